"""SIGKILL the endpoint at random moments while it queues and drains: nothing lost, nothing twice.

The loop itself lives in tests/fault/harness.py (``crash_rounds``); benchmarks/bench_outbox.py
runs it for more rounds. Each run draws a new seed (more moments covered over many runs) and
names it in every failure; ``CASCADE_CRASH_SEED=<seed>`` replays a red run with the same kill
moments, ``CASCADE_CRASH_ROUNDS`` sets how many kills.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.fault.harness import assert_crash_safe, crash_rounds

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("CASCADE_CRASH_ROUNDS", "10"))


def crash_seed() -> int:
    """``CASCADE_CRASH_SEED`` if set (a replay), else a fresh random seed."""
    given = os.environ.get("CASCADE_CRASH_SEED", "").strip()
    if not given:
        return random.randrange(1 << 30)
    try:
        return int(given)
    except ValueError:
        pytest.fail(f"CASCADE_CRASH_SEED={given!r}: give the integer seed a failed run printed")


def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(
    tiers, proxy_to, hard_images, record_property
):
    seed = crash_seed()
    replay = f"replay with CASCADE_CRASH_SEED={seed}"
    print(f"crash seed {seed} ({replay})")  # shown with the output of a failed test
    record_property("crash_seed", seed)
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, start=False,
                     outbox={"forward_concurrency": 8})
    body = {"task": "vision", "input": {"image": hard_images[0]}}
    try:
        report = crash_rounds(endpoint, upstream, proxy, body, rounds=ROUNDS, seed=seed)
        assert report["kills"] == ROUNDS
        assert_crash_safe(report)
    except BaseException as exc:
        # Every failure names the seed, also those raised outside crash_rounds' own asserts
        # (a tier that did not start, a timeout, a transport error).
        exc.add_note(f"crash seed {seed}: {replay}")
        raise
