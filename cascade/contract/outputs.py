"""What a model returns, typed by kind: the currency between runners and the gate.

A runner turns a batch of decoded inputs into one :data:`Output` per input. The gate never sees
a runtime's own objects: a scorer per output kind (:func:`cascade.gating.scoring.assess_output`)
turns an output into the gate's signals, the same way for serving, replay and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Classification", "Generation", "Output", "Probabilities"]

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

    ``token_logprobs`` are the natural-log probabilities of the emitted tokens (the generative
    gate's signals are their mean and minimum); ``finish_reason`` is ``stop``, ``length`` or
    ``deadline``.
    """

    text: str
    token_logprobs: tuple[float, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    kind: Literal["generation"] = "generation"


Output = Classification | Generation
"""One model output; new kinds join this union (and get a scorer)."""
