"""Confidence calibration: fit a temperature or an isotonic curve, and measure calibration error.

A tier's raw confidence is rarely a probability of being right: small MLPs trained to
convergence are over-confident, calibrated SVMs often under-confident. These functions fit,
on the held-out calibration split, a map from raw to calibrated confidence so that among
answers given with confidence 0.9 about 90% are correct; the result is a plain
:class:`~cascade.gating.gate.Calibration` that the gate applies before deciding.

Two methods:

- ``temperature``: one parameter ``T`` minimising the negative log-likelihood of the true
  class under ``softmax(log p / T)``. Robust with few samples; keeps the ranking of samples.
- ``isotonic``: a non-decreasing curve from the signal's raw confidence to the observed
  accuracy (pool-adjacent-violators), stored as knots through the pooled blocks' centroids and
  interpolated linearly between them, so the map stays strictly increasing where the data allow.

For a generation (a log-probability signal) the raw input is its signal vector and the
target its correctness: the temperature then minimises the NLL of being right under
``exp(logprob / T)``; isotonic works as for classes.

Everything here is numpy on plain arrays; nothing is fitted at import or at serving time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cascade.gating.gate import Calibration, GateRule, SignalName, assess, is_generation_signal
from cascade.gating.logprobs import GENERATION_SIGNAL_NAMES, NO_EVIDENCE

Method = Literal["none", "temperature", "isotonic"]
METHODS: tuple[str, ...] = ("none", "temperature", "isotonic")
DEFAULT_BINS = 15
_T_BOUNDS = (0.05, 20.0)


# -- measuring ----------------------------------------------------------------------------------


def expected_calibration_error(
    conf: np.ndarray, correct: np.ndarray, *, bins: int = DEFAULT_BINS
) -> float:
    """ECE: the sample-weighted mean gap between confidence and accuracy over equal-width bins.

    0 is perfect; an over-confident model (90% sure, 80% right) scores about 0.1.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(conf) != len(correct):
        raise ValueError("conf and correct must have the same length")
    if len(conf) == 0:
        return 0.0
    # Bin i holds (i/bins, (i+1)/bins]; confidence 0 goes to the first bin.
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            gap += mask.sum() * abs(conf[mask].mean() - correct[mask].mean())
    return float(gap / len(conf))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin mean confidence, accuracy and count: the data of a reliability diagram."""

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def reliability_bins(conf: np.ndarray, correct: np.ndarray, *, bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Mean confidence and accuracy per non-empty equal-width bin."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    rows = [(conf[idx == b].mean(), correct[idx == b].mean(), int((idx == b).sum()))
            for b in range(bins) if (idx == b).any()]
    if not rows:
        empty = np.zeros(0)
        return ReliabilityBins(empty, empty, empty.astype(int))
    c, a, n = zip(*rows)
    return ReliabilityBins(np.asarray(c), np.asarray(a), np.asarray(n))


# -- applying (vectorised twins of cascade.gating.gate.assess, for whole splits) ------------------------


def gate_confidences(probabilities: np.ndarray, rule: GateRule) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index, gate confidence) of every row of ``probabilities`` under ``rule``.

    Calls :func:`cascade.gating.gate.assess` row by row: exactly what serving computes, so offline
    numbers and live decisions cannot drift apart.
    """
    top = np.empty(len(probabilities), dtype=np.int64)
    conf = np.empty(len(probabilities), dtype=np.float64)
    for i, row in enumerate(probabilities):
        signals, c = assess(row, rule)
        top[i], conf[i] = signals.top_index, c
    return top, conf


def _tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    logp = np.log(np.clip(probabilities, 1e-300, None)) / temperature
    logp = np.where(probabilities > 0, logp, -np.inf)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# -- fitting ------------------------------------------------------------------------------------


