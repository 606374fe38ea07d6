"""Threshold search and cascade simulation on synthetic scores with known answers."""

import numpy as np
import pytest

from cascade.policy.calibrate import simulate_cascade, threshold_for_accuracy


def test_threshold_for_accuracy_known_answer():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False])
    # top 3 are 100% right; top 4: 75%; top 5: 80%; all: 66.7%
    assert threshold_for_accuracy(conf, correct, 1.0) == 0.9
    assert threshold_for_accuracy(conf, correct, 0.8) == 0.7
    assert threshold_for_accuracy(conf, correct, 0.6) == 0.6


def test_threshold_never_splits_ties():
    conf = np.array([0.9, 0.9, 0.5])
    correct = np.array([True, False, True])
    # accepting one 0.9 without the other is impossible: both or none.
    assert threshold_for_accuracy(conf, correct, 1.0) > 0.9


def test_threshold_answer_nothing_when_unreachable():
    conf = np.array([0.9, 0.8])
    correct = np.array([False, False])
    t = threshold_for_accuracy(conf, correct, 0.5)
    assert t > 0.9
    assert not (conf >= t).any()


def test_min_answered():
    conf = np.array([0.99, 0.5, 0.4])
    correct = np.array([True, False, True])
    assert threshold_for_accuracy(conf, correct, 1.0, min_answered=1) == 0.99
    assert threshold_for_accuracy(conf, correct, 0.6, min_answered=3) == 0.4


def test_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError):
        threshold_for_accuracy(np.array([0.5]), np.array([True, False]), 0.9)
    with pytest.raises(ValueError):
        threshold_for_accuracy(np.array([0.5]), np.array([True]), 0.0)


def test_simulate_cascade_known_outcome():
    tiers = ["endpoint", "edge", "cloud"]
    conf = [np.array([0.9, 0.2, 0.2, 0.2]), np.array([0.0, 0.8, 0.1, 0.1]), np.zeros(4)]
    correct = [
        np.array([True, False, False, False]),
        np.array([False, True, False, False]),
        np.array([True, True, True, False]),
    ]
    out = simulate_cascade(tiers, conf, correct, [0.5, 0.5, 0.0])
    assert out.answered_share == {"endpoint": 0.25, "edge": 0.25, "cloud": 0.5}
    assert out.accuracy == pytest.approx(0.75)  # sample 0 by endpoint, 1 by edge, 2 by cloud
    assert out.answered_accuracy["cloud"] == pytest.approx(0.5)
    assert out.escalation_rate == {"endpoint": 0.75, "edge": pytest.approx(2 / 3), "cloud": 0.0}
    assert out.below_top_share == 0.5 and out.top_share == 0.5


def test_simulate_with_per_sample_thresholds():
    tiers = ["a", "top"]
    conf = [np.array([0.8, 0.8]), np.zeros(2)]
    correct = [np.array([True, True]), np.array([True, True])]
    out = simulate_cascade(tiers, conf, correct, [np.array([0.5, 0.9]), 0.0])
    assert out.answered_share == {"a": 0.5, "top": 0.5}
