"""README "Bring your own model", run as written: its shell blocks, in order, in a fresh
directory holding the node configs. The worked example trains four models, registers them,
calibrates a policy, serves them on four real tier processes (`cascade up`) and sends a
request that climbs. The only change made to the text: the example's base port (9201) becomes
a free one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port_block

SECTION = "## Bring your own model"
README_PORT = "9201"


def readme_blocks() -> list[str]:
    """The ```bash blocks of the README section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.DOTALL)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float,
                ca: Path) -> None:
    """``url`` answers /readyz over TLS, trusting the CA `cascade up` made at ``ca``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "cascade up exited before the chain was ready"
        try:
            verify = ssl.create_default_context(cafile=str(ca)) if ca.is_file() else None
            if verify and httpx.get(f"{url}/readyz", timeout=0.5,
                                    verify=verify).status_code == 200:
                return
        except (httpx.TransportError, ssl.SSLError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def test_readme_example_registers_calibrates_serves_and_escalates(tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 6, "the worked example has six shell steps"
    for folder in ("edge_nodes", "cloud"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    base = free_port_block(4)
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    env.pop("CASCADE_TASKS", None)
    up: subprocess.Popen[bytes] | None = None
    outputs: list[str] = []
    try:
        for block in blocks:
            script = block.replace(README_PORT, str(base))
            if "cascade up" in script:
                with (tmp_path / "up.log").open("wb") as log:
                    up = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                _wait_ready(f"https://127.0.0.1:{base}", up, timeout_s=120,
                            ca=tmp_path / "var/certs/ca.pem")
                continue
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=240,
                                  check=False)
            assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            outputs.append(done.stdout)
        manifest = json.loads((tmp_path / "models/manifest.json").read_text())
        entry = manifest["tasks"]["cancer"]
        assert entry["input"] == {"kind": "features", "length": 30, "names": None}
        assert entry["classes"] == ["benign", "malignant"]
        assert (entry["splits"]["calibration"], entry["splits"]["test"]) == (142, 143)
        tiers = entry["tiers"]
        assert [tiers[t]["quantized"] for t in tiers] == [False, True, True, False]
        assert tiers["edge-node"]["file"] == "cancer/edge-node.int8.onnx"
        for tier in tiers.values():
            if tier["int8_accuracy"] is not None:
                assert tier["fp32_accuracy"] - tier["int8_accuracy"] <= 0.005
        # 6. the answer came from the edge node, after the endpoint escalated
        body = {"task": "cancer", "input": {"features": [1.0] * 30}}
        ca = ssl.create_default_context(cafile=str(tmp_path / "var/certs/ca.pem"))
        assert httpx.post(f"https://127.0.0.1:{base}/v1/infer", json=body,
                          verify=ca).status_code == 200
        infer_out = outputs[-1]
        assert "answered by edge-node" in infer_out and "true label: malignant" in infer_out
        assert re.search(r"endpoint .*escalate", infer_out), infer_out
        assert re.search(r"edge-node .*answer", infer_out), infer_out
    finally:
        if up is not None and up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)  # cascade up stops its tiers on SIGTERM
            up.wait(timeout=30)
    assert up is not None and up.returncode == 0
