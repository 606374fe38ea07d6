"""Live field accuracy from shadow audits: plain logic, no I/O (architecture §7, "Field
accuracy").

A tier sends a sample of the requests it answered itself to its upstream in the background
and compares the labels. The share of audits on which the upper tier agreed estimates the
accuracy of this tier's own answers on live traffic (an upper-tier error counts against the
tier; see ``docs/field-operations.md``). This module holds what that needs, as pure functions
and small classes over plain data with injectable clocks:

- :func:`wilson_interval`: the confidence interval of a proportion that behaves at 0 and 1
  and at small n (the normal approximation does not);
- :class:`TokenBucket`: the audit budget per second (bursts up to the bucket's size);
- :func:`stratified_accuracy`: the live accuracy of the tier's *model* on all its traffic,
  from two strata: the requests it answered (agreement from audits, a sample) and the ones it
  escalated (agreement of its own label with the upper tier's answer, known for every
  escalation answered online: no audit needed), weighted by their shares of the traffic
  (:class:`ShareWindow`). The hard escalated stratum is fully observed, so the interval is
  much narrower than the audits alone give: this is the number to compare with the
  calibration split's accuracy;
- :class:`AgreementWindow`: the last ``window`` audit verdicts of one task, their agreement
  with its interval, and the **disagreement alarm** (the field-accuracy twin of the drift
  alarm) with hysteresis: on when the interval's upper bound falls below ``min_agreement``
  (the tier is, with the interval's confidence, worse than allowed), off again when the point
  estimate is back at ``min_agreement`` or above.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

__all__ = ["AgreementSettings", "AgreementWindow", "ShareWindow", "TokenBucket",
           "stratified_accuracy", "wilson_interval"]

log = logging.getLogger("cascade.gating.agreement")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` at ``confidence`` (two-sided);
    ``(0.0, 1.0)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n ({n}), got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    # Exactly 0 and 1 at the extremes (the formula gives them only up to rounding).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def stratified_accuracy(local: tuple[int, int], escalated: tuple[int, int], local_share: float,
                        confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(estimate, low, high) of a model's accuracy over all its traffic from ``local``
    (agreed, audits) on the share ``local_share`` it answered and ``escalated`` (agreed,
    verdicts) on the rest; the bounds weight each stratum's Wilson bounds (conservative).
    None until every stratum with traffic has a verdict."""
    strata = [(local_share, *local), (1.0 - local_share, *escalated)]
    if any(weight > 0 and n == 0 for weight, _, n in strata):
        return None
    estimate = low = high = 0.0
    for weight, agreed, n in strata:
        if weight <= 0:
            continue
        lo, hi = wilson_interval(agreed, n, confidence)
        estimate, low, high = estimate + weight * agreed / n, low + weight * lo, high + weight * hi
    return estimate, low, high


class ShareWindow:
    """The share of ``True`` among the last ``size`` observations (a byte ring: O(1) each)."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._ring = bytearray(self.size)
        self._next = 0
        self.seen = 0
        self.ones = 0

    def observe(self, flag: bool) -> None:
        """One observation."""
        if self.seen >= self.size:
            self.ones -= self._ring[self._next]
        else:
            self.seen += 1
        self._ring[self._next] = flag
        self.ones += flag
        self._next = (self._next + 1) % self.size

    def share(self) -> float | None:
        """Share of ``True`` in the window (None before any observation)."""
        return self.ones / self.seen if self.seen else None


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; :meth:`take` spends one."""

    def __init__(self, rate_per_s: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, burst if burst is not None else rate_per_s)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class AgreementSettings:
    """How one task's audits are judged (``tasks.<task>.audit`` of the policy)."""

    window: int = 2000
    confidence: float = 0.95
    min_agreement: float | None = None
    min_audits: int = 50


class AgreementWindow:
    """The last ``settings.window`` audit verdicts of one task at one tier, and its alarm."""

    def __init__(self, settings: AgreementSettings, *, tier: str = "", task: str = "") -> None:
        self.settings = settings
        self.tier, self.task = tier, task
        self._verdicts: deque[bool] = deque(maxlen=settings.window)
        self.agreed = 0
        """Agreements among the verdicts in the window."""
        self.audits_total = 0
        self.disagreements_total = 0
        self.alarm = False
        self.alarms = 0

    @property
    def audits(self) -> int:
        """Verdicts in the window."""
        return len(self._verdicts)

    def observe(self, agreed: bool) -> None:
        """One audit's verdict: did the upper tier give the same answer?"""
        if len(self._verdicts) == self._verdicts.maxlen and self._verdicts[0]:
            self.agreed -= 1
        self._verdicts.append(agreed)
        self.agreed += agreed
        self.audits_total += 1
        self.disagreements_total += not agreed
        self._judge()

    def estimate(self) -> float | None:
        """Agreement over the window (None before any audit)."""
        return self.agreed / self.audits if self.audits else None

    def interval(self) -> tuple[float, float]:
        """Wilson interval of the agreement over the window."""
        return wilson_interval(self.agreed, self.audits, self.settings.confidence)

    def _judge(self) -> None:
        floor = self.settings.min_agreement
        if floor is None or self.audits < self.settings.min_audits:
            return
        if not self.alarm and self.interval()[1] < floor:
            self.alarm, self.alarms = True, self.alarms + 1
            log.warning("field accuracy alarm ON at tier %s, task %s: agreement with the upper "
                        "tier %.3f (%.0f%% interval %.3f-%.3f over %d audits) is below %.3f",
                        self.tier, self.task, self.estimate(), 100 * self.settings.confidence,
                        *self.interval(), self.audits, floor)
        elif self.alarm and (self.estimate() or 0.0) >= floor:
            self.alarm = False
            log.warning("field accuracy alarm OFF at tier %s, task %s: agreement %.3f over %d "
                        "audits is back at %.3f or above", self.tier, self.task,
                        self.estimate(), self.audits, floor)

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` shows for this task."""
        low, high = self.interval()
        estimate = self.estimate()
        return {
            "audits": self.audits, "agreed": self.agreed,
            "agreement": None if estimate is None else round(estimate, 4),
            "interval": [round(low, 4), round(high, 4)],
            "confidence": self.settings.confidence,
            "audits_total": self.audits_total, "disagreements_total": self.disagreements_total,
            "alarm": self.alarm, "alarms": self.alarms,
            "min_agreement": self.settings.min_agreement,
        }
