"""Threshold search: the per-tier (and per-class) thresholds that meet a goal with the fewest
escalations, on recorded confidences of every tier.

The search is exact over cut points: a threshold only matters through which samples it
accepts, so each tier's candidates are the midpoints between its distinct confidences (plus
"answer all" and "answer none"). Tiers below the last edge tier are enumerated (down-sampled to
``grid`` candidates when a split is large); the last edge tier is solved for all its cut points
at once with cumulative sums. Objective, lexicographic:

1. total violation of the goal's bounds (0 when feasible; otherwise the closest miss wins);
2. with an accuracy floor: fewest escalations, then highest accuracy;
   without one (budget goals only): highest accuracy, then fewest escalations.

Per-class thresholds are then tried one tier and class at a time (coordinate descent) and kept
only where the class has enough samples and the gain is real (``class_min_gain`` escalations or
correct answers), and only if they also win under k-fold cross-validation on the split, so
that noise on a small split does not become policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascade.policy.calibrate import CascadeOutcome, simulate_cascade
from cascade.policy.goals import Goals

_EPS = 1e-9


def cut_thresholds(conf: np.ndarray) -> np.ndarray:
    """Every threshold that makes a different accept set: descending, from "none" to "all".

    "None" is just above the top confidence (capped at 1.0, which still answers samples at
    exactly 1.0), "all" is 0.0, the rest are midpoints between adjacent distinct values.
    """
    values = np.unique(np.asarray(conf, dtype=np.float64))[::-1]
    if len(values) == 0:
        return np.array([1.0, 0.0])
    mids = (values[:-1] + values[1:]) / 2.0
    none = min(1.0, float(np.nextafter(values[0], np.inf)))
    return np.unique(np.r_[none, mids, 0.0])[::-1]


@dataclass(frozen=True)
class SearchResult:
    """Thresholds found for one task and what they do on the split they were searched on."""

    tiers: tuple[str, ...]
    thresholds: tuple[float, ...]
    class_thresholds: tuple[dict[str, float], ...]
    outcome: CascadeOutcome
    escalations: int
    violation: float
    violations: tuple[str, ...] = field(default=())

    @property
    def feasible(self) -> bool:
        """True when the outcome meets every bound of the goal."""
        return self.violation <= _EPS


def _violation(goals: Goals, tiers: Sequence[str], accuracy: np.ndarray, cloud_share: np.ndarray,
               esc_rates: Sequence[np.ndarray | float]) -> np.ndarray:
    v = np.zeros_like(np.asarray(accuracy, dtype=np.float64))
    if goals.min_accuracy is not None:
        v = v + np.maximum(0.0, goals.min_accuracy - accuracy)
    if goals.max_cloud_share is not None:
        v = v + np.maximum(0.0, cloud_share - goals.max_cloud_share)
    for tier, rate in zip(tiers[:-1], esc_rates):
        limit = goals.escalation_limit(tier)
        if limit is not None:
            v = v + np.maximum(0.0, np.asarray(rate) - limit)
    return np.round(v, 9)


def _keys(goals: Goals, violation: np.ndarray, escalations: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Row-wise sort keys (smaller is better) for lexicographic comparison."""
    if goals.min_accuracy is not None:
        return np.stack([violation, escalations, -correct], axis=-1).astype(np.float64)
    return np.stack([violation, -correct, escalations], axis=-1).astype(np.float64)


def _better(a: np.ndarray, b: np.ndarray | None) -> bool:
    if b is None:
        return True
    for x, y in zip(a, b):
        if x < y - _EPS:
            return True
        if x > y + _EPS:
            return False
    return False


def _candidates(conf: np.ndarray, grid: int) -> np.ndarray:
    cuts = cut_thresholds(conf)
    if len(cuts) <= grid:
        return cuts
    keep = np.unique(np.linspace(0, len(cuts) - 1, grid).round().astype(int))
    return np.asarray(cuts[keep])


