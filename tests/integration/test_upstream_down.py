"""A tier whose upstream is dead or silent still answers with its own model's label,
provisionally, once the escalation it owes is in its outbox; a silent one is given up on at the
request's deadline."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import Chain
from cascade.lab.evaluation import predict_split
from tests.conftest import free_port_block
from tests.fault.harness import default_policy_copy, wait_for

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
def hard_vision(models_dir) -> tuple[dict, str, float]:
    """The vision test sample the endpoint is least sure of: its body, and the endpoint's own
    label and calibrated confidence for it (what the tier must answer on its own)."""
    from cascade.models.manifest import load_split
    from cascade.policy import load_policy

    inputs, _ = load_split(models_dir, "vision", "test")
    _, preds = predict_split(models_dir, "vision", ["endpoint"], "test")
    i = int(np.argmin(preds["endpoint"].confidences("max_prob")))
    rule = load_policy(ROOT / "policies/default.yaml").rule("vision", "endpoint")
    conf = float(preds["endpoint"].confidences(rule)[i])
    return request_body("vision", inputs[i]), preds["endpoint"].predicted[i], conf


@pytest.fixture(scope="module")
def hard_vision_body(hard_vision) -> dict:
    return hard_vision[0]


def _endpoint(models_dir: Path, tmp: Path, upstream: str, policy: Path | None = None) -> Chain:
    # The shipped policy, its decision log in tmp (not the repository's var/).
    policy = policy or default_policy_copy(tmp / "policy.yaml")
    env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy),
           "CASCADE_BREAKER_FAILURE_THRESHOLD": "2", "CASCADE_BREAKER_RESET_S": "30"}
    return Chain([ROOT / "edge_nodes/endpoint.yaml"], base_port=free_port_block(1), env=env,
                 log_dir=tmp / "logs", state_dir=tmp, top_upstream_url=upstream)


def assert_provisional_with_the_local_answer(data: dict, label: str, conf: float) -> None:
    """The endpoint's own answer, provisional, its escalation committed to the outbox."""
    assert (data["status"], data["answered_by"]) == ("provisional", "endpoint")
    assert [(h["tier"], h["decision"], h["label"]) for h in data["hops"]] == [
        ("endpoint", "escalate", label)]
    assert data["label"] == label
    assert data["confidence"] == data["hops"][0]["confidence"] == pytest.approx(conf, abs=1e-6)
    assert data["escalation"]["state"] == "queued"
    assert data["escalation"]["held_by"] == "endpoint"


def outbox_rows(tmp: Path) -> dict[str, str]:
    conn = sqlite3.connect(tmp / "endpoint.db", timeout=10)
    try:
        return dict(conn.execute("SELECT id, state FROM cascade_outbox").fetchall())
    finally:
        conn.close()


def test_dead_upstream_gives_provisional_and_the_breaker_opens(models_dir, tmp_path, hard_vision):
    body, label, conf = hard_vision
    dead_port = free_port_block(1)  # nothing listens there: connection refused
    with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{dead_port}") as chain:
        ids = []
        for _ in range(3):
            r = httpx.post(f"{chain.entry_url}/v1/infer", json=body, timeout=10)
            assert r.status_code == 200, r.text
            assert_provisional_with_the_local_answer(r.json(), label, conf)
            ids.append(r.json()["id"])
        ready = httpx.get(f"{chain.entry_url}/readyz").json()
        assert ready["upstream"]["breaker"] == "open"
        assert ready["queue_depth"] == 3
        # Every escalation is in the outbox, still owed (the forwarder may be trying one).
        rows = outbox_rows(tmp_path)
        assert set(rows) == set(ids) and set(rows.values()) <= {"queued", "forwarding"}
        for id_ in ids:
            kept = httpx.get(f"{chain.entry_url}/v1/results/{id_}").json()
            assert (kept["status"], kept["label"]) == ("provisional", label)


def test_silent_upstream_is_given_up_on_at_the_deadline(models_dir, tmp_path, hard_vision):
    body, label, conf = hard_vision
    hole = Blackhole()
    try:
        with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{hole.port}") as chain:
            r = httpx.post(f"{chain.entry_url}/v1/infer", json={**body, "deadline_ms": 400},
                           timeout=10)
            assert r.status_code == 200, r.text
            data = r.json()
            assert_provisional_with_the_local_answer(data, label, conf)
            # Sent, then waited for only what was left of the 400 ms (no second attempt fits);
            # how long that takes in wall-clock time is the benchmark's business.
            reason = data["escalation"]["reason"]
            assert "unavailable after 1 attempt(s) (deadline reached)" in reason, reason
            budget = re.search(r"last error: no answer within the remaining (\d+) ms$", reason)
            assert budget is not None and 0 < int(budget[1]) <= 400, reason
            wait_for(lambda: hole.conns, timeout_s=10, what="the upstream connection accepted")
            assert set(outbox_rows(tmp_path)) == {data["id"]}
    finally:
        hole.close()


def test_offline_reject_policy_refuses_with_503(models_dir, tmp_path, hard_vision_body):
    text = default_policy_copy(tmp_path / "default.yaml").read_text().replace(
        "offline: provisional", "offline: reject"
    )
    assert text.count("offline: reject") == 2
    policy = tmp_path / "reject.yaml"
    policy.write_text(text)
    dead_port = free_port_block(1)
    with _endpoint(models_dir, tmp_path, f"http://127.0.0.1:{dead_port}", policy) as chain:
        r = httpx.post(f"{chain.entry_url}/v1/infer", json=hard_vision_body, timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "upstream_unavailable"
