"""The HTTP contract (architecture §2) holds for a tier run as a Ray Serve application: the
bad-request and OpenAPI suites written for `cascade serve` tiers run unchanged against it, and
it answers exactly as the same tier run as a process (same labels, confidences, hops). Its
escalations reach the cloud tier through a DeploymentHandle, in the same trace."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

# The suites of the process tiers, collected here again with their target fixtures pointed at
# the Serve tier.
from tests.fault.test_answer_contract import (  # noqa: F401
    test_the_openapi_document_names_the_typed_bodies,
)
from tests.integration.test_bad_input import (  # noqa: F401
    test_a_valid_png_is_accepted,
    test_bad_request_gets_a_precise_4xx,
    test_chunked_oversize_body_is_refused,
    test_unknown_route_and_method_are_json,
)

pytestmark = [pytest.mark.integration, pytest.mark.ray]

SLOW_MACHINE_MS = 30_000


@pytest.fixture(scope="module")
def running_chain(serve_tier: Any) -> SimpleNamespace:
    """What the bad-request suite sends to: the Serve tier."""
    return SimpleNamespace(entry_url=serve_tier.url)


@pytest.fixture
def tiers(serve_tier: Any) -> Any:
    """What the OpenAPI test asks for a tier: the Serve tier, whatever its name."""
    return lambda *_args, **_kw: SimpleNamespace(url=serve_tier.url)


def _comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what differs per request (ids, timings)."""
    hops = [{k: h[k] for k in ("tier", "model", "label", "confidence", "decision")}
            for h in answer["hops"]]
    return {**{k: answer[k] for k in ("task", "label", "confidence", "status", "answered_by")},
            "hops": hops}


def test_serve_tier_answers_exactly_as_the_process_tier(serve_tier, hard_images):
    # A long deadline: on a loaded machine an escalation must not turn into a provisional
    # answer on one side only.
    bodies = [{"task": "vision", "input": {"image": image}, "deadline_ms": SLOW_MACHINE_MS}
              for image in hard_images[:6]]
    bodies += [{"task": "documents", "input": {"text": text}, "deadline_ms": SLOW_MACHINE_MS}
               for text in (
        "the striker scored twice before half time", "shares fell as the bank cut rates",
        "the minister announced an election", "a new phone with a faster chip")]
    escalated = 0
    with httpx.Client(timeout=60) as client:
        for body in bodies:
            served = client.post(f"{serve_tier.url}/v1/infer", json=body)
            twin = client.post(f"{serve_tier.twin.url}/v1/infer", json=body)
            assert served.status_code == twin.status_code == 200, served.text
            assert _comparable(served.json()) == _comparable(twin.json())
            escalated += served.json()["answered_by"] == "cloud"
    assert escalated > 0  # the escalation path (by handle; the twin's over HTTP) was taken too


def test_idempotency_probes_and_metrics(serve_tier):
    body = {"task": "documents", "input": {"text": "the league title race"}}
    url = serve_tier.url
    with httpx.Client(timeout=30) as client:
        first = client.post(f"{url}/v1/infer", json=body, headers={"Idempotency-Key": "ray-k1"})
        again = client.post(f"{url}/v1/infer", json=body, headers={"Idempotency-Key": "ray-k1"})
        other = client.post(f"{url}/v1/infer", json={**body, "input": {"text": "other"}},
                            headers={"Idempotency-Key": "ray-k1"})
        assert first.status_code == again.status_code == 200
        assert again.json() == {**first.json(), "escalation": None}  # as cascade serve does
        assert again.headers["Idempotent-Replayed"] == "true"
        assert other.status_code == 422
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        result = client.get(f"{url}/v1/results/ray-k1")
        assert result.status_code == 200 and result.json()["id"] == "ray-k1"
        assert client.get(f"{url}/healthz").json() == {"status": "ok", "tier": "edge-server"}
        ready = client.get(f"{url}/readyz").json()
        assert ready["ready"] is True and ready["tier"] == "edge-server"
        assert set(ready["models"]) == {"vision", "documents"}
        metrics = client.get(f"{url}/metrics")
        assert metrics.status_code == 200
        assert 'cascade_requests_total{' in metrics.text or "cascade_request_duration" in metrics.text


def test_an_escalation_by_handle_is_one_trace_across_both_tiers(serve_tier, hard_images):
    from cascade.observability.export import TraceFileError, read_span_records

    body = {"task": "vision", "input": {"image": hard_images[0]}, "deadline_ms": SLOW_MACHINE_MS}
    answer = httpx.post(f"{serve_tier.url}/v1/infer", json=body, timeout=60).json()
    assert [hop["tier"] for hop in answer["hops"]] == ["edge-server", "cloud"]
    trace_id = answer["trace_id"]

    def servers_written() -> set[str]:
        try:
            records, _ = read_span_records(serve_tier.trace_dir)
        except TraceFileError:  # no file yet
            return set()
        return {r["tier"] for r in records if r["trace_id"] == trace_id and r["kind"] == "SERVER"}

    deadline = time.monotonic() + 60  # the exporters write in batches
    while servers_written() != {"edge-server", "cloud"}:
        assert time.monotonic() < deadline, f"SERVER spans written: {servers_written()}"
        time.sleep(0.1)
