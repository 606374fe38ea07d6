"""CLI output for scripts: ``--json`` documents, and what ``calibrate --out`` says about who
loads the file it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cascade.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_calibrate_names_the_tiers_that_load_the_file_or_the_file_they_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade.cli.policy_cmd import _who_picks_it_up

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("CASCADE_POLICY", raising=False)
    said = _who_picks_it_up(Path("policies/default.yaml"))
    assert said.startswith("running tiers that use it (endpoint, edge-node, edge-server, cloud)")
    said = _who_picks_it_up(Path("policies/strict.yaml"))
    assert "watch policies/default.yaml, not policies/strict.yaml" in said
    assert "CASCADE_POLICY=policies/strict.yaml" in said


def test_disk_json_measures_each_store_from_its_files(tmp_path: Path) -> None:
    db = tmp_path / "edge-node.db"
    db.write_bytes(b"x" * 5000)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "edge-node.log").write_bytes(b"y" * 300)
    (tmp_path / "logs" / "edge-node.log.1").write_bytes(b"y" * 700)
    config = tmp_path / "edge-node.yaml"
    config.write_text(yaml.safe_dump({
        "tier": "edge-node", "tasks": ["vision"], "models_dir": str(tmp_path / "no-models"),
        "policy": str(ROOT / "policies/default.yaml"), "outbox_url": f"sqlite:///{db}",
        "log_file": str(tmp_path / "logs" / "edge-node.log"), "disk": {"budget_mb": 10}}))
    result = CliRunner().invoke(app, ["disk", "-c", str(config), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    stores = doc["stores"]
    assert doc["tier"] == "edge-node" and doc["budget_bytes"] == 10 * 1024 * 1024
    assert stores["results"]["used_bytes"] == 5000
    assert stores["results"]["budget_bytes"] == 5 * 1024 * 1024
    assert stores["logs"]["used_bytes"] == 1000 and len(stores["logs"]["files"]) == 2
    assert set(stores) == {"results", "decisions", "logs", "traces", "models"}


def test_traces_json_is_one_line_per_trace(tmp_path: Path) -> None:
    spans = [{"trace_id": f"{t:032x}", "span_id": f"{t:016x}", "parent_id": None,
              "name": "POST /v1/infer", "kind": "SERVER", "start_ns": t * 1_000_000,
              "end_ns": t * 1_000_000 + 2_000_000, "status": "UNSET", "service": "cascade-endpoint",
              "tier": "endpoint", "attrs": {"cascade.status": "final",
                                            "cascade.answered_by": "endpoint"},
              "links": [], "events": []} for t in (1, 2, 3)]
    file = tmp_path / "endpoint.jsonl"
    file.write_text("".join(json.dumps(s) + "\n" for s in spans))
    result = CliRunner().invoke(app, ["traces", str(file), "--json", "-n", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["trace_id"] for d in lines] == [f"{3:032x}", f"{2:032x}"]
    assert lines[0]["duration_ms"] == 2.0 and lines[0]["tiers"] == ["endpoint"]
    assert lines[0]["outcome"] == "final, answered by endpoint" and len(lines[0]["spans"]) == 1
