"""From a typed model output to the gate's inputs: one scorer per output kind.

:func:`assess_output` is what serving calls; for classifications it is exactly
:func:`~cascade.gating.gate.assess` (the scorer replay and the benchmark use too), so offline
numbers stay the live ones. A generation is scored from its token log-probabilities
(:mod:`cascade.gating.logprobs`); its raw gate input, kept as ``Assessment.probabilities``
(what the decision log stores and replay re-decides from), is its signal vector.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.contract.outputs import Classification, Generation, Output
from cascade.errors import ModelError
from cascade.gating.gate import GateRule, Signals, assess, is_generation_signal
from cascade.gating.logprobs import GenerationSignals, generation_signals

__all__ = ["Assessment", "answer_label", "assess_generation", "assess_output"]


@dataclass(slots=True)  # built per request: frozen would cost more than it guards
class Assessment:
    """What the gate decides on: the predicted label, its (calibrated) confidence, the signals,
    and the raw gate input the decision log keeps (a classification's probabilities, a
    generation's signal vector).

    For a generation, ``label`` is the answer: a structured answer as compact JSON (its fields
    in the schema's order), free text as generated, an unusable answer as its raw text; ``text``
    is the generated text and ``fields`` the parsed answer (None: not a usable JSON object).
    """

    label: str
    confidence: float
    signals: Signals | GenerationSignals
    probabilities: npt.NDArray[np.floating[Any]]
    text: str | None = None
    fields: dict[str, Any] | None = None


def assess_output(output: Output, rule: GateRule, *,
                  fields: Sequence[str] | None = None) -> Assessment:
    """Score one output under ``rule``.

    ``fields``: for a generation of a structured task, the keys its JSON answer must carry
    (the manifest's ``output.fields``); see :func:`assess_generation`.
    """
    if isinstance(output, Classification):
        if is_generation_signal(rule.signal):
            raise ModelError(f"signal {rule.signal!r} scores generations; this model returns "
                             "classifications (use max_prob, margin or entropy)",
                             field="signal")
        signals, conf = assess(output.probabilities, rule)
        return Assessment(output.classes[signals.top_index], conf, signals, output.probabilities)
    if isinstance(output, Generation):
        return assess_generation(output, rule, fields=fields)
    raise ModelError(f"no gate scorer for {getattr(output, 'kind', type(output).__name__)!r} "
                     "outputs", field="runtime")


def assess_generation(output: Generation, rule: GateRule, *,
                      fields: Sequence[str] | None = None) -> Assessment:
    """Score one generation: its log-probability signals and the rule's calibrated confidence.

    A structured answer (``fields`` given, or text starting with ``{``) that is not a JSON
    object carrying every field has confidence 0: the tier escalates it (or, at the top,
    applies its floor action).
    """
    if not is_generation_signal(rule.signal):
        raise ModelError(f"signal {rule.signal!r} scores classifications; this model generates "
                         "text (use mean_logprob, min_logprob, field_mean_logprob, "
                         "field_min_logprob or answer_logprob)", field="signal")
    scored = generation_signals(output, fields)
    vector = np.asarray(scored.vector(), dtype=np.float64)
    _, conf = assess(vector, rule)
    parsed = {f.name: f.value for f in scored.fields} if scored.valid and scored.fields else None
    return Assessment(answer_label(output.text, parsed), conf, scored, vector, output.text, parsed)


def answer_label(text: str, parsed: dict[str, Any] | None) -> str:
    """A generation's label: its parsed fields as compact JSON, else its stripped text."""
    if parsed is None:
        return text.strip()
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
