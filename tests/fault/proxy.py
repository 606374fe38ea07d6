"""A small asyncio TCP fault proxy for tests: sits between two tiers on 127.0.0.1.

Runs its own event loop in a daemon thread, so synchronous tests can switch faults while real
tier processes talk through it::

    proxy = FaultProxy(target_port).start()
    proxy.set(mode="blackhole")        # accept, swallow, never answer (a cut uplink)
    proxy.set(mode="reset")            # RST every connection, new and existing
    proxy.set(mode="pass", delay_ms=50, bandwidth_bps=20_000)
    proxy.drop_responses(1)            # the upstream's next reply is swallowed after it was
                                       # computed, and the client connection reset
    proxy.stop()

Connections that lost bytes to a blackhole are reset when the mode changes again: after an
outage, half-sent HTTP exchanges are dead, as they would be on a real link.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["pass", "blackhole", "reset"]
_CHUNK = 16 * 1024


@dataclass(eq=False)  # identity hashing: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallowed: bool = False
    cut: bool = False  # accepted while the link was down: it never gets an upstream
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees 'connection reset'."""
    if writer is None or writer.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """TCP proxy 127.0.0.1:``port`` → 127.0.0.1:``target_port`` with switchable faults."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.bandwidth_bps: float | None = None
        self._drop = 0
        self.stats = {"connections": 0, "resets": 0, "dropped_responses": 0,
                      "bytes_up": 0, "bytes_down": 0, "swallowed_bytes": 0}
        self._conns: set[_Conn] = set()  # type: ignore[misc]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    # -- control (any thread) -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start_server())
        return self

    def stop(self) -> None:
        self._call(self._stop_server())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode | None = None, *, delay_ms: float | None = None,
            bandwidth_bps: float | None | Literal["unchanged"] = "unchanged") -> None:
        """Switch faults; takes effect for new and existing connections."""
        self._call(self._set(mode, delay_ms, bandwidth_bps))

    def drop_responses(self, n: int) -> None:
        """Swallow the next ``n`` replies coming back from the target (and reset their client)."""
        self._call(self._set_drop(n))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- inside the proxy's loop ----------------------------------------------------------------

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_server(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._kill(conn)
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _set(self, mode: Mode | None, delay_ms: float | None, bandwidth: Any) -> None:
        if delay_ms is not None:
            self.delay_s = delay_ms / 1000.0
        if bandwidth != "unchanged":
            self.bandwidth_bps = bandwidth
        if mode is not None and mode != self.mode:
            self.mode = mode
            for conn in list(self._conns):
                # A connection that lost bytes, or was accepted while the link was down
                # (so it has no upstream), cannot carry traffic again: reset it, so its
                # client retries on a new one instead of waiting for its own timeout.
                if mode == "reset" or conn.swallowed or conn.cut:
                    self._kill(conn)

    async def _set_drop(self, n: int) -> None:
        self._drop = n

    def _kill(self, conn: _Conn) -> None:
        self.stats["resets"] += 1
        _abort(conn.client)
        _abort(conn.upstream)
        self._conns.discard(conn)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        conn = _Conn(writer)
        if self.mode == "reset":
            self.stats["resets"] += 1
            _abort(writer)
            return
        conn.cut = self.mode != "pass"
        self._conns.add(conn)
        try:
            up_reader: asyncio.StreamReader | None = None
            if self.mode == "pass":
                try:
                    up_reader, conn.upstream = await asyncio.open_connection(*self.target)
                except OSError:
                    self._kill(conn)
                    return
            await self._pipe_client(conn, reader, up_reader)
        finally:
            self._conns.discard(conn)

    async def _pipe_client(self, conn: _Conn, reader: asyncio.StreamReader,
                           up_reader: asyncio.StreamReader | None) -> None:
        down: asyncio.Task[None] | None = None
        if up_reader is not None:
            down = asyncio.create_task(self._pipe_down(conn, up_reader))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.mode != "pass" or conn.upstream is None:
                    conn.swallowed = True
                    self.stats["swallowed_bytes"] += len(data)
                    continue
                await self._shape(len(data))
                self.stats["bytes_up"] += len(data)
                conn.upstream.write(data)
                await conn.upstream.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if down is not None:
                if conn.upstream is not None and not conn.upstream.is_closing():
                    conn.upstream.close()
                await asyncio.gather(down, return_exceptions=True)
            if not writer_closed(conn.client):
                conn.client.close()

    async def _pipe_down(self, conn: _Conn, up_reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await up_reader.read(_CHUNK)
                if not data:
                    break
                if self._drop > 0:  # the target computed and answered; the answer is lost
                    self._drop -= 1
                    self.stats["dropped_responses"] += 1
                    self._kill(conn)
                    return
                if self.mode != "pass":
                    conn.swallowed = True
                    self.stats["swallowed_bytes"] += len(data)
                    continue
                await self._shape(len(data))
                self.stats["bytes_down"] += len(data)
                conn.client.write(data)
                await conn.client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not writer_closed(conn.client):
                conn.client.close()

    async def _shape(self, nbytes: int) -> None:
        wait = self.delay_s
        if self.bandwidth_bps:
            wait += nbytes / self.bandwidth_bps
        if wait > 0:
            await asyncio.sleep(wait)


def writer_closed(writer: asyncio.StreamWriter) -> bool:
    return writer.is_closing()
