"""A generative ladder's predictions on a held-out split, from its recorded generations.

Each recorded :class:`~cascade.contract.outputs.Generation` is scored by the gate's own scorer
(:func:`cascade.gating.logprobs.generation_signals`, what :func:`~cascade.gating.scoring.
assess_output` computes live) and checked against the truth with the task's exact match, so
calibration, replay and the benchmark see what serving would see.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade.errors import ModelError
from cascade.gating.logprobs import generation_signals
from cascade.lab.evaluation import TierPredictions
from cascade.lab.generative.records import Record, Recordings, predictions_path, split_digest

__all__ = ["ScoredAnswers", "predict_generative", "score_records"]


@dataclass(frozen=True)
class ScoredAnswers:
    """One run's answers on a split: signal vectors, canonical answers, correctness, and per
    field how often it matched."""

    vectors: np.ndarray
    predicted: list[str]
    correct: np.ndarray
    valid: np.ndarray
    field_accuracy: dict[str, float]


def score_records(records: Sequence[Record], labels: Sequence[str],
                  fields: Sequence[str]) -> ScoredAnswers:
    """Score recorded generations against the split's true answers (canonical JSON)."""
    from cascade.models.extraction.fields import canonical, field_matches

    if len(records) != len(labels):
        raise ModelError(f"{len(records)} recorded answers for {len(labels)} samples: the "
                         "recording is of another split; rebuild with "
                         "`cascade models build --generative --force`")
    vectors, predicted, correct, valid = [], [], [], []
    matched = dict.fromkeys(fields, 0)
    for record, label in zip(records, labels):
        signals = generation_signals(record.generation, fields)
        vectors.append(signals.vector())
        truth = json.loads(label)
        answer = {f.name: f.value for f in signals.fields} if signals.valid else None
        valid.append(answer is not None)
        if answer is None:
            predicted.append(record.generation.text.strip())
            correct.append(False)
            continue
        predicted.append(canonical(answer, tuple(fields)))
        per_field = field_matches(answer, truth)
        for name in fields:
            matched[name] += per_field[name]
        correct.append(all(per_field.values()))
    n = max(1, len(labels))
    return ScoredAnswers(np.asarray(vectors, dtype=np.float64).reshape(len(labels), -1),
                         predicted, np.asarray(correct, dtype=bool), np.asarray(valid, dtype=bool),
                         {name: round(count / n, 4) for name, count in matched.items()})


def predict_generative(models_dir: Path, task: str, tiers: Sequence[str],
                       split: str) -> tuple[list[str], dict[str, TierPredictions]]:
    """Labels of ``split`` and each generative tier's predictions on it, from the recordings
    ``cascade models build --generative`` made (:class:`ModelError` naming the tier when one
    is missing or was made on another model file, prompt or split)."""
    from cascade.models.manifest import GenerativeTierEntry, load_manifest, load_split

    manifest = load_manifest(models_dir)
    entry = manifest.task(task)
    texts, labels = load_split(models_dir, task, split)
    digest = split_digest(list(texts), labels)
    path = predictions_path(models_dir, task)
    recordings = Recordings.load(path, task)
    out: dict[str, TierPredictions] = {}
    for tier in tiers:
        model = manifest.tier(task, tier)
        assert isinstance(model, GenerativeTierEntry)  # a generative task's tiers are
        run = recordings.find(model.sha256, model.prompt)
        records = None if run is None else run.records(split, digest)
        if records is None:
            raise ModelError(f"{path}: no recorded answers of {task}/{tier} ({model.algorithm}, "
                             f"prompt {model.prompt}) on the {split} split; record them with "
                             "`cascade models build --generative`", field=f"{task}.{tier}")
        scored = score_records(records, labels, entry.fields)
        out[tier] = TierPredictions(tier, manifest.model_name(task, tier), (), scored.vectors,
                                    scored.predicted, scored.correct, output="generation")
    return list(labels), out
