"""Cycles of a cut (or degraded) link under steady load, shared by
tests/fault/test_partition.py (short) and benchmarks/bench_partition.py (the full soak).

One client sends keyed requests to the endpoint at a steady rate while the link from the
endpoint to its upstream (in a network namespace, :class:`tests.fault.netns.Partition`) goes
through ``cycles`` of ``down_s`` with a fault and ``up_s`` healed. Counted: requests the
endpoint answered (200) or not, provisional answers, acknowledged requests not in its store
(lost), keys computed more than once upstream, and per cycle how long the backlog queued
during the outage took to drain once the link was back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tests.fault.harness import Tier, wait_for
from tests.fault.netns import Partition

OWED = "SELECT id FROM cascade_outbox WHERE state IN ('queued', 'forwarding')"


@dataclass
class SteadyLoad:
    """Keyed requests to ``url`` every ``interval_s`` from one thread until :meth:`stop`."""

    url: str
    interval_s: float = 0.05
    body: dict[str, Any] = field(default_factory=lambda: {
        "task": "documents", "input": {"text": "Shares rose after the central bank cut rates"}})
    answers: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for n in range(10**9):
                if self._stop.is_set():
                    return
                key = f"part-{n}"
                try:
                    r = client.post(f"{self.url}/v1/infer", json=self.body,
                                    headers={"Idempotency-Key": key})
                except httpx.HTTPError as exc:
                    self.failures.append(f"{key}: {type(exc).__name__}: {exc}")
                else:
                    if r.status_code == 200:
                        self.answers[key] = r.json()["status"]
                    else:
                        self.failures.append(f"{key}: {r.status_code} {r.text[:200]}")
                self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


@dataclass
class CycleReport:
    """What one soak of partition cycles measured."""

    fault: str
    cycles: int
    down_s: float
    up_s: float
    requests: int = 0
    answered: int = 0
    provisional: int = 0
    failures: list[str] = field(default_factory=list)
    lost: int = 0
    never_upstream: int = 0
    computed_twice: int = 0
    not_final: int = 0
    queued_per_cycle: list[int] = field(default_factory=list)
    drain_s: list[float] = field(default_factory=list)

    @property
    def worst_drain_ratio(self) -> float:
        """The slowest drain over the outage it followed (the target is at most 2)."""
        return max(self.drain_s, default=0.0) / self.down_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": self.failures[:10],
                "worst_drain_ratio": round(self.worst_drain_ratio, 3)}


def partition_cycles(endpoint: Tier, upstream: Tier, link: Partition, *, fault: str,
                     cycles: int, down_s: float, up_s: float,
                     drain_timeout_s: float = 300.0) -> CycleReport:
    """Run the cycles (the outage and healthy phases last ``down_s`` and ``up_s`` of wall
    time: they are the scenario, not a wait for an event) and count what happened."""
    report = CycleReport(fault, cycles, down_s, up_s)
    load = SteadyLoad(endpoint.url).start()
    try:
        wait_for(lambda: "final" in load.answers.values(), 60, "a first answer online")
        for cycle in range(cycles):
            link.apply(fault)
            time.sleep(down_s)
            owed = {row[0] for row in endpoint.query(OWED)}
            link.heal()
            healed = time.monotonic()
            wait_for(lambda o=owed: not o & {row[0] for row in endpoint.query(OWED)},
                     drain_timeout_s, f"cycle {cycle}: the backlog of the outage delivered")
            report.queued_per_cycle.append(len(owed))
            report.drain_s.append(round(time.monotonic() - healed, 3))
            time.sleep(max(0.0, up_s - (time.monotonic() - healed)))
    finally:
        load.stop()
        link.heal()
    wait_for(lambda: not endpoint.query(OWED), drain_timeout_s, "every escalation delivered")
    _count(report, load, endpoint, upstream)
    return report


def _count(report: CycleReport, load: SteadyLoad, endpoint: Tier, upstream: Tier) -> None:
    acked = dict(load.answers)
    report.requests = len(acked) + len(load.failures)
    report.answered = len(acked)
    report.provisional = sum(status == "provisional" for status in acked.values())
    report.failures = list(load.failures)
    stored = {key: json.loads(response).get("status")
              for key, response in endpoint.query("SELECT id, response FROM cascade_results")}
    report.lost = sum(key not in stored for key in acked)
    report.not_final = sum(stored.get(key) != "final" for key in acked)
    computed = dict(upstream.query("SELECT id, computations FROM cascade_results"))
    report.never_upstream = sum(key not in computed for key in acked)
    report.computed_twice = sum(n > 1 for n in computed.values())
