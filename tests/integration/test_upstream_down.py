"""A tier whose upstream is dead or silent still answers, provisionally, within the deadline."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import Chain
from cascade.lab.evaluation import predict_split
from tests.conftest import free_port_block

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class Blackhole:
    """A TCP server that accepts connections and never answers (a hung upstream)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def hard_vision_body(models_dir):
    from cascade.models.manifest import load_split

    inputs, _ = load_split(models_dir, "vision", "test")
    _, preds = predict_split(models_dir, "vision", ["endpoint"], "test")
    i = int(np.argmin(preds["endpoint"].confidences("max_prob")))
    return request_body("vision", inputs[i])


def _endpoint(models_dir: Path, tmp: Path, upstream: str, policy: Path | None = None) -> Chain:
    env = {"CASCADE_MODELS_DIR": str(models_dir),
           "CASCADE_POLICY": str(policy or ROOT / "policies/default.yaml"),
           "CASCADE_BREAKER_FAILURE_THRESHOLD": "2", "CASCADE_BREAKER_RESET_S": "30"}
    return Chain([ROOT / "edge_nodes/endpoint.yaml"], base_port=free_port_block(1), env=env,
                 log_dir=tmp / "logs", state_dir=tmp, top_upstream_url=upstream)


def test_dead_upstream_gives_provisional_and_the_breaker_opens(models_dir, tmp_path, hard_vision_body):
    dead_port = free_port_block(1)  # nothing listens there: connection refused
    with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{dead_port}") as chain:
        for _ in range(3):
            r = httpx.post(f"{chain.entry_url}/v1/infer", json=hard_vision_body, timeout=10)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["status"] == "provisional"
            assert data["answered_by"] == "endpoint"
            assert [h["decision"] for h in data["hops"]] == ["escalate"]
            assert data["label"] is not None
            assert data["escalation"]["state"] in ("queued", "not_queued")
        ready = httpx.get(f"{chain.entry_url}/readyz").json()
        assert ready["upstream"]["breaker"] == "open"


def test_silent_upstream_gives_provisional_within_the_deadline(models_dir, tmp_path, hard_vision_body):
    hole = Blackhole()
    try:
        with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{hole.port}") as chain:
            body = {**hard_vision_body, "deadline_ms": 400}
            started = time.monotonic()
            r = httpx.post(f"{chain.entry_url}/v1/infer", json=body, timeout=10)
            elapsed_ms = (time.monotonic() - started) * 1000
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "provisional"
            # The contract: the answer comes back within the request's deadline (+ transport slack).
            assert elapsed_ms < 400 + 300, elapsed_ms
            assert hole.conns, "the tier never tried the upstream"
    finally:
        hole.close()


def test_offline_reject_policy_refuses_with_503(models_dir, tmp_path, hard_vision_body):
    text = (ROOT / "policies/default.yaml").read_text().replace(
        "offline: provisional", "offline: reject"
    )
    assert "offline: reject" in text
    policy = tmp_path / "reject.yaml"
    policy.write_text(text)
    dead_port = free_port_block(1)
    with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{dead_port}", policy) as chain:
        r = httpx.post(f"{chain.entry_url}/v1/infer", json=hard_vision_body, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
