"""A tier under pressure (``docs/field-operations.md``, "Fallbacks under pressure").

:class:`PressureGuard` follows the live policy and gives the node, per request, a
:class:`Plan`: answer from the **answer cache** (``tasks.<task>.cache``: recent final answers
by input sha256, TTL and LRU bound; a repeated frame or document never reaches the model),
run the tier's **own model** (and measure it), run its **fallback model** (while the model's
p95 over a window is over ``pressure.latency_budget_ms``, with hysteresis; one request in
``probe_every`` still runs the own model so pressure can clear), or **escalate early**
(``action: escalate``, or no fallback loaded). When nothing fits (pressure, no fallback, no
upstream or it failed), the node answers ``unknown`` with the reason: never a slow answer
dressed as a normal one. Everything is counted for ``/metrics`` and shown on ``/readyz``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from cachetools import TTLCache
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cascade.contract.answer import Answer, Hop
from cascade.gating.pressure import LatencyPressure, PressureSettings
from cascade.observability.examples import input_sha256
from cascade.runners.base import Runner

__all__ = ["CACHE_MODEL", "Plan", "PressureGuard"]

CACHE_MODEL: Final[str] = "cache"
"""The ``model`` (and ``decision``) of the hop of an answer served from the answer cache."""
_COUNTERS: Final[tuple[str, ...]] = ("cache_hit", "cache_miss", "own", "probe", "fallback",
                                     "early_escalation", "unknown")


@dataclass(frozen=True, slots=True)
class Plan:
    """How the node answers one request."""

    runner: Runner | None
    """The model to run (None: escalate at once)."""
    rule_tier: str
    """Whose section of the task's policy gates the output (the fallback's own if the
    policy has one)."""
    measure: bool
    """The own model runs: its latency feeds the pressure window."""
    reason: str | None = None
    """Why the own model is not used (pressure), for the answer and the logs."""


class PressureGuard:
    """The answer caches and latency-pressure states of one tier's tasks.

    ``fallbacks``: per task, the fallback models loaded at start, by ladder tier name."""

    def __init__(self, tier: str, fallbacks: dict[str, dict[str, Runner]] | None = None) -> None:
        self.tier = tier
        self.fallbacks = fallbacks or {}
        self.states: dict[str, LatencyPressure] = {}
        self.caches: dict[str, tuple[tuple[float, int], TTLCache[str, Answer]]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._policy: Any = None

    def configure(self, policy: Any) -> None:
        """Follow a (re)loaded policy; a task's state or cache restarts when its settings
        change."""
        self._policy = policy
        for task, task_policy in policy.policy.tasks.items():
            tier_policy = task_policy.tiers.get(self.tier)
            if tier_policy is not None:
                p = tier_policy.pressure
                settings = PressureSettings(p.latency_budget_ms, p.window, p.min_runs,
                                            p.recover_below, p.probe_every)
                state = self.states.get(task)
                if state is None or state.settings != settings:
                    self.states[task] = LatencyPressure(settings, tier=self.tier, task=task)
            cache = task_policy.cache
            key = (cache.ttl_s, cache.max_entries)
            if cache.ttl_s > 0 and self.caches.get(task, ((0.0, 0), None))[0] != key:
                self.caches[task] = (key, TTLCache(maxsize=cache.max_entries, ttl=cache.ttl_s))
            elif cache.ttl_s <= 0:
                self.caches.pop(task, None)

    def _count(self, task: str, what: str) -> None:
        counts = self.counts.get(task)
        if counts is None:
            counts = self.counts[task] = dict.fromkeys(_COUNTERS, 0)
        counts[what] += 1

    # -- the answer cache -------------------------------------------------------------------------

    def lookup(self, task: str, payload: Any, request_id: str, trace_id: str | None,
               ) -> Answer | None:
        """A recent final answer to the same input, as this request's answer; None if none."""
        entry = self.caches.get(task)
        if entry is None:
            return None
        found = entry[1].get(input_sha256(payload))
        if found is None:
            self._count(task, "cache_miss")
            return None
        self._count(task, "cache_hit")
        hop = Hop(tier=self.tier, model=CACHE_MODEL, label=found.label,
                  confidence=found.confidence, decision=CACHE_MODEL, ms=0.0)
        return replace(found, id=request_id, hops=[hop], trace_id=trace_id, escalation=None)

    def remember(self, task: str, payload: Any, answer: Answer) -> None:
        """Keep a final answer for repeats of its input."""
        entry = self.caches.get(task)
        if entry is not None and answer.status == "final" and answer.label is not None:
            entry[1][input_sha256(payload)] = answer

    # -- pressure -------------------------------------------------------------------------------

    def plan(self, task: str, own: Runner) -> Plan:
        """How to answer the next request of ``task``."""
        state = self.states.get(task)
        if state is None or not state.on or state.probe_due():
            self._count(task, "own" if state is None or not state.on else "probe")
            return Plan(own, self.tier, measure=True)
        pressure = self._policy.task(task).tiers[self.tier].pressure
        reason = (f"tier {self.tier} is under pressure: its model's p95 {state.p95_ms:.2f} ms "
                  f"is over its budget of {pressure.latency_budget_ms:g} ms")
        fallback = self.fallbacks.get(task, {}).get(pressure.fallback_model or "")
        if pressure.action == "fallback" and fallback is not None:
            self._count(task, "fallback")
            rule_tier = pressure.fallback_model \
                if pressure.fallback_model in self._policy.task(task).tiers else self.tier
            return Plan(fallback, rule_tier, measure=False, reason=reason)
        self._count(task, "early_escalation")
        return Plan(None, self.tier, measure=False, reason=reason)

    def observe(self, task: str, model_ms: float) -> None:
        """The own model of ``task`` ran in ``model_ms``."""
        state = self.states.get(task)
        if state is not None:
            state.observe(model_ms)

    def gave_up(self, task: str) -> None:
        """Nothing fitted: the node answered ``unknown`` with the reason."""
        self._count(task, "unknown")

    def close(self) -> None:
        """Release the fallback models' threads."""
        for runners in self.fallbacks.values():
            for runner in runners.values():
                runner.close()

    # -- what the tier shows ----------------------------------------------------------------------

    def readiness(self, tasks: list[str]) -> dict[str, Any]:
        """Per task: pressure state, cache size and counters."""
        out: dict[str, Any] = {}
        for task in tasks:
            state, cache = self.states.get(task), self.caches.get(task)
            out[task] = {
                **(state.describe() if state is not None else {"on": False}),
                "cache_entries": None if cache is None else len(cache[1]),
                "counts": dict(self.counts.get(task, {})),
            }
        return out

    def metric_families(self) -> Iterator[Any]:
        """``/metrics``: how requests were answered under pressure, and the pressure state."""
        plans = CounterMetricFamily(
            "cascade_pressure_plans", "How requests were answered: cache_hit, cache_miss, own "
            "(model), probe (own model under pressure), fallback (model), early_escalation, "
            "unknown (nothing fitted).", labels=["tier", "task", "plan"])
        on = GaugeMetricFamily("cascade_pressure_on", "1 while the tier's model is over its "
                               "latency budget (fallbacks in use).", labels=["tier", "task"])
        p95 = GaugeMetricFamily("cascade_pressure_model_p95_seconds", "p95 of the own model's "
                                "latency over the pressure window.", labels=["tier", "task"])
        switches = CounterMetricFamily("cascade_pressure_switches", "Times pressure turned on.",
                                       labels=["tier", "task"])
        for task, counts in sorted(self.counts.items()):
            for what, n in counts.items():
                plans.add_metric([self.tier, task, what], n)
        for task, state in sorted(self.states.items()):
            if state.settings.latency_budget_ms is None:
                continue
            on.add_metric([self.tier, task], 1.0 if state.on else 0.0)
            switches.add_metric([self.tier, task], state.switches)
            if state.p95_ms is not None:
                p95.add_metric([self.tier, task], state.p95_ms / 1000)
        yield from (plans, on, p95, switches)
