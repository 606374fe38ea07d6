"""A tier's drift alarms, one :class:`~cascade.gating.drift.DriftDetector` per task, following
the live policy (a reload with a new reference or new settings starts a fresh window)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

from cascade.gating.drift import DriftDetector, DriftStateName, effective_rule
from cascade.gating.gate import GateRule

__all__ = ["DriftMonitor"]

log = logging.getLogger("cascade.gating.drift")


class _Off:
    """Stand-in for a task whose tier has no usable detector (the reason is its state)."""

    __slots__ = ("key", "reason")

    def __init__(self, reason: DriftStateName, key: object) -> None:
        self.reason, self.key = reason, key


class DriftMonitor:
    """A tier's drift detectors, one per task, following the live policy.

    :meth:`observe` is the per-request hook: it feeds the task's detector and returns the rule
    the gate must apply (the policy's own, or its tightened twin). A new policy object (hot
    reload) is noticed by identity; the window survives a reload that keeps the task's drift
    settings and reference, and restarts otherwise.
    """

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self._by_task: dict[str, tuple[object, DriftDetector | _Off]] = {}
        self._tight: dict[int, tuple[GateRule, GateRule]] = {}

    def _sync(self, policy: Any, task: str) -> DriftDetector | _Off:
        settings, reference = policy.drift(task, self.tier)
        key = (settings, reference)
        previous = self._by_task.get(task)
        current = previous[1] if previous else None
        if current is not None and _key_of(current) == key:
            self._by_task[task] = (policy, current)
            return current
        det: DriftDetector | _Off
        if not settings.enabled:
            det = _Off("disabled", key)
        elif reference is None:
            det = _Off("no_reference", key)
        else:
            det = DriftDetector(reference, settings, tier=self.tier, task=task)
            if not det.usable:
                det = _Off("reference_too_small", key)
        self._tight.clear()  # rules of the old policy: rebuilt on demand
        if current is not None:
            log.info("drift detector of tier %s, task %s restarted: the policy changed its drift "
                     "settings or reference", self.tier, task)
        self._by_task[task] = (policy, det)
        return det

    def observe(self, policy: Any, task: str, conf: float, label: str, rule: GateRule) -> GateRule:
        """Feed one request's confidence; the rule to decide it with."""
        entry = self._by_task.get(task)
        det = entry[1] if entry is not None and entry[0] is policy else self._sync(policy, task)
        if type(det) is _Off:
            return rule
        assert isinstance(det, DriftDetector)
        if not det.observe(conf, conf < rule.threshold_for(label)):
            return rule
        # Tighten only against harmful drift: the tier escalating more than calibrated. Inputs
        # that became easier (a steady stream of clear cases) raise the alarm, not the thresholds.
        if det.settings.action != "tighten" or not (det.escalation_z or 0.0) > 0.0:
            return rule
        cached = self._tight.get(id(rule))
        if cached is None or cached[0] is not rule:
            cached = (rule, effective_rule(rule, det.settings, True))
            self._tight[id(rule)] = cached
        return cached[1]

    def detectors(self) -> dict[str, DriftDetector | _Off]:
        """The current detector (or why there is none) per task seen so far."""
        return {task: det for task, (_, det) in self._by_task.items()}

    def prime(self, policy: Any, tasks: Sequence[str]) -> None:
        """Create the detectors of ``tasks`` now, so ``/readyz`` shows them before traffic."""
        for task in tasks:
            entry = self._by_task.get(task)
            if entry is None or entry[0] is not policy:
                self._sync(policy, task)

    def readiness(self, policy: Any, tasks: Sequence[str]) -> dict[str, Any]:
        """Per task, what ``/readyz`` shows (under the live ``policy``, even before traffic)."""
        self.prime(policy, tasks)
        out: dict[str, Any] = {}
        for task in tasks:
            det = self._by_task[task][1]
            if isinstance(det, DriftDetector):
                out[task] = det.describe()
            else:
                out[task] = {"state": det.reason, "hint": _HINTS[det.reason]}
        return out


_HINTS: Final[dict[str, str]] = {
    "no_reference": "this tier's policy section has no drift_reference: re-run "
                    "`cascade policy calibrate` to record one",
    "reference_too_small": "too few calibration samples reach this tier to compare with",
    "disabled": "tasks.<task>.drift.enabled is false",
}


def _key_of(det: DriftDetector | _Off) -> object:
    if isinstance(det, DriftDetector):
        return (det.settings, det.reference)
    return det.key
