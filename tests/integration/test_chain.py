"""The four-tier chain as real processes on 127.0.0.1: answers, escalation, hops, readiness."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from cascade.contract.inputs import request_body
from cascade.lab.evaluation import predict_split
from cascade.policy import load_policy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]


def vision_body(pixels: np.ndarray) -> dict:
    return request_body("vision", pixels)


body_for = request_body


@pytest.fixture(scope="module")
def test_split_predictions(models_dir):
    """Per task: test inputs, labels, and each tier's gate confidence under the live policy."""
    from cascade.models.manifest import load_split

    policy = load_policy(ROOT / "policies/default.yaml")
    out = {}
    for task in ("vision", "documents"):
        inputs, labels = load_split(models_dir, task, "test")
        _, preds = predict_split(models_dir, task, TIERS, "test")
        conf = {t: preds[t].confidences(policy.rule(task, t)) for t in TIERS}  # calibrated
        thresholds = {t: policy.rule(task, t).threshold for t in TIERS}
        out[task] = (inputs, labels, conf, thresholds)
    return out


@pytest.mark.parametrize("task", ["vision", "documents"])
def test_easy_sample_is_answered_by_the_endpoint_in_one_hop(running_chain, test_split_predictions, task):
    inputs, labels, conf, _ = test_split_predictions[task]
    i = int(np.argmax(conf["endpoint"]))
    r = httpx.post(f"{running_chain.entry_url}/v1/infer", json=body_for(task, inputs[i]), timeout=10)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answered_by"] == "endpoint"
    assert data["status"] == "final"
    assert [h["tier"] for h in data["hops"]] == ["endpoint"]
    assert data["hops"][0]["decision"] == "answer"
    assert data["label"] == labels[i]
    assert data["confidence"] == pytest.approx(conf["endpoint"][i], abs=1e-4)
    assert len(data["trace_id"]) == 32 and len(data["id"]) >= 16


@pytest.mark.parametrize("task", ["vision", "documents"])
def test_hard_sample_climbs_to_the_cloud_with_every_decision_in_hops(
    running_chain, test_split_predictions, task
):
    inputs, _, conf, thr = test_split_predictions[task]
    below_all = np.ones(len(inputs), dtype=bool)
    for t in TIERS[:-1]:
        below_all &= conf[t] < thr[t]
    if not below_all.any():
        pytest.skip(f"no {task} test sample is below every edge threshold under this policy")
    i = int(np.flatnonzero(below_all)[0])
    r = httpx.post(f"{running_chain.entry_url}/v1/infer", json=body_for(task, inputs[i]), timeout=10)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [h["tier"] for h in data["hops"]] == TIERS
    assert [h["decision"] for h in data["hops"]] == ["escalate"] * 3 + ["answer"]
    assert data["answered_by"] == "cloud" and data["status"] == "final"
    assert data["label"] == data["hops"][-1]["label"]
    for hop, t in zip(data["hops"], TIERS):
        assert hop["confidence"] == pytest.approx(conf[t][i], abs=1e-4)
        assert hop["model"].startswith(f"{task}/{t}")


def test_a_mid_confidence_sample_stops_at_the_first_confident_tier(running_chain, test_split_predictions):
    inputs, _, conf, thr = test_split_predictions["vision"]
    mask = (conf["endpoint"] < thr["endpoint"]) & (conf["edge-node"] >= thr["edge-node"])
    if not mask.any():
        pytest.skip("no vision test sample escalated by the endpoint and answered by the edge node")
    i = int(np.flatnonzero(mask)[0])
    data = httpx.post(f"{running_chain.entry_url}/v1/infer", json=vision_body(inputs[i]), timeout=10).json()
    assert [h["tier"] for h in data["hops"]] == ["endpoint", "edge-node"]
    assert data["answered_by"] == "edge-node"


def test_health_ready_docs(running_chain):
    policy = load_policy(ROOT / "policies/default.yaml")
    for t in running_chain.tiers:
        assert httpx.get(f"{t.url}/healthz").json() == {"status": "ok", "tier": t.tier}
        ready = httpx.get(f"{t.url}/readyz").json()
        assert ready["tier"] == t.tier and ready["ready"] is True
        assert ready["policy"]["version"] == policy.version
        assert set(ready["models"]) == {"vision", "documents"}
    assert httpx.get(f"{running_chain.entry_url}/docs").status_code == 200
    spec = httpx.get(f"{running_chain.entry_url}/openapi.json").json()
    assert "/v1/infer" in spec["paths"]


def test_tier_processes_stay_small(running_chain):
    # How fast a tier starts is a timing: `cascade bench` measures it ("ready <= 2 s" in
    # reports/bench.md). What keeps it fast, serving without the build stack, is the next test.
    for t in running_chain.tiers:
        rss_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{t.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        assert rss_kb < 200 * 1024, f"{t.tier} uses {rss_kb / 1024:.0f} MB RSS"


def test_serving_processes_never_import_scikit_learn(running_chain):
    for t in running_chain.tiers:
        maps = Path(f"/proc/{t.pid}/maps").read_text()
        # (numpy's own BLAS is called libscipy_openblas; only the packages' folders count)
        assert "/sklearn/" not in maps and "/scipy/" not in maps, t.tier
