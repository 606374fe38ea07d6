"""SIGKILL a tier in the middle of installing a model bundle: after verifying it, with its files
written to staging, after moving them into versions/, after probing it (just before the swap). Each time the old model serves throughout the
install and after the restart, nothing half-installed is left, and the same bundle then installs.

The install is held at the step by a test-only fault hook (``CASCADE_FAULT_INSTALL_HOLD``, in
cascade.tier.rollout) so the kill lands exactly there; everything else is the real tier."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.bundle_kit import bundle_knobs, fleet, read_state
from tests.fault.harness import default_policy_copy, hardest_images, wait_for

pytestmark = pytest.mark.integration
__all__ = ["fleet"]  # fixture, found by name

OLD_MODEL = "vision/endpoint:MLP(16)-int8"


def _push(url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/pull", content=data, timeout=120,
                      headers={"Content-Type": "application/octet-stream"})


def _model(url: str, image: object) -> str:
    answer = httpx.post(f"{url}/v1/infer", json={"task": "vision", "input": {"image": image}},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["hops"][0]["model"])


@pytest.mark.parametrize("step", ["verified", "written", "staged", "probed"])
def test_sigkill_mid_install_leaves_the_old_model_serving(step, tiers, fleet, models_dir,
                                                          tmp_path, monkeypatch):
    marker = tmp_path / "held"
    monkeypatch.setenv("CASCADE_FAULT_INSTALL_HOLD", step)
    monkeypatch.setenv("CASCADE_FAULT_INSTALL_HOLD_MARKER", str(marker))
    store = tmp_path / "store"
    endpoint = tiers("endpoint", policy_path=default_policy_copy(tmp_path / "policy.yaml"),
                     tasks={"vision": "endpoint"},
                     bundles=bundle_knobs([fleet["pub"]], store, canary={"share": 0}))
    image = hardest_images(models_dir, 1, easiest=True)[0]
    data = fleet["good"].read_bytes()

    def push_and_ignore_the_kill() -> None:
        try:
            _push(endpoint.url, data)
        except httpx.HTTPError:
            pass  # the tier dies under this request

    pusher = threading.Thread(target=push_and_ignore_the_kill, daemon=True)
    pusher.start()
    wait_for(marker.exists, 60, f"the install to reach {step}")
    assert _model(endpoint.url, image) == OLD_MODEL  # serving while the install is under way
    endpoint.kill()
    pusher.join(60)

    monkeypatch.delenv("CASCADE_FAULT_INSTALL_HOLD")
    endpoint.start()
    assert _model(endpoint.url, image) == OLD_MODEL
    versions = httpx.get(f"{endpoint.url}/readyz", timeout=30).json()["model_versions"]
    assert versions["vision"]["version"] == "manifest"
    assert not list((store / "staging").iterdir())
    assert not list((store / "versions" / "vision").glob("*"))
    if (store / "state.json").exists():
        assert read_state(store)["tasks"].get("vision", {}).get("active") is None
    response = _push(endpoint.url, data)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["outcome"] == "promoted"
    assert _model(endpoint.url, image) == f"{OLD_MODEL}@v2"
    assert read_state(store)["tasks"]["vision"]["active"] == "v2"
