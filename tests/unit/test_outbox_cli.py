"""``cascade queue`` against a real SQLite outbox prepared through the Outbox API."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cascade.cli import app
from cascade.contract.escalation import PendingEscalation
from cascade.outbox import Outbox, OutboxSettings
from cascade.outbox.store import Outcome

runner = CliRunner()


def pending(i: int) -> PendingEscalation:
    rid = f"q-{i}"
    return PendingEscalation(
        id=rid, task="documents", body={"task": "documents", "input": {"text": f"t{i}"}},
        provisional={"id": rid, "task": "documents", "label": "sport", "status": "provisional",
                     "hops": []}, reason="upstream down", hop_count=1, ttl_s=3600,
        max_attempts=2)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """q-0 dead (poison), q-1 done, q-2 and q-3 queued."""
    path = tmp_path / "endpoint.db"

    async def fill() -> None:
        box = Outbox(f"sqlite:///{path}", tier="endpoint", settings=OutboxSettings())
        await box.start(background=False)
        for i in range(4):
            await box.enqueue(pending(i))
        await box.claim(2)
        await box.record(Outcome("q-0", "dead", error="upstream refused it with HTTP 422"))
        await box.record(Outcome("q-1", "final", response_json='{"id": "q-1", "status": "final"}'))
        await box.aclose()

    asyncio.run(fill())
    return path


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["queue", *args])
    return result.exit_code, result.output


def test_stats_table_and_json(db):
    code, out = run("stats", "--db", str(db))
    assert code == 0
    assert "queued" in out and "dead" in out and "held against the caps: 3 / 100000" in out
    code, out = run("stats", "--db", f"sqlite:///{db}", "--json")
    data = json.loads(out)
    assert data["states"]["queued"]["rows"] == 2 and data["states"]["done"]["rows"] == 1
    assert data["held_rows"] == 3 and data["caps"]["max_rows"] == 100_000


def test_ls_filters_by_state(db):
    code, out = run("ls", "--db", str(db), "--state", "dead")
    assert code == 0 and "q-0" in out and "HTTP 422" in out and "q-2" not in out
    code, out = run("ls", "--db", str(db), "--json")
    assert [r["id"] for r in json.loads(out)] == ["q-0", "q-1", "q-2", "q-3"]


def test_show_one_request(db):
    code, out = run("show", "q-0", "--db", str(db))
    data = json.loads(out)
    assert code == 0 and data["escalation"]["state"] == "dead"
    assert data["escalation"]["body"] == {"task": "documents", "input": {"text": "t0"}}
    assert data["answer"]["status"] == "provisional" and data["computations"] == 1
    code, out = run("show", "nope", "--db", str(db))
    assert code == 1 and "no escalation or result with id 'nope'" in out


def test_replay_dead_by_id_and_all(db):
    code, out = run("replay", "q-2", "--db", str(db))
    assert code == 1 and "is not dead or expired" in out
    code, out = run("replay", "--dead", "--db", str(db))
    assert code == 0 and "replayed 1" in out
    _, out = run("ls", "--db", str(db), "--state", "queued", "--json")
    assert {r["id"] for r in json.loads(out)} == {"q-0", "q-2", "q-3"}


def test_replay_with_a_new_ttl(db):
    code, out = run("replay", "--dead", "--ttl", "0", "--db", str(db))
    assert code == 2 and "--ttl '0'" in out and "above zero" in out
    code, out = run("replay", "--dead", "--ttl", "2h", "--db", str(db))
    assert code == 0 and "replayed 1" in out
    _, out = run("show", "q-0", "--db", str(db))
    esc = json.loads(out)["escalation"]
    ttl = dt.datetime.fromisoformat(esc["expires_at"]) - dt.datetime.fromisoformat(esc["updated_at"])
    assert esc["state"] == "queued" and ttl.total_seconds() == pytest.approx(7200, abs=0.002)


def test_purge_only_finished_rows(db):
    code, out = run("purge", "--db", str(db))
    assert code == 2 and "--expired, --dead and/or --done" in out
    code, out = run("purge", "--dead", "--dry-run", "--db", str(db))
    assert code == 0 and "would purge 1" in out
    code, out = run("purge", "--dead", "--done", "--db", str(db))
    assert code == 0 and "purged 2" in out
    _, out = run("stats", "--db", str(db), "--json")
    assert json.loads(out)["held_rows"] == 2
    code, out = run("purge", "--expired", "--older-than", "soon", "--db", str(db))
    assert code == 2 and "--older-than 'soon'" in out


def test_config_points_at_the_tier_database(db, tmp_path):
    config = tmp_path / "endpoint.yaml"
    config.write_text(yaml.safe_dump({
        "tier": "endpoint", "tasks": {"documents": "endpoint"},
        "outbox_url": f"sqlite:///{db}", "outbox": {"max_rows": 10}}))
    code, out = run("stats", "-c", str(config))
    assert code == 0 and "outbox of endpoint" in out and "3 / 10 rows" in out


@pytest.mark.parametrize("args,message", [
    (["stats"], "give exactly one of --config"),
    (["stats", "--db", "/nonexistent/x.db"], "no outbox database at /nonexistent/x.db"),
    (["stats", "--db", "mysql://h/db"], "backend 'mysql' is not supported"),
    (["stats", "-c", "/nonexistent.yaml"], "no such node config file"),
])
def test_clear_errors(args, message):
    code, out = run(*args)
    assert code == 2 and message in out.replace("\n", " ")


def test_a_file_that_is_not_an_outbox(tmp_path):
    other = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(other).execute("create table t(x)").connection.close()
    code, out = run("stats", "--db", str(other))
    assert code == 2 and "is not a cascade outbox" in out
