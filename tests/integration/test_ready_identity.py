"""A supervisor counts only its own tier process ready (``cascade up``, ``Chain``): another
process answering ``/readyz`` 200 on the tier's port (a second chain, a tier left running) is
not it. The tier started there fails to bind and exits; the start must fail saying so, not
report the chain ready while requests reach someone else. The same holds for a restarted tier.

Real processes: a tier process on a port that a plain HTTP server on 127.0.0.1 already holds
and answers like a ready tier.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cascade.deploy.supervisor import _answers_ready
from tests.conftest import free_port_block
from tests.fault.harness import Tier, write_policy

pytestmark = pytest.mark.integration


class ReadyImpostor:
    """An HTTP server on 127.0.0.1 answering every GET 200 with a ready tier's ``/readyz``."""

    def __init__(self, instance: str | None = "someone-else") -> None:
        body = json.dumps({"tier": "cloud", "instance": instance, "ready": True}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def impostor() -> Iterator[ReadyImpostor]:
    server = ReadyImpostor()
    try:
        yield server
    finally:
        server.close()


def test_a_tier_whose_port_another_process_answers_is_not_counted_ready(
        impostor: ReadyImpostor, models_dir: Path, tmp_path: Path) -> None:
    cloud = Tier(tmp_path, "cloud", models_dir, write_policy(tmp_path / "policy.yaml"))
    with pytest.raises(RuntimeError) as failed:
        cloud.start(port=impostor.port)  # before: "ready", though the tier itself had died
    message = str(failed.value)
    assert f"tier at {impostor.url} exited with code" in message, message
    assert "its port was answered by another process: tier cloud (instance someone-else)" \
        in message, message
    assert "address already in use" in message, message  # the tier's own log says why


def test_a_restarted_tier_is_ready_only_when_it_answers_itself(
        impostor: ReadyImpostor) -> None:
    # The supervisor's check for a restarted tier (Chain.supervise), on the same impostor.
    assert not _answers_ready(impostor.url, instance="the-restarted-one")
    assert _answers_ready(impostor.url, instance="someone-else")
    assert _answers_ready(impostor.url)  # no token to check (e.g. the bench's echo server)
