"""The drift alarm in a serving tier: /metrics and /readyz show it, and with `action: tighten`
the decision log records it so replay still reproduces every live decision."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cascade.http.app import create_app
from cascade.lab.replay import replay_task, traffic_from_logs
from cascade.observability.decisionlog import connect, read_rows
from cascade.tier.node import Node
from tests.unit.otel_fixtures import send_texts, serving, text_node
from tests.unit.test_metrics import samples, value

# Calibrated on traffic that is mostly confident (10% below the 0.6 threshold).
POLICY = """\
version: 1
name: drift-test
decision_log: {{sample_rate: 1.0, path: "{path}"}}
tasks:
  documents:
    drift: {{window: 40, min_samples: 20, action: {action}, tighten_by: 0.2}}
    tiers:
      endpoint:
        threshold: 0.6
        drift_reference: {{edges: [0.6, 0.9], counts: [10, 30, 60], escalation_rate: 0.1}}
      cloud: {{threshold: 0.0}}
"""


def make_node(tmp_path: Path, action: str) -> Node:
    return text_node(tmp_path, POLICY.format(path=tmp_path / "decisions-{tier}.db", action=action))


async def test_metrics_and_readyz_expose_the_drift_state(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(tmp_path, "alert")
    app = create_app(node)
    t = {"tier": "endpoint", "task": "documents"}
    async with serving(app) as c:
        ready = (await c.get("/readyz")).json()["drift"]["documents"]
        assert ready["state"] == "warming_up" and ready["reference_samples"] == 100
        await send_texts(node, [0.95] * 10 + [0.75] * 15 + [0.45] * 5)  # like the reference
        scrape = samples((await c.get("/metrics")).text)
        assert value(scrape, "cascade_drift_alarm", **t) == 0
        assert value(scrape, "cascade_drift_window_requests", **t) == 30
        assert (await c.get("/readyz")).json()["drift"]["documents"]["state"] == "ok"
        with caplog.at_level(logging.WARNING, logger="cascade.gating.drift"):
            answers = await send_texts(node, [0.55] * 80, start=30)  # harder traffic: escalates
        scrape = samples((await c.get("/metrics")).text)
        ready = (await c.get("/readyz")).json()["drift"]["documents"]
    assert value(scrape, "cascade_drift_alarm", **t) == 1
    assert value(scrape, "cascade_drift_alarms_total", **t) == 1
    assert value(scrape, "cascade_drift_score", **t) > value(scrape, "cascade_drift_alarm_level", **t)
    assert ready["state"] == "alarm" and "escalation rate" in ready["cause"]
    assert ready["escalation_rate"] > 0.9 and ready["reference_escalation_rate"] == 0.1
    assert ready["action"] == "alert" and ready["alarms"] == 1
    drift_names = {name for name, _ in scrape if name.startswith("cascade_drift_")}
    documented = (Path(__file__).resolve().parents[2] / "infra" / "README.md").read_text()
    assert len(drift_names) == 5 and all(f"`{name}`" in documented for name in drift_names)
    # Alert only: decisions are what the policy alone says.
    assert all(a["hops"][0]["decision"] == "escalate" for a in answers)
    ons = [r for r in caplog.records if r.levelno == logging.WARNING and "drift alarm ON" in r.message]
    assert len(ons) == 1 and "tier endpoint, task documents" in ons[0].message


def test_tightened_decisions_are_logged_and_replayed_exactly(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cascade.gating.drift")
    node = make_node(tmp_path, "tighten")

    async def run() -> list[dict[str, Any]]:
        out = await send_texts(node, [0.55] * 80)  # drives the alarm on
        return out + await send_texts(node, [0.7] * 20, start=80)

    answers = asyncio.run(run())
    asyncio.run(node.aclose())
    # 0.7 clears the policy's 0.6 but not the tightened 0.8: escalated while the alarm is on.
    assert [a["hops"][0]["decision"] for a in answers[80:]] == ["escalate"] * 20
    rows = list(read_rows([tmp_path / "decisions-endpoint.db"]))
    tightened = [r for r in rows if r["drift_tightened"]]
    assert tightened and all(r["threshold"] == pytest.approx(0.8) for r in tightened)
    assert rows[0]["drift_tightened"] == 0 and rows[0]["threshold"] == pytest.approx(0.6)
    traffic = traffic_from_logs([tmp_path / "decisions-endpoint.db"], node.policy)["documents"]
    result = replay_task(traffic, node.policy)
    assert result.compared == 100 and result.mismatched == 0


def test_an_older_decision_log_gains_the_drift_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
                 "request_id TEXT NOT NULL)")
    conn.commit()
    conn.close()
    conn = connect(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(decisions)")}
    conn.close()
    assert "drift_tightened" in columns
