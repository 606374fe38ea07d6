"""What a tier run as several replicas adds, without Ray: each replica's decision log file, the
response header naming the replica, and the refusal to share a SQLite outbox."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cascade.deploy.replicas import REPLICA_HEADER, ReplicaHeaderMiddleware
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
