"""Canaries under live traffic on real tiers: a model trained on shuffled labels is rolled back
by its escalation guard having answered no more than its share of requests; a good version is
promoted, named in answers, /readyz, /metrics, logs and spans, and rolled back on command; a
site pulls bundles through its edge server on a schedule.

Traffic is sequential and the split is counted (every 1/share-th request), so the numbers
asserted are exact, not statistical. The latency guard is switched off here (a loaded machine
must not decide a test); tests/unit/test_canary_guards.py covers it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundle_kit import bundle_knobs, fleet, read_state
from tests.fault.harness import ROOT, default_policy_copy, hardest_images, scrape, wait_for

pytestmark = pytest.mark.integration
__all__ = ["fleet"]  # fixture, found by name

NO_LATENCY_GUARD = {"max_p99_ratio": 1e6}


def _install(client: httpx.Client, bundle: Path) -> dict[str, Any]:
    response = client.post("/v1/models/pull", content=bundle.read_bytes(),
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    return dict(result)


def _model_versions(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/readyz").json()["model_versions"]["vision"])


@pytest.mark.parametrize("mode", ["split", "shadow"])
def test_bad_canary_rolled_back_before_more_than_its_share_see_it(mode, tiers, fleet, models_dir,
                                                                  tmp_path):
    policy = default_policy_copy(tmp_path / "policy.yaml")
    upstream = tiers("edge-node", policy_path=policy, tasks={"vision": "edge-node"})
    canary = {"share": 0.1, "min_requests": 20, "window_requests": 100_000, "mode": mode,
              **NO_LATENCY_GUARD}
    endpoint = tiers("endpoint", policy_path=policy, upstream=upstream.url,
                     tasks={"vision": "endpoint"},
                     bundles=bundle_knobs([fleet["pub"]], tmp_path / "store",
                                          probe_tolerance=1.0, canary=canary))
    images = hardest_images(models_dir, 50, easiest=True)
    with httpx.Client(base_url=endpoint.url, timeout=60) as client:
        assert _install(client, fleet["bad"])["outcome"] == "canary"
        sent = served_by_bad = 0
        while _model_versions(client)["last_verdict"] is None and sent < 2000:
            for _ in range(10):
                body = {"task": "vision", "input": {"image": images[sent % len(images)]}}
                answer = client.post("/v1/infer", json=body).json()
                sent += 1
                served_by_bad += answer["hops"][0]["model"].endswith("@bad")
        verdict = _model_versions(client)["last_verdict"]
        assert verdict is not None and verdict["verdict"] == "rollback", verdict
        assert "escalation rate" in verdict["reason"]
        if mode == "split":
            # Exactly its share: the 20th canary request is the 200th the task saw.
            assert served_by_bad == verdict["canary_requests"] == 20
            assert verdict["requests_seen"] == 200
            assert served_by_bad <= 0.1 * sent
        else:  # shadowed: judged on what it would have done, no client saw it
            assert served_by_bad == 0
            assert 20 <= verdict["canary_requests"] <= 24  # + shadows still in flight
        for i in range(50):  # none after the rollback
            answer = client.post("/v1/infer", json={"task": "vision",
                                                    "input": {"image": images[i]}}).json()
            assert answer["hops"][0]["model"] == "vision/endpoint:MLP(16)-int8"
        samples = scrape(endpoint.url)
    key = ("cascade_model_rollout_events_total",
           frozenset({"tier": "endpoint", "task": "vision", "event": "rolled_back"}.items()))
    assert samples[key] == 1
    state = read_state(tmp_path / "store")["tasks"]["vision"]
    assert (state["active"], state["canary"], state["refused"]) == (None, None, ["bad"])
    wait_for(lambda: "canary bad rolled back" in endpoint.log(), 60, "the rollback logged")


def test_good_canary_promoted_named_everywhere_then_rolled_back(tiers, fleet, models_dir,
                                                                tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")  # every span kept
    canary = {"share": 0.25, "min_requests": 10, "window_requests": 20, **NO_LATENCY_GUARD}
    endpoint = tiers("endpoint", policy_path=default_policy_copy(tmp_path / "policy.yaml"),
                     tasks={"vision": "endpoint"}, trace_dir=str(tmp_path / "traces"),
                     bundles=bundle_knobs([fleet["pub"]], tmp_path / "store", canary=canary))
    images = hardest_images(models_dir, 20, easiest=True)
    cli = [sys.executable, "-m", "cascade", "models"]
    pushed = subprocess.run([*cli, "pull", "--url", endpoint.url, "--file", str(fleet["good"])],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert pushed.returncode == 0, pushed.stderr
    assert "version=v2 outcome=canary" in pushed.stdout
    with httpx.Client(base_url=endpoint.url, timeout=60) as client:
        labels = set()
        for i in range(80):  # the canary's 20th request is the 80th: promoted right after it
            answer = client.post("/v1/infer", json={"task": "vision",
                                                    "input": {"image": images[i % 20]}}).json()
            labels.add(answer["hops"][0]["model"])
        assert labels == {"vision/endpoint:MLP(16)-int8", "vision/endpoint:MLP(16)-int8@v2"}
        versions = _model_versions(client)
        assert versions["version"] == "v2" and versions["canary"] is None
        assert versions["last_verdict"]["verdict"] == "promote"
        answer = client.post("/v1/infer", json={"task": "vision",
                                                "input": {"image": images[0]}}).json()
        assert answer["hops"][0]["model"] == "vision/endpoint:MLP(16)-int8@v2"
        key = ("cascade_model_version_info", frozenset(
            {"tier": "endpoint", "task": "vision", "version": "v2", "role": "active"}.items()))
        assert scrape(endpoint.url)[key] == 1
    # info lines reach the file in batches (cascade.observability.logs): wait for it
    wait_for(lambda: "vision: canary v2 promoted" in endpoint.log(), 60, "the promotion logged")
    wait_for(lambda: "@v2" in _spans_text(tmp_path / "traces"), 60, "a span naming v2")
    done = subprocess.run([*cli, "rollback", "vision", "--url", endpoint.url, "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"task": "vision", "version": "manifest",
                                       "outcome": "rolled_back"}
    status = subprocess.run([*cli, "status", "--url", endpoint.url], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, check=False)
    assert status.stdout.startswith("vision: manifest (vision/endpoint:MLP(16)-int8)"), status


def _spans_text(folder: Path) -> str:
    return "".join(path.read_text() for path in folder.glob("*.jsonl"))


def test_a_site_pulls_through_its_edge_on_a_schedule(tiers, fleet, tmp_path):
    policy = default_policy_copy(tmp_path / "policy.yaml")
    source = tmp_path / "published"
    source.mkdir()
    edge = tiers("edge-node", policy_path=policy, tasks={"vision": "edge-node"},
                 bundles=bundle_knobs([fleet["pub"]], tmp_path / "edge-store",
                                      source=str(source)))
    endpoint = tiers("endpoint", policy_path=policy, upstream=edge.url,
                     tasks={"vision": "endpoint"},
                     bundles=bundle_knobs([fleet["pub"]], tmp_path / "store", source="upstream",
                                          pull_interval_s=0.2, canary={"share": 0}))
    (source / fleet["good"].name).write_bytes(fleet["good"].read_bytes())
    with httpx.Client(base_url=endpoint.url, timeout=60) as client:
        wait_for(lambda: _model_versions(client)["version"] == "v2", 60, "v2 pulled")
    # its only source is the edge: it fetched the bundle there, and keeps it for tiers below
    assert (tmp_path / "store" / "received" / fleet["good"].name).read_bytes() == \
        fleet["good"].read_bytes()
