"""Threshold calibration and cascade simulation: pure functions over recorded predictions.

Given, for each tier of a chain, the confidence of its answer and whether it was correct on a
held-out split, these functions pick thresholds for an operator goal and predict what the
cascade will do (accuracy, share answered per tier). The same simulation backs
``cascade policy calibrate``, replay and the benchmark report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


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
        return float(self.answered_share[list(self.answered_share)[-1]])


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