def _nll(probabilities: np.ndarray, true_index: np.ndarray, temperature: float) -> float:
    p = _tempered(probabilities, temperature)[np.arange(len(true_index)), true_index]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(probabilities: np.ndarray, true_index: np.ndarray) -> float:
    """The temperature minimising the NLL of the true classes (golden-section search on log T).

    The NLL is convex in ``1/T``, hence unimodal in ``log T``: the search finds the optimum.
    ``true_index`` may be -1 for a label the model does not know; such rows are ignored.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    true_index = np.asarray(true_index)
    known = true_index >= 0
    probabilities, true_index = probabilities[known], true_index[known]
    if len(true_index) == 0:
        return 1.0
    return _golden(lambda t: _nll(probabilities, true_index, t))


def _binary_nll(logprob: np.ndarray, correct: np.ndarray, temperature: float) -> float:
    p = np.clip(np.exp(logprob / temperature), 1e-12, 1.0 - 1e-12)
    return float(-(correct * np.log(p) + (1.0 - correct) * np.log1p(-p)).mean())


def fit_logprob_temperature(logprob: np.ndarray, correct: np.ndarray) -> float:
    """The temperature ``T`` whose ``exp(logprob / T)`` best predicts correctness (binary NLL,
    golden-section search on log T). Unusable answers (:data:`NO_EVIDENCE`) are left out: their
    confidence is 0 whatever ``T``."""
    logprob = np.asarray(logprob, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    usable = logprob > NO_EVIDENCE
    logprob, correct = np.minimum(logprob[usable], 0.0), correct[usable]
    if len(logprob) == 0 or correct.min() == correct.max():
        return 1.0
    return _golden(lambda t: _binary_nll(logprob, correct, t))


def _golden(nll: Callable[[float], float]) -> float:
    """Minimise a unimodal function of ``log T`` over the temperature bounds."""
    lo, hi = np.log(_T_BOUNDS[0]), np.log(_T_BOUNDS[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(float(np.exp(a))), nll(float(np.exp(b)))
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(float(np.exp(b)))
        if hi - lo < 1e-6:
            break
    return float(np.exp((lo + hi) / 2.0))


def fit_isotonic(conf: np.ndarray, correct: np.ndarray, *, max_knots: int = 64) -> tuple[tuple[float, float], ...]:
    """Knots ``(raw, calibrated)`` of the isotonic regression of ``correct`` on ``conf``.

    Pool-adjacent-violators over the samples sorted by confidence; each pooled block becomes
    one knot at its centroid. Raw values of the knots strictly increase; calibrated values
    never decrease.
    """
    conf = np.asarray(conf, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if len(conf) != len(y):
        raise ValueError("conf and correct must have the same length")
    if len(conf) == 0:
        return ()
    order = np.argsort(conf, kind="stable")
    xs, ys = conf[order], y[order]
    # Equal confidences must share one value: start from one block per distinct confidence.
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    sums_y = list(np.add.reduceat(ys, starts))
    sums_x = list(np.add.reduceat(xs, starts))
    counts = list(np.diff(np.r_[starts, len(xs)]).astype(float))
    by: list[float] = []
    bx: list[float] = []
    bn: list[float] = []
    for sy, sx, n in zip(sums_y, sums_x, counts):
        by.append(sy)
        bx.append(sx)
        bn.append(n)
        while len(by) > 1 and by[-2] / bn[-2] >= by[-1] / bn[-1]:
            # Pool violators; equal means pool too so that raw values stay strictly increasing
            # and the curve is flat only where the data are.
            sy2, sx2, n2 = by.pop(), bx.pop(), bn.pop()
            by[-1] += sy2
            bx[-1] += sx2
            bn[-1] += n2
    knots = [(x / n, y_ / n) for x, y_, n in zip(bx, by, bn)]
    if len(knots) > max_knots:
        keep = np.unique(np.linspace(0, len(knots) - 1, max_knots).round().astype(int))
        knots = [knots[i] for i in keep]
    return tuple((round(float(x), 6), round(float(v), 6)) for x, v in knots)


@dataclass(frozen=True)
class CalibrationFit:
    """A fitted calibration of one tier and what it does to the calibration error."""

    method: Method
    calibration: Calibration | None
    ece_before: float
    ece_after: float
    ece_cv: dict[Method, float]
    """Cross-validated ECE of every method (``none`` is the raw confidence): honest numbers."""


def answered_correctly(top: np.ndarray, target: np.ndarray, signal: SignalName) -> np.ndarray:
    """Which samples a tier got right: its top class is the true class, or (a generation
    signal) the target already says so."""
    if is_generation_signal(signal):
        return np.asarray(target).astype(bool)
    return np.asarray(top == target)


def _fit(method: Method, probabilities: np.ndarray, true_index: np.ndarray,
         signal: SignalName) -> Calibration | None:
    if method == "none":
        return None
    if method == "temperature":
        if is_generation_signal(signal):
            column = probabilities[:, GENERATION_SIGNAL_NAMES.index(signal)]
            return Calibration(temperature=round(fit_logprob_temperature(column, true_index), 6))
        return Calibration(temperature=round(fit_temperature(probabilities, true_index), 6))
    rule = GateRule(signal=signal, threshold=0.0)
    top, conf = gate_confidences(probabilities, rule)
    return Calibration(curve=fit_isotonic(conf, answered_correctly(top, true_index, signal)))


def _ece_under(calibration: Calibration | None, probabilities: np.ndarray,
               true_index: np.ndarray, signal: SignalName) -> float:
    rule = GateRule(signal=signal, threshold=0.0, calibration=calibration)
    top, conf = gate_confidences(probabilities, rule)
    return expected_calibration_error(conf, answered_correctly(top, true_index, signal))


def cross_validated_ece(method: Method, probabilities: np.ndarray, true_index: np.ndarray,
                        signal: SignalName, *, folds: int = 5, seed: int = 0) -> float:
    """ECE of ``method`` fitted on k-1 folds and measured on the held-out fold, pooled."""
    n = len(true_index)
    if n < folds * 2:
        return _ece_under(_fit(method, probabilities, true_index, signal), probabilities,
                          true_index, signal)
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    conf = np.empty(n)
    ok = np.empty(n, dtype=bool)
    for k in range(folds):
        test = fold_of == k
        cal = _fit(method, probabilities[~test], true_index[~test], signal)
        top, c = gate_confidences(probabilities[test], GateRule(signal, 0.0, calibration=cal))
        conf[test], ok[test] = c, answered_correctly(top, true_index[test], signal)
    return expected_calibration_error(conf, ok)


def fit_calibration(
    probabilities: np.ndarray,
    true_index: np.ndarray,
    *,
    signal: SignalName = "max_prob",
    method: Method | Literal["auto"] = "auto",
) -> CalibrationFit:
    """Fit one tier's calibration on the calibration split.

    ``true_index`` is the index of each sample's true class in the model's classes (for a
    generation signal: each answer's correctness, 1 or 0, and ``probabilities`` the signal
    vectors). ``auto``
    picks, among none, temperature and isotonic, the lowest cross-validated ECE (a calibration
    that does not help out of sample is not applied).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    true_index = np.asarray(true_index)
    methods: Sequence[Method] = ("none", "temperature", "isotonic")
    cv = {m: cross_validated_ece(m, probabilities, true_index, signal) for m in methods}
    chosen: Method = min(methods, key=lambda m: (round(cv[m], 6), methods.index(m))) \
        if method == "auto" else method
    calibration = _fit(chosen, probabilities, true_index, signal)
    return CalibrationFit(
        method=chosen,
        calibration=calibration,
        ece_before=_ece_under(None, probabilities, true_index, signal),
        ece_after=_ece_under(calibration, probabilities, true_index, signal),
        ece_cv=cv,
    )
