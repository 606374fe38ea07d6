"""Threshold calibration and cascade simulation: pure functions over recorded predictions.

Given, for each tier of a chain, the confidence of its answer and whether it was correct on a
held-out split, these functions pick thresholds for an operator goal and predict what the
cascade will do (accuracy, share answered per tier). The same simulation backs
``cascade policy calibrate``, replay and the benchmark report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cascade.gating.drift import DriftReference, fit_reference


def threshold_for_accuracy(
    conf: np.ndarray, correct: np.ndarray, target: float, *, min_answered: int = 1
) -> float:
    """The lowest threshold at which answers with ``conf >= threshold`` are ``target`` accurate.

    Scans thresholds from the most confident sample down and keeps the largest accepted set
    whose accuracy still meets the target. Returns a threshold just above the top confidence
    (answer nothing) when no set of at least ``min_answered`` samples qualifies.
    """
    if len(conf) != len(correct):
        raise ValueError("conf and correct must have the same length")
    if not 0.0 < target <= 1.0:
        raise ValueError("target must be in (0, 1]")
    never = 1.0 if len(conf) == 0 else float(min(1.0, np.nextafter(conf.max(), np.inf)))
    if len(conf) == 0:
        return never
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    ok_sorted = correct[order].astype(np.float64)
    cum_acc = np.cumsum(ok_sorted) / np.arange(1, len(conf) + 1)
    # Only cut between distinct confidences: a threshold accepts every sample at that value.
    last_of_value = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    ok = (cum_acc >= target - 1e-12) & last_of_value & (np.arange(1, len(conf) + 1) >= min_answered)
    if not ok.any():
        return never
    k = int(np.flatnonzero(ok)[-1])
    return float(c_sorted[k])


@dataclass(frozen=True)
class CascadeOutcome:
    """What a chain of thresholds does on a labelled split."""

    accuracy: float
    answered_share: dict[str, float]
    answered_accuracy: dict[str, float]
    escalation_rate: dict[str, float] = field(default_factory=dict)
    """Per tier: share of the requests *reaching* that tier that it escalated."""

    @property
    def below_top_share(self) -> float:
        """Share of requests answered before the top tier."""
        tiers = list(self.answered_share)
        return float(sum(self.answered_share[t] for t in tiers[:-1]))

    @property
    def top_share(self) -> float:
        """Share of requests answered by (that is, reaching) the top tier."""
        return float(self.answered_share[list(self.answered_share)[-1]])

    @property
    def escalations_per_request(self) -> float:
        """Tier-to-tier escalations per request: a request answered by tier ``i`` made ``i``."""
        return float(sum(i * share for i, share in enumerate(self.answered_share.values())))


def simulate_cascade(
    tiers: Sequence[str],
    conf: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    thresholds: Sequence[float | np.ndarray],
) -> CascadeOutcome:
    """Replay a chain: each sample is answered by the first tier whose confidence meets its
    threshold (per-sample thresholds allowed, for per-class rules); the top tier answers the rest.
    """
    n = len(correct[0])
    remaining = np.ones(n, dtype=bool)
    answered_ok = np.zeros(n, dtype=bool)
    share: dict[str, float] = {}
    acc: dict[str, float] = {}
    esc: dict[str, float] = {}
    for i, tier in enumerate(tiers):
        reaching = remaining.copy()
        if i == len(tiers) - 1:
            take = remaining.copy()
        else:
            take = remaining & (conf[i] >= thresholds[i])
        answered_ok |= take & correct[i]
        remaining &= ~take
        share[tier] = float(take.sum() / n) if n else 0.0
        acc[tier] = float(correct[i][take].mean()) if take.any() else float("nan")
        esc[tier] = float((reaching & ~take).sum() / reaching.sum()) if reaching.any() else 0.0
    return CascadeOutcome(
        accuracy=float(answered_ok.mean()) if n else 0.0,
        answered_share=share,
        answered_accuracy=acc,
        escalation_rate=esc,
    )


def reaching(conf: Sequence[np.ndarray], thresholds: Sequence[float | np.ndarray]) -> list[np.ndarray]:
    """Per tier, which samples reach it: those every lower tier escalated (the top tier's own
    threshold does not matter)."""
    n = len(conf[0])
    reach = np.ones(n, dtype=bool)
    out = []
    for c, t in zip(conf, thresholds):
        out.append(reach.copy())
        reach &= ~(np.asarray(c) >= t)
    return out


def drift_references(
    tiers: Sequence[str],
    conf: Sequence[np.ndarray],
    thresholds: Sequence[float | np.ndarray],
    tier_thresholds: Sequence[float],
) -> dict[str, DriftReference]:
    """Each tier's drift reference: the histogram of the calibrated confidences of the samples
    reaching it under these thresholds (per-sample ones for per-class rules), with a bin edge
    at the tier's threshold, and the share of them it escalates (0 at the top tier). A tier no
    sample reaches gets none."""
    out: dict[str, DriftReference] = {}
    masks = reaching(conf, thresholds)
    for i, tier in enumerate(tiers):
        c = np.asarray(conf[i])[masks[i]]
        if len(c) == 0:
            continue
        t = thresholds[i]
        per_sample = np.asarray(t)[masks[i]] if np.ndim(t) else t
        top = i == len(tiers) - 1
        escalated = np.zeros(len(c), dtype=bool) if top else c < per_sample
        out[tier] = fit_reference(c.tolist(), threshold=None if top else tier_thresholds[i],
                                  escalated=escalated.tolist())
    return out


def oracle_curve(correct: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy against escalations per request of an oracle router.

    The oracle escalates exactly the samples the lower tier gets wrong, and only as far as the
    first tier that gets them right; to reach a given accuracy with the fewest escalations it
    fixes the cheapest mistakes first. Returns (escalations per request, accuracy), both
    non-decreasing, from "the bottom tier answers everything" to the oracle's best.
    """
    n = len(correct[0])
    if n == 0:
        return np.zeros(1), np.zeros(1)
    stacked = np.vstack([np.asarray(c, dtype=bool) for c in correct])
    base_ok = stacked[0]
    any_ok = stacked.any(axis=0)
    fixable = ~base_ok & any_ok
    cost = np.argmax(stacked[:, fixable], axis=0)  # index of the first tier that is right
    steps = np.sort(cost)
    esc = np.r_[0, np.cumsum(steps)] / n
    acc = (base_ok.sum() + np.arange(len(steps) + 1)) / n
    return esc.astype(np.float64), acc.astype(np.float64)


