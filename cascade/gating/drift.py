"""Drift alarm: is the traffic a tier gates still the traffic its thresholds were fitted on?

Lab accuracy does not survive distribution shift (a model 97% right on its test split can be
71% right in the field), and a calibrated confidence of 0.9 only means "90% right" on the
distribution it was calibrated on. So each tier watches, per task, the distribution of its
gate's calibrated confidence and compares it with the one recorded on the calibration split.

- **Reference** (:class:`DriftReference`): a histogram of the calibrated confidence of the
  calibration-split samples that *reach* this tier under the policy (the lower tiers filter
  what an upper tier sees), written into the policy by ``cascade policy calibrate``. Bins are
  reference quantiles (tied values, e.g. an isotonic curve's flat top at 1.0, stay in one bin)
  plus a cut at the tier's threshold, so a change in the escalation rate moves mass across a
  bin edge.
- **Window** (:class:`DriftDetector`): the last ``window`` requests at the tier, as a ring of bin
  indices (and whether the policy's own rule escalated each) with per-bin counts: bounded
  memory, O(1) work per request (a bisect and a few integer updates); the statistics are
  evaluated every ``CHECK_EVERY`` requests, in O(bins).
- **Two statistics**, sharing the false-alarm budget ``significance`` (Bonferroni):
  the population stability index, PSI = sum (w - r) ln(w / r) over the bins (window shares w,
  reference shares r, smoothed by half a count; rules of thumb: < 0.1 stable, 0.1-0.25
  moderate, > 0.25 major), for any change of shape; and a one-sided two-proportion z-test on
  the escalation rate, for the change that matters most (harder traffic, more escalations).
- **Alarm, with hysteresis**: on when, on ``CONFIRM_CHECKS`` consecutive evaluations, PSI is at
  least ``alarm_psi`` *and* above what sampling noise alone reaches at these sample sizes
  (for two samples of one distribution PSI ~ chi2(bins-1) * (1/n + 1/m), so a small reference,
  as upper tiers have, raises the bar instead of raising false alarms), or the escalation z
  is above its level; off when PSI is below ``clear_psi`` and its noise level at the 80%
  quantile, and z below 0.84. No verdict before ``min_samples`` requests.
- **Effects**: gauges on ``/metrics``, state on ``/readyz``, a warning log line on each
  transition, and with ``action: tighten`` a stricter rule (every threshold + ``tighten_by``)
  while the alarm is on. Both statistics use the confidence and the policy's own rule, never
  the tightened one, so tightening does not feed back into the alarm of the tier that tightens.

What it cannot see: a model that stays as confident as in the lab while being wrong more often
(the confidence distribution does not move). Only labelled feedback shows that.

Everything here is plain Python over plain data: no numpy, no I/O, nothing at import time.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, Final, Literal

from cascade.gating.gate import GateRule

log = logging.getLogger("cascade.gating.drift")

CHECK_EVERY: Final[int] = 20
"""Requests between two evaluations of the statistics."""
CONFIRM_CHECKS: Final[int] = 3
"""Consecutive evaluations over the alarm level before the alarm turns on: a noise excursion
of the sliding window rarely lasts that long (measured: false alarms on in-distribution
streams drop about 3x, detection is ~40 requests later)."""
MIN_BIN_SAMPLES: Final[int] = 10
"""Reference samples a bin needs at least; smaller bins are merged into a neighbour."""
DEFAULT_BINS: Final[int] = 10
CLEAR_QUANTILE: Final[float] = 0.8
"""The alarm clears once PSI is below this quantile of its sampling noise (and clear_psi)..."""
CLEAR_Z: Final[float] = NormalDist().inv_cdf(CLEAR_QUANTILE)
"""...and the escalation rate's z-score below the same quantile (0.84)."""

DriftAction = Literal["alert", "tighten"]
DriftStateName = Literal["ok", "alarm", "warming_up", "no_reference", "reference_too_small",
                         "disabled"]


