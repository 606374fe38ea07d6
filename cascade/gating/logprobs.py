"""Confidence of a generated answer from its token log-probabilities.

Signals of one :class:`~cascade.contract.outputs.Generation`, all natural-log probabilities
(``<= 0``; the gate's confidence of a signal is ``exp(value)``, in [0, 1]):

- ``mean_logprob``: mean over every generated token (``exp``: the geometric-mean token
  probability of the whole answer);
- ``min_logprob``: the least likely generated token;
- ``field_mean_logprob``: per field of a structured (JSON) answer the mean over the tokens of
  its value, then the weakest field's;
- ``field_min_logprob``: the least likely token inside any field's value;
- ``answer_logprob``: the sum over the tokens of every field's value (``exp``: the model's
  probability of exactly these values, given the keys and punctuation around them).

The field signals look only at the values, not at the JSON punctuation and keys (which a
grammar forces, and whose raw log-probabilities say little). A value's tokens are those
overlapping its characters plus its closing quote: the decision to end the value there is
part of the answer. Tokens are mapped onto the text by their own texts
(:attr:`Generation.tokens`), tolerating tokens that carry only part of a multi-byte character
(their text is empty).

A structured answer that is not a JSON object carrying every expected field gets every signal
at :data:`NO_EVIDENCE` (confidence 0: escalate). The signals travel as a plain vector in
:data:`GENERATION_SIGNAL_NAMES` order: what decision logs store and replay re-decides from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import numpy.typing as npt

from cascade.contract.outputs import Generation

__all__ = ["GENERATION_SIGNAL_NAMES", "NO_EVIDENCE", "FieldScore", "GenerationSignals",
           "generation_signals", "json_value_spans", "token_spans", "vector_confidence"]

GENERATION_SIGNAL_NAMES: tuple[str, ...] = (
    "mean_logprob", "min_logprob", "field_mean_logprob", "field_min_logprob", "answer_logprob")
NO_EVIDENCE = -1.0e4
"""Log-probability standing for "no usable answer" (``exp`` is exactly 0.0); finite, so that
decision logs stay plain JSON."""
_WS = " \t\r\n"


@dataclass(frozen=True, slots=True)
class FieldScore:
    """One field of a structured answer: its value and its tokens' log-probabilities."""

    name: str
    value: Any
    mean_logprob: float
    min_logprob: float
    sum_logprob: float
    tokens: int


@dataclass(frozen=True, slots=True)
class GenerationSignals:
    """The gate's signals of one generation (see the module docstring).

    ``valid``: the answer is usable (a structured answer parsed and carries every field).
    ``max_prob``, ``margin`` and ``entropy`` are the classification signals' columns in the
    decision log: None here.
    """

    mean_logprob: float
    min_logprob: float
    field_mean_logprob: float
    field_min_logprob: float
    answer_logprob: float
    valid: bool = True
    fields: tuple[FieldScore, ...] = ()
    top_index: int = 0
    max_prob: None = None
    margin: None = None
    entropy: None = None

    def vector(self) -> list[float]:
        """The signals in :data:`GENERATION_SIGNAL_NAMES` order."""
        return [self.mean_logprob, self.min_logprob, self.field_mean_logprob,
                self.field_min_logprob, self.answer_logprob]

    @classmethod
    def from_vector(cls, values: Sequence[float] | npt.NDArray[Any]) -> GenerationSignals:
        """Signals back from a stored vector (per-field details are not kept)."""
        v = [float(x) for x in values]
        if len(v) != len(GENERATION_SIGNAL_NAMES):
            raise ValueError(f"a generation's signal vector has {len(GENERATION_SIGNAL_NAMES)} "
                             f"values ({', '.join(GENERATION_SIGNAL_NAMES)}); got {len(v)}")
        return cls(v[0], v[1], v[2], v[3], v[4], valid=min(v) > NO_EVIDENCE)

    def as_dict(self) -> dict[str, float]:
        """The signals as a plain dict (for decision logs and span attributes)."""
        return dict(zip(GENERATION_SIGNAL_NAMES, self.vector()))


_UNUSABLE = GenerationSignals(*(NO_EVIDENCE,) * 5, valid=False)


def vector_confidence(values: Sequence[float] | npt.NDArray[Any], signal: str,
                      temperature: float = 1.0) -> float:
    """Confidence in [0, 1] of one signal of a stored vector: ``exp(value / temperature)``."""
    value = float(values[GENERATION_SIGNAL_NAMES.index(signal)])
    if value <= NO_EVIDENCE or math.isnan(value):
        return 0.0
    return min(1.0, math.exp(min(0.0, value) / temperature))


