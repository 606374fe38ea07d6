"""Hot reload while requests flow: a valid policy goes live on every tier, an invalid one is
refused (old policy kept, error names file and key, counted), and no request fails.

How fast a change goes live is a timing, not a pass/fail property: the test records it (the
``reload_s`` property in the JUnit XML) and waits for it with a generous timeout."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from cascade.policy import load_policy_bytes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TWO_TIERS = [ROOT / "edge_nodes/endpoint.yaml", ROOT / "cloud/cloud.yaml"]
DOC = {"task": "documents", "input": {"text": "Shares rose after the central bank cut rates"}}


def policy(endpoint_threshold: float, *, key: str = "threshold", name: str = "reload") -> str:
    tiers = f"endpoint: {{{key}: {endpoint_threshold}}}\n      cloud: {{threshold: 0.0}}"
    return (f"version: 1\nname: {name}\ntasks:\n"
            f"  documents:\n    offline: provisional\n    tiers:\n      {tiers}\n"
            f"  vision:\n    tiers:\n      {tiers}\n")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Traffic(threading.Thread):
    """Requests in a loop until stopped; keeps every status code and which tier answered."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.results = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/infer", json=DOC)
                    self.results.append((r.status_code, r.json().get("answered_by")))
                except httpx.HTTPError as exc:  # a transport failure is a failed request too
                    self.results.append((repr(exc), None))


def ready(url: str) -> dict:
    return httpx.get(f"{url}/readyz", timeout=5).json()


def wait_for(predicate, timeout_s: float) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def chain(models_dir, tmp_path_factory):
    from cascade.deploy.supervisor import Chain
    from tests.conftest import free_port_block

    var = tmp_path_factory.mktemp("reload")
    policy_path = var / "policy.yaml"
    policy_path.write_text(policy(0.0))
    env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy_path)}
    with Chain(TWO_TIERS, base_port=free_port_block(2), env=env, log_dir=var / "logs",
               state_dir=var) as running:
        yield running, policy_path


def test_valid_then_invalid_policy_while_requests_flow(chain, record_property):
    running, path = chain
    entry = running.entry_url
    v1 = load_policy_bytes(policy(0.0).encode(), source=str(path)).version
    assert ready(entry)["policy"]["version"] == v1
    traffic = Traffic(entry)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.results) >= 20, 10)
        assert {who for _, who in traffic.results} == {"endpoint"}  # threshold 0: answer all

        # A valid change: the endpoint now escalates everything (confidence < 1.0).
        text = policy(1.0)
        v2 = load_policy_bytes(text.encode(), source=str(path)).version
        write_atomically(path, text)
        took = wait_for(lambda: all(ready(t.url)["policy"]["version"] == v2 for t in running.tiers), 15)
        record_property("reload_s", round(took, 3))
        n = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= n + 20, 10)
        assert {who for _, who in traffic.results[n + 2:]} == {"cloud"}

        # An invalid change (a typo) written in place: refused, v2 stays, error names file+key.
        path.write_text(policy(0.5, key="treshold"))
        wait_for(lambda: ready(entry)["policy"]["reload"]["errors"] >= 1, 15)
        state = ready(entry)["policy"]
        assert state["version"] == v2
        assert str(path) in state["reload"]["last_error"]
        assert "tasks.documents.tiers.endpoint.treshold" in state["reload"]["last_error"]

        # A file that no longer covers this tier is refused too.
        errors = state["reload"]["errors"]
        write_atomically(path, policy(0.5).replace("endpoint: {threshold: 0.5}\n      ", ""))
        wait_for(lambda: ready(entry)["policy"]["reload"]["errors"] > errors, 15)
        assert ".tiers.endpoint: missing" in ready(entry)["policy"]["reload"]["last_error"]
        assert ready(entry)["policy"]["version"] == v2

        n = len(traffic.results)
        wait_for(lambda: len(traffic.results) >= n + 20, 10)
    finally:
        traffic.stop.set()
        traffic.join(10)
    failed = [code for code, _ in traffic.results if code != 200]
    assert not failed, f"{len(failed)} of {len(traffic.results)} requests failed: {failed[:3]}"
    assert {who for _, who in traffic.results[-10:]} == {"cloud"}  # still v2
    metrics = httpx.get(f"{entry}/metrics", timeout=5).text
    assert 'cascade_policy_reloads_total{outcome="applied",tier="endpoint"} 1.0' in metrics
    # An in-place write can be seen half-written (one more refusal): count what /readyz counted.
    rejected = ready(entry)["policy"]["reload"]["errors"]
    assert rejected >= 2
    assert f'cascade_policy_reloads_total{{outcome="rejected",tier="endpoint"}} {rejected:.1f}' in metrics


def test_sighup_does_not_stop_a_tier_and_the_change_goes_live(chain):
    """SIGHUP beside the file watcher (either may apply the change first; that SIGHUP alone
    re-reads the file is proved by tests/integration/test_hot_reload_signals.py, where the
    watcher cannot see the change)."""
    import signal

    running, path = chain
    text = policy(0.25, name="via-sighup")
    version = load_policy_bytes(text.encode(), source=str(path)).version
    write_atomically(path, text)
    for t in running.tiers:
        os.kill(t.pid, signal.SIGHUP)  # the watcher may win the race; either way it is applied
    wait_for(lambda: all(ready(t.url)["policy"]["version"] == version for t in running.tiers), 30)
    for t in running.tiers:
        assert t.process.poll() is None  # SIGHUP did not kill the tier
