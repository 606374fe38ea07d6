"""`cascade policy calibrate` records each tier's drift reference from the calibration split."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from cascade.gating.drift import DriftReference, fit_reference
from cascade.lab.fit import FitOptions, fit_task, policy_document
from cascade.policy import load_policy_bytes
from cascade.policy.calibrate import drift_references, reaching
from cascade.policy.goals import Goals


def test_references_describe_what_reaches_each_tier():
    tiers = ["endpoint", "edge", "cloud"]
    conf = [np.linspace(0.0, 1.0, 101), np.linspace(1.0, 0.0, 101), np.full(101, 0.5)]
    thresholds = [0.7, 0.5, 0.0]
    masks = reaching(conf, thresholds)
    assert [int(m.sum()) for m in masks] == [101, 70, 19]
    refs = drift_references(tiers, conf, thresholds, thresholds)
    assert [r.samples for r in refs.values()] == [101, 70, 19]
    assert refs["endpoint"].escalation_rate == pytest.approx(70 / 101, abs=1e-6)
    assert refs["edge"].escalation_rate == pytest.approx(19 / 70, abs=1e-6)
    assert refs["cloud"].escalation_rate == 0.0  # the top tier never escalates
    assert refs["edge"] == fit_reference(conf[1][masks[1]].tolist(), threshold=0.5,
                                         escalated=(conf[1][masks[1]] < 0.5).tolist())


def test_calibrate_writes_a_drift_reference_per_tier_and_keeps_drift_settings(models_dir):
    options = FitOptions(signal="max_prob", calibration="temperature", per_class=False)
    base = {"drift": {"window": 250, "action": "tighten", "tighten_by": 0.02}}
    fitted = fit_task(models_dir, "vision", ["endpoint", "edge-node", "edge-server", "cloud"],
                      Goals(max_cloud_share=0.1), options, base)
    section = fitted.section
    assert section["drift"] == base["drift"]  # operator settings survive a re-calibration
    text = yaml.safe_dump(policy_document("t", {"vision": section}, None))
    policy = load_policy_bytes(text.encode(), source="t.yaml")
    refs = {t: policy.drift("vision", t)[1] for t in section["tiers"]}
    assert all(isinstance(r, DriftReference) and r.bins >= 1 for r in refs.values())
    assert all(section["tiers"][t]["drift_reference"]["split"] == "calibration" for t in refs)
    # The endpoint sees every calibration sample; each tier above sees what the one below escalated.
    outcome = fitted.outcome
    assert refs["endpoint"].samples == fitted.samples
    assert refs["endpoint"].escalation_rate == pytest.approx(outcome.escalation_rate["endpoint"], abs=1e-6)
    assert refs["edge-node"].samples == round(fitted.samples * outcome.escalation_rate["endpoint"])
    assert policy.drift("vision", "endpoint")[0].action == "tighten"


def test_calibrate_keeps_field_operation_settings(models_dir):
    options = FitOptions(signal="max_prob", calibration="none", per_class=False)
    pressure = {"latency_budget_ms": 5.0, "action": "escalate"}
    base = {"audit": {"rate": 0.05, "reference": "top"},
            "hard_examples": {"enabled": True, "include_payloads": True},
            "cache": {"ttl_s": 30}, "tiers": {"edge-node": {"pressure": pressure}}}
    fitted = fit_task(models_dir, "vision", ["endpoint", "edge-node", "edge-server", "cloud"],
                      Goals(max_cloud_share=0.1), options, base)
    section = fitted.section
    assert {k: section[k] for k in ("audit", "hard_examples", "cache")} == \
        {k: base[k] for k in ("audit", "hard_examples", "cache")}
    assert section["tiers"]["edge-node"]["pressure"] == pressure
    assert "pressure" not in section["tiers"]["endpoint"]
    text = yaml.safe_dump(policy_document("t", {"vision": section}, None))
    assert load_policy_bytes(text.encode(), source="t.yaml").task("vision").audit.rate == 0.05
