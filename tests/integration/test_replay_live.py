"""Replay of a real chain's decision logs gives exactly the decisions live serving made, and
`cascade policy replay` gates a candidate on its goals (exit 0 / 1)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from cascade.contract.inputs import request_body
from cascade.lab.replay import replay_task, traffic_from_logs
from cascade.policy import load_policy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]


body = request_body


async def send(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(8)

        async def one(b: dict) -> dict:
            async with sem:
                r = await client.post(f"{url}/v1/infer", json=b)
                assert r.status_code == 200, r.text
                return r.json()

        return list(await asyncio.gather(*(one(b) for b in bodies)))


@pytest.fixture(scope="module")
def recorded(models_dir, tmp_path_factory):
    """Test-split traffic (the endpoint's least confident samples first) through a live chain
    whose policy logs every decision; returns (policy path, log files, responses per task)."""
    from cascade.deploy.supervisor import Chain
    from cascade.lab.evaluation import predict_split
    from cascade.models.manifest import load_split
    from tests.conftest import CHAIN_CONFIGS, free_port_block

    var = tmp_path_factory.mktemp("replay")
    doc = yaml.safe_load((ROOT / "policies/default.yaml").read_text())
    doc["decision_log"] = {"sample_rate": 1.0}
    policy_path = var / "logged.yaml"
    policy_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy_path),
           "CASCADE_DECISION_LOG_PATH": str(var / "decisions-{tier}.db")}
    responses = {}
    with Chain(CHAIN_CONFIGS, base_port=free_port_block(4), env=env, log_dir=var / "logs",
               state_dir=var) as chain:
        for task in ("vision", "documents"):
            inputs, _ = load_split(models_dir, task, "test")
            _, preds = predict_split(models_dir, task, ["endpoint"], "test")
            order = np.argsort(preds["endpoint"].probabilities.max(axis=1))[:60]
            responses[task] = asyncio.run(send(chain.entry_url, [body(task, inputs[i]) for i in order]))
    # Stopping the chain flushed every tier's log.
    return policy_path, [var / f"decisions-{t}.db" for t in TIERS], responses


def test_replay_under_the_live_policy_reproduces_live_serving(recorded):
    policy_path, logs, responses = recorded
    policy = load_policy(policy_path)
    traffic = traffic_from_logs(logs, policy)
    for task, answers in responses.items():
        result = replay_task(traffic[task], policy)
        hops = sum(len(a["hops"]) for a in answers)
        assert result.compared == hops and result.mismatched == 0
        assert result.unresolved == 0
        for a in answers:
            assert [result.decisions[(a["id"], h["tier"])] for h in a["hops"]] == \
                [h["decision"] for h in a["hops"]]
            assert result.answers[a["id"]] == a["label"]
        assert any(len(a["hops"]) > 1 for a in answers)  # the hard ones climbed


def cascade_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cascade", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_replay_cli_gates_a_candidate_on_its_goals(recorded, tmp_path):
    policy_path, logs, _ = recorded
    log_args = [a for f in logs for a in ("--log", str(f))]
    same = cascade_cli("policy", "replay", str(policy_path), "--live", str(policy_path), *log_args,
                       "--goal", "cloud<=100%")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "live decisions reproduced: " in same.stdout
    reproduced = same.stdout.split("live decisions reproduced: ")[1].split()[0:3]
    assert reproduced[0] == reproduced[2]  # "N of N"

    doc = yaml.safe_load(policy_path.read_text())
    for task in doc["tasks"].values():
        task["tiers"]["endpoint"]["threshold"] = 0.0  # answer everything at the endpoint
    cheap = tmp_path / "cheap.yaml"
    cheap.write_text(yaml.safe_dump(doc, sort_keys=False))
    ok = cascade_cli("policy", "replay", str(cheap), "--live", str(policy_path), *log_args,
                     "--goal", "cloud<=0%", "--goal", "escalation.endpoint<=0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = cascade_cli("policy", "replay", str(policy_path), "--live", str(policy_path),
                         *log_args, "--goal", "escalation.endpoint<=0")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "✗" in broken.stdout and "escalation.endpoint<=0" in broken.stdout
