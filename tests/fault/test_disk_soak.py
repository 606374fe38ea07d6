"""A short soak of the four tiers under steady load with a tiny disk budget (issue 16).

Real tier processes on 127.0.0.1 (endpoint → fault proxy → edge-node → edge-server → cloud),
each with ``disk: {budget_mb: 3}`` (results 1.5 MiB, decision log 0.3, logs 0.45, traces 0.6)
and a 2 s idempotency window; keyed load runs in 20 s rounds until the endpoint's results share
was filled three times over. (At 1 MiB a burst of commits while readers keep the WAL busy can
outgrow the WAL's allowance, an eighth of the share, before it is emptied.) Before the load the
endpoint is left owing work that must survive it: final answers whose callbacks could not be
delivered yet (the receiver refuses them). During the load:

* every request gets a 200, every ``/v1/results`` lookup and every replay with the same key
  inside the idempotency window gets the same answer;
* every store of every tier, read from its files on disk, stays within its share;

afterwards the owed callbacks are exactly the ones owed before (none evicted) and are delivered
once the receiver is back, and an offline backlog queued behind a cut uplink is drained.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.observability.disk import DiskSettings
from tests.fault.harness import (
    LOOPBACK_CALLBACKS,
    CallbackReceiver,
    Tier,
    default_policy_copy,
    metric,
    post,
    scrape,
    wait_for,
)

pytestmark = pytest.mark.integration

DISK = {"budget_mb": 3, "idempotency_window_s": 2}
SHARES = DiskSettings(**DISK).shares()
SOAK_ROUND_S = 20.0
SOAK_ROUNDS = 20  # an upper bound: the soak stops once the stores were filled
OWED_CALLBACKS = 12


def _store_bytes(tier: Tier, policy_dir: Path, trace_dir: Path) -> dict[str, int]:
    """What each store of ``tier`` takes on disk now, read from its files."""
    def family(base: Path) -> int:
        total = 0
        for path in base.parent.glob(base.name + "*"):
            try:
                total += path.stat().st_size
            except OSError:  # rotated or checkpointed away while we looked
                pass
        return total

    return {"results": family(tier.db), "logs": family(tier.dir / "logs" / f"{tier.tier}.log"),
            "decisions": family(policy_dir / f"decisions-{tier.tier}.db"),
            "traces": family(trace_dir / f"{tier.tier}.jsonl")}


def _sizes(db: Path) -> dict[str, int]:
    """Each file of a SQLite database (file, WAL, shared memory) and its size."""
    out = {}
    for path in db.parent.glob(db.name + "*"):
        try:
            out[path.name] = path.stat().st_size
        except OSError:
            pass
    return out


class _Watcher(threading.Thread):
    """Samples every store of every tier until stopped; keeps the largest size seen."""

    def __init__(self, tiers: list[Tier], policy_dir: Path, trace_dir: Path) -> None:
        super().__init__(daemon=True)
        self.tiers, self.policy_dir, self.trace_dir = tiers, policy_dir, trace_dir
        self.peak: dict[tuple[str, str], int] = {}
        self.at_peak: dict[tuple[str, str], dict[str, int]] = {}  # files then (diagnostics)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.25):
            for t in self.tiers:
                for store, size in _store_bytes(t, self.policy_dir, self.trace_dir).items():
                    key = (t.tier, store)
                    if size > self.peak.get(key, 0):
                        self.peak[key] = size
                        if store == "results":
                            self.at_peak[key] = _sizes(t.db)


async def _soak(url: str, bodies: list[dict[str, Any]], seconds: float,
                round_no: int) -> dict[str, Any]:
    """Keyed load from 16 connections (keys new in each round); after some answers, look them
    up and replay them."""
    stats: dict[str, Any] = {"codes": {}, "lookups": 0, "replays": 0, "mismatches": []}
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:

        async def worker(w: int) -> None:
            rng = random.Random(w)
            i = 0
            while time.monotonic() < stop_at:
                key, body = f"soak-{round_no}-{w}-{i}", rng.choice(bodies)
                i += 1
                r = await client.post(f"{url}/v1/infer", json=body,
                                      headers={"Idempotency-Key": key})
                stats["codes"][r.status_code] = stats["codes"].get(r.status_code, 0) + 1
                if r.status_code != 200 or i % 25:
                    continue
                answer = r.json()
                got = await client.get(f"{url}/v1/results/{key}")
                again = await client.post(f"{url}/v1/infer", json=body,
                                          headers={"Idempotency-Key": key})
                stats["lookups"] += 1
                stats["replays"] += 1
                if (got.status_code != 200 or got.json()["label"] != answer["label"]
                        or again.headers.get("Idempotent-Replayed") != "true"
                        or again.json()["id"] != answer["id"]):
                    stats["mismatches"].append((key, got.status_code, again.status_code))

        await asyncio.gather(*(worker(w) for w in range(16)))
    return stats


def _evictions(samples: dict[Any, float], store: str, reason: str) -> float:
    """The endpoint's evictions from ``store`` so far; 0 before its first (no series yet)."""
    labels = {"tier": "endpoint", "store": store, "reason": reason}
    return samples.get(("cascade_disk_evictions_total", frozenset(labels.items())), 0.0)


