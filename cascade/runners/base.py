"""The one small interface every model runtime implements, and what a runner returns.

Serving calls :meth:`Runner.run` (async, with the request's deadline) and gets one typed
:data:`~cascade.contract.outputs.Output` per input. Offline tools (build validation, evaluation,
calibration) may also call a runtime's synchronous batch API directly, as ``OnnxRunner`` offers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import (
    Classification,
    CompletionInput,
    Generation,
    Output,
    TokenDelta,
)
from cascade.errors import InvalidInput

__all__ = ["BatchClassifier", "Classification", "CompletionInput", "Generation", "Output",
           "Runner", "StreamingRunner", "TokenDelta", "completion_inputs"]


@runtime_checkable
class Runner(Protocol):
    """Turns a batch of decoded task inputs into typed outputs.

    ``model_name`` identifies the model in traces and hops (e.g. ``vision/endpoint:MLP(16)-int8``).
    """

    model_name: str
    task: str

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """One output per input, in order. Blocking runtimes do their work off the event loop
        unless they are faster than a thread hop (see :mod:`cascade.runners.execution`)."""
        ...

    def warmup(self) -> None:
        """Run one throw-away inference so the first real request pays no setup cost."""
        ...

    def close(self) -> None:
        """Release threads, sessions or connections (the tier is stopping)."""
        ...


@runtime_checkable
class StreamingRunner(Runner, Protocol):
    """A generative runner that can also hand out tokens as they are produced.

    ``run([CompletionInput])`` returns ``[Generation]``; ``stream(one CompletionInput)`` yields a
    :class:`TokenDelta` per token, then exactly one :class:`Generation` holding the whole
    answer (the same one ``run`` would return). Generation stops at ``max_tokens``
    (``finish_reason="length"``) or when the deadline passes (``"deadline"``, with what was
    generated so far); a consumer that stops iterating early (a client gone) ends the
    generation too.
    """

    def stream(self, inputs: CompletionInput,
               deadline: Deadline | None = None) -> AsyncIterator[TokenDelta | Generation]:
        """Tokens as they come, then the whole :class:`Generation`."""
        ...


def completion_inputs(inputs: Any) -> list[CompletionInput]:
    """What a generative runner's ``run`` takes: one :class:`CompletionInput` or a non-empty
    sequence of them (422 naming ``input`` otherwise)."""
    items = [inputs] if isinstance(inputs, CompletionInput) \
        else list(inputs) if isinstance(inputs, (list, tuple)) else []
    if not items or not all(isinstance(item, CompletionInput) for item in items):
        raise InvalidInput("a generative model takes a completion input or a non-empty list "
                           "of them", field="input")
    return items


@runtime_checkable
class BatchClassifier(Protocol):
    """A classifier runtime that offline tools (build validation, evaluation, calibration,
    benchmark) can call synchronously on a batch: ``predict_proba`` columns follow ``classes``."""

    model_name: str
    classes: tuple[str, ...]

    def predict_proba(self, inputs: Any) -> npt.NDArray[np.floating[Any]]:
        """Probabilities [N, len(classes)], each row summing to ~1."""
        ...

    def warmup(self) -> None:
        """Run one throw-away inference (latency measurements start warm)."""
        ...
