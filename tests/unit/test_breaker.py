"""CircuitBreaker: exact state transitions over a fake clock."""

from __future__ import annotations

import pytest

from cascade.errors import ConfigError
from cascade.upstream.breaker import CircuitBreaker


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def state(breaker: CircuitBreaker) -> str:
    """Read the state afresh (a plain ``breaker.state`` gets narrowed by mypy after an assert)."""
    return breaker.state


def make(threshold: int = 3, reset_s: float = 10.0) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset_s, clock=clock), clock


def test_starts_closed_and_allows_requests() -> None:
    breaker, _ = make()
    assert state(breaker) == "closed"
    assert breaker.state_code == 0
    assert all(breaker.allow_request() for _ in range(10))


def test_opens_after_threshold_consecutive_failures_only() -> None:
    breaker, _ = make(threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the streak
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 2
    breaker.record_failure()
    assert state(breaker) == "open"
    assert breaker.state_code == 1
    assert not breaker.allow_request()


def test_open_turns_half_open_after_reset_timeout_and_allows_one_probe() -> None:
    breaker, clock = make(threshold=1, reset_s=10.0)
    breaker.record_failure()
    clock.now_s = 9.999
    assert state(breaker) == "open"
    assert not breaker.allow_request()
    clock.now_s = 10.0
    assert state(breaker) == "half_open"
    assert breaker.state_code == 2
    assert breaker.allow_request()  # the probe
    assert not breaker.allow_request()  # everyone else waits for its outcome
    assert not breaker.allow_request()
    assert state(breaker) == "half_open"


def test_probe_success_closes() -> None:
    breaker, clock = make(threshold=1, reset_s=10.0)
    breaker.record_failure()
    clock.now_s = 10.0
    assert breaker.allow_request()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 0
    assert breaker.allow_request()
    assert breaker.allow_request()


def test_probe_failure_reopens_and_restarts_the_timer() -> None:
    breaker, clock = make(threshold=2, reset_s=10.0)
    breaker.record_failure()
    breaker.record_failure()
    clock.now_s = 12.0
    assert breaker.allow_request()
    breaker.record_failure()  # a single failed probe is enough, regardless of threshold
    assert state(breaker) == "open"
    clock.now_s = 21.999
    assert state(breaker) == "open"
    assert not breaker.allow_request()
    clock.now_s = 22.0
    assert state(breaker) == "half_open"
    assert breaker.allow_request()


def test_late_failure_while_open_does_not_postpone_the_probe() -> None:
    breaker, clock = make(threshold=1, reset_s=10.0)
    breaker.record_failure()
    clock.now_s = 5.0
    breaker.record_failure()  # from a request sent before the circuit opened
    assert state(breaker) == "open"
    clock.now_s = 10.0
    assert state(breaker) == "half_open"


def test_a_probe_that_never_reports_lapses_after_reset_timeout() -> None:
    breaker, clock = make(threshold=1, reset_s=10.0)
    breaker.record_failure()
    clock.now_s = 10.0
    assert breaker.allow_request()  # probe taken, its caller is then cancelled
    clock.now_s = 19.999
    assert not breaker.allow_request()
    clock.now_s = 20.0
    assert breaker.allow_request()  # a fresh probe
    assert not breaker.allow_request()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"failure_threshold": 0}, "failure_threshold"), ({"reset_timeout_s": 0}, "reset_timeout_s")],
)
def test_rejects_invalid_settings_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
