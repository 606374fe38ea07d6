"""The gate: signals are pure functions of the output, decisions pure functions of scores+policy."""

import math

import pytest

from cascade.gating.gate import Decision, GateRule, confidence, decide, score


def test_signals_of_a_confident_output():
    s = score([0.9, 0.05, 0.05])
    assert s.top_index == 0
    assert s.max_prob == pytest.approx(0.9)
    assert s.margin == pytest.approx(0.85)
    h = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)) / math.log(3)
    assert s.entropy == pytest.approx(h)


def test_uniform_output_has_zero_margin_and_full_entropy():
    s = score([0.25] * 4)
    assert s.max_prob == pytest.approx(0.25)
    assert s.margin == pytest.approx(0.0)
    assert s.entropy == pytest.approx(1.0)


def test_one_hot_output():
    s = score([0.0, 1.0, 0.0])
    assert (s.top_index, s.max_prob, s.margin, s.entropy) == (1, 1.0, 1.0, 0.0)


def test_unnormalised_and_negative_outputs_are_renormalised():
    # int8 models can emit rows that do not sum to exactly one.
    s = score([2.0, 2.0, -0.1])
    assert s.max_prob == pytest.approx(0.5)
    assert s.margin == pytest.approx(0.0)


def test_all_zero_output_is_uniform():
    assert score([0.0, 0.0]).max_prob == pytest.approx(0.5)


def test_empty_output_is_an_error():
    with pytest.raises(ValueError):
        score([])


def test_confidence_puts_every_signal_on_higher_is_better():
    s = score([0.7, 0.2, 0.1])
    assert confidence(s, "max_prob") == pytest.approx(0.7)
    assert confidence(s, "margin") == pytest.approx(0.5)
    assert confidence(s, "entropy") == pytest.approx(1 - s.entropy)
    with pytest.raises(ValueError, match="allowed"):
        confidence(s, "bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("conf", "has_upstream", "floor", "expected"),
    [
        (0.95, True, "answer", Decision.ANSWER),
        (0.90, True, "answer", Decision.ANSWER),  # threshold is inclusive
        (0.89, True, "answer", Decision.ESCALATE),
        (0.89, False, "answer", Decision.ANSWER),
        (0.89, False, "unknown", Decision.UNKNOWN),
    ],
)
def test_decide(conf, has_upstream, floor, expected):
    rule = GateRule(signal="max_prob", threshold=0.9, floor_action=floor)
    assert decide(conf, "a", rule, has_upstream=has_upstream) is expected


def test_class_threshold_overrides_the_default():
    rule = GateRule(signal="max_prob", threshold=0.9, class_thresholds=(("8", 0.99),))
    assert decide(0.95, "7", rule, has_upstream=True) is Decision.ANSWER
    assert decide(0.95, "8", rule, has_upstream=True) is Decision.ESCALATE
    assert rule.threshold_for("8") == 0.99
