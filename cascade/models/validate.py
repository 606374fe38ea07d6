"""Measuring a loaded model on a held-out split: accuracy, agreement, single-request latency.

Works on any :class:`~cascade.runners.base.BatchClassifier`, so benchmarks can reuse it at serving time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.models.specs import INT8_MAX_ACCURACY_LOSS
from cascade.runners.base import BatchClassifier


@dataclass(frozen=True)
class Evaluation:
    """Probabilities of a whole split and the accuracy of their argmax."""

    probabilities: npt.NDArray[np.floating[Any]]
    accuracy: float

    @property
    def predictions(self) -> npt.NDArray[np.intp]:
        """Index of the most probable class per row."""
        predictions: npt.NDArray[np.intp] = np.argmax(self.probabilities, axis=1)
        return predictions


def evaluate(runner: BatchClassifier, inputs: Any, labels: Sequence[str]) -> Evaluation:
    """Run the whole split as one batch and score the argmax against ``labels``."""
    probabilities = runner.predict_proba(inputs)
    predicted = np.asarray(runner.classes)[np.argmax(probabilities, axis=1)]
    accuracy = float(np.mean(predicted == np.asarray(labels)))
    return Evaluation(probabilities=probabilities, accuracy=accuracy)


def agreement(a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]]) -> float:
    """Share of rows whose argmax is the same in ``a`` and ``b``."""
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def single_request_latency_ms(runner: BatchClassifier, inputs: Any) -> tuple[float, float]:
    """Median and 95th percentile milliseconds of one-sample calls over ``inputs``.

    One call per sample, as the service makes them; includes input preparation.
    """
    runner.warmup()
    samples = [inputs[i : i + 1] for i in range(len(inputs))]
    timings = np.empty(len(samples), dtype=np.float64)
    predict = runner.predict_proba
    clock = time.perf_counter_ns
    for i, sample in enumerate(samples):
        start = clock()
        predict(sample)
        timings[i] = clock() - start
    p50, p95 = np.percentile(timings, [50, 95]) / 1e6
    return round(float(p50), 4), round(float(p95), 4)


def quantization_warning(
    fp32_accuracy: float, int8_accuracy: float, *, graph_changed: bool = True
) -> str | None:
    """Why an int8 model is not a faithful twin of its fp32 model, or ``None`` if it is."""
    loss = round(fp32_accuracy - int8_accuracy, 9)  # 0.975 - 0.970 is 0.0050000000000000044
    if loss > INT8_MAX_ACCURACY_LOSS:
        return (
            f"int8 quantization costs {loss * 100:.2f} points of test accuracy "
            f"({fp32_accuracy:.2%} -> {int8_accuracy:.2%}), more than the "
            f"{INT8_MAX_ACCURACY_LOSS * 100:.1f} allowed"
        )
    if not graph_changed:
        return "int8 quantization left the graph unchanged (no MatMul/Gemm to quantize)"
    return None