def _filled(endpoint: Tier) -> bool:
    """The endpoint's results share was filled three times over (more answers evicted than
    twice those it holds) and its log file rotated at least twice."""
    samples = scrape(endpoint.url)
    held = endpoint.query("SELECT count(*) FROM cascade_results")[0][0]
    return (_evictions(samples, "results", "budget") > 2 * held
            and _evictions(samples, "logs", "rotation") >= 2)


def _soak_until_filled(endpoint: Tier, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of load until the endpoint's stores were filled (:func:`_filled`), at most
    ``SOAK_ROUNDS`` rounds: a loaded machine answers fewer requests per round, so the rounds,
    not the bar, adapt."""
    total: dict[str, Any] = {"codes": {}, "lookups": 0, "replays": 0, "mismatches": []}
    for round_no in range(SOAK_ROUNDS):
        stats = asyncio.run(_soak(endpoint.url, bodies, SOAK_ROUND_S, round_no))
        for code, n in stats["codes"].items():
            total["codes"][code] = total["codes"].get(code, 0) + n
        for key in ("lookups", "replays", "mismatches"):
            total[key] += stats[key]
        if _filled(endpoint):
            break
    return total


def _cut_and_queue(client: httpx.Client, proxy: Any, endpoint: Tier, hard: list[Any],
                   prefix: str, n: int, callback_url: str | None = None) -> set[str]:
    """With the uplink cut, have the endpoint queue ``n`` hard requests; returns their keys."""
    proxy.set(mode="reset")
    keys = set()
    for i in range(n):
        body: dict[str, Any] = {"task": "vision", "input": {"image": hard[i]}}
        if callback_url:
            body["callback_url"] = callback_url
        r = post(client, endpoint.url, body, key=f"{prefix}{i}")
        assert r.status_code == 200 and r.json()["status"] == "provisional", r.text
        keys.add(f"{prefix}{i}")
    return keys


def _owed_work_survived(endpoint: Tier, owed: set[str],
                        receiver: CallbackReceiver) -> CallbackReceiver:
    """The callbacks owed before the soak are exactly those owed after it (none evicted), with
    their final answers; once the client's receiver is back they are delivered. Returns it."""
    assert dict(endpoint.query("SELECT id, state FROM cascade_callbacks")) == \
        dict.fromkeys(owed, "pending")
    finals = dict(endpoint.query("SELECT id, response FROM cascade_results WHERE id LIKE "
                                 "'owed-%'"))
    assert set(finals) == owed and all('"final"' in v for v in finals.values())
    port = int(receiver.url.split(":")[2].split("/")[0])
    receiver.close()
    back = CallbackReceiver(port=port)
    wait_for(lambda: {k for k, _ in back.received} >= owed, 60, "owed callbacks")
    return back


def test_small_budget_soak_keeps_every_store_within_its_share(
        tmp_path: Path, models_dir: Path, hard_images: list[Any], proxy_to: Any) -> None:
    policy = default_policy_copy(tmp_path / "policy.yaml")
    trace_dir = tmp_path / "traces"
    knobs: dict[str, Any] = {"disk": DISK, "trace_dir": str(trace_dir),
                             "callbacks": LOOPBACK_CALLBACKS}
    made: list[Tier] = []
    receiver = CallbackReceiver(fail_first=10**9)  # refuses every callback for now
    try:
        up = None
        for name in ("cloud", "edge-server", "edge-node", "endpoint"):
            outbox = {"callback_max_attempts": 1000, "callback_retry_initial_s": 1,
                      "callback_retry_max_s": 2}
            tier = Tier(tmp_path, name, models_dir, policy, upstream=up, outbox=outbox, **knobs)
            made.append(tier.start())
            up = tier.url
            if name == "edge-node":
                proxy = proxy_to(tier.url)
                up = proxy.url
        endpoint = made[-1]
        with httpx.Client() as client:
            owed = _cut_and_queue(client, proxy, endpoint, hard_images, "owed-", OWED_CALLBACKS,
                                  callback_url=receiver.url)
            proxy.set(mode="pass")
            wait_for(lambda: dict(endpoint.query(
                "SELECT id, state FROM cascade_callbacks")) == dict.fromkeys(owed, "pending")
                and set(endpoint.states().values()) == {"done"}, 60, "owed callbacks armed")

        from cascade.contract.inputs import image_grid, request_body
        from cascade.models.manifest import load_split

        easy, _ = load_split(models_dir, "vision", "test")
        docs, _ = load_split(models_dir, "documents", "test")
        bodies = ([{"task": "vision", "input": {"image": image_grid(x)}} for x in easy[:60]]
                  + [{"task": "vision", "input": {"image": g}} for g in hard_images[:20]]
                  + [request_body("documents", d[:1500]) for d in docs[:40]])
        watcher = _Watcher(made, tmp_path, trace_dir)
        watcher.start()
        stats = _soak_until_filled(endpoint, bodies)
        watcher.stop_event.set()
        watcher.join()

        answered = stats["codes"].get(200, 0)
        assert stats["codes"] == {200: answered} and answered > 1000, stats["codes"]
        assert stats["lookups"] > 50 and stats["mismatches"] == [], stats["mismatches"][:5]
        over = {k: (v, SHARES[k[1]]) for k, v in watcher.peak.items() if v > SHARES[k[1]]}
        assert over == {}, (f"stores past their share (peak, share): {over}; results files at "
                            f"their peak: {watcher.at_peak}")
        samples = scrape(endpoint.url)
        held = endpoint.query("SELECT count(*) FROM cascade_results")[0][0]
        evicted = metric(samples, "cascade_disk_evictions_total", tier="endpoint",
                         store="results", reason="budget")
        assert evicted > 2 * held, (evicted, held)  # the share was filled several times over
        assert metric(samples, "cascade_disk_evictions_total", tier="endpoint", store="logs",
                      reason="rotation") >= 2
        assert metric(samples, "cascade_disk_budget_bytes", tier="endpoint",
                      store="results") == SHARES["results"]

        receiver = _owed_work_survived(endpoint, owed, receiver)

        # An offline backlog is still queued and drained after the soak.
        with httpx.Client() as client:
            backlog = _cut_and_queue(client, proxy, endpoint, hard_images, "late-", 30)
            proxy.set(mode="pass")
            wait_for(lambda: all(endpoint.states().get(k) == "done" for k in backlog), 60,
                     "the backlog drained")
            for key in backlog:
                r = client.get(f"{endpoint.url}/v1/results/{key}")
                assert r.status_code == 200 and r.json()["status"] == "final", r.text
    finally:
        receiver.close()
        for tier in reversed(made):
            tier.stop()
