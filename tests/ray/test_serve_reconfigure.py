"""The policy as Serve ``user_config``: a redeploy that changes only it reconfigures the running
ingress replica live (no restart); a valid policy goes live, an invalid one is refused with the
same validation as a policy file's hot reload (counted, logged naming source and key; the old
policy stays)."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.fault.harness import metric, scrape, wait_for
from tests.ray.conftest import escalate_everything

pytestmark = [pytest.mark.integration, pytest.mark.ray]


def _answered_by(url: str) -> str:
    body = {"task": "documents", "input": {"text": "the striker scored twice"},
            "deadline_ms": 30_000}  # a loaded machine must not make it provisional
    answer = httpx.post(f"{url}/v1/infer", json=body, timeout=60).json()
    return str(answer["answered_by"])


def test_reconfigure_applies_a_valid_policy_live_and_refuses_an_invalid_one(serve_tier):
    from cascade.deploy.ray_serve import deploy_tier, policy_user_config

    original = policy_user_config(serve_tier.policy)
    start = serve_tier.readiness()
    reload0 = start["policy"]["reload"]
    try:
        escalating = {"policy": escalate_everything(original["policy"]),
                      "source": "escalate-all.yaml"}
        deploy_tier(serve_tier.settings, user_config=escalating)
        live = wait_for(lambda: (r := serve_tier.readiness())["policy"]["reload"]["reloads"]
                        > reload0["reloads"] and r, timeout_s=120, what="the new policy live")
        assert live["policy"]["path"] == "escalate-all.yaml (user_config.policy)"
        assert live["policy"]["version"] != start["policy"]["version"]
        assert live["uptime_s"] >= start["uptime_s"]  # the same replica: reconfigured in place
        assert _answered_by(serve_tier.url) == "cloud"

        bad = {"policy": escalate_everything(original["policy"]), "source": "bad.yaml"}
        bad["policy"]["tasks"]["vision"]["tiers"]["edge-server"]["threshold"] = 1.5
        deploy_tier(serve_tier.settings, user_config=bad)
        refused = wait_for(lambda: (r := serve_tier.readiness())["policy"]["reload"]["errors"]
                           > reload0["errors"] and r, timeout_s=120, what="the refusal")
        error = refused["policy"]["reload"]["last_error"]
        assert "bad.yaml (user_config.policy)" in error
        assert "tasks.vision.tiers.edge-server.threshold" in error
        assert refused["policy"]["version"] == live["policy"]["version"]  # the old one stays
        assert _answered_by(serve_tier.url) == "cloud"
        samples = scrape(serve_tier.url)
        assert metric(samples, "cascade_policy_reloads_total", tier="edge-server",
                      outcome="rejected") >= 1
    finally:
        deploy_tier(serve_tier.settings, user_config=original)
        wait_for(lambda: serve_tier.readiness()["policy"]["path"].endswith("(user_config.policy)")
                 and serve_tier.readiness()["policy"]["reload"]["last_error"] is None,
                 timeout_s=120, what="the original policy back")
