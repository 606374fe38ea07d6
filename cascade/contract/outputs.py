"""What a model returns, typed by kind: the currency between runners and the gate.

A runner turns a batch of decoded inputs into one :data:`Output` per input. The gate never sees
a runtime's own objects: a scorer per output kind (:func:`cascade.gating.scoring.assess_output`)
turns an output into the gate's signals, the same way for serving, replay and the benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Classification", "CompletionInput", "Generation", "Output", "Probabilities",
           "TokenDelta"]

Probabilities = Sequence[float] | npt.NDArray[np.floating[Any]]
"""One output's class probabilities: a list or a numpy row (the gate accepts both)."""


@dataclass(slots=True)  # built per request: frozen would cost more than it guards
class Classification:
    """Probabilities over ``classes`` (same order), summing to about 1."""

    probabilities: npt.NDArray[np.floating[Any]]
    classes: tuple[str, ...]
    kind: Literal["classification"] = "classification"

    @property
    def top_index(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))


@dataclass(frozen=True, slots=True)
class Generation:
    """Generated text with what the gate needs to judge it.

    ``tokens`` and ``token_logprobs`` are parallel: the emitted tokens' texts and their
    natural-log probabilities (the generative gate's signals are their mean and minimum, over
    the whole answer or per field of a structured answer). ``finish_reason`` is ``stop``,
    ``length`` (``max_tokens`` reached) or ``deadline`` (the request's deadline cut it).
    ``ttft_ms``: time from the start of the call to the first token.
    """

    text: str
    tokens: tuple[str, ...]
    token_logprobs: tuple[float, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None = None
    kind: Literal["generation"] = "generation"


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """One streamed token of a generation in progress (see ``StreamingRunner.stream``)."""

    text: str
    logprob: float | None = None
    kind: Literal["token"] = "token"


@dataclass(frozen=True, slots=True)
class CompletionInput:
    """A decoded generative request, as a runner takes it: the whole prompt text (the task's
    prompt template already applied for this tier's model) and how to generate.

    ``json_schema``: constrain the output to JSON matching this schema (llama.cpp grammar,
    ``response_format`` for OpenAI-compatible servers); None for free text.
    """

    prompt: str
    max_tokens: int
    json_schema: Mapping[str, Any] | None = None
    stop: tuple[str, ...] = ()
    temperature: float = 0.0


Output = Classification | Generation
"""One model output; new kinds join this union (and get a scorer)."""
