"""The fault-level contract for a tier run on Ray Serve whose uplink fails: the same promises the
process tiers keep (``tests/fault/test_idempotency.py``, ``test_answer_contract.py``), checked
against the edge-server as a Serve application escalating over HTTP, through a fault proxy, to
a real cloud tier process.

- a duplicate of a request still in flight gets 409, and the first is computed once, here and
  upstream;
- with the uplink down the Serve tier answers provisionally and queues the escalation in its
  outbox; once the uplink is back its forwarder delivers it: the result turns final, answered by
  the cloud, computed once upstream, and the callback is delivered once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.fault.harness import (
    FAST_BREAKER,
    FAST_OUTBOX,
    LOOPBACK_CALLBACKS,
    CallbackReceiver,
    Tier,
    post,
    wait_for,
    write_policy,
)
from tests.fault.proxy import FaultProxy
from tests.ray.conftest import SERVE_KNOBS

pytestmark = [pytest.mark.integration, pytest.mark.ray]

APP, PREFIX = "edge-server-uplink", "/uplink"
INGRESS_CPUS = 0.1
"""The app is the ingress alone (models inside it): the session's Ray has 2 logical CPUs, and
the long-lived apps of other modules (conftest.py) hold most of them. This module is named to
run before ``replicated_cloud`` takes the rest; should it not fit, the fixture fails at once
instead of waiting in ``serve.run`` for replicas that can never be placed."""


@dataclass
class UplinkRig:
    """The Serve edge-server (``url``), its outbox file, the proxy on its uplink and the cloud
    process behind it."""

    url: str
    db: Path
    proxy: FaultProxy
    cloud: Tier

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, args).fetchall()

    def states(self) -> dict[str, str]:
        return dict(self.query("SELECT id, state FROM cascade_outbox"))

    def explain(self, what: str = "") -> str:
        """``what`` and the rig's state, for a failure message: a red run must be explainable
        from its log alone (the tier logs live in a temp dir pytest soon deletes)."""
        cloud = self.cloud.chain.tiers[0].process.poll() if self.cloud.chain else "stopped"
        rows = self.query("SELECT id, state, attempts, last_error FROM cascade_outbox")
        return (f"{what}\nproxy: mode={self.proxy.mode} {self.proxy.stats}\n"
                f"cloud process: {'running' if cloud is None else f'exited {cloud}'}\n"
                f"edge-server outbox: {rows}\ncloud log ends:\n{self.cloud.log()[-3000:]}")

    def wait_for(self, check: Any, timeout_s: float, what: str) -> Any:
        try:
            return wait_for(check, timeout_s=timeout_s, what=what)
        except AssertionError as exc:
            raise AssertionError(self.explain(str(exc))) from None


@pytest.fixture(scope="module")
def rig(serve_proxy: str, models_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[UplinkRig]:
    import ray
    from ray import serve

    from cascade.deploy.ray_serve import build_tier_app
    from cascade.tier.settings import load_node_settings

    tmp = tmp_path_factory.mktemp("uplink")
    policy = write_policy(tmp / "policy.yaml", escalating=("edge-server",))
    cloud = Tier(tmp / "processes", "cloud", models_dir, policy).start()
    proxy = FaultProxy(int(cloud.url.rsplit(":", 1)[1])).start()
    db = tmp / "edge-server.db"
    root = Path(__file__).resolve().parents[2]
    settings = load_node_settings(
        root / "edge_nodes/edge-server.yaml", models_dir=models_dir, policy=policy,
        outbox_url=f"sqlite:///{db}", upstream_url=proxy.url, outbox=FAST_OUTBOX,
        callbacks=LOOPBACK_CALLBACKS,
        ray_serve={**SERVE_KNOBS, "route_prefix": PREFIX, "model_deployments": False,
                   "ingress_num_cpus": INGRESS_CPUS},
        **FAST_BREAKER)
    try:
        free = ray.available_resources().get("CPU", 0.0)
        if free < INGRESS_CPUS:
            pytest.fail(f"the session's Ray has {free} CPU free, the app needs {INGRESS_CPUS}: "
                        "serve.run would wait forever for a replica it cannot place")
        serve.run(build_tier_app(settings), name=APP, route_prefix=PREFIX)
        url = f"{serve_proxy}{PREFIX}"
        wait_for(lambda: _ready(url), timeout_s=120, what="the Serve edge-server ready")
        yield UplinkRig(url, db, proxy, cloud)
    finally:
        serve.delete(APP)
        proxy.stop()
        cloud.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _computations(db_query: Any, key: str) -> list[tuple[Any, ...]]:
    return list(db_query("SELECT computations FROM cascade_results WHERE id = ?", key))


def test_a_duplicate_in_flight_on_a_serve_tier_gets_409_and_is_computed_once(
        rig: UplinkRig, hard_images: list[Any]) -> None:
    # A long deadline: the first request waits on the cut uplink until the test restores it.
    body = {"task": "vision", "input": {"image": hard_images[0]}, "deadline_ms": 60_000}
    swallowed = rig.proxy.stats["swallowed_bytes"]
    rig.proxy.set(mode="blackhole")
    try:
        with httpx.Client() as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, client, rig.url, body, "serve-busy-1", 90.0)
            # In flight for sure: the Serve tier sent it upstream, where the blackhole holds it.
            rig.wait_for(lambda: rig.proxy.stats["swallowed_bytes"] > swallowed, timeout_s=60,
                         what="the first request sent upstream")
            duplicate = post(client, rig.url, body, key="serve-busy-1")
            assert duplicate.status_code == 409, duplicate.text
            error = duplicate.json()["error"]
            assert (error["code"], error["field"]) == ("idempotency_in_flight",
                                                       "Idempotency-Key")
            assert not first.done()
            rig.proxy.set(mode="pass")  # resets the held connection; the retry gets through
            answer = first.result(90)
            assert answer.status_code == 200, rig.explain(answer.text)
            assert (answer.json()["status"], answer.json()["answered_by"]) == (
                "final", "cloud"), rig.explain(answer.text)
            after = post(client, rig.url, body, key="serve-busy-1")
            assert after.headers["Idempotent-Replayed"] == "true"
            assert after.json()["label"] == answer.json()["label"]
    finally:
        rig.proxy.set(mode="pass")
    assert _computations(rig.query, "serve-busy-1") == [(1,)]
    assert _computations(rig.cloud.query, "serve-busy-1") == [(1,)]


def test_a_serve_tier_with_its_uplink_down_answers_provisionally_and_delivers_later(
        rig: UplinkRig, hard_images: list[Any]) -> None:
    receiver = CallbackReceiver()
    try:
        with httpx.Client() as client:
            rig.proxy.set(mode="reset")  # the uplink refuses: the Serve tier queues
            keys = [f"serve-queued-{i}" for i in range(3)]
            for i, key in enumerate(keys):
                body = {"task": "vision", "input": {"image": hard_images[i + 1]},
                        "callback_url": receiver.url}
                queued = post(client, rig.url, body, key=key, timeout=30.0)
                assert queued.status_code == 200, queued.text
                answer = queued.json()
                assert (answer["status"], answer["answered_by"]) == ("provisional",
                                                                     "edge-server")
                assert answer["escalation"]["state"] == "queued"
                assert answer["escalation"]["held_by"] == "edge-server"
            assert all(rig.states()[k] in ("queued", "forwarding") for k in keys)
            assert receiver.received == []

            rig.proxy.set(mode="pass")
            rig.wait_for(lambda: all(rig.states().get(k) == "done" for k in keys), timeout_s=60,
                         what="every queued escalation delivered by the Serve tier's forwarder")
            for key in keys:
                done = client.get(f"{rig.url}/v1/results/{key}").json()
                assert (done["status"], done["answered_by"]) == ("final", "cloud")
                assert [h["tier"] for h in done["hops"]] == ["edge-server", "cloud"]
                assert _computations(rig.cloud.query, key) == [(1,)]
            rig.wait_for(lambda: len(receiver.received) >= len(keys), timeout_s=30,
                         what="every callback delivered")
            assert sorted(key for key, _ in receiver.received) == keys  # once each
    finally:
        rig.proxy.set(mode="pass")
        receiver.close()
