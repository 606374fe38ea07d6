"""Is a tier's own model over its latency budget? Plain logic over plain data
(``docs/field-operations.md``, "Fallbacks under pressure").

:class:`LatencyPressure` keeps the last ``window`` model latencies of one task at one tier and
turns **on** when their p95 passes the budget (after ``min_runs``), **off** when it is back
below ``budget x recover_below``: the gap is the hysteresis that keeps a tier near its budget
from flapping between its model and its fallback. Under pressure the node still runs its own
model on one request in ``probe_every`` (:meth:`probe_due`), so the window keeps measuring it
and pressure can clear.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

__all__ = ["LatencyPressure", "PressureSettings"]

log = logging.getLogger("cascade.gating.pressure")


@dataclass(frozen=True, slots=True)
class PressureSettings:
    """``tasks.<task>.tiers.<tier>.pressure`` as plain data."""

    latency_budget_ms: float | None = None
    window: int = 50
    min_runs: int = 20
    recover_below: float = 0.7
    probe_every: int = 10


class LatencyPressure:
    """The pressure state of one task's model at one tier."""

    def __init__(self, settings: PressureSettings, *, tier: str = "", task: str = "") -> None:
        self.settings = settings
        self.tier, self.task = tier, task
        self._ms: deque[float] = deque(maxlen=settings.window)
        self.on = False
        self.switches = 0
        """Times pressure turned on since start."""
        self.p95_ms: float | None = None
        self._since_probe = 0

    def observe(self, model_ms: float) -> None:
        """One run of the tier's own model took ``model_ms``."""
        self._ms.append(model_ms)
        budget = self.settings.latency_budget_ms
        if budget is None or len(self._ms) < min(self.settings.min_runs, self.settings.window):
            return
        ordered = sorted(self._ms)
        self.p95_ms = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        if not self.on and self.p95_ms > budget:
            self.on, self.switches = True, self.switches + 1
            log.warning("tier %s, task %s: model p95 %.2f ms over its budget %.2f ms: falling "
                        "back", self.tier, self.task, self.p95_ms, budget)
        elif self.on and self.p95_ms < budget * self.settings.recover_below:
            self.on = False
            log.warning("tier %s, task %s: model p95 %.2f ms back under %.2f ms: own model "
                        "again", self.tier, self.task, self.p95_ms,
                        budget * self.settings.recover_below)

    def probe_due(self) -> bool:
        """Under pressure: whether this request runs the own model anyway (one in
        ``probe_every``)."""
        self._since_probe += 1
        if self._since_probe >= self.settings.probe_every:
            self._since_probe = 0
            return True
        return False

    def describe(self) -> dict[str, object]:
        """What ``/readyz`` shows."""
        return {"on": self.on, "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 3),
                "budget_ms": self.settings.latency_budget_ms, "runs": len(self._ms),
                "switches": self.switches}
