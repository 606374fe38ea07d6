"""SIGKILL the endpoint at random moments while it queues and drains: nothing lost, nothing twice.

The loop itself lives in tests/fault/harness.py (``crash_rounds``); benchmarks/bench_outbox.py
runs it for more rounds. ``CASCADE_CRASH_SEED`` replays a failing run.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.fault.harness import crash_rounds

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("CASCADE_CRASH_ROUNDS", "10"))


def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(tiers, proxy_to,
                                                                       hard_images):
    seed = int(os.environ.get("CASCADE_CRASH_SEED", random.randrange(1 << 30)))
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, start=False,
                     outbox={"forward_concurrency": 8})
    body = {"task": "vision", "input": {"image": hard_images[0]}}
    report = crash_rounds(endpoint, upstream, proxy, body, rounds=ROUNDS, seed=seed)
    assert report["kills"] == ROUNDS and report["lost"] == report["duplicates"] == 0
