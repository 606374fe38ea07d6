"""The top tier's ``unknown`` over HTTP: below its floor with ``floor_action: unknown`` it answers
status "unknown" with a null label, and its hop says so (with the model's best guess)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration


def floor_policy(path: Path) -> Path:
    """The endpoint escalates everything; the cloud's floor (1.0) is above all it can say."""
    tiers = {"endpoint": {"signal": "max_prob", "threshold": 1.0},
             "cloud": {"signal": "max_prob", "threshold": 1.0, "floor_action": "unknown"}}
    task = {"deadline_ms": 5000, "tiers": tiers}
    path.write_text(yaml.safe_dump({"version": 1, "name": "unknown-floor",
                                    "tasks": {"vision": task, "documents": task}}))
    return path


def test_the_top_tier_below_its_floor_answers_unknown(tiers, tmp_path, models_dir, hard_images):
    from cascade.lab.evaluation import predict_inputs

    policy = floor_policy(tmp_path / "floor.yaml")
    cloud = tiers("cloud", policy_path=policy)
    endpoint = tiers("endpoint", policy_path=policy, upstream=cloud.url)
    image = hard_images[0]
    cloud_alone = predict_inputs(models_dir, "vision", ["cloud"],
                                 np.asarray(image, np.float32).reshape(1, 64), ["?"])["cloud"]
    guess, conf = cloud_alone.predicted[0], float(cloud_alone.probabilities[0].max())
    assert conf < 1.0
    body = {"task": "vision", "input": {"image": image}}
    with httpx.Client(timeout=10) as client:
        direct = client.post(f"{cloud.url}/v1/infer", json=body)
        climbed = client.post(f"{endpoint.url}/v1/infer", json=body)
    assert direct.status_code == 200 and climbed.status_code == 200, (direct.text, climbed.text)
    for answer in (direct.json(), climbed.json()):
        assert (answer["status"], answer["label"], answer["answered_by"]) == (
            "unknown", None, "cloud")
        assert "escalation" not in answer  # nothing owed: unknown is a final verdict
        top = answer["hops"][-1]
        assert (top["tier"], top["decision"], top["label"]) == ("cloud", "unknown", guess)
        assert top["confidence"] == pytest.approx(conf, abs=1e-6)
        assert answer["confidence"] == top["confidence"]
    assert [h["tier"] for h in direct.json()["hops"]] == ["cloud"]
    assert [(h["tier"], h["decision"]) for h in climbed.json()["hops"]] == [
        ("endpoint", "escalate"), ("cloud", "unknown")]
    assert endpoint.query("SELECT count(*) FROM cascade_outbox") == [(0,)]