# -- plain data -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriftReference:
    """Histogram of a tier's calibrated confidence on the calibration split.

    Bin ``i`` holds confidences ``c`` with ``edges[i-1] <= c < edges[i]`` (``bisect_right``), so a
    bin edge at the threshold separates escalated from answered samples.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    escalation_rate: float | None = None

    @property
    def samples(self) -> int:
        """Reference sample size."""
        return sum(self.counts)

    @property
    def bins(self) -> int:
        """Number of bins."""
        return len(self.counts)


@dataclass(frozen=True, slots=True)
class DriftSettings:
    """How a tier judges drift for one task (``tasks.<task>.drift`` of the policy)."""

    enabled: bool = True
    window: int = 300
    min_samples: int = 200
    alarm_psi: float = 0.1
    clear_psi: float = 0.05
    significance: float = 0.001
    action: DriftAction = "alert"
    tighten_by: float = 0.05


def fit_reference(conf: Sequence[float], *, threshold: float | None = None,
                  escalated: Sequence[bool] | None = None, bins: int = DEFAULT_BINS,
                  min_bin_samples: int = MIN_BIN_SAMPLES) -> DriftReference:
    """The reference histogram of calibrated confidences ``conf`` (the samples reaching a tier).

    Cuts at the ``bins``-quantiles (midway between distinct values: ties are never split) and at
    ``threshold``; then merges bins with fewer than ``min_bin_samples`` samples into their
    smaller neighbour (across the other edge when the small bin borders the threshold's cut, so
    that cut stays where it can). ``escalated`` (per sample) gives the reference escalation rate.
    """
    values = sorted(float(c) for c in conf)
    n = len(values)
    rate = (sum(bool(e) for e in escalated) / len(escalated)) if escalated else None
    if n == 0:
        return DriftReference((), (0,), rate)
    distinct: list[float] = []
    counts: list[int] = []
    for v in values:
        if distinct and v == distinct[-1]:
            counts[-1] += 1
        else:
            distinct.append(v)
            counts.append(1)
    cuts: set[float] = set()
    target = n / max(1, bins)
    acc = 0
    for i in range(len(distinct) - 1):
        acc += counts[i]
        if acc >= target:
            cuts.add((distinct[i] + distinct[i + 1]) / 2.0)
            acc = 0
    if threshold is not None and distinct[0] < threshold <= distinct[-1]:
        cuts.add(float(threshold))  # rounded like the others below, so it is found again
    edges = sorted(round(c, 9) for c in cuts)
    hist = [0] * (len(edges) + 1)
    for v in values:
        hist[bisect_right(edges, v)] += 1
    keep = round(float(threshold), 9) if threshold is not None else None
    while len(hist) > 1 and min(hist) < min_bin_samples:
        i = hist.index(min(hist))
        j = i - 1 if i == len(hist) - 1 or (i > 0 and hist[i - 1] <= hist[i + 1]) else i + 1
        if edges[min(i, j)] == keep and 0 < i < len(hist) - 1:
            j = 2 * i - j  # merge across the other edge: the threshold's cut stays
        lo = min(i, j)
        hist[lo:lo + 2] = [hist[lo] + hist[lo + 1]]
        del edges[lo]
    return DriftReference(tuple(edges), tuple(hist), None if rate is None else round(rate, 6))


# -- statistics -----------------------------------------------------------------------------------


def psi(window_counts: Sequence[int], reference_counts: Sequence[int]) -> float:
    """Population stability index between two histograms over the same bins.

    Each share is smoothed by half a count so an empty bin does not make the score infinite.
    """
    k = len(reference_counts)
    n = sum(window_counts) + 0.5 * k
    m = sum(reference_counts) + 0.5 * k
    total = 0.0
    for a, b in zip(window_counts, reference_counts):
        w = (a + 0.5) / n
        r = (b + 0.5) / m
        total += (w - r) * math.log(w / r)
    return total


def chi2_quantile(dof: int, p: float) -> float:
    """Quantile ``p`` of the chi-square distribution (Wilson-Hilferty; within ~2% for dof >= 1
    in the upper tail, which is all the alarm levels need)."""
    if dof < 1:
        return 0.0
    z = NormalDist().inv_cdf(p)
    h = 2.0 / (9.0 * dof)
    return dof * max(0.0, 1.0 - h + z * math.sqrt(h)) ** 3


def noise_psi(dof: int, p: float, n: int, m: int) -> float:
    """The PSI two samples of one distribution (sizes ``n`` and ``m``) stay below with
    probability ``p``: chi2(dof) quantile times (1/n + 1/m)."""
    if n <= 0 or m <= 0:
        return math.inf
    return chi2_quantile(dof, p) * (1.0 / n + 1.0 / m)


def escalation_z(escalated: int, n: int, reference_rate: float | None, m: int) -> float | None:
    """One-sided two-proportion z-score: does the window (``escalated`` of ``n``) escalate more
    than the reference (rate ``reference_rate`` over ``m`` samples)? None without a reference
    rate."""
    if reference_rate is None or n <= 0 or m <= 0:
        return None
    pooled = (escalated + reference_rate * m) / (n + m)
    var = pooled * (1.0 - pooled) * (1.0 / n + 1.0 / m)
    return 0.0 if var <= 0.0 else (escalated / n - reference_rate) / math.sqrt(var)


def tightened(rule: GateRule, by: float) -> GateRule:
    """``rule`` with every threshold raised by ``by`` (capped at 1.0): escalate more."""
    return replace(
        rule,
        threshold=min(1.0, rule.threshold + by),
        class_thresholds=tuple((k, min(1.0, v + by)) for k, v in rule.class_thresholds),
    )


def effective_rule(rule: GateRule, settings: DriftSettings | None, alarm: bool) -> GateRule:
    """The rule the gate applies: ``rule``, or its tightened twin while a tighten alarm is on.

    Serving and replay both call this, so a recorded alarm replays to the same decision.
    """
    if alarm and settings is not None and settings.action == "tighten" and settings.tighten_by > 0:
        return tightened(rule, settings.tighten_by)
    return rule


# -- runtime --------------------------------------------------------------------------------------


class DriftDetector:
    """Rolling window of one tier's calibrated confidence for one task, against a reference."""

    __slots__ = (
        "_counts",
        "_edges",
        "_escalated",
        "_filled",
        "_pos",
        "_q_off",
        "_q_on",
        "_ring",
        "_since_check",
        "_streak",
        "_z_on",
        "alarm",
        "alarm_at_seen",
        "alarm_since",
        "alarms",
        "cause",
        "escalation_z",
        "level_off",
        "level_on",
        "reference",
        "score",
        "seen",
        "settings",
        "task",
        "tier",
    )

    def __init__(self, reference: DriftReference, settings: DriftSettings, *, tier: str = "",
                 task: str = "") -> None:
        self.tier, self.task = tier, task
        self.reference, self.settings = reference, settings
        self._edges = list(reference.edges)
        self._ring = [0] * settings.window  # bin * 2 + escalated, per request
        self._pos = 0
        self._filled = 0
        self._counts = [0] * reference.bins
        self._escalated = 0
        self._since_check = 0
        # Two tests share the false-alarm budget (Bonferroni).
        dof = reference.bins - 1
        self._q_on = chi2_quantile(dof, 1.0 - settings.significance / 2.0)
        self._q_off = chi2_quantile(dof, CLEAR_QUANTILE)
        self._z_on = NormalDist().inv_cdf(1.0 - settings.significance / 2.0)
        self.score: float | None = None
        self.escalation_z: float | None = None
        self.alarm = False
        self.cause: str | None = None
        self._streak = 0
        self.alarms = 0
        self.seen = 0
        self.alarm_since: float | None = None
        self.alarm_at_seen: int | None = None
        self.level_on = math.inf
        self.level_off = 0.0

    @property
    def usable(self) -> bool:
        """Whether the reference has at least two bins (else nothing can be compared)."""
        return self.reference.bins >= 2

    @property
    def z_on(self) -> float:
        """Escalation-rate z-score that turns the alarm on."""
        return self._z_on

    def observe(self, conf: float, escalated: bool = False) -> bool:
        """Add one request's confidence (and whether the policy's own rule escalates it);
        returns whether the alarm is on afterwards."""
        b = bisect_right(self._edges, conf)
        code = b + b + escalated
        ring = self._ring
        pos = self._pos
        if self._filled == len(ring):
            old = ring[pos]
            self._counts[old >> 1] -= 1
            self._escalated -= old & 1
        else:
            self._filled += 1
        ring[pos] = code
        self._counts[b] += 1
        self._escalated += escalated
        self._pos = pos + 1 if pos + 1 < len(ring) else 0
        self.seen += 1
        self._since_check += 1
        if self._since_check >= CHECK_EVERY and self._filled >= self.settings.min_samples:
            self._check()
        return self.alarm

    def _check(self) -> None:
        self._since_check = 0
        s = self.settings
        n, m = self._filled, self.reference.samples
        scale = 1.0 / n + 1.0 / m
        score = self.score = psi(self._counts, self.reference.counts)
        z = self.escalation_z = escalation_z(self._escalated, n, self.reference.escalation_rate, m)
        self.level_on = max(s.alarm_psi, self._q_on * scale)
        self.level_off = max(s.clear_psi, self._q_off * scale)
        if not self.alarm:
            causes = [name for name, hit in (("confidence distribution", score >= self.level_on),
                                             ("escalation rate", z is not None and z >= self._z_on))
                      if hit]
            self._streak = self._streak + 1 if causes else 0
            if causes and self._streak >= CONFIRM_CHECKS:
                self.alarm, self.cause = True, " and ".join(causes)
                self.alarms += 1
                self.alarm_since = time.time()
                self.alarm_at_seen = self.seen
                log.warning(
                    "drift alarm ON at tier %s, task %s (%s): over the last %d requests PSI %.3f "
                    "(alarm at %.3f), escalation rate %.1f%% vs %s calibrated (z %s, alarm at "
                    "%.2f); action: %s", self.tier, self.task, self.cause, n, score,
                    self.level_on, 100.0 * self._escalated / n,
                    _pct(self.reference.escalation_rate), _num(z), self._z_on, s.action)
        elif score < self.level_off and (z is None or z < CLEAR_Z):
            self.alarm, self.cause, self.alarm_since = False, None, None
            log.warning("drift alarm OFF at tier %s, task %s: over the last %d requests PSI %.3f "
                        "(< %.3f), escalation rate %.1f%% vs %s calibrated (z %s < %.2f)",
                        self.tier, self.task, n, score, self.level_off,
                        100.0 * self._escalated / n, _pct(self.reference.escalation_rate),
                        _num(z), CLEAR_Z)

    @property
    def samples(self) -> int:
        """Requests in the window now."""
        return self._filled

    @property
    def escalation_rate(self) -> float | None:
        """Share of the window the base rule escalated (None when empty)."""
        return self._escalated / self._filled if self._filled else None

    def state(self) -> DriftStateName:
        """ok, alarm or warming_up (fewer than ``min_samples`` requests seen)."""
        if not self.usable:
            return "reference_too_small"
        if self.alarm:
            return "alarm"
        return "ok" if self.score is not None else "warming_up"

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` shows for this tier and task."""
        return {
            "state": self.state(),
            "cause": self.cause,
            "psi": _round(self.score),
            "psi_alarm_at": None if math.isinf(self.level_on) else round(self.level_on, 4),
            "psi_clear_at": round(self.level_off, 4) if self.score is not None else None,
            "escalation_z": _round(self.escalation_z),
            "escalation_z_alarm_at": round(self._z_on, 3),
            "window": self.samples,
            "min_samples": self.settings.min_samples,
            "reference_samples": self.reference.samples,
            "escalation_rate": _round(self.escalation_rate),
            "reference_escalation_rate": self.reference.escalation_rate,
            "alarms": self.alarms,
            "alarm_since": self.alarm_since,
            "action": self.settings.action,
            "seen": self.seen,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{100.0 * x:.1f}%"
