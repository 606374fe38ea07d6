"""Serving a tier over TLS with uvicorn: the listening context (reloadable, counting refused
handshakes: :class:`cascade.trust.TierTls`) and an HTTP protocol that puts the caller's
verified certificate subject in each request's scope (the ASGI TLS extension's
``client_cert_name``), read once per connection, not per request."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cascade.trust import TierTls
from cascade.trust.tls import peer_subject

__all__ = ["CallerAwareHttpToolsProtocol", "uvicorn_tls_options"]


class CallerAwareHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus ``scope["extensions"]["tls"]`` on a TLS connection."""

    _tls_extension: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls_extension = {"client_cert_name": peer_subject(ssl_object),
                                   "tls_version": ssl_object.version()}

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls_extension is not None:
            self.scope["extensions"] = {"tls": self._tls_extension}  # type: ignore[dict-item]


def uvicorn_tls_options(tls: TierTls) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` that serve with ``tls``'s listening context."""

    def factory(_config: Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return tls.server_context()

    return {"ssl_context_factory": factory, "http": CallerAwareHttpToolsProtocol}
