"""The drift alarm on synthetic streams: quiet in distribution, fast on a shift, hysteresis."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cascade.gating.drift import (
    CHECK_EVERY,
    CONFIRM_CHECKS,
    DriftDetector,
    DriftReference,
    DriftSettings,
    chi2_quantile,
    effective_rule,
    escalation_z,
    fit_reference,
    psi,
    tightened,
)
from cascade.gating.drift_monitor import DriftMonitor
from cascade.gating.gate import GateRule
from cascade.policy import load_policy_bytes

THRESHOLD = 0.9


def confident(rng: np.random.Generator, k: int, *, a: float = 6.0, at_one: float = 0.5) -> np.ndarray:
    """Calibrated-looking confidences: a share exactly 1.0 (an isotonic curve's flat top), the
    rest Beta(a, 1); a smaller ``a`` is harder traffic."""
    x = rng.beta(a, 1.0, k)
    x[rng.random(k) < at_one] = 1.0
    return x


def reference_from(values: np.ndarray, threshold: float = THRESHOLD) -> DriftReference:
    return fit_reference(values.tolist(), threshold=threshold,
                         escalated=(values < threshold).tolist())


def feed(det: DriftDetector, values: np.ndarray, threshold: float = THRESHOLD) -> list[int]:
    """Observe every value; the stream positions at which the alarm turned on."""
    onsets = []
    for i, c in enumerate(values.tolist()):
        was = det.alarm
        if det.observe(c, c < threshold) and not was:
            onsets.append(i)
    return onsets


@pytest.fixture(autouse=True)
def _quiet_alarms(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cascade.gating.drift")


# -- reference and statistics ---------------------------------------------------------------------


def test_reference_keeps_ties_in_one_bin_and_cuts_at_the_threshold():
    values = np.r_[np.full(60, 1.0), np.linspace(0.2, 0.99, 140)]
    ref = fit_reference(values.tolist(), threshold=0.9, escalated=(values < 0.9).tolist())
    assert ref.samples == 200 and ref.bins == len(ref.edges) + 1
    assert ref.counts[-1] >= 60  # the 60 values at exactly 1.0 are never split
    assert 0.9 in ref.edges  # a change in the escalation rate moves mass across an edge
    assert min(ref.counts) >= 10
    assert ref.escalation_rate == pytest.approx(float(np.mean(values < 0.9)), abs=1e-6)
    assert list(ref.edges) == sorted(ref.edges)


def test_tiny_references_collapse_to_too_few_bins():
    ref = fit_reference([0.5, 0.7, 0.9], threshold=0.8)
    assert ref.bins == 1 and not DriftDetector(ref, DriftSettings()).usable


def test_psi_and_noise_quantiles():
    assert psi([50, 50], [50, 50]) == pytest.approx(0.0)
    assert psi([90, 10], [50, 50]) > 0.25
    # Wilson-Hilferty against tabulated chi-square quantiles.
    assert chi2_quantile(4, 0.999) == pytest.approx(18.467, rel=0.02)
    assert chi2_quantile(9, 0.95) == pytest.approx(16.919, rel=0.02)
    assert escalation_z(150, 300, 0.3, 400) > 3.0
    assert escalation_z(90, 300, 0.3, 400) == pytest.approx(0.0)
    assert escalation_z(10, 300, None, 400) is None


# -- false alarms, detection, hysteresis -----------------------------------------------------------


def test_no_alarm_in_distribution_across_many_seeds():
    """Bounded false alarms: the reference is itself a finite sample (as the calibration split
    is), and the stream is fresh traffic from the same distribution."""
    alarmed = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        det = DriftDetector(reference_from(confident(rng, 400)), DriftSettings())
        alarmed += bool(feed(det, confident(rng, 5_000)))
    # Measured: 5 of 200 streams of 5,000 requests (2.5%). Without the sampling-noise level
    # (alarm_psi alone) most streams alarm.
    assert alarmed <= 10


def test_alarm_on_a_shift_within_a_bounded_number_of_requests():
    settings = DriftSettings()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        det = DriftDetector(reference_from(confident(rng, 400)), settings)
        assert feed(det, confident(rng, 300)) == []
        onsets = feed(det, confident(rng, 1_000, a=2.0, at_one=0.3))
        # Harder traffic: on within min_samples-worth of shifted requests plus the confirmations.
        assert onsets and onsets[0] <= settings.min_samples + (CONFIRM_CHECKS + 1) * CHECK_EVERY
        assert det.escalation_rate > det.reference.escalation_rate + 0.1


def test_a_shift_toward_more_confidence_is_seen_too():
    rng = np.random.default_rng(3)
    det = DriftDetector(reference_from(confident(rng, 400)), DriftSettings())
    onsets = feed(det, confident(rng, 600, a=30.0, at_one=0.9))  # "too sure": fewer escalations
    assert onsets and det.cause == "confidence distribution"


def test_no_verdict_before_min_samples():
    rng = np.random.default_rng(0)
    det = DriftDetector(reference_from(confident(rng, 400)), DriftSettings(min_samples=200))
    feed(det, confident(rng, 150, a=1.0, at_one=0.0))  # wildly shifted, but too few requests
    assert det.state() == "warming_up" and det.score is None and not det.alarm
    assert det.describe()["window"] == 150


def test_hysteresis_the_alarm_holds_until_the_window_has_recovered():
    rng = np.random.default_rng(1)
    settings = DriftSettings(window=300)
    det = DriftDetector(reference_from(confident(rng, 400)), settings)
    assert feed(det, confident(rng, 400, a=2.0, at_one=0.3))
    # Back to normal traffic: a third of a window later the window is still mostly shifted.
    assert feed(det, confident(rng, 100)) == [] and det.alarm
    # Once the window has turned over it clears, and stays off: one onset in all.
    tail = confident(rng, 2_000)
    assert feed(det, tail) == []
    assert not det.alarm and det.alarms == 1 and det.state() == "ok"


def test_the_window_is_bounded():
    rng = np.random.default_rng(2)
    det = DriftDetector(reference_from(confident(rng, 400)), DriftSettings(window=100, min_samples=50))
    feed(det, confident(rng, 10_000))
    assert det.samples == 100 and det.seen == 10_000 and len(det._ring) == 100


# -- rules and the per-tier monitor ----------------------------------------------------------------


def test_tightened_raises_every_threshold_and_caps_at_one():
    rule = GateRule("margin", 0.8, class_thresholds=(("8", 0.97),))
    tight = tightened(rule, 0.05)
    assert tight.threshold == pytest.approx(0.85) and dict(tight.class_thresholds)["8"] == 1.0
    assert effective_rule(rule, DriftSettings(action="alert"), alarm=True) is rule
    assert effective_rule(rule, DriftSettings(action="tighten"), alarm=False) is rule
    assert effective_rule(rule, DriftSettings(action="tighten", tighten_by=0.05), alarm=True) == tight


def policy_text(*, action: str = "alert", edges: str = "[0.5, 0.9]", window: int = 40) -> str:
    return f"""\
version: 1
tasks:
  documents:
    drift: {{window: {window}, min_samples: 20, action: {action}, tighten_by: 0.05}}
    tiers:
      endpoint:
        threshold: 0.6
        drift_reference: {{edges: {edges}, counts: [20, 60, 120], escalation_rate: 0.1}}
      cloud: {{threshold: 0.0}}
"""


def test_monitor_tightens_while_the_alarm_is_on_and_follows_reloads():
    policy = load_policy_bytes(policy_text(action="tighten").encode(), source="p.yaml")
    rule = policy.rule("documents", "endpoint")
    monitor = DriftMonitor("endpoint")
    assert monitor.observe(policy, "documents", 0.95, "a", rule) is rule
    for _ in range(60):  # everything low: far from the reference
        used = monitor.observe(policy, "documents", 0.3, "a", rule)
    assert used.threshold == pytest.approx(0.65)
    det = monitor.detectors()["documents"]
    assert isinstance(det, DriftDetector) and det.alarm
    # A reload with the same drift settings and reference keeps the window and the alarm...
    same = load_policy_bytes(policy_text(action="tighten").encode() + b"\n", source="p.yaml")
    monitor.observe(same, "documents", 0.3, "a", same.rule("documents", "endpoint"))
    assert monitor.detectors()["documents"] is det and det.seen == 62
    # ...a new reference restarts it.
    new = load_policy_bytes(policy_text(action="tighten", edges="[0.4, 0.8]").encode(), source="p.yaml")
    assert monitor.observe(new, "documents", 0.3, "a", new.rule("documents", "endpoint")) \
        == new.rule("documents", "endpoint")
    assert monitor.detectors()["documents"] is not det


def test_drift_toward_easier_inputs_alarms_but_never_tightens():
    policy = load_policy_bytes(policy_text(action="tighten").encode(), source="p.yaml")
    rule = policy.rule("documents", "endpoint")
    monitor = DriftMonitor("endpoint")
    for _ in range(80):  # everything clearly confident: far from the reference, nothing escalated
        used = monitor.observe(policy, "documents", 0.99, "a", rule)
        assert used is rule
    det = monitor.detectors()["documents"]
    assert isinstance(det, DriftDetector) and det.alarm and det.escalation_z < 0


def test_monitor_reports_tiers_without_a_usable_reference():
    policy = load_policy_bytes(policy_text().encode(), source="p.yaml")
    monitor = DriftMonitor("cloud")
    rule = policy.rule("documents", "cloud")
    assert monitor.observe(policy, "documents", 0.1, "a", rule) is rule
    state = monitor.readiness(policy, ["documents"])["documents"]
    assert state["state"] == "no_reference" and "cascade policy calibrate" in state["hint"]
    endpoint = DriftMonitor("endpoint").readiness(policy, ["documents"])["documents"]
    assert endpoint["state"] == "warming_up" and endpoint["reference_samples"] == 200
