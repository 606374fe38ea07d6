"""The canary's pure parts: the counted split and each guard of :func:`judge`."""

from __future__ import annotations

import pytest

from cascade.tier.canary import Canary, MeteredRunner, VersionStats, judge
from cascade.tier.rollout_settings import CanarySettings

SETTINGS = CanarySettings(share=0.1, min_requests=10, window_requests=50, max_error_rate=0.05,
                          max_escalation_increase=0.1, max_p99_ratio=2.0, p99_slack_ms=1.0)


def stats(calls: int, *, errors: int = 0, escalated: int = 0, ms: float = 1.0) -> VersionStats:
    s = VersionStats(calls=calls, errors=errors, answered=calls - errors, escalated=escalated)
    s.latencies_ms.extend([ms] * (calls - errors))
    return s


def test_no_verdict_before_min_requests():
    assert judge(stats(9, errors=9), stats(100), SETTINGS, 0)[0] == "continue"


@pytest.mark.parametrize(("canary", "guard"), [
    (stats(20, errors=2), "error rate"),
    (stats(20, escalated=5), "escalation rate"),
    (stats(20, ms=3.5), "p99 latency"),
])
def test_each_guard_rolls_back(canary, guard):
    verdict, reason = judge(canary, stats(100, escalated=10, ms=1.0), SETTINGS, 0)
    assert verdict == "rollback" and guard in reason


def test_within_guards_promoted_after_the_window():
    stable = stats(100, escalated=10, ms=1.0)
    assert judge(stats(49, escalated=9, ms=2.9), stable, SETTINGS, 0)[0] == "continue"
    assert judge(stats(50, escalated=9, ms=2.9), stable, SETTINGS, 0)[0] == "promote"
    timed = SETTINGS.model_copy(update={"window_s": 60})
    assert judge(stats(50), stable, timed, 59)[0] == "continue"


class _Runner:
    model_name, task = "m", "vision"


@pytest.mark.parametrize("share", [0.1, 0.25, 1 / 3, 0.5, 1.0])
def test_split_sends_exactly_the_share(share):
    canary = Canary(MeteredRunner(_Runner(), "v2"), MeteredRunner(_Runner(), "v1"),  # type: ignore[arg-type]
                    CanarySettings(share=share))
    taken = [canary.take() for _ in range(600)]
    for n in range(1, 601):
        assert sum(taken[:n]) <= share * n  # never more than its share, at any point
    assert sum(taken) == int(share * 600 + 1e-9)
