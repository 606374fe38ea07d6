"""Shadow audits and hard examples on real tier processes (an endpoint and a cloud on
127.0.0.1): the endpoint's live agreement with the cloud equals what the two models say
offline, audits are not traffic at the cloud, the budget and the queue drop and count, audit
spans link to the audited request, and hard examples land in the store with the cloud's label
and export as a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cascade.cli import app
from cascade.gating.agreement import wilson_interval
from cascade.lab.bench.run import bodies_for
from cascade.lab.evaluation import predict_inputs, predict_split
from cascade.models.manifest import load_split
from cascade.observability.examples import read_examples
from tests.fault.harness import metric, scrape, wait_for, write_policy

pytestmark = pytest.mark.integration

N = 40


def field_policy(path: Path, *, escalating: tuple[str, ...] = (), **blocks: dict[str, Any]) -> Path:
    """The fault suite's policy (``escalating`` tiers send everything up, the others answer
    all) with ``audit`` and ``hard_examples`` blocks for vision."""
    write_policy(path, escalating=escalating)
    policy = yaml.safe_load(path.read_text())
    policy["tasks"]["vision"].update(blocks)
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture(scope="module")
def images(models_dir: Path) -> dict[str, Any]:
    """The first N vision test images, their bodies and what endpoint and cloud predict."""
    inputs, labels = load_split(models_dir, "vision", "test")
    inputs, labels = inputs[:N], list(labels[:N])
    pred = predict_inputs(models_dir, "vision", ["endpoint", "cloud"], inputs, labels)
    return {"bodies": bodies_for(models_dir, "vision", inputs),
            "endpoint": list(pred["endpoint"].predicted), "cloud": list(pred["cloud"].predicted)}


def audit_view(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/readyz", timeout=10).json()["audit"]["vision"]


def test_audits_measure_agreement_and_are_not_traffic_upstream(tiers, tmp_path, images,
                                                                monkeypatch, models_dir):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")  # keep every routine answer's span
    monkeypatch.setenv("CASCADE_TRACE_ROUTINE_PER_S", "none")
    monkeypatch.setenv("CASCADE_EXAMPLES_PATH", str(tmp_path / "examples-{tier}.db"))
    policy = field_policy(
        tmp_path / "policy.yaml",
        audit={"rate": 1.0, "per_second": 10_000, "queue_size": 1_000},
        hard_examples={"enabled": True, "include_payloads": True})
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"},
                     upstream=cloud.url, trace_dir=str(tmp_path / "traces"))
    ids = []
    with httpx.Client(timeout=10) as client:
        for body in images["bodies"]:
            r = client.post(f"{endpoint.url}/v1/infer", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["answered_by"] == "endpoint"
            ids.append(r.json()["id"])
    view = wait_for(lambda: (v := audit_view(endpoint.url))["audits"] == N and v,
                    timeout_s=60, what=f"{N} audits")
    agreed = sum(e == c for e, c in zip(images["endpoint"], images["cloud"]))
    assert 0 < agreed < N  # the test needs both verdicts
    assert (view["agreed"], view["disagreements_total"]) == (agreed, N - agreed)
    assert view["interval"] == [round(b, 4) for b in wilson_interval(agreed, N)]
    assert view["counts"]["sent"] == N and view["counts"]["dropped_budget"] == 0
    # Everything answered here: the model's accuracy over all traffic is the agreement.
    assert view["model_accuracy"]["estimate"] == round(agreed / N, 4)
    assert view["model_accuracy"]["local_share"] == 1.0
    ep = scrape(endpoint.url)
    assert metric(ep, "cascade_audit_agreement", tier="endpoint", task="vision") == \
        pytest.approx(agreed / N)
    assert metric(ep, "cascade_audits_total", tier="endpoint", task="vision",
                  outcome="disagreed") == N - agreed
    # The cloud answered N audits and served no traffic: no answers, decisions, latencies.
    up = scrape(cloud.url)
    assert metric(up, "cascade_audit_requests_served_total", tier="cloud", task="vision") == N
    assert not [k for k in up if k[0] in ("cascade_answers_total", "cascade_gate_decisions_total")
                or (k[0] == "cascade_request_duration_seconds_count")]
    assert cloud.query("SELECT count(*) FROM cascade_results") == [(0,)]  # nothing stored
    # Disagreements are hard examples, labelled by the cloud.
    store = tmp_path / "examples-endpoint.db"
    rows = wait_for(lambda: store.exists() and len(list(read_examples([store]))) == N - agreed
                    and list(read_examples([store])), what="hard examples written")
    by_id = {r["request_id"]: r for r in rows}
    for rid, e, c in zip(ids, images["endpoint"], images["cloud"]):
        if e != c:
            assert (by_id[rid]["reason"], by_id[rid]["label"], by_id[rid]["local_label"]) == \
                ("disagreed", c, e)
    # The report: the live numbers next to the endpoint's calibration-split accuracy (the
    # test policy answers everything at the endpoint: its accuracy on the whole split).
    result = CliRunner().invoke(app, ["audit", "report", "--url", endpoint.url,
                                      "--models-dir", str(models_dir), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    labels, pred = predict_split(models_dir, "vision", ["endpoint"])
    assert row["calibration"]["accuracy"] == pytest.approx(pred["endpoint"].accuracy)
    assert row["calibration"]["answered"] == len(labels)
    assert row["live"]["agreed"] == agreed
    table = CliRunner().invoke(app, ["audit", "report", "--url", endpoint.url,
                                     "--models-dir", str(models_dir)])
    assert table.exit_code == 0, table.output
    assert f"{agreed / N:.1%}" in table.output and f"{pred['endpoint'].accuracy:.1%}" in \
        table.output
    # Each audit span links to the span of the request it audited.
    from cascade.observability.export import read_span_records

    def audit_spans() -> list[dict[str, Any]]:
        if not (tmp_path / "traces").exists():
            return []
        spans = [s for s in read_span_records(tmp_path / "traces")[0]
                 if s["name"] == "cascade.audit"]
        return spans if len(spans) == N else []

    spans = wait_for(audit_spans, what="audit spans exported")
    servers = {s["span_id"]: s for s in read_span_records(tmp_path / "traces")[0]
               if s["kind"] == "SERVER"}
    linked = {servers[s["links"][0]["span_id"]]["attrs"]["cascade.request_id"] for s in spans}
    assert linked == set(ids)


def test_budget_and_queue_drop_and_count(tiers, tmp_path, images):
    # A budget of one audit now and then: the first is sent, the rest are dropped and counted.
    policy = field_policy(tmp_path / "policy.yaml",
                          audit={"rate": 1.0, "per_second": 0.001, "queue_size": 100})
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"},
                     upstream=cloud.url)
    with httpx.Client(timeout=10) as client:
        for body in images["bodies"][:10]:
            assert client.post(f"{endpoint.url}/v1/infer", json=body).status_code == 200
    view = wait_for(lambda: (v := audit_view(endpoint.url))["audits"] == 1 and v, what="1 audit")
    assert view["counts"]["sampled"] == 10
    assert view["counts"]["dropped_budget"] == 9
    assert view["counts"]["sent"] == 1


def test_low_confidence_answers_are_audited_for_labels_not_for_the_estimate(
        tiers, tmp_path, images, monkeypatch):
    monkeypatch.setenv("CASCADE_EXAMPLES_PATH", str(tmp_path / "examples-{tier}.db"))
    policy = field_policy(  # rate 0: no audit is drawn; the floor forces them
        tmp_path / "policy.yaml", audit={"rate": 0.0, "per_second": 10_000, "queue_size": 1_000},
        hard_examples={"enabled": True, "include_payloads": True, "confidence_floor": 1.0})
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"},
                     upstream=cloud.url)
    with httpx.Client(timeout=10) as client:
        for body in images["bodies"][:10]:
            assert client.post(f"{endpoint.url}/v1/infer", json=body).status_code == 200
    # (the answer's confidence is rounded: which answers were below 1.0 is the tier's to say)
    view = wait_for(lambda: (v := audit_view(endpoint.url))["counts"]["sampled"] > 0
                    and v["counts"]["sent"] == v["counts"]["sampled"] and v,
                    what="the forced audits answered")
    forced = view["counts"]["sent"]
    assert (view["audits"], view["counts"]["agreed"], view["counts"]["disagreed"]) == (0, 0, 0)
    store = tmp_path / "examples-endpoint.db"
    rows = wait_for(lambda: store.exists() and len(list(read_examples([store]))) == forced
                    and list(read_examples([store])), what="low-confidence examples")
    assert {r["reason"] for r in rows} == {"low_confidence"}
    cloud_label = dict(zip([json.dumps(b["input"], sort_keys=True) for b in images["bodies"]],
                           images["cloud"]))
    assert all(r["label"] == cloud_label[json.dumps(json.loads(r["payload"]), sort_keys=True)]
               for r in rows)


def test_escalated_inputs_are_kept_as_hashes_and_export_skips_them(tiers, tmp_path, images,
                                                                   monkeypatch):
    monkeypatch.setenv("CASCADE_EXAMPLES_PATH", str(tmp_path / "examples-{tier}.db"))
    policy = field_policy(tmp_path / "policy.yaml", escalating=("endpoint",),
                          hard_examples={"enabled": True})  # payloads not allowed
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"},
                     upstream=cloud.url)
    with httpx.Client(timeout=10) as client:
        for body in images["bodies"][:5]:
            assert client.post(f"{endpoint.url}/v1/infer", json=body).json()["answered_by"] \
                == "cloud"
    store = tmp_path / "examples-endpoint.db"
    rows = wait_for(lambda: store.exists() and len(list(read_examples([store]))) == 5
                    and list(read_examples([store])), what="5 examples")
    assert [(r["reason"], r["label"], r["payload"]) for r in rows] == \
        [("escalated", c, None) for c in images["cloud"][:5]]
    # Every escalation is a verdict on the endpoint's own label: the model's live accuracy.
    model = httpx.get(f"{endpoint.url}/readyz").json()["audit"]["vision"]["model_accuracy"]
    agreed = sum(e == c for e, c in zip(images["endpoint"][:5], images["cloud"][:5]))
    assert (model["estimate"], model["local_share"], model["escalation_verdicts"]) == \
        (round(agreed / 5, 4), 0.0, 5)
    out = tmp_path / "dataset.jsonl"
    result = CliRunner().invoke(app, ["examples", "export", str(store), "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["hash_only"] == 5
    assert out.read_text() == ""


def test_a_bad_audit_header_is_a_4xx(tiers, tmp_path, images):
    cloud = tiers("cloud", policy_path=field_policy(tmp_path / "policy.yaml"),
                  tasks={"vision": "cloud"})
    r = httpx.post(f"{cloud.url}/v1/infer", json=images["bodies"][0],
                   headers={"X-Cascade-Audit": "everything"}, timeout=10)
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "X-Cascade-Audit"
    assert np.isfinite(httpx.get(f"{cloud.url}/healthz").status_code)
