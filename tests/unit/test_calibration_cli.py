"""`cascade policy calibrate|replay` from the command line: files, exit codes, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cascade.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]


def cascade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(ROOT)})


def test_calibrate_writes_a_policy_that_says_how_it_was_made(models_dir, tmp_path):
    out = tmp_path / "vision-only.yaml"
    r = cascade("policy", "calibrate", "--task", "vision", "--signal", "max_prob",
                "-g", "accuracy>=top", "-g", "cloud<=10%", "--models-dir", str(models_dir),
                "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "✓ vision: expected accuracy" in r.stdout and "ECE before → after" in r.stdout
    text = out.read_text()
    assert text.startswith("# Made by `cascade policy calibrate --goal 'accuracy>=top' --goal "
                           "'cloud<=10%' --signal max_prob")
    assert "from the calibration split of" in text and "ECE before -> after" in text
    policy = load_policy(out)
    task = policy.task("vision")
    assert task.goals.max_cloud_share == 0.1 and task.goals.max_accuracy_drop_vs_top == 0.0
    assert list(task.tiers) == ["endpoint", "edge-node", "edge-server", "cloud"]
    assert task.tiers["cloud"].threshold == 0.0
    assert all(t.calibration.method in ("none", "temperature", "isotonic") for t in task.tiers.values())


def test_an_unreachable_goal_exits_1_and_writes_nothing(models_dir, tmp_path):
    out = tmp_path / "never.yaml"
    r = cascade("policy", "calibrate", "--task", "vision", "--signal", "max_prob", "--no-per-class",
                "-g", "accuracy>=1.0", "-g", "cloud<=0%", "--models-dir", str(models_dir),
                "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot be met on the calibration split; closest:" in r.stdout
    assert not out.exists()


def test_calibrated_to_agree_every_answer_below_the_top_is_the_tops(models_dir, tmp_path):
    out = tmp_path / "agree.yaml"
    r = cascade("policy", "calibrate", "--task", "vision", "--signal", "max_prob", "--no-per-class",
                "--target", "agreement", "-g", "accuracy>=top", "-g", "cloud<=50%",
                "--models-dir", str(models_dir), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(accuracy: agreement with the top tier)" in r.stdout
    text = out.read_text()
    assert "--target agreement" in text.splitlines()[0]
    assert "lower tiers fitted to agree with the top tier" in text
    replay = cascade("policy", "replay", str(out), "--live", str(out), "--task", "vision",
                     "--split", "calibration", "--models-dir", str(models_dir))
    assert "agreement with the top tier" in replay.stdout, replay.stdout + replay.stderr
    line = next(x for x in replay.stdout.splitlines() if "agreement with the top tier" in x)
    assert line.rstrip(" │").split()[-1] == "1.0000", line  # on the split it was fitted on


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["policy", "calibrate", "-g", "latency<=5"], "unknown metric 'latency'; allowed: accuracy"),
        (["policy", "calibrate", "-g", "accuracy"], "goal 'accuracy' is not understood"),
        (["policy", "calibrate", "-g", "audio:cloud<=0.1"], "unknown task 'audio'"),
        (["policy", "calibrate", "--task", "audio"], "--task: unknown task 'audio'; allowed:"),
        (["policy", "calibrate", "--signal", "logits"], "allowed: auto, max_prob, margin, entropy"),
        (["policy", "calibrate", "--target", "truth"], "--target 'truth': allowed: correct, agreement"),
        (["policy", "calibrate", "--models-dir", "/nonexistent"], "no model manifest at"),
        (["policy", "replay", "nope.yaml"], "nope.yaml: no such policy file"),
        (["policy", "replay", "policies/default.yaml", "--log", "nope.db"], "no such decision log"),
        (["policy", "replay", "policies/default.yaml", "--log", "policies/README.md"],
         "not a cascade decision log"),
        (["policy", "replay", "policies/default.yaml", "--split", "train"], "allowed: test, calibration"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(args, message):
    r = cascade(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_the_shipped_policies_were_made_by_calibrate():
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Made by `cascade policy calibrate"), path
