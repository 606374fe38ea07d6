"""Logs of real tier processes: one access line per request per tier, nothing from libraries."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.deploy.supervisor import Chain
from cascade.observability.logs import THIRD_PARTY_LOGGERS, configure_logging
from tests.conftest import CHAIN_CONFIGS, free_port_block
from tests.fault.harness import write_policy

pytestmark = pytest.mark.integration
REQUESTS = 5


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_an_escalated_request_leaves_one_line_per_tier(models_dir: Path, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "escalate.yaml", escalating=("endpoint",))
    env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy)}
    logs = tmp_path / "logs"
    chain = Chain([CHAIN_CONFIGS[0], CHAIN_CONFIGS[-1]], base_port=free_port_block(2), env=env,
                  log_dir=logs, state_dir=tmp_path)
    ids = []
    with chain, httpx.Client(timeout=10) as client:
        for i in range(REQUESTS):
            r = client.post(f"{chain.entry_url}/v1/infer",
                            json={"task": "documents", "input": {"text": f"rates rose {i}"}})
            assert r.status_code == 200, r.text
            assert [h["tier"] for h in r.json()["hops"]] == ["endpoint", "cloud"]
            ids.append(r.json()["id"])
    # Stopped cleanly: every tier has flushed its batched lines.
    for tier in ("endpoint", "cloud"):
        text = (logs / f"{tier}.log").read_text()
        assert "HTTP Request:" not in text, f"{tier}: httpx logs its own line per call"
        lines = log_lines(logs / f"{tier}.log")
        access = [i for i, x in enumerate(lines)
                  if x["logger"] == "cascade.access" and x.get("route") == "/v1/infer"]
        assert len(access) == REQUESTS, f"{tier}: {len(access)} access lines for {REQUESTS}"
        assert sorted(lines[i]["request_id"] for i in access) == sorted(ids)
        # While the requests were served, the access lines were all the tier wrote.
        served = lines[access[0]:access[-1] + 1]
        others = [x for x in served if x["logger"] != "cascade.access"]
        assert others == [], f"{tier}: more than one line per request: {others[:2]}"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lib_level in levels.items():
        logging.getLogger(name).setLevel(lib_level)


@pytest.mark.usefixtures("restore_logging")
def test_library_info_lines_only_when_asked_for_debug() -> None:
    for level, shown in (("info", False), ("debug", True)):
        stream = io.StringIO()
        handler = configure_logging("endpoint", level, stream=stream, flush_interval_s=0)
        logging.getLogger("httpx").info("HTTP Request: POST http://up/v1/infer 200 OK")
        logging.getLogger("httpx").warning("something httpx warns about")
        handler.flush()
        text = stream.getvalue()
        assert ("HTTP Request:" in text) is shown, level
        assert "something httpx warns about" in text  # warnings always pass
