"""Who may call this tier: the API key check (tier 1's clients) and, on a TLS tier in ``api``
mode, the client certificate the tier-to-tier API requires (docs/security.md).

A pure ASGI middleware, inside the telemetry middleware (so refusals are in the access log and
``cascade_http_responses``) and before the body is read. It puts the caller's identity in the
scope for the SERVER span and the access line: ``cascade.client_key`` (the key's *name*) and
the ASGI TLS extension's ``client_cert_name`` (the certificate subject, set by the server
protocol). Refusals are the contract's error body; the key itself is never repeated.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from cascade.errors import CascadeError, Forbidden, TooManyRequests, Unauthenticated
from cascade.http.responses import error_response
from cascade.observability.caller import CLIENT_KEY_SCOPE
from cascade.trust import TierTrust
from cascade.trust.keys import Refusal, presented_key, route_group

__all__ = ["CLIENT_KEY_SCOPE", "CallerGuardMiddleware", "client_cert_name"]


def client_cert_name(scope: Scope) -> str | None:
    """The verified client certificate's subject the server put in the scope, if any."""
    tls = scope.get("extensions", {}).get("tls")
    return tls.get("client_cert_name") if tls else None


def _error(refusal: Refusal) -> CascadeError:
    if refusal.status == 401:
        return Unauthenticated(refusal.message, code=refusal.code)
    if refusal.status == 403:
        return Forbidden(refusal.message, code=refusal.code)
    return TooManyRequests(refusal.message, code=refusal.code, retry_after_s=refusal.retry_after_s)


class CallerGuardMiddleware:
    """Refuses callers the tier's trust settings do not admit (401, 403, 429)."""

    def __init__(self, app: ASGIApp, *, trust: Callable[[], TierTrust | None]) -> None:
        self.app = app
        self._trust = trust

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trust = self._trust() if scope["type"] == "http" else None
        if trust is None:
            await self.app(scope, receive, send)
            return
        group = route_group(scope["path"])
        tls = trust.tls
        if (group == "api" and tls is not None and tls.settings.client_cert == "api"
                and client_cert_name(scope) is None):
            tls.refusals["no_certificate"] += 1
            await self._refuse(Unauthenticated(
                "this tier's API is for the tiers of this site: connect with a client "
                "certificate issued by the site CA", code="client_certificate_required"),
                scope, receive, send)
            return
        if trust.keys.protected:
            headers: dict[bytes, bytes] = dict(scope["headers"])
            name, refusal = trust.keys.check(group, presented_key(headers))
            if name is not None:
                scope[CLIENT_KEY_SCOPE] = name
            if refusal is not None:
                await self._refuse(_error(refusal), scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(error: CascadeError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(error)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="cascade"'
        await response(scope, receive, send)

