"""Fallbacks under pressure on real tier processes: the answer cache, the switch to a fallback
model, early escalation and the honest ``unknown`` with its reason.

A test cannot rely on a machine being slow, so pressure is made certain instead: a latency
budget of a nanosecond is passed by every model run, which turns pressure on after
``min_runs`` runs (the switch back, with its hysteresis, is exercised on fed latencies in
tests/unit/test_pressure.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cascade.lab.bench.run import bodies_for
from cascade.models.manifest import load_split
from tests.fault.harness import metric, scrape, write_policy

pytestmark = pytest.mark.integration

ALWAYS_SLOW = {"latency_budget_ms": 1e-6, "window": 5, "min_runs": 5, "probe_every": 1000}


def pressure_policy(path: Path, *, tier: str = "endpoint", pressure: dict[str, Any] | None = None,
                    cache: dict[str, Any] | None = None) -> Path:
    """Every tier answers everything; ``pressure`` for ``tier``'s vision section, ``cache``."""
    write_policy(path, escalating=())
    policy = yaml.safe_load(path.read_text())
    vision = policy["tasks"]["vision"]
    if pressure is not None:
        vision["tiers"][tier]["pressure"] = pressure
    if cache is not None:
        vision["cache"] = cache
    path.write_text(yaml.safe_dump(policy))
    return path


@pytest.fixture(scope="module")
def bodies(models_dir: Path) -> list[dict[str, Any]]:
    inputs, _ = load_split(models_dir, "vision", "test")
    return bodies_for(models_dir, "vision", inputs[:12])


def model_name(models_dir: Path, tier: str) -> str:
    from cascade.models.repository import load_classifier

    return str(load_classifier(models_dir, "vision", tier).model_name)


def ask(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def plans(url: str, tier: str = "endpoint") -> dict[str, float]:
    samples = scrape(url)
    return {dict(labels)["plan"]: value for (name, labels), value in samples.items()
            if name == "cascade_pressure_plans_total" and dict(labels)["tier"] == tier}


def test_repeated_inputs_are_answered_from_the_cache(tiers, tmp_path, bodies):
    policy = pressure_policy(tmp_path / "p.yaml", cache={"ttl_s": 600, "max_entries": 100})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"})
    first = ask(endpoint.url, bodies[0])
    again = ask(endpoint.url, bodies[0])
    other = ask(endpoint.url, bodies[1])
    assert first["hops"][0]["model"] != "cache"
    assert [(h["model"], h["decision"]) for h in again["hops"]] == [("cache", "cache")]
    assert (again["label"], again["confidence"], again["status"]) == \
        (first["label"], first["confidence"], "final")
    assert again["id"] != first["id"]
    assert other["hops"][0]["model"] != "cache"
    assert plans(endpoint.url) == {"cache_hit": 1, "cache_miss": 2, "own": 2, "probe": 0,
                                   "fallback": 0, "early_escalation": 0, "unknown": 0}
    ready = httpx.get(f"{endpoint.url}/readyz").json()["pressure"]["vision"]
    assert ready["cache_entries"] == 2


def test_a_slow_model_falls_back_to_the_smaller_one(tiers, tmp_path, bodies, models_dir):
    # The tier runs the edge-server's model; under pressure, the endpoint's.
    policy = pressure_policy(tmp_path / "p.yaml", pressure={
        **ALWAYS_SLOW, "action": "fallback", "fallback_model": "endpoint"})
    tier = tiers("endpoint", policy_path=policy, tasks={"vision": "edge-server"})
    names = {t: model_name(models_dir, t) for t in ("edge-server", "endpoint")}
    models = [ask(tier.url, body)["hops"][0]["model"] for body in bodies[:8]]
    assert models == [names["edge-server"]] * 5 + [names["endpoint"]] * 3
    samples = scrape(tier.url)
    assert metric(samples, "cascade_pressure_on", tier="endpoint", task="vision") == 1
    assert metric(samples, "cascade_pressure_switches_total", tier="endpoint", task="vision") == 1
    assert plans(tier.url)["fallback"] == 3


def test_under_pressure_without_fallback_the_tier_escalates_early(tiers, tmp_path, bodies):
    policy = pressure_policy(tmp_path / "p.yaml", pressure={**ALWAYS_SLOW, "action": "escalate"})
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"vision": "endpoint"},
                     upstream=cloud.url)
    for body in bodies[:5]:
        assert ask(endpoint.url, body)["answered_by"] == "endpoint"
    early = ask(endpoint.url, bodies[5])
    assert early["answered_by"] == "cloud" and early["status"] == "final"
    assert early["hops"][0]["decision"] == "escalate" and early["hops"][0]["label"] is None
    assert plans(endpoint.url)["early_escalation"] == 1


def test_when_nothing_fits_the_answer_is_unknown_with_the_reason(tiers, tmp_path, bodies):
    policy = pressure_policy(tmp_path / "p.yaml", tier="cloud",
                             pressure={**ALWAYS_SLOW, "action": "escalate"})
    cloud = tiers("cloud", policy_path=policy, tasks={"vision": "cloud"})  # no upstream
    for body in bodies[:5]:
        assert ask(cloud.url, body)["status"] == "final"
    answer = ask(cloud.url, bodies[5])
    assert (answer["status"], answer["label"]) == ("unknown", None)
    assert "under pressure" in answer["reason"] and "no upstream" in answer["reason"]
    assert plans(cloud.url, "cloud")["unknown"] == 1
    samples = scrape(cloud.url)
    assert metric(samples, "cascade_answers_total", tier="cloud", task="vision",
                  status="unknown") == 1
