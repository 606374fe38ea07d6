"""A real two-node Ray cluster on this machine (tests/ray/cluster.py: the head here, the worker
node in its own network namespace, each started with ``ray start``): the cloud tier's two
ingress replicas are placed one per node and both answer; then, under load from an
edge-server process escalating everything to it, the worker node is killed (every process,
SIGKILL). Serve replaces the lost replica on the head, the edge-server retries or queues what
was in flight, and every accepted request ends final, computed once by the cloud (its
PostgreSQL outbox, shared by the replicas, has one results row per request, computed once).

Slow (minutes: two Ray nodes start on two shared cores), every wait bounded."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

pytest.importorskip("ray.serve")

from cascade.outbox.tables import results
from tests.conftest import free_port_block
from tests.contract.pgserver import PostgresServer, find_bindir
from tests.fault.harness import Tier, default_policy_copy, wait_for
from tests.ray.cluster import (
    TwoNodeCluster,
    answered_per_node,
    netns_available,
    replica_nodes,
    two_node_cluster,
)
from tests.ray.conftest import escalate_everything

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

REQUESTS = 40
KILL_AFTER = 10  # answered requests before the worker node dies
CONCURRENCY = 4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"a second node in its own network namespace {reason}")
    with two_node_cluster(tmp_path / "ray-logs") as running:
        yield running


@pytest.fixture
def cluster_postgres(cluster: TwoNodeCluster) -> Any:
    """PostgreSQL reachable from both nodes (the worker node's 127.0.0.1 is its own)."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries not found")
    server = PostgresServer.start(host=cluster.head_ip, trust_network=f"{cluster.head_ip}/24")
    try:
        yield server
    finally:
        server.stop()


def _deploy_cloud(cluster: TwoNodeCluster, outbox_url: str, models_dir: Path,
                  tmp: Path) -> str:
    from cascade.deploy.ray_serve import portable_settings
    from cascade.tier.settings import load_node_settings

    settings = load_node_settings(
        ROOT / "cloud/cloud.yaml", models_dir=models_dir,
        policy=default_policy_copy(tmp / "cloud-policy.yaml"), outbox_url=outbox_url,
        outbox={"claim_grace_s": 5},  # a dead replica's claims lapse within the test
        ray_serve={"ingress_replicas": 2, "model_deployments": False,
                   "ingress_num_cpus": 0.2, "metrics_export_interval_s": 0})
    settings_file = tmp / "cloud-settings.json"
    settings_file.write_text(json.dumps(portable_settings(settings)))
    port = free_port_block(1)
    cluster.driver("deploy", str(settings_file), str(port))
    return f"http://{cluster.head_ip}:{port}"


def _edge_server(tmp: Path, models_dir: Path, upstream: str) -> Tier:
    policy = default_policy_copy(tmp / "edge-policy.yaml")
    policy.write_text(yaml.safe_dump(escalate_everything(yaml.safe_load(policy.read_text()))))
    return Tier(tmp, "edge-server", models_dir, policy, upstream=upstream).start()


def _load_through_a_node_failure(edge: Tier, cluster: TwoNodeCluster,
                                 cloud_url: str) -> tuple[list[httpx.Response], dict[str, float]]:
    """REQUESTS keyed requests, CONCURRENCY at a time; the worker node dies once KILL_AFTER
    are answered and its replica has answered some. Returns the responses and the answers
    per node before the failure."""
    done = threading.Semaphore(0)

    def ask(i: int) -> httpx.Response:
        body = {"task": "documents", "deadline_ms": 20_000,
                "input": {"text": f"dispatch {i}: the markets, the election and the cup"}}
        try:
            return httpx.post(f"{edge.url}/v1/infer", json=body, timeout=120,
                              headers={"Idempotency-Key": f"node-loss-{i}"})
        finally:
            done.release()

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        jobs = [pool.submit(ask, i) for i in range(REQUESTS)]
        for _ in range(KILL_AFTER):
            assert done.acquire(timeout=300), "requests before the failure did not finish"
        def worker_answered() -> dict[str, float] | None:
            counts = answered_per_node(cloud_url)
            return counts if counts.get(cluster.netns.ns_ip) else None

        per_node = wait_for(worker_answered, timeout_s=120, what="answers from the worker node")
        cluster.kill_worker_node()
        return [job.result(timeout=300) for job in jobs], per_node


def test_replicas_on_two_nodes_survive_the_loss_of_one(cluster, cluster_postgres, models_dir,
                                                       tmp_path):
    outbox_url = cluster_postgres.create_database("cloud_nodes")
    cloud_url = _deploy_cloud(cluster, outbox_url, models_dir, tmp_path)
    seen: dict[str, str] = {}
    try:
        wait_for(lambda: replica_nodes(cloud_url, seen) >= {cluster.head_ip,
                                                             cluster.netns.ns_ip},
                 timeout_s=180, what="ingress replicas answering from both nodes")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; replicas that answered: {seen}") from None
    assert len(seen) == 2, seen  # one replica per node, each answered /readyz

    edge = _edge_server(tmp_path, models_dir, cloud_url)
    try:
        responses, per_node = _load_through_a_node_failure(edge, cluster, cloud_url)
        assert [r.status_code for r in responses] == [200] * REQUESTS, \
            [r.text[:300] for r in responses if r.status_code != 200]
        provisional = sum(r.json()["status"] == "provisional" for r in responses)

        def final_answers() -> list[dict[str, Any]] | None:
            answers = [httpx.get(f"{edge.url}/v1/results/node-loss-{i}", timeout=30).json()
                       for i in range(REQUESTS)]
            # final: not provisional any more ("unknown" is the cloud's final word too)
            return answers if all(a["status"] != "provisional" for a in answers) else None

        finals = wait_for(final_answers, timeout_s=300, what="every request final")
        assert {a["answered_by"] for a in finals} == {"cloud"}
    finally:
        edge.stop()

    # The cluster sees the worker node dead, and Serve replaces its replica on the head: two
    # replicas answer again, both from the head node.
    wait_for(lambda: [n["ip"] for n in cluster.alive_nodes()] == [cluster.head_ip],
             timeout_s=180, what="the worker node seen dead")
    after: dict[str, str] = {}

    def replaced() -> bool:  # asks once; the replicas seen answering since the node died
        return replica_nodes(cloud_url, after) == {cluster.head_ip} and len(after) == 2

    try:
        wait_for(replaced, timeout_s=240, what="two replicas answering from the head node")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; replicas that answered: {after}") from None
    engine = sa.create_engine(outbox_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(results.c.id, results.c.computations)).all()
    finally:
        engine.dispose()
    assert sorted(i for i, _ in stored) == sorted(f"node-loss-{i}" for i in range(REQUESTS))
    assert {n for _, n in stored} == {1}  # computed once each, failure or not
    print(f"multinode: answered per node before the failure {per_node}; {provisional} of "
          f"{REQUESTS} answered provisionally, then made final by the outbox")