def token_spans(tokens: Sequence[str], text: str) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of every token in ``text``.

    Tokens are found left to right; a token not found within a few characters of where the
    previous one ended (or with an empty text: part of a multi-byte character) gets the
    characters up to the next found token, possibly none.
    """
    if "".join(tokens) == text:
        spans, pos = [], 0
        for tok in tokens:
            spans.append((pos, pos + len(tok)))
            pos += len(tok)
        return spans
    found: list[tuple[int, int] | None] = []
    pos = 0
    for tok in tokens:
        j = text.find(tok, pos) if tok else -1
        if tok and 0 <= j - pos <= 4:
            found.append((j, j + len(tok)))
            pos = j + len(tok)
        else:
            found.append(None)
    spans = []
    prev_end = 0
    for i, span in enumerate(found):
        if span is None:
            nxt = next((s[0] for s in found[i + 1:] if s is not None), len(text))
            span = (prev_end, max(prev_end, nxt))
        spans.append(span)
        prev_end = span[1]
    return spans


def json_value_spans(text: str) -> dict[str, tuple[Any, int, int]] | None:
    """Each top-level key of a JSON object in ``text`` → (value, start, end) of the value's
    characters (a string's content and its closing quote; another value's literal).

    None when ``text`` is not exactly one JSON object (surrounding whitespace allowed).
    """
    decoder = json.JSONDecoder()
    n = len(text)
    i = _skip(text, 0)
    if i >= n or text[i] != "{":
        return None
    out: dict[str, tuple[Any, int, int]] = {}
    i = _skip(text, i + 1)
    try:
        if i < n and text[i] == "}":
            return out if _skip(text, i + 1) == n else None
        while True:
            if i >= n or text[i] != '"':
                return None
            key, i = scanstring(text, i + 1)
            i = _skip(text, i)
            if i >= n or text[i] != ":":
                return None
            start = _skip(text, i + 1)
            value, end = decoder.raw_decode(text, start)
            span = (start + 1, end) if isinstance(value, str) else (start, end)
            out[key] = (value, *span)
            i = _skip(text, end)
            if i < n and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < n and text[i] == "}":
                return out if _skip(text, i + 1) == n else None
            return None
    except ValueError:
        return None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def generation_signals(generation: Generation,
                       fields: Sequence[str] | None = None) -> GenerationSignals:
    """The signals of one generation.

    ``fields``: the keys a structured answer must carry (the task's schema); the answer must
    then be a JSON object holding all of them, else it is unusable (confidence 0). Without
    ``fields`` an answer that starts with ``{`` is held to being a JSON object (its keys are
    its fields), and any other text is free text: its field signals are its whole-answer ones.
    """
    logprobs = [float(x) for x in generation.token_logprobs]
    if not logprobs or generation.finish_reason == "deadline":
        return _UNUSABLE
    mean_lp, min_lp = sum(logprobs) / len(logprobs), min(logprobs)
    structured = fields is not None or generation.text.lstrip().startswith("{")
    if not structured:
        return GenerationSignals(mean_lp, min_lp, mean_lp, min_lp, sum(logprobs))
    values = json_value_spans(generation.text)
    if values is None or (fields is not None and not set(fields) <= set(values)):
        return _UNUSABLE
    spans = token_spans(generation.tokens, generation.text)
    scores = []
    for name in fields or list(values):
        value, lo, hi = values[name]
        picked = [lp for lp, (a, b) in zip(logprobs, spans)
                  if (a < hi and b > lo) or (a == b and lo <= a < hi)]
        if not picked:  # tokens and text disagree: judge the field by the whole answer
            picked = logprobs
        scores.append(FieldScore(name, value, sum(picked) / len(picked), min(picked),
                                 sum(picked), len(picked)))
    if not scores:
        return GenerationSignals(mean_lp, min_lp, mean_lp, min_lp, sum(logprobs))
    return GenerationSignals(
        mean_logprob=mean_lp, min_logprob=min_lp,
        field_mean_logprob=min(s.mean_logprob for s in scores),
        field_min_logprob=min(s.min_logprob for s in scores),
        answer_logprob=sum(s.sum_logprob for s in scores),
        fields=tuple(scores),
    )
