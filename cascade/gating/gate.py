"""Confidence gate: scoring (how confident?) kept apart from deciding (what to do?).

Both halves are pure functions over plain data so that a policy can be replayed offline on
recorded scores (``cascade policy replay``) and gives exactly the decisions live serving gave.

Signals of a classification, all computed from one probability vector ``p`` over ``K``
classes:

- ``max_prob``: the top-1 probability, in [1/K, 1].
- ``margin``: top-1 minus top-2 probability, in [0, 1].
- ``entropy``: Shannon entropy normalised by ``log K``, in [0, 1]; *lower* is more confident.

:func:`confidence` maps any signal onto one "higher is more confident" scale in [0, 1]
(``entropy`` becomes ``1 - entropy``) so that every threshold reads the same way:
answer when ``confidence >= threshold``.

A generation's signals are token log-probabilities (:mod:`cascade.gating.logprobs`: mean and
minimum over the answer and per field of a structured answer); its confidence under a signal
is ``exp(value)``. Its raw gate input is the vector of those signals, so the one :func:`assess`
serves, replays and benchmarks both kinds: the rule's signal says which kind it reads.

A rule may carry a :class:`Calibration` (fitted by ``cascade policy calibrate``): a temperature
applied to the probabilities before scoring, or an isotonic curve applied to the confidence
after it, so that a confidence of 0.9 means about 90% correct. :func:`assess` is the one
function serving, replay and the benchmark all use to get from probabilities to confidence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from cascade.contract.outputs import Probabilities
from cascade.gating.logprobs import GENERATION_SIGNAL_NAMES, GenerationSignals, vector_confidence

SignalName = Literal["max_prob", "margin", "entropy", "mean_logprob", "min_logprob",
                     "field_mean_logprob", "field_min_logprob", "answer_logprob"]
CLASSIFICATION_SIGNAL_NAMES: tuple[str, ...] = ("max_prob", "margin", "entropy")
SIGNAL_NAMES: tuple[str, ...] = CLASSIFICATION_SIGNAL_NAMES
"""The signals of a classification (``--signal auto`` of a classifier task chooses among them)."""
ALL_SIGNAL_NAMES: tuple[str, ...] = (*CLASSIFICATION_SIGNAL_NAMES, *GENERATION_SIGNAL_NAMES)


def is_generation_signal(signal: str) -> bool:
    """True for the token log-probability signals of a generation."""
    return signal in GENERATION_SIGNAL_NAMES


class Decision(StrEnum):
    """What a tier does with its local answer."""

    ANSWER = "answer"
    ESCALATE = "escalate"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Signals:
    """Confidence signals of one model output, plus the index of its top class."""

    top_index: int
    max_prob: float
    margin: float
    entropy: float

    def as_dict(self) -> dict[str, float]:
        """The signals as a plain dict (for decision logs and span attributes)."""
        return {"max_prob": self.max_prob, "margin": self.margin, "entropy": self.entropy}


def score(probabilities: Probabilities) -> Signals:
    """Compute the confidence signals of one probability vector.

    The vector is renormalised defensively (model outputs can drift from summing to exactly 1
    after quantisation); negative entries are treated as zero.
    """
    if hasattr(probabilities, "tolist"):
        # numpy rows: Python floats are ~10x faster to loop over than numpy scalars for small K.
        probabilities = probabilities.tolist()
    k = len(probabilities)
    if k == 0:
        raise ValueError("probabilities must not be empty")
    clipped = [p if p > 0.0 else 0.0 for p in probabilities]  # noqa: FURB136 - hot path, faster than max()
    total = sum(clipped)
    if total <= 0.0:
        # No information at all: uniform.
        clipped = [1.0 / k] * k
        total = 1.0
    p = [x / total for x in clipped]
    top_index = max(range(k), key=p.__getitem__)
    top1 = p[top_index]
    top2 = max((x for i, x in enumerate(p) if i != top_index), default=0.0)
    if k > 1:
        h = -sum(x * math.log(x) for x in p if x > 0.0)
        entropy = min(1.0, max(0.0, h / math.log(k)))
    else:
        entropy = 0.0
    return Signals(top_index=top_index, max_prob=top1, margin=top1 - top2, entropy=entropy)


def confidence(signals: Signals, signal: SignalName) -> float:
    """The chosen signal on a "higher is more confident" scale in [0, 1]."""
    if signal == "max_prob":
        return signals.max_prob
    if signal == "margin":
        return signals.margin
    if signal == "entropy":
        return 1.0 - signals.entropy
    raise ValueError(f"unknown signal {signal!r}; allowed: {', '.join(CLASSIFICATION_SIGNAL_NAMES)}")


def raw_confidence(raw: Probabilities, signal: SignalName) -> float:
    """Uncalibrated confidence of one raw gate input (a classification's probabilities or a
    generation's signal vector, as the signal's kind says)."""
    if is_generation_signal(signal):
        return vector_confidence(raw, signal)
    return confidence(score(raw), signal)


@dataclass(frozen=True, slots=True)
class Calibration:
    """How raw model output becomes calibrated confidence (plain data, fitted offline).

    ``temperature`` divides the log-probabilities before scoring (``p ** (1/T)``, renormalised;
    never changes the predicted class; for a generation, ``exp(logprob / T)``). ``curve`` maps the chosen signal's confidence through
    increasing ``(raw, calibrated)`` knots, linearly between them and flat beyond the ends.
    """

    temperature: float = 1.0
    curve: tuple[tuple[float, float], ...] = ()


def temper(probabilities: Probabilities, temperature: float) -> list[float]:
    """Temperature-scale a probability vector: ``softmax(log p / T)``."""
    if hasattr(probabilities, "tolist"):
        probabilities = probabilities.tolist()  # Python floats: faster than numpy scalars here
    if temperature == 1.0:
        return list(probabilities)
    inv = 1.0 / temperature
    scaled = [p**inv if p > 0.0 else 0.0 for p in probabilities]
    total = sum(scaled)
    return scaled if total <= 0.0 else [x / total for x in scaled]


def map_confidence(conf: float, curve: Sequence[tuple[float, float]]) -> float:
    """Piecewise-linear interpolation of ``conf`` through increasing ``(raw, calibrated)`` knots."""
    if not curve:
        return conf
    if conf <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if conf <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (conf - x0) / (x1 - x0)
    return curve[-1][1]


@dataclass(frozen=True, slots=True)
class GateRule:
    """The part of a policy one tier needs to decide: plain data, no I/O.

    ``floor_action`` is what a tier with no upstream (the top of the chain) does below its
    threshold: answer anyway, or say honestly that it does not know.
    """

    signal: SignalName
    threshold: float
    class_thresholds: tuple[tuple[str, float], ...] = ()
    floor_action: Literal["answer", "unknown"] = "answer"
    calibration: Calibration | None = None

    def threshold_for(self, label: str) -> float:
        """The threshold that applies to a predicted class."""
        for name, value in self.class_thresholds:
            if name == label:
                return value
        return self.threshold


def assess(probabilities: Probabilities,
           rule: GateRule) -> tuple[Signals | GenerationSignals, float]:
    """Signals of one model output and its (calibrated) confidence under ``rule``.

    The signals are those of the tempered probabilities; the predicted class is the same as
    the raw output's. Under a generation signal ``probabilities`` is the generation's signal
    vector (:meth:`GenerationSignals.vector`).
    """
    cal = rule.calibration
    if is_generation_signal(rule.signal):
        temperature = 1.0 if cal is None else cal.temperature
        conf = vector_confidence(probabilities, rule.signal, temperature)
        generated = GenerationSignals.from_vector(probabilities)
        return generated, conf if cal is None else map_confidence(conf, cal.curve)
    if cal is None:
        signals = score(probabilities)
        return signals, confidence(signals, rule.signal)
    signals = score(temper(probabilities, cal.temperature))
    return signals, map_confidence(confidence(signals, rule.signal), cal.curve)


def decide(conf: float, label: str, rule: GateRule, *, has_upstream: bool) -> Decision:
    """Decide what to do with a local answer of confidence ``conf`` predicting ``label``.

    Confident answers are returned; below the threshold a tier escalates when it has an
    upstream, otherwise it applies the policy's floor action.
    """
    if conf >= rule.threshold_for(label):
        return Decision.ANSWER
    if has_upstream:
        return Decision.ESCALATE
    return Decision.UNKNOWN if rule.floor_action == "unknown" else Decision.ANSWER
