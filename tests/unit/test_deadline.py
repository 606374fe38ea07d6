"""Deadline: pure arithmetic over an injected clock."""

from __future__ import annotations

import dataclasses

import pytest

from cascade.contract.deadline import Deadline


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance_ms(self, ms: float) -> None:
        self.now_s += ms / 1000.0


def test_from_ms_counts_down_with_the_clock() -> None:
    clock = FakeClock()
    deadline = Deadline.from_ms(250, clock=clock)
    assert deadline.at_s == pytest.approx(1000.25)
    assert deadline.remaining_ms() == 250
    assert deadline.remaining_s() == pytest.approx(0.25)
    assert not deadline.expired

    clock.advance_ms(100.7)
    assert deadline.remaining_ms() == 149  # rounded down: never promise more than is left
    assert deadline.remaining_s() == pytest.approx(0.1493)
    assert not deadline.expired


def test_expires_exactly_at_the_deadline_and_never_goes_negative() -> None:
    clock = FakeClock()
    deadline = Deadline.from_ms(50, clock=clock)
    clock.advance_ms(50)
    assert deadline.expired
    assert deadline.remaining_ms() == 0
    clock.advance_ms(1000)
    assert deadline.remaining_s() == 0.0
    assert deadline.remaining_ms() == 0


@pytest.mark.parametrize("ms", [0, -5])
def test_zero_or_negative_budget_is_already_expired(ms: float) -> None:
    deadline = Deadline.from_ms(ms, clock=FakeClock())
    assert deadline.expired
    assert deadline.remaining_ms() == 0


def test_is_immutable_and_compares_by_instant() -> None:
    clock = FakeClock()
    deadline = Deadline.from_ms(10, clock=clock)
    with pytest.raises(dataclasses.FrozenInstanceError):
        deadline.at_s = 0.0  # type: ignore[misc]
    assert deadline == Deadline(at_s=deadline.at_s)


def test_default_clock_is_monotonic_time() -> None:
    deadline = Deadline.from_ms(60_000)
    assert 59_000 < deadline.remaining_ms() <= 60_000
    assert not deadline.expired
