"""``cascade up`` supervises: SIGKILL the edge-node of a running chain and the endpoint keeps
answering (provisionally), the supervisor restarts the edge-node and says so, the backlog
drains, and every request ends final. Real processes: ``cascade up`` and its four tiers."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.deploy.supervisor import DEFAULT_CHAIN
from tests.conftest import free_port_block
from tests.fault.harness import ROOT, wait_for, write_policy
from tests.helpers import children_of

pytestmark = pytest.mark.integration


class UpProcess:
    """``cascade up --json`` in ``cwd``; its output lines collected as they come."""

    def __init__(self, cwd: Path, models_dir: Path, policy: Path, *extra: str) -> None:
        self.base = free_port_block(4)
        env = {**os.environ, "CASCADE_MODELS_DIR": str(models_dir),
               "CASCADE_POLICY": str(policy),
               "CASCADE_DECISION_LOG_PATH": str(cwd / "decisions-{tier}.db"),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        configs = [arg for cfg in DEFAULT_CHAIN for arg in ("--config", str(ROOT / cfg))]
        self.log_dir = cwd / "logs"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cascade", "up", *configs, "--base-port", str(self.base),
             "--log-dir", str(self.log_dir), "--ready-timeout", "120", "--json", *extra],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def tiers(self) -> dict[str, dict[str, Any]]:
        """The tiers ``cascade up`` printed once ready (tier -> url, pid...)."""
        line = wait_for(lambda: next((x for x in self.lines if x.startswith('{"tiers"')), None),
                        timeout_s=300, what=f"cascade up to be ready (said: {self.lines[-20:]})")
        return {t["tier"]: t for t in json.loads(line)["tiers"]}

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def test_a_killed_tier_is_restarted_while_the_endpoint_answers_and_its_backlog_drains(
        models_dir, tmp_path):
    # The endpoint escalates everything and the edge-node answers it: every answer is final
    # once the edge-node has it, provisional while it cannot be reached.
    policy = write_policy(tmp_path / "policy.yaml", escalating=("endpoint",))
    up = UpProcess(tmp_path, models_dir, policy, "--restart-backoff", "0.5")
    try:
        tiers = up.tiers()
        endpoint, edge = tiers["endpoint"]["url"], tiers["edge-node"]
        # `cascade up` serves TLS with the CA it made in its working directory.
        ca = ssl.create_default_context(cafile=str(tmp_path / "var/certs/ca.pem"))
        answers: dict[str, str] = {}
        refused: list[tuple[str, int]] = []
        stop = threading.Event()

        def client() -> None:  # steady traffic, each request with its own key
            with httpx.Client(timeout=30, verify=ca) as c:
                for n in range(1_000_000):
                    if stop.is_set():
                        return
                    key = f"sup-{n}"
                    r = c.post(f"{endpoint}/v1/infer", headers={"Idempotency-Key": key},
                               json={"task": "documents",
                                     "input": {"text": f"Shares rose {n} points after the cut"}})
                    if r.status_code == 200:
                        answers[key] = r.json()["status"]
                    else:
                        refused.append((key, r.status_code))
                    stop.wait(0.05)

        traffic = threading.Thread(target=client)
        traffic.start()
        try:
            wait_for(lambda: list(answers.values()).count("final") >= 5, 60, "final answers")
            os.kill(edge["pid"], signal.SIGKILL)
            wait_for(lambda: "provisional" in answers.values(), 60,
                     "a provisional answer while the edge-node is down")
            wait_for(lambda: up.said("tier edge-node restarted"), 60, "the restart, printed")
            wait_for(lambda: up.said("tier edge-node is ready again"), 180, "the edge-node ready")
            seen = len(answers)
            wait_for(lambda: list(answers.values())[seen:].count("final") >= 5, 120,
                     "final answers online again")
        finally:
            stop.set()
            traffic.join(60)
        assert refused == [], refused[:5]
        assert up.said("tier edge-node exited with code -9; restarting in 0.5 s")
        # Every request ends final: the provisional ones once the outbox delivered them.
        with httpx.Client(timeout=10, verify=ca) as c:
            def not_final() -> list[str]:
                return [k for k in answers
                        if c.get(f"{endpoint}/v1/results/{k}").json().get("status") != "final"]
            wait_for(lambda: not not_final(), 240, "every answer final")
        events = [json.loads(x) for x in (up.log_dir / "supervisor.log").read_text().splitlines()]
        assert [(e["tier"], e["kind"]) for e in events] == [
            ("edge-node", "exited"), ("edge-node", "restarted"), ("edge-node", "ready")]
        # The other tiers were never restarted: the same processes still run.
        running = children_of(up.proc.pid)
        assert all(tiers[t]["pid"] in running for t in ("endpoint", "edge-server", "cloud"))
    finally:
        assert up.stop() == 0, "\n".join(up.lines[-30:])
    assert up.said("all tiers stopped")
