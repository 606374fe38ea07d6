"""The `cascade` command: up starts and stops the chain with no orphans; policy check; infer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port_block

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cascade(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cascade", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False, **kw)


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def start_up(models_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    base = free_port_block(4)
    env = {**os.environ, "CASCADE_MODELS_DIR": str(models_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade", "up", "--base-port", str(base), "--log-dir",
         str(tmp_path / "logs")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ok = wait_until(lambda: all(_ready(base + i) for i in range(4)), 60)
    assert ok, "chain did not come up"
    return proc, base


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=0.5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_all_children_on_signal(models_dir, tmp_path, how):
    proc, base = start_up(models_dir, tmp_path)
    kids = children_of(proc.pid)
    assert len(kids) == 4
    r = httpx.post(f"http://127.0.0.1:{base}/v1/infer",
                   json={"task": "documents", "input": {"text": "The striker scored twice"}})
    assert r.status_code == 200
    proc.send_signal(how)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "all tiers stopped" in out
    assert "curl -s" in out and f"http://127.0.0.1:{base}" in out
    assert wait_until(lambda: not any(alive(k) for k in kids), 10)


def test_killed_up_leaves_no_orphans(models_dir, tmp_path):
    proc, _ = start_up(models_dir, tmp_path)
    kids = children_of(proc.pid)
    assert len(kids) == 4
    proc.kill()  # SIGKILL: no chance to clean up; the children must die with it
    proc.wait()
    assert wait_until(lambda: not any(alive(k) for k in kids), 10)


def test_policy_check_good_and_bad(tmp_path):
    ok = cascade("policy", "check", "policies/default.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "✓" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntasks:\n  vision:\n    tiers:\n      endpoint: {threshold: 2}\n")
    r = cascade("policy", "check", str(bad))
    assert r.returncode == 2
    assert f"{bad}: tasks.vision.tiers.endpoint.threshold" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_serve_with_a_bad_config_fails_cleanly(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("tier: endpoint\ntasks: {vision: endpoint}\nport: lots\n")
    r = cascade("serve", "--config", str(cfg))
    assert r.returncode == 2
    assert "port" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


def test_help_teaches():
    r = cascade("--help")
    assert r.returncode == 0
    for command in ("serve", "up", "infer", "models", "policy", "bench"):
        assert command in r.stdout
    r = cascade("up", "--help")
    assert "Ctrl-C" in r.stdout and "Example" in r.stdout


def test_infer_prints_hops(running_chain):
    r = cascade("infer", "documents", "The striker scored twice in the cup final",
                "--url", running_chain.entry_url)
    assert r.returncode == 0, r.stderr
    assert "answered by" in r.stdout and "endpoint" in r.stdout
    r = cascade("infer", "vision", "--sample", "3", "--url", running_chain.entry_url)
    assert r.returncode == 0, r.stderr
    assert "true label" in r.stdout
