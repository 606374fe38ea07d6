"""Policy files: valid ones load; every invalid one names the file, the key path and what is allowed."""

from pathlib import Path

import pytest

from cascade.errors import PolicyError
from cascade.gating.gate import GateRule
from cascade.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]

VALID = """
version: 1
name: test
tasks:
  vision:
    deadline_ms: 800
    offline: reject
    queue: {ttl_s: 60, max_attempts: 5}
    tiers:
      endpoint: {signal: margin, threshold: 0.8, class_thresholds: {"8": 0.95}}
      cloud: {threshold: 0.3, floor_action: unknown}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_policy_loads(tmp_path):
    loaded = load_policy(write(tmp_path, VALID))
    task = loaded.policy.tasks["vision"]
    assert task.deadline_ms == 800 and task.offline == "reject"
    assert task.queue.ttl_s == 60 and task.queue.max_attempts == 5
    assert loaded.rule("vision", "endpoint") == GateRule(
        signal="margin", threshold=0.8, class_thresholds=(("8", 0.95),)
    )
    assert loaded.rule("vision", "cloud").floor_action == "unknown"
    assert len(loaded.version) == 12 and loaded.sha256.startswith(loaded.version)


def test_shipped_policies_are_valid():
    files = sorted((ROOT / "policies").glob("*.yaml"))
    assert files, "policies/ must ship at least the default policy"
    for path in files:
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        (VALID.replace("threshold: 0.8", "threshold: 1.5"), "tasks.vision.tiers.endpoint.threshold",
         "less than or equal to 1"),
        (VALID.replace("signal: margin", "signal: logits"), "tasks.vision.tiers.endpoint.signal",
         "'field_min_logprob' or 'answer_logprob'"),
        (VALID.replace("threshold: 0.8", "treshold: 0.8"), "tasks.vision.tiers.endpoint.treshold",
         "unknown key"),
        (VALID.replace("offline: reject", "offline: drop"), "tasks.vision.offline",
         "'provisional' or 'reject'"),
        (VALID.replace("floor_action: unknown", "floor_action: guess"),
         "tasks.vision.tiers.cloud.floor_action", "'answer' or 'unknown'"),
        (VALID.replace('"8": 0.95', '"8": 2'), "tasks.vision.tiers.endpoint.class_thresholds",
         "allowed: 0.0 to 1.0"),
        (VALID.replace("max_attempts: 5", "max_attempts: 0"), "tasks.vision.queue.max_attempts",
         "greater than or equal to 1"),
        (VALID.replace("version: 1", "version: 2"), "version", "allowed: 1"),
        (VALID.replace("      endpoint:", "      Endpoint!:"), "tasks.vision.tiers", "not allowed"),
        ("version: 1\nname: x\n", "tasks", "required key is missing"),
    ],
)
def test_invalid_policy_names_file_key_and_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == key
    assert str(path) in err.message and key in err.message
    assert allowed in err.message


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "tasks:\n  vision: [unclosed\n")
    with pytest.raises(PolicyError, match=r"not valid YAML at line \d+, column \d+") as info:
        load_policy(path)
    assert info.value.file == str(path)


def test_non_mapping_file(tmp_path):
    with pytest.raises(PolicyError, match="must be a YAML mapping"):
        load_policy(write(tmp_path, "- just\n- a list\n"))


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_missing_tier_or_task_is_named(tmp_path):
    loaded = load_policy(write(tmp_path, VALID))
    with pytest.raises(PolicyError, match=r"tasks\.vision\.tiers\.edge-node: missing") as info:
        loaded.rule("vision", "edge-node")
    assert info.value.key == "tasks.vision.tiers.edge-node"
    with pytest.raises(PolicyError, match=r"tasks\.documents: missing"):
        loaded.rule("documents", "endpoint")
