"""Calibrate and replay on the generative task, from real recorded GGUF answers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cascade.gating.logprobs import (
    GENERATION_SIGNAL_NAMES,
    generation_signals,
    json_value_spans,
    token_spans,
)
from cascade.lab.evaluation import predict_split
from cascade.lab.fit import FitOptions, fit_task
from cascade.lab.generative.records import Record
from cascade.lab.replay import replay_task, traffic_from_split
from cascade.models.extraction.fields import FIELDS
from cascade.policy import load_policy, load_policy_bytes
from cascade.policy.goals import Goals
from tests.generative_fixture import FIXTURE, generative_models_dir

ROOT = Path(__file__).resolve().parents[2]
TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason="no recorded answers")


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    return generative_models_dir(tmp_path_factory.mktemp("models"))


def test_recorded_answers_become_tier_predictions(gen_dir):
    labels, preds = predict_split(gen_dir, "extraction", TIERS, "calibration")
    for tier in TIERS:
        p = preds[tier]
        assert p.output == "generation" and p.classes == ()
        assert p.probabilities.shape == (len(labels), len(GENERATION_SIGNAL_NAMES))
        assert np.all(p.probabilities <= 0.0)
        assert ((np.asarray(p.predicted) == np.asarray(labels)) == p.correct).all()
    # the bigger models do better than the smallest one
    assert preds["edge-server"].accuracy > preds["endpoint"].accuracy


def test_fields_map_onto_real_tokens():
    """On every parsed recorded answer, the tokens counted for a field spell out its value."""
    runs = json.loads(FIXTURE.read_text())["runs"]
    checked = 0
    for run in runs.values():
        for data in run["splits"]["calibration"]:
            generation = Record.from_json(data).generation
            signals = generation_signals(generation, FIELDS)
            if not signals.valid:
                continue
            spans = token_spans(generation.tokens, generation.text)
            values = json_value_spans(generation.text)
            assert values is not None
            for field in signals.fields:
                _, lo, hi = values[field.name]
                picked = [tok for tok, (a, b) in zip(generation.tokens, spans)
                          if (a < hi and b > lo) or (a == b and lo <= a < hi)]
                assert len(picked) == field.tokens >= 1
                assert str(field.value) in "".join(picked)
                assert field.min_logprob <= field.mean_logprob <= 0.0
                checked += 1
    assert checked >= 40


def test_fit_writes_a_generative_section_that_replay_reproduces(gen_dir):
    goals = Goals(max_cloud_share=0.5)
    fitted = fit_task(gen_dir, "extraction", TIERS, goals, FitOptions(signal="auto"))
    assert fitted.signal in GENERATION_SIGNAL_NAMES
    section = fitted.section
    assert set(section["tiers"]) == set(TIERS)
    for tier in section["tiers"].values():
        assert tier["signal"] == fitted.signal and "class_thresholds" not in tier
    assert "drift_reference" in section["tiers"]["endpoint"]
    doc = {"version": 1, "name": "gen", "tasks": {"extraction": section}}
    loaded = load_policy_bytes(yaml.safe_dump(doc).encode(), source="gen.yaml")
    traffic = traffic_from_split(gen_dir, "extraction", TIERS, "calibration")
    replayed = replay_task(traffic, loaded)
    assert replayed.accuracy == pytest.approx(fitted.outcome.accuracy)
    assert replayed.cloud_share == pytest.approx(fitted.outcome.top_share)
    assert replayed.cloud_share <= 0.5 + 1e-9


def test_an_unusable_answer_never_passes_a_threshold(gen_dir):
    _, preds = predict_split(gen_dir, "extraction", TIERS, "test")
    for p in preds.values():
        conf = p.confidences("field_min_logprob")
        unusable = p.probabilities.min(axis=1) <= -1e4
        assert (conf[unusable] == 0.0).all()
        assert np.allclose(conf[~unusable], np.exp(p.probabilities[~unusable, 3]))
    assert math.isfinite(float(np.mean([p.accuracy for p in preds.values()])))


def cascade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_calibrate_and_replay_from_the_command_line(gen_dir, tmp_path):
    out = tmp_path / "gen.yaml"
    r = cascade("policy", "calibrate", "--task", "extraction", "-g", "cloud<=50%",
                "--models-dir", str(gen_dir), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    policy = load_policy(out)
    assert policy.task("extraction").tiers["endpoint"].signal in GENERATION_SIGNAL_NAMES
    r = cascade("policy", "replay", str(out), "--live", str(out), "--models-dir", str(gen_dir),
                "--split", "test")
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert "extraction:" in r.stdout and "answered by cloud" in r.stdout


def test_a_classifier_signal_on_the_generative_task_is_refused(gen_dir, tmp_path):
    r = cascade("policy", "calibrate", "--task", "extraction", "--signal", "max_prob",
                "--models-dir", str(gen_dir), "--out", str(tmp_path / "x.yaml"))
    assert r.returncode == 2
    assert "task 'extraction' generates text; its signals are mean_logprob" in r.stdout + r.stderr


def test_fitted_to_agree_with_the_top_tier_every_answer_below_it_is_the_tops(gen_dir):
    """``target='agreement'``: with ``accuracy>=top`` a lower tier answers only what the top
    tier would answer the same on the split (not the samples both get wrong), the written
    policy does exactly what the search found (its thresholds are rounded up, so an "answer
    none" cut above an isotonic plateau stays above it), and the expected accuracy is against
    the labels."""
    goals = Goals(max_accuracy_drop_vs_top=0.0, max_cloud_share=0.5)
    fitted = fit_task(gen_dir, "extraction", TIERS, goals,
                      FitOptions(signal="auto", target="agreement"))
    assert fitted.target == "agreement" and fitted.resolved_goals.min_accuracy == 1.0
    doc = {"version": 1, "name": "gen", "tasks": {"extraction": fitted.section}}
    loaded = load_policy_bytes(yaml.safe_dump(doc).encode(), source="gen.yaml")
    traffic = traffic_from_split(gen_dir, "extraction", TIERS, "calibration")
    replayed = replay_task(traffic, loaded)
    assert replayed.agreement_with_top == pytest.approx(1.0)
    assert replayed.accuracy == pytest.approx(fitted.outcome.accuracy)
    _, preds = predict_split(gen_dir, "extraction", TIERS, "calibration")
    assert fitted.outcome.accuracy == pytest.approx(preds["cloud"].accuracy)


def test_thresholds_are_written_rounded_up():
    from cascade.lab.fit import _round_threshold

    plateau = 0.030303030303030304  # many samples at exactly this calibrated confidence
    none = float(np.nextafter(plateau, np.inf))  # the search's "answer none" cut
    assert _round_threshold(none) > plateau  # to the nearest it was 0.030303: below them all
    assert _round_threshold(0.25) == 0.25 and _round_threshold(0.1234561) == 0.123457
    assert _round_threshold(0.0) == 0.0 and _round_threshold(1.0) == 1.0
