"""The restart policy of a supervised chain: pure backoff and budget arithmetic."""

from __future__ import annotations

import pytest

from cascade.deploy.restarts import RestartHistory, RestartPolicy
from cascade.errors import ConfigError


def test_backoff_doubles_up_to_its_cap_then_the_budget_is_spent() -> None:
    history = RestartHistory(RestartPolicy(initial_delay_s=1, max_delay_s=5, budget=4,
                                           window_s=100))
    delays = []
    for now in (0.0, 10.0, 20.0, 30.0, 40.0):
        delay = history.next_delay_s(now)
        delays.append(delay)
        if delay is not None:
            history.record(now + delay)
    assert delays == [1, 2, 4, 5, None]


def test_restarts_older_than_the_window_no_longer_count() -> None:
    history = RestartHistory(RestartPolicy(initial_delay_s=1, budget=2, window_s=60))
    history.record(0.0)
    history.record(1.0)
    assert history.next_delay_s(30.0) is None
    assert history.next_delay_s(60.5) == 2  # the restart at 0 has left the window
    assert history.next_delay_s(62.0) == 1


def test_a_zero_budget_never_restarts() -> None:
    assert RestartHistory(RestartPolicy(budget=0)).next_delay_s(0.0) is None


@pytest.mark.parametrize(("knob", "value"), [("initial_delay_s", -1), ("max_delay_s", 0.5),
                                             ("multiplier", 0.5), ("budget", -1),
                                             ("window_s", 0)])
def test_bad_values_name_the_knob(knob: str, value: float) -> None:
    with pytest.raises(ConfigError) as caught:
        RestartPolicy(**{knob: value})
    assert caught.value.field == knob and f"{knob}={value!r}" in caught.value.message