def _solve_last_edge_tier(
    reach: np.ndarray, conf: np.ndarray, ok: np.ndarray, ok_top: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the samples ``reach``-ing the last edge tier: per cut point, (threshold, answered
    there, correct there + at the top, escalated to the top)."""
    idx = np.flatnonzero(reach)
    m = len(idx)
    order = idx[np.argsort(-conf[idx], kind="stable")]
    c = conf[order]
    cum_ok = np.r_[0, np.cumsum(ok[order])]
    cum_top = np.r_[0, np.cumsum(ok_top[order])]
    # j = number accepted; valid only where the cut falls between distinct values.
    valid = np.r_[True, np.r_[c[1:] != c[:-1], True]] if m else np.array([True])
    if m and c[0] >= 1.0:
        valid[0] = False  # a threshold cannot exceed 1.0, so confidence 1.0 is always answered
    js = np.flatnonzero(valid)
    thr = np.empty(len(js))
    for n, j in enumerate(js):
        if j == 0:
            thr[n] = min(1.0, float(np.nextafter(c[0], np.inf))) if m else 1.0
        elif j == m:
            thr[n] = 0.0
        else:
            thr[n] = (c[j - 1] + c[j]) / 2.0
    answered_ok = cum_ok[js] + (cum_top[m] - cum_top[js])
    return thr, js, answered_ok, m - js


def search_thresholds(
    tiers: Sequence[str],
    conf: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    goals: Goals,
    *,
    predicted: Sequence[Sequence[str]] | None = None,
    grid: int = 64,
    class_min_support: int = 20,
    class_min_gain: int | None = None,
    class_cv_folds: int = 5,
) -> SearchResult:
    """Thresholds for every tier (the top's is 0.0) that best meet ``goals`` on this split.

    ``conf[i]``/``correct[i]`` are tier ``i``'s gate confidences and correctness per sample.
    With ``predicted`` (each tier's predicted class per sample) per-class thresholds are
    searched too, and kept only if they also win under ``class_cv_folds``-fold
    cross-validation (0: trust the split). Returns the best solution even if infeasible;
    check ``.feasible``.
    """
    n_tiers = len(tiers)
    if n_tiers < 2:
        raise ValueError("a cascade needs at least two tiers")
    n = len(correct[0])
    conf = [np.asarray(c, dtype=np.float64) for c in conf]
    correct = [np.asarray(c, dtype=bool) for c in correct]
    top_ok = correct[-1]
    goals = goals.resolved(float(top_ok.mean()) if n else None)
    last = n_tiers - 2  # the last edge tier, solved in closed form
    grids = [_candidates(conf[i], grid) for i in range(last)]
    best_key: np.ndarray | None = None
    best: tuple[float, ...] = ()
    for head in itertools.product(*grids):
        reach = np.ones(n, dtype=bool)
        ok_so_far, esc_so_far = 0, 0
        rates: list[float] = []
        for i, t in enumerate(head):
            take = reach & (conf[i] >= t)
            ok_so_far += int((take & correct[i]).sum())
            reached = int(reach.sum())
            reach = reach & ~take
            rates.append(int(reach.sum()) / reached if reached else 0.0)
            esc_so_far += int(reach.sum())
        thr, _, answered_ok, to_top = _solve_last_edge_tier(reach, conf[last], correct[last], top_ok)
        m = int(reach.sum())
        accuracy = (ok_so_far + answered_ok) / n if n else answered_ok * 0.0
        cloud = to_top / n if n else to_top * 0.0
        last_rate = to_top / m if m else to_top * 0.0
        escalations = esc_so_far + to_top
        violation = _violation(goals, tiers, accuracy, cloud, [*rates, last_rate])
        keys = _keys(goals, violation, escalations, ok_so_far + answered_ok)
        j = int(np.lexsort(keys.T[::-1])[0])
        if _better(keys[j], best_key):
            best_key, best = keys[j], (*head, float(thr[j]))
    thresholds = [*best, 0.0]
    class_thr: list[dict[str, float]] = [{} for _ in tiers]
    if predicted is not None:
        gain = class_min_gain if class_min_gain is not None else max(2, round(0.005 * n))
        class_thr = _refine_per_class(tiers, conf, correct, predicted, goals, thresholds,
                                      class_min_support, gain)
        if any(class_thr) and class_cv_folds > 1 and not _per_class_generalises(
                tiers, conf, correct, predicted, goals, grid=grid, folds=class_cv_folds,
                class_min_support=class_min_support, gain=gain):
            class_thr = [{} for _ in tiers]
    return _result(tiers, conf, correct, goals, thresholds, class_thr, predicted)


def cross_validate(
    tiers: Sequence[str],
    conf: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    goals: Goals,
    *,
    predicted: Sequence[Sequence[str]] | None = None,
    folds: int = 5,
    grid: int = 32,
    class_min_support: int = 20,
    class_min_gain: int | None = None,
) -> tuple[np.ndarray, CascadeOutcome]:
    """Out-of-sample quality of the search itself: thresholds searched on k-1 folds, applied to
    the held-out fold, pooled. Returns (sort key, smaller is better; outcome)."""
    n = len(correct[0])
    goals = goals.resolved(float(np.mean(correct[-1])) if n else None)
    fold_of = np.random.default_rng(0).permutation(n) % folds
    held = [np.zeros(n) for _ in tiers]
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        def sub(arrays: Sequence[Any], train: np.ndarray = train) -> list[np.ndarray]:
            return [np.asarray(a)[train] for a in arrays]

        r = search_thresholds(
            tiers, sub(conf), sub(correct), goals, grid=grid,
            predicted=[list(p) for p in sub(predicted)] if predicted is not None else None,
            class_min_support=max(1, round(class_min_support * (folds - 1) / folds)),
            class_min_gain=class_min_gain, class_cv_folds=0,
        )
        for i, (t, ct) in enumerate(zip(r.thresholds, r.class_thresholds)):
            held[i][test] = per_sample_thresholds(
                t, ct, list(np.asarray(predicted[i])[test]) if predicted is not None else None)
    key, out, _ = _evaluate(tiers, conf, correct, goals, held,  # type: ignore[arg-type]
                            [{} for _ in tiers], None)
    return key, out


def _per_class_generalises(tiers: Sequence[str], conf: Sequence[np.ndarray],
                           correct: Sequence[np.ndarray], predicted: Sequence[Sequence[str]],
                           goals: Goals, *, grid: int, folds: int, class_min_support: int,
                           gain: int) -> bool:
    """Whether per-class thresholds beat tier thresholds out of sample (k-fold on the split).

    A class threshold fitted on a few dozen samples easily memorises them (a class with no
    mistakes in the split gets "answer everything"); keep them only if held-out folds agree.
    """
    common: dict[str, Any] = {"folds": folds, "grid": max(8, grid // 2),
                              "class_min_support": class_min_support, "class_min_gain": gain}
    plain, _ = cross_validate(tiers, conf, correct, goals, **common)
    per_class, _ = cross_validate(tiers, conf, correct, goals, predicted=predicted, **common)
    return _better(per_class, plain) and _gain(plain, per_class) >= gain


def per_sample_thresholds(
    threshold: float, class_thresholds: dict[str, float], predicted: Sequence[str] | None
) -> float | np.ndarray:
    """The threshold each sample faces at one tier (the class override of its predicted class)."""
    if not class_thresholds or predicted is None:
        return threshold
    return np.asarray([class_thresholds.get(p, threshold) for p in predicted], dtype=np.float64)


def _evaluate(tiers: Sequence[str], conf: Sequence[np.ndarray], correct: Sequence[np.ndarray],
              goals: Goals, thresholds: Sequence[float], class_thr: Sequence[dict[str, float]],
              predicted: Sequence[Sequence[str]] | None) -> tuple[np.ndarray, CascadeOutcome, int]:
    n = len(correct[0])
    per_sample = [per_sample_thresholds(t, ct, predicted[i] if predicted else None)
                  for i, (t, ct) in enumerate(zip(thresholds, class_thr))]
    out = simulate_cascade(tiers, conf, correct, per_sample)
    escalations = round(out.escalations_per_request * n)
    accuracy = np.asarray(out.accuracy)
    violation = _violation(goals, tiers, accuracy, np.asarray(out.top_share),
                           [out.escalation_rate[t] for t in tiers[:-1]])
    key = _keys(goals, np.asarray(violation), np.asarray(escalations),
                np.asarray(round(out.accuracy * n)))
    return key, out, escalations


def _refine_per_class(tiers: Sequence[str], conf: Sequence[np.ndarray], correct: Sequence[np.ndarray],
                      predicted: Sequence[Sequence[str]], goals: Goals, thresholds: list[float],
                      min_support: int, min_gain: int) -> list[dict[str, float]]:
    class_thr: list[dict[str, float]] = [{} for _ in tiers]
    current, _, _ = _evaluate(tiers, conf, correct, goals, thresholds, class_thr, predicted)
    for _ in range(3):  # passes of coordinate descent; each keeps only real gains
        improved = False
        for i in range(len(tiers) - 1):
            pred = np.asarray(predicted[i])
            for label in sorted(set(pred.tolist())):
                mask = pred == label
                if mask.sum() < min_support:
                    continue
                best_key, best_t = current, class_thr[i].get(label)
                for t in _candidates(conf[i][mask], 24):
                    trial = [dict(ct) for ct in class_thr]
                    trial[i][label] = float(t)
                    key, _, _ = _evaluate(tiers, conf, correct, goals, thresholds, trial, predicted)
                    if _better(key, best_key):
                        best_key, best_t = key, float(t)
                if best_t is not None and best_t != class_thr[i].get(label) and \
                        _gain(current, best_key) >= min_gain:
                    class_thr[i][label] = best_t
                    current = best_key
                    improved = True
        if not improved:
            break
    return class_thr


def _gain(old: np.ndarray, new: np.ndarray) -> float:
    """How much better ``new`` is, in samples (infinite when it removes a violation)."""
    if new[0] < old[0] - _EPS:
        return float("inf")
    if abs(old[1] - new[1]) > _EPS:
        return float(old[1] - new[1])
    return float(old[2] - new[2])


def _result(tiers: Sequence[str], conf: Sequence[np.ndarray], correct: Sequence[np.ndarray],
            goals: Goals, thresholds: Sequence[float], class_thr: Sequence[dict[str, float]],
            predicted: Sequence[Sequence[str]] | None) -> SearchResult:
    key, out, escalations = _evaluate(tiers, conf, correct, goals, thresholds, class_thr, predicted)
    return SearchResult(
        tiers=tuple(tiers),
        thresholds=tuple(float(t) for t in thresholds),
        class_thresholds=tuple(dict(ct) for ct in class_thr),
        outcome=out,
        escalations=escalations,
        violation=float(key[0]),
        violations=tuple(_explain(goals, tiers, out)),
    )


def _explain(goals: Goals, tiers: Sequence[str], out: CascadeOutcome) -> list[str]:
    from cascade.policy.goals import check_goals

    checks = check_goals(goals, accuracy=out.accuracy, cloud_share=out.top_share,
                         escalation_rate=out.escalation_rate, top_tier=tiers[-1])
    return [f"{c.goal} (got {c.measured})" for c in checks if c.met is False]
