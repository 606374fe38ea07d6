"""Calibration fitting and calibration error on synthetic scores with known answers."""

import itertools

import numpy as np
import pytest

from cascade.gating.gate import Calibration, GateRule, assess, map_confidence, score, temper
from cascade.policy.calibration import (
    expected_calibration_error,
    fit_calibration,
    fit_isotonic,
    fit_temperature,
    gate_confidences,
    reliability_bins,
)


def overconfident_sample(n=3000, k=5, true_t=2.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports softmax(true_t * z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (p_true.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    p_model = np.exp(true_t * z) / np.exp(true_t * z).sum(1, keepdims=True)
    return p_model, y


def test_ece_known_values():
    assert expected_calibration_error(np.full(10, 0.9), np.array([1] * 8 + [0] * 2)) == pytest.approx(0.1)
    conf = np.array([0.25, 0.25, 0.75, 0.75])
    assert expected_calibration_error(conf, np.array([0, 1, 1, 1])) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
    assert expected_calibration_error(np.zeros(0), np.zeros(0)) == 0.0


def test_reliability_bins_are_per_nonempty_bin():
    bins = reliability_bins(np.array([0.25, 0.25, 0.75]), np.array([0, 1, 1]), bins=2)
    assert bins.confidence.tolist() == [0.25, 0.75]
    assert bins.accuracy.tolist() == [0.5, 1.0]
    assert bins.count.tolist() == [2, 1]


def test_temperature_recovers_the_over_confidence_factor():
    p, y = overconfident_sample(true_t=2.0)
    assert fit_temperature(p, y) == pytest.approx(2.0, rel=0.1)


def test_temperature_of_a_calibrated_model_is_about_one():
    p, y = overconfident_sample(true_t=1.0, seed=1)
    assert fit_temperature(p, y) == pytest.approx(1.0, abs=0.1)


def test_temperature_ignores_unknown_labels():
    p, y = overconfident_sample(n=500)
    y_unknown = y.copy()
    y_unknown[:10] = -1
    assert fit_temperature(p, y_unknown) == pytest.approx(fit_temperature(p[10:], y[10:]), rel=1e-4)


def test_isotonic_pools_violators_into_centroid_knots():
    knots = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 1]))
    assert knots == ((0.15, 0.5), (0.35, 1.0))
    assert map_confidence(0.25, knots) == pytest.approx(0.75)
    assert map_confidence(0.05, knots) == 0.5 and map_confidence(0.9, knots) == 1.0


def test_isotonic_curve_is_monotone_and_ties_share_a_value():
    rng = np.random.default_rng(3)
    conf = np.round(rng.uniform(size=400), 2)
    correct = rng.uniform(size=400) < conf
    knots = fit_isotonic(conf, correct)
    xs, ys = zip(*knots)
    assert all(b > a for a, b in itertools.pairwise(xs))
    assert all(b >= a for a, b in itertools.pairwise(ys))


def test_temper_keeps_the_predicted_class_and_sharpens_or_softens():
    p = [0.5, 0.3, 0.2]
    soft, sharp = temper(p, 2.0), temper(p, 0.5)
    assert sum(soft) == pytest.approx(1.0) and sum(sharp) == pytest.approx(1.0)
    assert score(soft).top_index == score(sharp).top_index == 0
    assert soft[0] < 0.5 < sharp[0]
    assert temper(p, 1.0) == p


def test_assess_applies_temperature_then_curve():
    p = [0.5, 0.3, 0.2]
    rule = GateRule("max_prob", 0.5, calibration=Calibration(temperature=2.0))
    _, conf = assess(p, rule)
    assert conf == pytest.approx(max(temper(p, 2.0)))
    curve_rule = GateRule("max_prob", 0.5, calibration=Calibration(curve=((0.4, 0.2), (0.6, 0.4))))
    assert assess(p, curve_rule)[1] == pytest.approx(0.3)
    assert assess(p, GateRule("max_prob", 0.5))[1] == 0.5


def test_gate_confidences_match_serving_row_by_row():
    p, _ = overconfident_sample(n=50)
    rule = GateRule("margin", 0.5, calibration=Calibration(temperature=1.7))
    top, conf = gate_confidences(p, rule)
    for i in range(len(p)):
        s, c = assess(p[i], rule)
        assert (top[i], conf[i]) == (s.top_index, c)


@pytest.mark.parametrize("method", ["temperature", "isotonic", "auto"])
def test_fitted_calibration_cuts_the_error_of_an_over_confident_model(method):
    p, y = overconfident_sample()
    fit = fit_calibration(p, y, method=method)
    assert fit.ece_before > 0.1
    assert fit.ece_after < 0.03
    assert fit.ece_cv["none"] > fit.ece_cv["temperature"]
    if method == "auto":
        assert fit.method in ("temperature", "isotonic")


def test_auto_applies_nothing_when_calibration_does_not_help_out_of_sample():
    # Confidence carries no information about correctness beyond the base rate, already matched.
    n = 400
    p = np.tile([0.7, 0.2, 0.1], (n, 1))
    y = np.r_[np.zeros(280, int), np.ones(120, int)]
    fit = fit_calibration(p, y, method="auto")
    assert fit.method == "none" and fit.calibration is None
    assert fit.ece_before == pytest.approx(0.0, abs=1e-9)
