"""The pure logic of shadow audits: Wilson interval, audit budget, agreement window and its
alarm, the stratified model-accuracy estimate, and the policy knobs that configure them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cascade.errors import PolicyError
from cascade.gating.agreement import (
    AgreementSettings,
    AgreementWindow,
    ShareWindow,
    TokenBucket,
    stratified_accuracy,
    wilson_interval,
)


def test_wilson_interval_matches_the_textbook_values():
    # 81 of 263 at 95% (Wilson 1927 / Newcombe 1998's worked example): 0.2553..0.3662.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # not the normal approximation's [1, 1]


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_interval_holds_the_point_estimate(k, n):
    k = min(k, n)
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_token_bucket_spends_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]  # a burst of one second
    now[0] = 0.49
    assert not bucket.take()
    now[0] = 0.5
    assert bucket.take()


def test_agreement_window_slides_and_alarms_with_hysteresis():
    window = AgreementWindow(AgreementSettings(window=20, min_agreement=0.9, min_audits=20))
    for _ in range(20):
        window.observe(True)
    assert (window.estimate(), window.alarm) == (1.0, False)
    for _ in range(8):  # 12 of 20 agree: the upper bound (0.81) is below 0.9
        window.observe(False)
    assert window.audits == 20 and window.agreed == 12
    assert window.interval()[1] < 0.9 and window.alarm and window.alarms == 1
    for _ in range(17):  # 0.85 estimate: not yet back at 0.9, the alarm stays on
        window.observe(True)
    assert window.estimate() == 0.85 and window.alarm
    window.observe(True)
    assert window.estimate() == 0.9 and not window.alarm
    assert window.audits_total == 46 and window.disagreements_total == 8


def test_no_alarm_before_min_audits_or_without_a_floor():
    window = AgreementWindow(AgreementSettings(window=100, min_agreement=0.9, min_audits=50))
    for _ in range(49):
        window.observe(False)
    assert not window.alarm
    window.observe(False)
    assert window.alarm
    quiet = AgreementWindow(AgreementSettings(window=100))
    for _ in range(100):
        quiet.observe(False)
    assert not quiet.alarm


def test_stratified_accuracy_weights_the_strata():
    est, low, high = stratified_accuracy((45, 50), (30, 60), 0.25)
    assert est == pytest.approx(0.25 * 0.9 + 0.75 * 0.5)
    lo_l, hi_l = wilson_interval(45, 50)
    lo_e, hi_e = wilson_interval(30, 60)
    assert (low, high) == pytest.approx((0.25 * lo_l + 0.75 * lo_e, 0.25 * hi_l + 0.75 * hi_e))
    assert stratified_accuracy((0, 0), (30, 60), 0.25) is None  # a stratum with no verdict
    assert stratified_accuracy((0, 0), (30, 60), 0.0)[0] == 0.5  # everything escalated


def test_share_window_forgets_the_oldest():
    share = ShareWindow(4)
    for flag in (True, True, False, False):
        share.observe(flag)
    assert share.share() == 0.5
    share.observe(False)  # the first True falls out
    assert share.share() == 0.25 and share.seen == 4


def test_policy_knobs_are_validated_with_their_key(tmp_path):
    from cascade.policy import load_policy

    path = tmp_path / "p.yaml"
    path.write_text("version: 1\ntasks:\n  vision:\n    audit: {rate: 1.5}\n"
                    "    tiers: {endpoint: {threshold: 0.5}}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert "tasks.vision.audit.rate" in err.value.message
    path.write_text("version: 1\ntasks:\n  vision:\n    hard_examples: {floor: 0.5}\n"
                    "    tiers: {endpoint: {threshold: 0.5}}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert "tasks.vision.hard_examples.floor" in err.value.message
