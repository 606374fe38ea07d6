"""The fault proxy itself, against a tiny echo server: each fault does what it says."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fault.harness import wait_for
from tests.fault.proxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.server.seen += len(data)  # type: ignore[attr-defined]
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    server.seen = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    p = FaultProxy(server.server_address[1]).start()
    p.echo = server  # type: ignore[attr-defined]
    yield p
    p.stop()
    server.shutdown()
    server.server_close()


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(4096)


def test_pass_delay_and_bandwidth(proxy):
    assert roundtrip(proxy.port) == b"ping"
    proxy.set(delay_ms=100)
    started = time.monotonic()
    assert roundtrip(proxy.port) == b"ping"
    assert time.monotonic() - started >= 0.2  # delayed both ways
    proxy.set(delay_ms=0, bandwidth_bps=2000)
    started = time.monotonic()
    assert roundtrip(proxy.port, b"x" * 400) == b"x" * 400
    assert time.monotonic() - started >= 0.35  # 400 B up and down at 2000 B/s


def test_blackhole_swallows_and_reset_refuses(proxy):
    proxy.set(mode="blackhole")
    with pytest.raises(socket.timeout):
        roundtrip(proxy.port, timeout=0.3)
    assert proxy.stats["swallowed_bytes"] >= 4
    proxy.set(mode="reset")
    with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        roundtrip(proxy.port)
    proxy.set(mode="pass")
    assert roundtrip(proxy.port) == b"ping"


def test_a_connection_opened_while_cut_is_reset_when_the_link_returns(proxy):
    # A client that connected during the cut and has sent nothing yet has no upstream.
    # Were it kept open after the link comes back, its request would be swallowed
    # until its own timeout; it must be reset so the client retries on a new one.
    proxy.set(mode="blackhole")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5.0) as s:
        wait_for(lambda: proxy.stats["connections"] == 1, timeout_s=10.0,
                 what="the proxy accepted the connection")
        proxy.set(mode="pass")
        with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            s.sendall(b"ping")
            if not s.recv(4096):
                raise ConnectionAbortedError("closed")
    assert proxy.stats["swallowed_bytes"] == 0
    assert roundtrip(proxy.port) == b"ping"


def test_drop_response_after_the_target_processed_it(proxy):
    proxy.drop_responses(1)
    with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
        got = roundtrip(proxy.port, b"lost")
        if got == b"":  # some kernels report the RST as EOF first
            raise ConnectionResetError
    assert proxy.echo.seen >= 4 and proxy.stats["dropped_responses"] == 1
    assert roundtrip(proxy.port) == b"ping"
