"""Real network partitions: the edge-node in a network namespace, the link from the endpoint
to it cut or degraded by the kernel in cycles under steady load (tests/fault/netns.py and
tests/fault/cycles.py). The endpoint must answer every request (provisionally while cut),
lose none, have none computed twice upstream, and deliver every queued escalation once the
link is back. Short here (``CASCADE_PARTITION_CYCLES`` x ``CASCADE_PARTITION_DOWN_S`` down /
``CASCADE_PARTITION_UP_S`` up, default 2 x 5 s / 5 s); the 5 x 30 s soak, which also holds
each drain against twice its outage, is benchmarks/bench_partition.py. Without network
namespaces (not root, a sandbox) these tests skip, saying why."""

from __future__ import annotations

import os

import pytest

from tests.fault.cycles import partition_cycles
from tests.fault.harness import write_policy
from tests.fault.netns import (
    Partition,
    loss_method,
    loss_unavailable,
    namespaces_unavailable,
    sweep_stale,
)

pytestmark = pytest.mark.integration

CYCLES = int(os.environ.get("CASCADE_PARTITION_CYCLES", "2"))
DOWN_S = float(os.environ.get("CASCADE_PARTITION_DOWN_S", "5"))
UP_S = float(os.environ.get("CASCADE_PARTITION_UP_S", "5"))


@pytest.fixture
def link():
    if reason := namespaces_unavailable():
        pytest.skip(f"network namespaces are not available here: {reason}")
    sweep_stale()
    with Partition() as partition:  # deleted at exit, also when the test fails
        yield partition


@pytest.mark.parametrize("fault", ["down", "blackhole", "slow", "lossy"])
def test_link_cycles_under_load_answer_everything_lose_nothing_compute_once(
        fault, link, tiers, tmp_path, record_property):
    if fault == "lossy" and (reason := loss_unavailable()):
        pytest.skip(reason)
    policy = write_policy(tmp_path / "policy.yaml", max_attempts=10_000)
    upstream = tiers("edge-node", policy_path=policy, host=link.ns_ip, launcher=link.launcher)
    endpoint = tiers("endpoint", policy_path=policy, upstream=upstream.url)
    report = partition_cycles(endpoint, upstream, link, fault=fault, cycles=CYCLES,
                              down_s=DOWN_S, up_s=UP_S)
    record_property("partition", report.as_dict())  # drain times: reported, not asserted
    if fault == "lossy":  # netem (loss and delay), or nftables (loss only) where it is missing
        record_property("loss_method", loss_method())
        if loss_method() == "nftables":  # packets were really lost (netem keeps no count)
            assert link.dropped_packets > 0
    assert report.failures == [], report.failures[:5]
    assert report.answered == report.requests > 0
    assert (report.lost, report.never_upstream, report.computed_twice, report.not_final) == (
        0, 0, 0, 0), report.as_dict()
    assert len(report.drain_s) == CYCLES
    if fault in ("down", "blackhole"):  # a cut link: the endpoint must have queued work
        assert report.provisional > 0 and all(report.queued_per_cycle), report.as_dict()


def test_partitions_are_removed_even_when_the_test_body_fails():
    if reason := namespaces_unavailable():
        pytest.skip(f"network namespaces are not available here: {reason}")
    with pytest.raises(RuntimeError), Partition() as partition:
        raise RuntimeError("the test failed")
    names = os.popen("ip netns list").read()
    links = os.popen("ip -o link show").read()
    assert partition.name not in names and partition.host_if not in links
