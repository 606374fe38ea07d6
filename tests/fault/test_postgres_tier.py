"""An edge server whose outbox is PostgreSQL (real server): queue offline, drain, operate."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from tests.contract.conftest import postgres_server  # noqa: F401 - the session fixture
from tests.fault.harness import LOOPBACK_CALLBACKS, post, wait_for, write_policy

pytestmark = pytest.mark.integration


def test_edge_server_with_a_postgres_outbox(tiers, proxy_to, callbacks, tmp_path, hard_images,
                                            postgres_server):  # noqa: F811
    url = postgres_server.create_database("edge_server_outbox")
    policy = write_policy(tmp_path / "p.yaml", escalating=("endpoint", "edge-node", "edge-server"))
    cloud = tiers("cloud", policy_path=policy)
    proxy = proxy_to(cloud.url)
    server = tiers("edge-server", upstream=proxy.url, policy_path=policy, outbox_url=url,
                   callbacks=LOOPBACK_CALLBACKS)
    proxy.set(mode="reset")
    with httpx.Client() as client:
        answers = [post(client, server.url, {"task": "vision", "input": {"image": hard_images[i]},
                                             "callback_url": callbacks.url}, key=f"pg-{i}").json()
                   for i in range(5)]
        assert {a["status"] for a in answers} == {"provisional"}
        assert {a["escalation"]["state"] for a in answers} == {"queued"}
        stats = CliRunner().invoke(app, ["queue", "stats", "--db", url, "--json"])
        assert stats.exit_code == 0, stats.output
        assert json.loads(stats.output)["states"]["queued"]["rows"] + \
            json.loads(stats.output)["states"]["forwarding"]["rows"] == 5
        proxy.set(mode="pass")
        wait_for(lambda: all(client.get(f"{server.url}/v1/results/pg-{i}").json()
                             ["escalation"]["state"] == "done" for i in range(5)),
                 timeout_s=30, what="drained from PostgreSQL")
        final = client.get(f"{server.url}/v1/results/pg-0").json()
        assert (final["status"], final["answered_by"]) == ("final", "cloud")
    wait_for(lambda: len(callbacks.received) == 5, timeout_s=30, what="callbacks")
    assert sorted(k for k, _ in callbacks.received) == [f"pg-{i}" for i in range(5)]
