"""What a tier run as several replicas adds, without Ray: each replica's decision log file, the
response header naming the replica, and the refusal to share a SQLite outbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cascade.deploy.replicas import REPLICA_HEADER, MetricsMirror, ReplicaHeaderMiddleware
from cascade.errors import ConfigError
from cascade.observability.decisionlog import PATH_ENV, resolve_path
from cascade.tier.settings import load_node_settings

ROOT = Path(__file__).resolve().parents[2]


def test_each_replica_writes_its_own_decision_log(monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)
    template = "var/decisions-{tier}.db"
    assert resolve_path(template, "cloud") == Path("var/decisions-cloud.db")
    assert resolve_path(template, "cloud", "ab12cd") == Path("var/decisions-cloud-ab12cd.db")
    assert resolve_path("logs/{replica}/{tier}.db", "cloud", "r/1") == Path("logs/r_1/cloud.db")
    assert resolve_path("var/decisions", "cloud", "r1") == Path("var/decisions-r1")


async def test_every_response_names_its_replica():
    async def ok(_request):
        return JSONResponse({"ok": True}, status_code=409)

    app = ReplicaHeaderMiddleware(Starlette(routes=[Route("/", ok)]), replica="r-7")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        response = await client.get("/")
    assert response.status_code == 409 and response.json() == {"ok": True}
    assert response.headers[REPLICA_HEADER] == "r-7"


def test_replicas_cannot_share_a_sqlite_outbox():
    with pytest.raises(ConfigError, match="ray_serve: ingress_replicas: 2 replicas cannot share"):
        load_node_settings(ROOT / "cloud/cloud.yaml", ray_serve={"ingress_replicas": 2})
    shared = load_node_settings(ROOT / "cloud/cloud.yaml", ray_serve={"ingress_replicas": 2},
                                outbox_url="postgresql+psycopg://cascade@127.0.0.1/cloud")
    assert shared.ray_serve.ingress_replicas == 2


class _Sink:
    """Stands in for ray.util.metrics (Ray itself: tests/ray/test_serve_metrics.py)."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[tuple[str, ...], dict[frozenset[Any], float]]] = {}

    def make(self, name: str, _description: str, keys: tuple[str, ...]) -> Any:
        if name == "cascade_broken_total":
            raise ValueError("refused by the sink")
        values: dict[frozenset[Any], float] = {}
        self.gauges[name] = (keys, values)

        class Gauge:
            def set(self, value: float, tags: dict[str, str]) -> None:
                assert set(tags) == set(keys)
                values[frozenset(tags.items())] = value

        return Gauge()


def test_the_metrics_mirror_copies_every_cascade_sample_with_its_replica():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    answers = Counter("cascade_answers", "answers", ["tier", "status"], registry=registry)
    latency = Histogram("cascade_request_duration_seconds", "latency", ["tier"],
                        buckets=(0.1, 1.0), registry=registry)
    Counter("cascade_broken", "refused", registry=registry).inc()
    Counter("other_total", "not cascade's", registry=registry).inc()
    answers.labels("cloud", "final").inc(3)
    latency.labels("cloud").observe(0.5)
    sink = _Sink()
    mirror = MetricsMirror(sink.make, replica="r1")
    mirror.export(registry)
    answers.labels("cloud", "final").inc()
    mirror.export(registry)
    keys, values = sink.gauges["cascade_answers_total"]
    assert keys == ("status", "tier", "replica")
    assert values == {frozenset({"status": "final", "tier": "cloud", "replica": "r1"}.items()): 4}
    buckets = sink.gauges["cascade_request_duration_seconds_bucket"][1]
    assert buckets[frozenset({"le": "0.1", "tier": "cloud", "replica": "r1"}.items())] == 0
    assert buckets[frozenset({"le": "1.0", "tier": "cloud", "replica": "r1"}.items())] == 1
    assert "cascade_answers_created" not in sink.gauges and "other_total" not in sink.gauges
    assert mirror.exports == 2 and mirror.skipped == 2  # the refused metric, twice
