"""From a typed model output to the gate's inputs: one scorer per output kind.

:func:`assess_output` is what serving calls; for classifications it is exactly
:func:`~cascade.gating.gate.assess` (the scorer replay and the benchmark use too), so offline
numbers stay the live ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.contract.outputs import Classification, Output
from cascade.errors import ModelError
from cascade.gating.gate import GateRule, Signals, assess

__all__ = ["Assessment", "assess_output"]


@dataclass(slots=True)  # built per request: frozen would cost more than it guards
class Assessment:
    """What the gate decides on: the predicted label, its (calibrated) confidence, the signals,
    and the raw probabilities the decision log keeps."""

    label: str
    confidence: float
    signals: Signals
    probabilities: npt.NDArray[np.floating[Any]]


def assess_output(output: Output, rule: GateRule) -> Assessment:
    """Score one output under ``rule``."""
    if isinstance(output, Classification):
        signals, conf = assess(output.probabilities, rule)
        return Assessment(output.classes[signals.top_index], conf, signals, output.probabilities)
    # Generation outputs get their scorer (token log-probability signals) with the generative
    # tiers; until then a tier refuses to serve them rather than guess a confidence.
    raise ModelError(f"no gate scorer for {output.kind!r} outputs yet", field="runtime")
