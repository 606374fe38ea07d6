"""Fixtures for the Ray Serve tests: one small local Ray instance for the whole session (started
once: a cold start takes 10-60 s on two cores), the edge-server and cloud tiers deployed on it
as Serve applications behind one proxy, and a twin edge-server process (``cascade serve``)
that must answer exactly as the Serve edge-server does.

Ray is kept small for a shared two-core machine: ``num_cpus=2``, a pinned object store, no
dashboard, fractional CPUs per replica; everything started here is stopped here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port_block
from tests.contract.conftest import postgres_server
from tests.fault.conftest import hard_images
from tests.fault.harness import Tier, default_policy_copy, wait_for

__all__ = ["hard_images", "postgres_server", "ray_instance", "replicated_cloud",  # fixtures
           "serve_proxy", "serve_tier"]

RAY_NUM_CPUS = 2
OBJECT_STORE_BYTES = 80 * 1024 * 1024
SERVE_KNOBS = {
    # A wait long enough that concurrent requests meet in one batch on a loaded machine.
    "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
    "ingress_num_cpus": 0.2, "model_num_cpus": 0.2,
    "metrics_export_interval_s": 1.0,
}


def escalate_everything(policy: dict[str, Any], tier: str = "edge-server") -> dict[str, Any]:
    """``policy`` with ``tier`` sending every request up (threshold 1.0, max_prob)."""
    changed = yaml.safe_load(yaml.safe_dump(policy))
    for task in changed["tasks"].values():
        task["tiers"][tier] = {"signal": "max_prob", "threshold": 1.0}
    return changed


@dataclass
class RayInstance:
    """The session's Ray: its temp dir and where its metrics agent serves Prometheus text."""

    temp_dir: str
    metrics_url: str


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[RayInstance]:
    """A local Ray instance for the session (no dashboard, small object store, the metrics
    agent on a free port), then stopped."""
    import ray
    from ray import serve

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    metrics_port = free_port_block(1)
    ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, _temp_dir=temp_dir, log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        yield RayInstance(temp_dir, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_proxy(ray_instance: RayInstance) -> str:
    """Serve's HTTP proxy on a free port (one per Ray cluster: every app of the session is
    routed by it); returns its base URL."""
    from ray import serve

    port = free_port_block(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@dataclass
class ServeTier:
    """The edge-server tier on Serve (its upstream: cloud on Serve) and its twin process."""

    url: str
    settings: Any
    policy: Path
    twin: Tier
    trace_dir: Path

    def readiness(self) -> dict[str, Any]:
        """The Serve tier's ``/readyz`` body."""
        return httpx.get(f"{self.url}/readyz", timeout=10).json()  # type: ignore[no-any-return]


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="session")
def serve_tier(serve_proxy: str, models_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeTier]:
    """The edge-server and cloud tiers as Serve applications behind one proxy on a free port
    (edge-server at ``/``, escalating to cloud, at ``/cloud``, through a DeploymentHandle;
    both write their spans under ``traces/``), and a twin edge-server process escalating over
    HTTP to the same Serve cloud tier."""
    from ray import serve

    from cascade.deploy.ray_serve import deploy_chain
    from cascade.tier.settings import load_node_settings

    tmp = tmp_path_factory.mktemp("serve")
    policy = default_policy_copy(tmp / "policy.yaml")
    root = Path(__file__).resolve().parents[2]
    chain = [load_node_settings(root / config, models_dir=models_dir, policy=policy,
                                outbox_url=f"sqlite:///{tmp / Path(config).stem}.db",
                                ray_serve=SERVE_KNOBS, trace_dir=tmp / "traces")
             for config in ("edge_nodes/edge-server.yaml", "cloud/cloud.yaml")]
    port = int(serve_proxy.rsplit(":", 1)[1])
    twin = None
    try:
        edge_server, _cloud = deploy_chain(chain, host="127.0.0.1", port=port)
        url = serve_proxy
        wait_for(lambda: _status(f"{url}/readyz") == 200 == _status(f"{url}/cloud/readyz"),
                 timeout_s=120, what="the Serve tiers ready")
        twin = Tier(tmp / "processes", "edge-server", models_dir, policy,
                    upstream=edge_server.upstream_url).start()
        yield ServeTier(url, edge_server, policy, twin, tmp / "traces")
    finally:
        if twin is not None:
            twin.stop()
        for app in ("edge-server", "cloud"):
            serve.delete(app)


@dataclass
class ReplicatedTier:
    """The cloud tier as a Serve app with two ingress replicas on one PostgreSQL outbox."""

    url: str
    app: str
    outbox_url: str


@pytest.fixture(scope="session")
def replicated_cloud(serve_proxy: str, models_dir: Path, postgres_server: Any,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedTier]:
    """Cloud as app ``cloud-replicas`` at ``/replicas``: 2 ingress replicas sharing a fresh
    PostgreSQL database as their outbox, one model replica per task."""
    from ray import serve

    from cascade.deploy.ray_serve import build_tier_app
    from cascade.tier.settings import load_node_settings

    tmp = tmp_path_factory.mktemp("replicas")
    outbox_url = postgres_server.create_database("cloud_replicas")
    root = Path(__file__).resolve().parents[2]
    settings = load_node_settings(root / "cloud/cloud.yaml", models_dir=models_dir,
                                  policy=default_policy_copy(tmp / "policy.yaml"),
                                  outbox_url=outbox_url,
                                  ray_serve={**SERVE_KNOBS, "ingress_replicas": 2})
    app, prefix = "cloud-replicas", "/replicas"
    try:
        serve.run(build_tier_app(settings), name=app, route_prefix=prefix)
        url = f"{serve_proxy}{prefix}"
        wait_for(lambda: _status(f"{url}/readyz") == 200, timeout_s=120,
                 what="the replicated cloud tier ready")
        yield ReplicatedTier(url, app, outbox_url)
    finally:
        serve.delete(app)
