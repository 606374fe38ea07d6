"""Run the model ladder over a stored split, without any server: the data behind calibration,
replay and the benchmark. Uses only onnxruntime + numpy (no scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade.gating.gate import GateRule, SignalName, assess, raw_confidence


@dataclass(frozen=True)
class TierPredictions:
    """One tier's outputs on one split: raw gate inputs, predicted labels, correctness.

    A classifier's ``probabilities`` are [N, K] over ``classes``; a generative tier's
    (``output == "generation"``, no classes) are its answers' signal vectors [N, 5] and its
    ``predicted`` labels the answers in canonical form (equal labels: equal answers).
    """

    tier: str
    model_name: str
    classes: tuple[str, ...]
    probabilities: np.ndarray  # [N, K] or [N, 5]
    predicted: list[str]
    correct: np.ndarray  # [N] bool
    output: str = "classification"

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0

    def confidences(self, signal: SignalName | GateRule) -> np.ndarray:
        """The gate confidence of every sample (same function as serving): the raw confidence
        under a signal name, or the calibrated one under a policy's :class:`GateRule`."""
        if isinstance(signal, GateRule):
            return np.asarray([assess(row, signal)[1] for row in self.probabilities])
        return np.asarray([raw_confidence(row, signal) for row in self.probabilities])


def predict_split(
    models_dir: Path, task: str, tiers: Sequence[str], split: str = "calibration", *,
    batch_size: int = 1,
) -> tuple[list[str], dict[str, TierPredictions]]:
    """Labels of ``split`` and each tier's predictions on it.

    One sample per call by default, exactly as serving runs the models: int8 models quantize
    activations dynamically over the whole input tensor, so a batched run gives (slightly)
    different probabilities than the single requests the gate actually sees.
    """
    from cascade.models.manifest import load_manifest, load_split

    if load_manifest(models_dir).task(task).generative:
        from cascade.lab.generative.predictions import predict_generative

        return predict_generative(models_dir, task, tiers, split)
    inputs, labels = load_split(models_dir, task, split)
    return labels, predict_inputs(models_dir, task, tiers, inputs, labels, batch_size=batch_size)


def predict_inputs(
    models_dir: Path, task: str, tiers: Sequence[str], inputs: Any, labels: Sequence[str], *,
    batch_size: int = 1,
) -> dict[str, TierPredictions]:
    """Each tier's predictions on given inputs (e.g. a corrupted copy of the test split)."""
    from cascade.models.repository import load_classifier

    out: dict[str, TierPredictions] = {}
    for tier in tiers:
        runner = load_classifier(models_dir, task, tier)
        chunks = [
            np.asarray(runner.predict_proba(inputs[i : i + batch_size]), dtype=np.float64)
            for i in range(0, len(labels), batch_size)
        ]
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(runner.classes)))
        predicted = [runner.classes[i] for i in probs.argmax(axis=1)]
        correct = np.asarray([p == y for p, y in zip(predicted, labels)], dtype=bool)
        out[tier] = TierPredictions(tier, runner.model_name, tuple(runner.classes), probs, predicted, correct)
    return out
