"""What a tier run as several replicas adds to the process tier (no Ray here: the Serve
module, :mod:`cascade.deploy.ray_serve`, hands these the replica's identity).

* :class:`ReplicaHeaderMiddleware`: every response names the replica that served it
  (``X-Cascade-Replica``), so an answer, a 409 or a ``/readyz`` body can be tied to the
  replica whose drift window, decision log file and metrics saw it.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["REPLICA_HEADER", "ReplicaHeaderMiddleware"]

REPLICA_HEADER: Final[str] = "X-Cascade-Replica"
"""Response header naming the replica that served the request (tiers run on Ray Serve)."""

ASGIApp = Any


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware adding ``X-Cascade-Replica: <replica>`` to every response."""

    def __init__(self, app: ASGIApp, *, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on; add the header to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
