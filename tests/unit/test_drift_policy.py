"""Policy keys of the drift alarm: defaults for old files, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.errors import PolicyError
from cascade.gating.drift import DriftReference, DriftSettings
from cascade.policy import load_policy

WITH_DRIFT = """
version: 1
tasks:
  vision:
    drift: {window: 400, min_samples: 100, alarm_psi: 0.2, clear_psi: 0.08, significance: 0.0001,
            action: tighten, tighten_by: 0.03}
    tiers:
      endpoint:
        threshold: 0.9
        drift_reference: {split: calibration, edges: [0.5, 0.9, 0.99], counts: [10, 20, 30, 40],
                          escalation_rate: 0.3}
      cloud: {threshold: 0.0}
"""
WITHOUT = """
version: 1
tasks:
  vision:
    tiers:
      endpoint: {threshold: 0.9}
      cloud: {threshold: 0.0}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_drift_keys_load_into_plain_settings_and_references(tmp_path):
    policy = load_policy(write(tmp_path, WITH_DRIFT))
    settings, reference = policy.drift("vision", "endpoint")
    assert settings == DriftSettings(window=400, min_samples=100, alarm_psi=0.2, clear_psi=0.08,
                                     significance=0.0001, action="tighten", tighten_by=0.03)
    assert reference == DriftReference((0.5, 0.9, 0.99), (10, 20, 30, 40), 0.3)
    assert policy.drift("vision", "cloud") == (settings, None)


def test_files_without_drift_keys_still_load_with_defaults(tmp_path):
    policy = load_policy(write(tmp_path, WITHOUT))
    settings, reference = policy.drift("vision", "endpoint")
    assert settings == DriftSettings() and settings.action == "alert" and reference is None


def test_drift_of_a_missing_tier_names_it(tmp_path):
    policy = load_policy(write(tmp_path, WITHOUT))
    with pytest.raises(PolicyError, match=r"tasks\.vision\.tiers\.edge-node: missing"):
        policy.drift("vision", "edge-node")


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ("tighten_by: 0.03", "tighten_by: 0", "tasks.vision.drift.tighten_by",
         "action tighten needs tighten_by > 0"),
        ("clear_psi: 0.08", "clear_psi: 0.3", "tasks.vision.drift.clear_psi",
         "clear_psi must be below alarm_psi (0.2)"),
        ("min_samples: 100", "min_samples: 500", "tasks.vision.drift.min_samples",
         "min_samples must not exceed window (400)"),
        ("action: tighten", "action: panic", "tasks.vision.drift.action", "'alert' or 'tighten'"),
        ("significance: 0.0001", "significance: 0.7", "tasks.vision.drift.significance",
         "less than 0.5"),
        ("window: 400", "windw: 400", "tasks.vision.drift.windw",
         "did you mean 'window'?"),
        ("counts: [10, 20, 30, 40]", "counts: [10, 20, 30]",
         "tasks.vision.tiers.endpoint.drift_reference.counts",
         "3 edges need 4 counts, got 3"),
        ("edges: [0.5, 0.9, 0.99]", "edges: [0.5, 0.99, 0.9]",
         "tasks.vision.tiers.endpoint.drift_reference.edges", "strictly increasing"),
        ("escalation_rate: 0.3", "escalation_rate: 1.3",
         "tasks.vision.tiers.endpoint.drift_reference.escalation_rate",
         "less than or equal to 1"),
        ("split: calibration,", "splt: calibration,",
         "tasks.vision.tiers.endpoint.drift_reference.splt",
         "allowed keys here: counts, edges, escalation_rate, split"),
    ],
)
def test_bad_drift_keys_name_file_key_and_allowed(tmp_path, old, new, key, message):
    assert old in WITH_DRIFT
    path = write(tmp_path, WITH_DRIFT.replace(old, new))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.key == key
    assert f"{path}: {key}:" in info.value.message and message in info.value.message
