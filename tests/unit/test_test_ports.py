"""The test suite's own port allocator (tests/conftest.py): ports go out in turn, so a port a
test took for a dead upstream is never handed to the tier it starts next."""

from __future__ import annotations

import contextlib
import socket

import pytest

from tests import conftest
from tests.conftest import free_port_block


def test_no_port_is_handed_out_twice_before_the_slice_wraps() -> None:
    # A dead upstream (taken, never bound) and then tiers: the pattern that once made a tier
    # escalate to itself. Every port in a run of blocks is distinct.
    # 117 ports of the 500: drawn at random, two would coincide almost surely (1 - 1e-6).
    taken: list[int] = []
    for n in (1, 4, 1, 2, 1, 1, 3) * 9:
        base = free_port_block(n)
        taken += range(base, base + n)
    assert len(taken) == len(set(taken))
    low, high = conftest._port_slice()
    assert all(low <= port <= high for port in taken)


def test_a_bound_port_is_skipped() -> None:
    low, _ = conftest._port_slice()
    nxt = low + conftest._cursor  # the port the allocator would try first
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        # Late in the suite that port may still be in TIME_WAIT from an earlier test's tier
        # (SO_REUSEADDR binds anyway) or held by one of this run's live tiers (then it is
        # bound already, which is what this test needs).
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            busy.bind(("127.0.0.1", nxt))
            busy.listen()
        assert free_port_block(1) != nxt


def test_the_cursor_wraps_and_a_block_never_runs_past_the_slice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = conftest._port_slice()
    monkeypatch.setattr(conftest, "_cursor", high - low - 1)  # two ports before the end
    base = free_port_block(4)  # does not fit at the end: starts over at the slice's start
    assert low <= base and base + 3 <= high
    assert base < high - 3
