"""Fixtures for fault tests: real tier processes on 127.0.0.1, a fault proxy between them, a
callback receiver, and node configs/policies written per test with fast timers."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cascade.supervisor import Chain
from tests.conftest import ROOT, free_port_block
from tests.fault.proxy import FaultProxy

FAST_OUTBOX = {
    "idle_poll_s": 0.05, "sweep_interval_s": 0.2, "retry_initial_s": 0.05, "retry_max_s": 0.2,
    "poll_initial_s": 0.05, "poll_max_s": 0.2, "callback_retry_initial_s": 0.05,
    "callback_retry_max_s": 0.2, "send_timeout_ms": 3000,
}


def write_policy(path: Path, *, ttl_s: float = 3600, max_attempts: int = 20,
                 deadline_ms: int = 1000) -> Path:
    """Endpoint escalates everything (threshold 1.0); the tiers above answer everything."""
    tiers = {"endpoint": {"signal": "max_prob", "threshold": 1.0},
             "edge-node": {"signal": "max_prob", "threshold": 0.0},
             "edge-server": {"signal": "max_prob", "threshold": 0.0},
             "cloud": {"signal": "max_prob", "threshold": 0.0}}
    task = {"deadline_ms": deadline_ms, "offline": "provisional",
            "queue": {"ttl_s": ttl_s, "max_attempts": max_attempts}, "tiers": tiers}
    path.write_text(yaml.safe_dump({"version": 1, "name": "fault-tests",
                                    "tasks": {"vision": task, "documents": task}}))
    return path


class Tier:
    """One real tier process (a one-tier :class:`Chain`) with its own config and database."""

    def __init__(self, tmp: Path, tier: str, models_dir: Path, policy: Path, *,
                 upstream: str | None = None, tasks: dict[str, str] | None = None,
                 outbox: dict[str, Any] | None = None, db_dir: Path | None = None,
                 **knobs: Any) -> None:
        self.tier = tier
        self.dir = tmp / tier
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = (db_dir or self.dir) / f"{tier}.db"
        self.config = self.dir / f"{tier}.yaml"
        config = {
            "tier": tier, "tasks": tasks or {"vision": tier, "documents": tier},
            "models_dir": str(models_dir), "policy": str(policy),
            "outbox_url": f"sqlite:///{self.db}",
            "outbox": {**FAST_OUTBOX, **(outbox or {})},
            "breaker_failure_threshold": 2, "breaker_reset_s": 0.3,
            "upstream_max_attempts": 2, "upstream_connect_timeout_ms": 300, **knobs,
        }
        self.config.write_text(yaml.safe_dump(config))
        self.upstream = upstream
        self.chain: Chain | None = None

    def start(self) -> "Tier":
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.chain = Chain([self.config], base_port=free_port_block(1), env=env,
                           log_dir=self.dir / "logs", top_upstream_url=self.upstream).start()
        return self

    @property
    def url(self) -> str:
        assert self.chain is not None
        return self.chain.entry_url

    @property
    def pid(self) -> int:
        assert self.chain is not None
        return self.chain.tiers[0].pid

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush."""
        assert self.chain is not None
        proc = self.chain.tiers[0].process
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        if self.chain is not None:
            self.chain.stop()
            self.chain = None

    def log(self) -> str:
        path = self.dir / "logs" / f"{self.tier}.log"
        return path.read_text() if path.exists() else ""

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read this tier's outbox database directly (a separate SQLite connection)."""
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()  # (a `with` block would only commit, not close)

    def states(self) -> dict[str, str]:
        return dict(self.query("SELECT id, state FROM cascade_outbox"))


@pytest.fixture
def tiers(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., Tier]]:
    """Make tiers; all are stopped at the end of the test."""
    made: list[Tier] = []
    policy = write_policy(tmp_path / "policy.yaml")

    def make(tier: str, *, policy_path: Path | None = None, start: bool = True,
             **kw: Any) -> Tier:
        t = Tier(tmp_path, tier, models_dir, policy_path or policy, **kw)
        made.append(t)
        return t.start() if start else t

    yield make
    for t in made:
        t.stop()


@pytest.fixture
def proxy_to() -> Iterator[Callable[[str], FaultProxy]]:
    """A fault proxy in front of a tier URL; stopped at the end of the test."""
    made: list[FaultProxy] = []

    def make(url: str) -> FaultProxy:
        p = FaultProxy(int(url.rsplit(":", 1)[1])).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


class CallbackReceiver:
    """An HTTP server on 127.0.0.1 that records every callback POST."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", 0))
                received.append((self.headers.get("Idempotency-Key", ""),
                                 json.loads(self.rfile.read(length))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callbacks() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def hard_images(models_dir: Path) -> list[list[list[float]]]:
    """Vision test images on which the endpoint model is least sure (they always escalate)."""
    import numpy as np

    from cascade.evaluation import predict_split
    from cascade.models.manifest import load_split

    inputs, _ = load_split(models_dir, "vision", "test")
    _, preds = predict_split(models_dir, "vision", ["endpoint"], "test")
    order = np.argsort(preds["endpoint"].confidences("max_prob"))[:200]
    return [[[float(v) for v in inputs[i][r * 8:(r + 1) * 8]] for r in range(8)] for i in order]


def wait_for(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def post(client: httpx.Client, url: str, body: dict[str, Any], key: str | None = None,
         timeout: float = 10.0) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"{url}/v1/infer", json=body, headers=headers, timeout=timeout)
