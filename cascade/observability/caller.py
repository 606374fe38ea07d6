"""Who made a request, as span and log attributes: the verified client certificate's subject
(the ASGI TLS extension's ``client_cert_name``, set by the TLS server) and the *name* of the API
key it was admitted with (set by ``cascade.http.guard``). Never the key itself."""

from __future__ import annotations

from typing import Any, Final

CLIENT_KEY_SCOPE: Final[str] = "cascade.client_key"
"""ASGI scope key holding the name of the API key a request was admitted with."""

__all__ = ["CLIENT_KEY_SCOPE", "caller_attributes"]


def caller_attributes(scope: Any) -> dict[str, str]:
    """``tls.client.subject`` and ``cascade.client.key`` of a request, when known."""
    out: dict[str, str] = {}
    tls = scope.get("extensions", {}).get("tls")
    if tls and tls.get("client_cert_name"):
        out["tls.client.subject"] = tls["client_cert_name"]
    if CLIENT_KEY_SCOPE in scope:
        out["cascade.client.key"] = scope[CLIENT_KEY_SCOPE]
    return out
