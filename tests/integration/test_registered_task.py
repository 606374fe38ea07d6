"""A registered task (the README's breast-cancer ladder, features input) gets what a built-in
one gets, with no code for it:

- ``cascade bench`` through its own four real tier processes: accuracy per tier and of the
  cascade, the field shift by input kind (sensor noise and stuck readings), the live drift
  state, the latency phase against the echo and raw onnxruntime, and the offline drift and
  policy analyses, written to bench.json and bench.md;
- the drift alarm on a real tier, with the references ``cascade policy calibrate`` fitted:
  readings from failing sensors turn it on, ``/readyz`` and ``/metrics`` show it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import free_port_block
from tests.fault.harness import Tier, metric, scrape
from tests.integration.registered_task import TASK, RegisteredTask, register_cancer

pytestmark = pytest.mark.integration

TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]
WINDOW, MIN_SAMPLES = 40, 20  # the calibrated window is 300: same statistics, sooner
MARGIN = 1e-3  # offline and served confidences agree to ~1e-6; keep clear of the threshold


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> RegisteredTask:
    return register_cancer(tmp_path_factory.mktemp("registered"))


def test_bench_measures_a_registered_task(task: RegisteredTask, tmp_path: Path) -> None:
    from cascade.cli import app
    from cascade.models.manifest import load_manifest

    out = tmp_path / "reports"
    base = free_port_block(4)
    done = CliRunner().invoke(app, [
        "bench", "--models-dir", str(task.models_dir), "--policy", str(task.policy),
        "--task", TASK, "--out", str(out), "--base-port", str(base),
        "--duration", "0.5", "--rounds", "1"])
    assert done.exit_code == 0, done.output
    results = json.loads((out / "bench.json").read_text())
    assert results["config"]["tasks"] == [TASK]
    assert set(results["accuracy"]) == set(results["shift"]) == {TASK}

    acc = results["accuracy"][TASK]
    test_size = load_manifest(task.models_dir).task(TASK).splits.test
    assert (acc["samples"], acc["errors"]) == (test_size, 0)
    assert acc["statuses"] == {"final": test_size, "provisional": 0, "unknown": 0}
    assert sum(acc["answered_share"].values()) == pytest.approx(1.0)
    assert list(acc["tier_alone_accuracy"]) == TIERS
    # The calibrated gate climbs for the hard cases: the cascade beats its endpoint alone.
    assert acc["cascade_accuracy"] > acc["tier_alone_accuracy"]["endpoint"]
    assert 0 < acc["answered_share"]["endpoint"] < 1

    shifted = results["shift"][TASK]
    assert shifted["corruption"].startswith("sensor noise (Gaussian, sigma 0.5 x each value")
    assert (shifted["samples"], shifted["errors"]) == (test_size, 0)
    summary = results["policy"]["shift"][TASK]
    assert summary["escalations_per_request_shifted"] > summary["escalations_per_request_clean"]

    for phase in ("after_clean", "after_shift"):
        assert set(results["drift_live"][phase]) == set(TIERS)
        assert TASK in results["drift_live"][phase]["endpoint"]
    offline = results["policy"]["drift"][TASK]["tiers"]["endpoint"]
    assert offline["detector"] and offline["reference_samples"] == 142
    assert offline["clean_split"]["samples"] == offline["shifted_split"]["samples"] == test_size

    over = results["overhead"][TASK]
    for clients in ("c1", "c16"):
        assert over[clients]["endpoint"]["requests"] > 0 and over[clients]["endpoint"]["errors"] == 0
    assert over["raw_onnxruntime"]["p50_ms"] > 0
    report = (out / "bench.md").read_text()
    assert f"| {TASK} |" in report


@pytest.fixture
def tiers(task: RegisteredTask, tmp_path: Path) -> Iterator[list[Tier]]:
    """A cloud and an endpoint serving the registered task, with a small drift window."""
    doc = yaml.safe_load(task.policy.read_text())
    doc["decision_log"]["path"] = str(tmp_path / "decisions-{tier}.db")
    doc["tasks"][TASK]["drift"] = {**doc["tasks"][TASK].get("drift", {}),
                                   "window": WINDOW, "min_samples": MIN_SAMPLES}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    made: list[Tier] = []
    try:
        made.append(Tier(tmp_path, "cloud", task.models_dir, policy,
                         tasks={TASK: "cloud"}).start())
        made.append(Tier(tmp_path, "endpoint", task.models_dir, policy, tasks={TASK: "endpoint"},
                         upstream=made[0].url).start())
        yield made
    finally:
        for t in made:
            t.stop()


def _endpoint_view(task: RegisteredTask, inputs: np.ndarray, labels: list[str]) -> list[tuple]:
    """(sample, calibrated confidence, its threshold) of each input at the endpoint, offline."""
    from cascade.lab.evaluation import predict_inputs
    from cascade.policy import load_policy

    rule = load_policy(task.policy).rule(TASK, "endpoint")
    pred = predict_inputs(task.models_dir, TASK, ["endpoint"], inputs, labels)["endpoint"]
    return [(x, float(c), rule.threshold_for(y))
            for x, c, y in zip(inputs, pred.confidences(rule), pred.predicted)]


def test_failing_sensors_raise_the_drift_alarm_of_a_registered_task(
        task: RegisteredTask, tiers: list[Tier]) -> None:
    from cascade.lab.bench.shift import ShiftSpec, corrupt_numeric
    from cascade.models.manifest import load_split

    inputs, labels = load_split(task.models_dir, TASK, "test")
    calm = [x for x, c, thr in _endpoint_view(task, inputs, labels) if c >= thr + MARGIN]
    # Failing sensors: strong noise on every reading, a third of the readings stuck.
    failing = ShiftSpec(feature_noise=1.5, occluded_share=1.0, stuck_share=0.33)
    hard = [x for seed in range(12)
            for x, c, thr in _endpoint_view(task, corrupt_numeric(inputs, failing, seed), labels)
            if c < thr - MARGIN]
    assert len(calm) >= MIN_SAMPLES and len(hard) >= 3 * MIN_SAMPLES, (len(calm), len(hard))
    endpoint = tiers[1]
    labels_ep = {"tier": "endpoint", "task": TASK}
    with httpx.Client(timeout=10) as client:
        def ask(x: np.ndarray) -> dict:
            body = {"task": TASK, "input": {"features": [float(v) for v in x]}}
            r = client.post(f"{endpoint.url}/v1/infer", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        def drift() -> dict:
            return client.get(f"{endpoint.url}/readyz").json()["drift"][TASK]

        assert drift()["state"] == "warming_up"
        for x in calm[:MIN_SAMPLES]:
            assert ask(x)["answered_by"] == "endpoint"
        ok = drift()
        assert (ok["state"], ok["window"], ok["alarms"]) == ("ok", MIN_SAMPLES, 0)
        assert ok["reference_samples"] == 142  # fitted by calibrate on the calibration half
        assert metric(scrape(endpoint.url), "cascade_drift_alarm", **labels_ep) == 0

        for x in hard[:3 * MIN_SAMPLES]:
            answer = ask(x)
            assert [(h["tier"], h["decision"]) for h in answer["hops"]] == [
                ("endpoint", "escalate"), ("cloud", "answer")]
        alarm = drift()
        assert (alarm["state"], alarm["alarms"]) == ("alarm", 1)
        assert "escalation rate" in alarm["cause"]
        assert alarm["escalation_rate"] == 1.0  # the window holds only failing-sensor readings
        assert alarm["escalation_z"] >= alarm["escalation_z_alarm_at"]
        metrics = scrape(endpoint.url)
        assert metric(metrics, "cascade_drift_alarm", **labels_ep) == 1
        assert metric(metrics, "cascade_drift_alarms_total", **labels_ep) == 1
        assert f"drift alarm ON at tier endpoint, task {TASK}" in endpoint.log()
