"""Offline side of field operations: what a tier's answers were worth on the calibration
split, printed by ``cascade audit report`` next to the live estimate from shadow audits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["calibration_accuracy"]


def calibration_accuracy(models_dir: Path, task: str, model_tier: str, policy: Any,
                         tier: str) -> dict[str, Any]:
    """Accuracy on the calibration split of the answers ``tier`` (running the ladder's
    ``model_tier`` model) gives itself under ``policy``: the samples its gate answers, all of
    them reaching it (exact for the entry tier; an upper tier sees only what its lower tiers
    escalate, so for it this is the accuracy on the whole split's confident answers)."""
    from cascade.lab.evaluation import predict_split

    labels, predictions = predict_split(models_dir, task, [model_tier], "calibration")
    pred = predictions[model_tier]
    rule = policy.rule(task, tier)
    conf = pred.confidences(rule)
    answered = np.asarray([c >= rule.threshold_for(label)
                           for c, label in zip(conf, pred.predicted)], dtype=bool)
    n = int(answered.sum())
    return {"samples": len(labels), "answered": n,
            "accuracy": float(pred.correct[answered].mean()) if n else None,
            "accuracy_all": pred.accuracy}
