"""The `cascade` command: up starts and stops the chain with no orphans; policy check; infer."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port_block
from tests.helpers import children_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cascade(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cascade ARGS`` (this checkout's package, whatever ``cwd`` is)."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "cascade", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120, check=False, **kw)


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


def start_up(models_dir: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """``cascade up`` of the four shipped node configs, run in ``tmp_path``: their relative state
    paths (var/<tier>.db, var/certs, var/traces, var/decisions-*) land there, not in the
    repository. ``extra``: more arguments (``--plain``)."""
    from cascade.deploy.supervisor import DEFAULT_CHAIN

    base = free_port_block(4)
    env = {**os.environ, "CASCADE_MODELS_DIR": str(models_dir),
           "CASCADE_POLICY": str(ROOT / "policies/default.yaml"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    configs = [arg for cfg in DEFAULT_CHAIN for arg in ("--config", str(ROOT / cfg))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade", "up", *configs, "--base-port", str(base), "--log-dir",
         str(tmp_path / "logs"), "--ready-timeout", "120", *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Generous: four tiers load their models one after another on a machine that may be busy.
    ok = wait_until(lambda: all(_ready(tmp_path, base + i) for i in range(4)), 300)
    if not ok:
        proc.kill()
        logs = {log.name: log.read_text()[-2000:] for log in (tmp_path / "logs").glob("*.log")}
        pytest.fail(f"chain did not come up; cascade up said:\n{proc.communicate()[0]}\n{logs}")
    return proc, base


def _client(tmp_path: Path) -> tuple[str, Any]:
    """(scheme, verify) of a chain `cascade up` started in ``tmp_path``: https with the CA it
    made there, or plain http under --plain."""
    ca = tmp_path / "var/certs/ca.pem"
    if ca.exists():
        return "https", ssl.create_default_context(cafile=str(ca))
    return "http", True


def _ready(tmp_path: Path, port: int) -> bool:
    scheme, verify = _client(tmp_path)
    try:
        return httpx.get(f"{scheme}://127.0.0.1:{port}/readyz", timeout=0.5,
                         verify=verify).status_code == 200
    except (httpx.TransportError, ssl.SSLError):
        return False


@pytest.mark.parametrize(("how", "plain"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_up_stops_all_children_on_signal(models_dir, tmp_path, how, plain):
    """By default over mTLS (certificates made under var/certs), with --plain over HTTP."""
    proc, base = start_up(models_dir, tmp_path, *(["--plain"] if plain else []))
    kids = children_of(proc.pid)
    assert len(kids) == 4
    scheme, verify = _client(tmp_path)
    assert scheme == ("http" if plain else "https")
    r = httpx.post(f"{scheme}://127.0.0.1:{base}/v1/infer", verify=verify,
                   json={"task": "documents", "input": {"text": "The striker scored twice"}})
    assert r.status_code == 200
    if not plain:  # the tiers above the endpoint want a client certificate on their API
        refused = httpx.post(f"https://127.0.0.1:{base + 1}/v1/infer", verify=verify,
                             json={"task": "documents", "input": {"text": "x"}})
        assert refused.status_code == 401
    proc.send_signal(how)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "all tiers stopped" in out
    if plain:
        assert "plain HTTP" in out and f"curl -s http://127.0.0.1:{base}" in out
    else:
        assert f"curl -s --cacert var/certs/ca.pem https://127.0.0.1:{base}" in out
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


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("CASCADE_PORT", "lots", "port: Input should be a valid integer"),
    ("CASCADE_UPSTREAM_URL", "ftp://10.0.0.2", "upstream_url: must start with http:// or https://"),
    ("CASCADE_OUTBOX__MAX_ROWS", "0", "outbox.max_rows: Input should be greater than or equal to 1"),
    ("CASCADE_LOG_LEVEL", "verbose", "log_level: Input should be 'debug', 'info'"),
    # A key that takes an object needs JSON (or CASCADE_TASKS__<TASK>=...).
    ("CASCADE_TASKS", "vision", "tasks: 'vision' is not a JSON object"),
])
def test_serve_names_the_environment_variable_a_bad_value_came_from(tmp_path, variable, value,
                                                                    message):
    r = cascade("serve", "--config", str(ROOT / "edge_nodes/endpoint.yaml"), cwd=tmp_path,
                env={variable: value})
    assert r.returncode == 2
    # One message naming the key, what is wrong and the variable; no traceback.
    first, second = r.stderr.splitlines()
    assert first == "error: invalid node config:"
    assert second.startswith(f"  {message}")
    assert second.endswith(f" (from environment variable {variable})")
    assert list(tmp_path.iterdir()) == []  # refused before anything was opened


def test_serve_names_a_bad_tracing_variable(tmp_path):
    r = cascade("serve", "--config", str(ROOT / "edge_nodes/endpoint.yaml"), cwd=tmp_path,
                env={"CASCADE_TRACE_ROUTINE_PER_S": "lots"})
    assert r.returncode == 2
    assert r.stderr == ("error: CASCADE_TRACE_ROUTINE_PER_S: 'lots' is not a number of traces per "
                        "second >= 0, or 'none' (the cap on routine traces per second)\n")


def test_help_teaches():
    r = cascade("--help")
    assert r.returncode == 0
    for command in ("serve", "up", "infer", "models", "policy", "bench"):
        assert command in r.stdout
    r = cascade("up", "--help")
    assert "Ctrl-C" in r.stdout and "Example" in r.stdout


def table_rows(output: str) -> list[list[str]]:
    """The cells of the header (┃) and of each row (│) of a rich table in ``output``."""
    return [[cell.strip() for cell in line[1:-1].split(line[0])]
            for line in output.splitlines() if line[:1] in ("┃", "│")]


def test_infer_prints_the_answer_and_every_hop(tiers, tmp_path, models_dir):
    from cascade.models.manifest import load_split

    # endpoint -> cloud; the endpoint escalates everything, the cloud answers everything.
    cloud = tiers("cloud")
    endpoint = tiers("endpoint", upstream=cloud.url)
    text = "The striker scored twice in the cup final"
    expected = httpx.post(f"{endpoint.url}/v1/infer",
                          json={"task": "documents", "input": {"text": text}}).json()
    wide = {"COLUMNS": "250"}  # no column is cut short
    r = cascade("infer", "documents", text, "--url", endpoint.url, cwd=tmp_path, env=wide)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (f"{expected['label']} (confidence {expected['confidence']:.3f}, final, "
                        "answered by cloud)")
    header, *rows = table_rows(r.stdout)
    assert header == ["hop", "tier", "model", "label", "confidence", "decision", "ms"]
    assert [row[:-1] for row in rows] == [
        [str(i), h["tier"], h["model"], h["label"], f"{h['confidence']:.3f}", h["decision"]]
        for i, h in enumerate(expected["hops"], 1)]
    assert [row[1] for row in rows] == ["endpoint", "cloud"]
    assert [row[5] for row in rows] == ["escalate", "answer"]
    assert all(float(row[-1]) >= 0 for row in rows)
    assert lines[-1].startswith("id ") and " trace " in lines[-1]

    _, labels = load_split(models_dir, "vision", "test")
    r = cascade("infer", "vision", "--sample", "3", "--url", endpoint.url, "--models-dir",
                str(models_dir), cwd=tmp_path, env=wide)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].endswith(f"answered by cloud)  true label: {labels[3]}")
    assert [(row[1], row[5]) for row in table_rows(r.stdout)[1:]] == [
        ("endpoint", "escalate"), ("cloud", "answer")]
    # The command ran here, and wrote nothing (the tiers keep their state in their folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud", "endpoint", "policy.yaml"]
