"""Serving several requests' inputs in one model call without changing any answer.

A batching server (Ray Serve's ``@serve.batch``) hands a model the inputs of several
concurrent requests at once. Computing them as one tensor changes answers: an int8 model
quantizes its activations with one scale over the whole tensor, so a sample's probabilities
depend on the other samples in the batch; and even an fp32 GEMM takes another path for N rows
than for one, so the last bits differ. Measured on every built-in model over the test split
(batches of 2..32): between 0 % and 88 % of rows were bit-identical to the single-sample
answer, never 100 %. A tier's answer must not depend on who else asked at the same moment, so
:class:`ExactBatcher` computes a batch sample by sample unless a measurement on the model
itself showed batched and single answers identical (``vectorized``), and
:func:`batching_is_exact` is that measurement. What batching still saves is the per-request
hop into the model's process, which costs far more than the 0.05-0.42 ms a built-in model takes.

Pure numpy over a ``predict_proba`` callable: no server, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["BatchStats", "ExactBatcher", "batching_is_exact", "concat_inputs", "row_count"]

Predict = Callable[[Any], npt.NDArray[np.floating[Any]]]


def row_count(inputs: Any) -> int:
    """How many samples one request's decoded input holds (array rows or list items)."""
    return len(inputs)


def concat_inputs(batch: Sequence[Any]) -> Any:
    """Several requests' decoded inputs as one model input (arrays stacked, lists joined)."""
    if isinstance(batch[0], np.ndarray):
        return np.concatenate(batch, axis=0)
    joined: list[Any] = []
    for inputs in batch:
        joined.extend(inputs)
    return joined


def _rows(inputs: Any, start: int, stop: int) -> Any:
    return inputs[start:stop]


def batching_is_exact(predict: Predict, samples: Any, *, max_batch_size: int) -> bool:
    """True when ``predict`` on batches of 2..``max_batch_size`` of ``samples`` gives every
    row bit-identical to ``predict`` on that row alone (the condition for vectorizing)."""
    n = row_count(samples)
    single = [predict(_rows(samples, i, i + 1))[0] for i in range(n)]
    for size in range(2, max_batch_size + 1):
        for start in range(0, n, size):
            batch = predict(_rows(samples, start, min(start + size, n)))
            for offset, row in enumerate(batch):
                if not np.array_equal(row, single[start + offset]):
                    return False
    return True


@dataclass
class BatchStats:
    """What a batching model did: calls of the batched method, samples, largest batch."""

    batches: int = 0
    requests: int = 0
    samples: int = 0
    largest_batch: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    """Batch size (in requests) -> how many batches had it."""

    def record(self, requests: int, samples: int) -> None:
        """Count one batch of ``requests`` requests holding ``samples`` samples."""
        self.batches += 1
        self.requests += requests
        self.samples += samples
        self.largest_batch = max(self.largest_batch, requests)
        self.sizes[requests] = self.sizes.get(requests, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {"batches": self.batches, "requests": self.requests, "samples": self.samples,
                "largest_batch": self.largest_batch, "sizes": dict(self.sizes)}


class ExactBatcher:
    """Answers a batch of requests exactly as it would answer each one alone.

    ``vectorized``: compute the whole batch in one call (only for a model measured exact by
    :func:`batching_is_exact`); otherwise sample by sample.
    """

    def __init__(self, predict: Predict, *, vectorized: bool = False) -> None:
        self.predict = predict
        self.vectorized = vectorized
        self.stats = BatchStats()

    def run(self, batch: Sequence[Any]) -> list[npt.NDArray[np.floating[Any]]]:
        """Probabilities [rows, classes] per request of ``batch``, in order."""
        counts = [row_count(inputs) for inputs in batch]
        self.stats.record(len(batch), sum(counts))
        if not self.vectorized:
            return [np.concatenate([self.predict(_rows(inputs, i, i + 1))
                                    for i in range(count)])
                    for inputs, count in zip(batch, counts, strict=True)]
        probabilities = self.predict(concat_inputs(batch))
        out, start = [], 0
        for count in counts:
            out.append(probabilities[start:start + count])
            start += count
        return out