def oracle_escalations_for(correct: Sequence[np.ndarray], accuracy: float) -> float | None:
    """Fewest escalations per request the oracle needs to reach ``accuracy`` (None: it cannot)."""
    return oracle_escalations_at(oracle_curve(correct), accuracy)


def oracle_escalations_at(curve: tuple[np.ndarray, np.ndarray], accuracy: float) -> float | None:
    """On an :func:`oracle_curve`, the fewest escalations per request reaching ``accuracy``."""
    esc, acc = curve
    reach = np.flatnonzero(acc >= accuracy - 1e-12)
    return float(esc[reach[0]]) if len(reach) else None


def sweep_tier(
    tiers: Sequence[str],
    conf: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    thresholds: Sequence[float | np.ndarray],
    tier_index: int,
    *,
    points: int = 200,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vary one tier's threshold (the others as given) from answering nothing to everything.

    Returns (thresholds tried, escalations per request, cascade accuracy) per point.
    """
    values = np.unique(np.r_[0.0, np.quantile(conf[tier_index], np.linspace(0, 1, points)), 1.0])
    esc, acc = [], []
    for t in values:
        trial = list(thresholds)
        trial[tier_index] = float(t)
        out = simulate_cascade(tiers, conf, correct, trial)
        esc.append(out.escalations_per_request)
        acc.append(out.accuracy)
    return values, np.asarray(esc), np.asarray(acc)
