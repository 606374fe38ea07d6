"""Autoscaling of a model deployment on Ray Serve (``ray_serve.model_*`` knobs ->
``autoscaling_config``): one replica at rest, two under sustained load (``serve.status()``),
back to one when the load stops; answers stay exact throughout."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from cascade.models.manifest import load_split
from cascade.models.repository import load_classifier
from tests.fault.harness import default_policy_copy, wait_for
from tests.ray.conftest import SERVE_KNOBS

pytestmark = [pytest.mark.integration, pytest.mark.ray]

APP = "autoscale"
MODEL = "cloud-model-documents"
IN_FLIGHT = 16


def _running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


@pytest.fixture
def autoscaled_cloud(serve_proxy: str, models_dir: Path, tmp_path: Path) -> Any:
    from ray import serve

    from cascade.deploy.ray_serve import build_tier_app
    from cascade.tier.settings import load_node_settings

    root = Path(__file__).resolve().parents[2]
    settings = load_node_settings(
        root / "cloud/cloud.yaml", models_dir=models_dir,
        policy=default_policy_copy(tmp_path / "policy.yaml"),
        outbox_url=f"sqlite:///{tmp_path / 'cloud.db'}",
        ray_serve={**SERVE_KNOBS, "model_min_replicas": 1, "model_max_replicas": 2,
                   "model_target_ongoing_requests": 1, "model_upscale_delay_s": 1,
                   "model_downscale_delay_s": 5})
    try:
        serve.run(build_tier_app(settings), name=APP, route_prefix=f"/{APP}")
        yield serve.get_deployment_handle(MODEL, app_name=APP)
    finally:
        serve.delete(APP)


def test_a_model_deployment_scales_from_one_to_two_replicas_under_load(autoscaled_cloud,
                                                                       models_dir):
    inputs = load_split(models_dir, "documents", "test")[0][:IN_FLIGHT]
    local = load_classifier(models_dir, "documents", "cloud")
    expected = [local.predict_proba(inputs[i:i + 1]) for i in range(IN_FLIGHT)]
    assert _running(MODEL) == 1
    stop, mismatches, answered = threading.Event(), [], [0]

    def load() -> None:  # IN_FLIGHT requests in flight until told to stop
        while not stop.is_set():
            calls = [autoscaled_cloud.predict.remote(inputs[i:i + 1]) for i in range(IN_FLIGHT)]
            for i, call in enumerate(calls):
                if not np.array_equal(call.result(timeout_s=120), expected[i]):
                    mismatches.append(i)
                answered[0] += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        wait_for(lambda: _running(MODEL) == 2, timeout_s=180, what="a second model replica")
    finally:
        stop.set()
        worker.join(timeout=180)
    assert not worker.is_alive()
    assert mismatches == [] and answered[0] >= IN_FLIGHT
    wait_for(lambda: _running(MODEL) == 1, timeout_s=180, what="back to one replica at rest")
