"""The drift alarm on a real tier: shifted documents (the bench's typos and truncation) turn it on,
/readyz and /metrics show it, and the shipped ``tighten`` action of ``policies/default.yaml``
changes the endpoint's decisions while it is on."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from tests.fault.harness import ROOT, default_policy_copy, metric, scrape

pytestmark = pytest.mark.integration

WINDOW, MIN_SAMPLES = 40, 20  # the shipped window is 300: same statistics, sooner
MARGIN = 1e-3  # offline and served confidences agree to ~1e-6; keep clear of the threshold


@pytest.fixture(scope="module")
def documents(models_dir: Path) -> dict[str, list]:
    """Test-split documents chosen by the endpoint's calibrated confidence under the policy."""
    from cascade.lab.bench.shift import ShiftSpec, corrupt_texts
    from cascade.lab.evaluation import predict_inputs
    from cascade.models.manifest import load_split
    from cascade.policy import load_policy

    rule = load_policy(ROOT / "policies/default.yaml").rule("documents", "endpoint")
    texts, labels = load_split(models_dir, "documents", "test")
    shifted = corrupt_texts(texts, ShiftSpec())

    def scored(inputs: list[str]) -> list[tuple[str, float, float]]:
        pred = predict_inputs(models_dir, "documents", ["endpoint"], inputs, labels)["endpoint"]
        return [(text, float(conf), rule.threshold_for(label)) for text, conf, label
                in zip(inputs, pred.confidences(rule), pred.predicted)]

    clean = scored(texts)
    answered = [(t, c) for t, c, thr in clean if c >= thr + MARGIN]
    # Answered under the policy's threshold, escalated under the tightened one (+0.1, capped
    # at 1.0): the documents the tighten action is about.
    between = [(t, c) for t, c, thr in clean if thr + MARGIN <= c < 1.0 - MARGIN]
    certain = [(t, c) for t, c, _ in clean if c == 1.0]
    hard = [(t, c) for t, c, thr in scored(shifted) if c < thr - MARGIN]
    assert len(answered) >= MIN_SAMPLES and between and certain and len(hard) >= 3 * MIN_SAMPLES
    return {"answered": answered, "between": between, "certain": certain, "hard": hard}


def ask(client: httpx.Client, url: str, text: str) -> dict:
    r = client.post(f"{url}/v1/infer", json={"task": "documents", "input": {"text": text}})
    assert r.status_code == 200, r.text
    return r.json()


def test_shifted_documents_raise_the_alarm_and_tighten_the_endpoint(tiers, tmp_path, documents):
    policy = default_policy_copy(tmp_path / "policy.yaml", drift={
        "documents": {"window": WINDOW, "min_samples": MIN_SAMPLES}})
    shipped = yaml.safe_load((ROOT / "policies/default.yaml").read_text())
    assert shipped["tasks"]["documents"]["drift"] == {"action": "tighten", "tighten_by": 0.1}
    cloud = tiers("cloud", policy_path=policy, tasks={"documents": "cloud"})
    endpoint = tiers("endpoint", policy_path=policy, tasks={"documents": "endpoint"},
                     upstream=cloud.url)
    ep = {"tier": "endpoint", "task": "documents"}
    probe, probe_conf = documents["between"][0]
    with httpx.Client(timeout=10) as client:
        def drift() -> dict:
            return client.get(f"{endpoint.url}/readyz").json()["drift"]["documents"]

        assert drift()["state"] == "warming_up"
        # In distribution: documents the endpoint answers, the probe first.
        before = ask(client, endpoint.url, probe)
        assert [(h["tier"], h["decision"]) for h in before["hops"]] == [("endpoint", "answer")]
        assert before["hops"][0]["confidence"] == pytest.approx(probe_conf, abs=1e-6)
        for text, _ in documents["answered"][:MIN_SAMPLES - 1]:
            assert ask(client, endpoint.url, text)["answered_by"] == "endpoint"
        calm = drift()
        # One check so far (every 20 requests); the alarm needs three in a row.
        assert (calm["state"], calm["window"], calm["alarms"]) == ("ok", MIN_SAMPLES, 0)
        assert metric(scrape(endpoint.url), "cascade_drift_alarm", **ep) == 0

        # Shifted: typos and truncation the endpoint is unsure of. The checks at 40, 60 and 80
        # requests each see an escalation rate far above the calibrated 18%.
        for text, _ in documents["hard"][:3 * MIN_SAMPLES]:
            answer = ask(client, endpoint.url, text)
            assert [h["decision"] for h in answer["hops"]] == ["escalate", "answer"]
        alarm = drift()
        metrics = scrape(endpoint.url)
        assert (alarm["state"], alarm["alarms"], alarm["action"]) == ("alarm", 1, "tighten")
        assert "escalation rate" in alarm["cause"]
        assert (alarm["seen"], alarm["window"], alarm["min_samples"]) == (
            MIN_SAMPLES + 3 * MIN_SAMPLES, WINDOW, MIN_SAMPLES)
        assert alarm["escalation_rate"] == 1.0  # the window holds only shifted documents
        reference = shipped["tasks"]["documents"]["tiers"]["endpoint"]["drift_reference"]
        assert alarm["reference_escalation_rate"] == reference["escalation_rate"]
        assert alarm["escalation_z"] >= alarm["escalation_z_alarm_at"]
        assert metric(metrics, "cascade_drift_alarm", **ep) == 1
        assert metric(metrics, "cascade_drift_alarms_total", **ep) == 1
        assert metric(metrics, "cascade_drift_window_requests", **ep) == WINDOW
        assert metric(metrics, "cascade_drift_score", **ep) == pytest.approx(alarm["psi"], abs=1e-4)
        assert metric(metrics, "cascade_drift_alarm_level", **ep) == pytest.approx(
            alarm["psi_alarm_at"], abs=1e-4)
        assert "drift alarm ON at tier endpoint, task documents" in endpoint.log()

        # Tightened by 0.1: the probe it answered before now goes up, with the same confidence.
        after = ask(client, endpoint.url, probe)
        assert [(h["tier"], h["decision"]) for h in after["hops"]] == [
            ("endpoint", "escalate"), ("cloud", "answer")]
        assert after["hops"][0]["confidence"] == before["hops"][0]["confidence"]
        assert after["answered_by"] == "cloud"
        # The threshold is capped at 1.0: a fully confident answer still stays at the endpoint.
        certain, _ = documents["certain"][0]
        assert ask(client, endpoint.url, certain)["answered_by"] == "endpoint"
        assert drift()["state"] == "alarm"
