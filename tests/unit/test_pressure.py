"""The latency-pressure state on fed latencies: on over the budget, off only below its
recovery level (hysteresis), probes under pressure."""

from __future__ import annotations

from cascade.gating.pressure import LatencyPressure, PressureSettings


def test_pressure_turns_on_over_budget_and_off_below_the_recovery_level():
    state = LatencyPressure(PressureSettings(latency_budget_ms=10.0, window=10, min_runs=10,
                                             recover_below=0.5))
    for _ in range(9):
        state.observe(50.0)
    assert not state.on  # fewer than min_runs
    state.observe(50.0)
    assert state.on and state.switches == 1 and state.p95_ms == 50.0
    for _ in range(10):
        state.observe(8.0)  # under the budget, not under 10 x 0.5: stays on
    assert state.on and state.p95_ms == 8.0
    for _ in range(10):
        state.observe(4.0)
    assert not state.on and state.switches == 1
    for _ in range(9):
        state.observe(11.0)  # p95 of 9 x 11 ms and one 4 ms: over budget again
    assert state.on and state.switches == 2


def test_one_slow_run_in_twenty_is_not_pressure():
    state = LatencyPressure(PressureSettings(latency_budget_ms=10.0, window=20, min_runs=20))
    for i in range(40):
        state.observe(100.0 if i % 20 == 0 else 1.0)
    assert not state.on and state.p95_ms == 1.0


def test_no_budget_no_pressure_and_probes_come_every_nth():
    state = LatencyPressure(PressureSettings(latency_budget_ms=None, probe_every=3))
    for _ in range(100):
        state.observe(1e6)
    assert not state.on and state.p95_ms is None
    assert [state.probe_due() for _ in range(6)] == [False, False, True, False, False, True]
