"""Batching does not change answers (cascade.runners.batching), measured on every built-in
model: computed as one tensor, int8 and fp32 models alike give rows that differ from the
single-sample answer; the exact batcher gives every row bit-identical to it, whatever the
batch size and whoever else is in the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cascade.models.manifest import load_split
from cascade.models.repository import load_classifier
from cascade.runners.batching import BatchStats, ExactBatcher, batching_is_exact, concat_inputs

TIERS = ("endpoint", "edge-node", "edge-server", "cloud")
MODELS = [(task, tier) for task in ("vision", "documents") for tier in TIERS]
ROWS = 48


@pytest.fixture(scope="module")
def splits(models_dir: Path) -> dict[str, object]:
    return {task: load_split(models_dir, task, "test")[0][:ROWS] for task in ("vision", "documents")}


@pytest.mark.parametrize(("task", "tier"), MODELS, ids=[f"{t}-{m}" for t, m in MODELS])
def test_exact_batcher_answers_every_batch_as_single_samples(models_dir, splits, task, tier):
    model = load_classifier(models_dir, task, tier)
    inputs = splits[task]
    single = [model.predict_proba(inputs[i:i + 1]) for i in range(ROWS)]
    batcher = ExactBatcher(model.predict_proba)
    for size in range(1, 17):
        # requests of one or two samples each, as concurrent callers would send them
        requests = [inputs[i:i + 1 + (i % 2)] for i in range(size)]
        answers = batcher.run(requests)
        for start, answer in enumerate(answers):
            expected = np.concatenate(single[start:start + len(answer)])
            assert np.array_equal(answer, expected)
    assert batcher.stats.batches == 16 and batcher.stats.largest_batch == 16


@pytest.mark.parametrize(("task", "tier"), MODELS, ids=[f"{t}-{m}" for t, m in MODELS])
def test_the_measurement_matches_what_vectorized_batches_do(models_dir, splits, task, tier):
    model = load_classifier(models_dir, task, tier)
    inputs = splits[task]
    exact = batching_is_exact(model.predict_proba, inputs, max_batch_size=8)
    vectorized = ExactBatcher(model.predict_proba, vectorized=True)
    requests = [inputs[i:i + 1] for i in range(8)]
    same = all(np.array_equal(answer, model.predict_proba(inputs[i:i + 1]))
               for i, answer in enumerate(vectorized.run(requests)))
    if not same:
        assert not exact  # a batch that changed an answer is never called exact
    if "int8" in model.model_name:
        # activations quantized with one scale per tensor: the batch changes the answers
        assert not exact


def test_concat_and_stats():
    arrays = concat_inputs([np.zeros((1, 3)), np.ones((2, 3))])
    assert arrays.shape == (3, 3)
    assert concat_inputs([["a"], ["b", "c"]]) == ["a", "b", "c"]
    stats = BatchStats()
    stats.record(3, 4)
    stats.record(1, 1)
    assert stats.as_dict() == {"batches": 2, "requests": 4, "samples": 5, "largest_batch": 3,
                               "sizes": {3: 1, 1: 1}}


def test_the_core_imports_no_ray():
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    probe = ("import cascade.cli, cascade.http.app, cascade.tier.compose, cascade.deploy.process, "
             "cascade.runners.batching, sys; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
