"""Idempotency over HTTP between real tiers: the same key is answered from the store (never
computed twice, here or upstream), a duplicate of a request still being computed gets 409, and a
key reused with another body gets 422."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fault.harness import post, wait_for

pytestmark = pytest.mark.integration


def computations(tier, key: str) -> list[tuple[int]]:
    return tier.query("SELECT computations FROM cascade_results WHERE id = ?", key)


def test_the_same_key_is_answered_from_the_store_never_computed_twice(tiers, hard_images):
    upstream = tiers("edge-node")
    endpoint = tiers("endpoint", upstream=upstream.url)
    body = {"task": "vision", "input": {"image": hard_images[0]}}
    with httpx.Client() as client:
        first = post(client, endpoint.url, body, key="same-1")
        assert first.status_code == 200, first.text
        assert "Idempotent-Replayed" not in first.headers
        answer = first.json()
        assert (answer["id"], answer["status"], answer["answered_by"]) == (
            "same-1", "final", "edge-node")
        for _ in range(3):
            again = post(client, endpoint.url, body, key="same-1")
            assert again.status_code == 200, again.text
            assert again.headers["Idempotent-Replayed"] == "true"
            # The stored answer, trace id and hops included, plus its (absent) escalation.
            assert again.json() == {**answer, "escalation": None}
    assert computations(endpoint, "same-1") == [(1,)]
    assert computations(upstream, "same-1") == [(1,)]  # escalated once, not four times
    outbox = httpx.get(f"{endpoint.url}/v1/outbox").json()
    assert outbox["idempotent_replays"] == 3 and outbox["idempotency_conflicts"] == 0


def test_a_duplicate_while_the_first_is_in_flight_gets_409(tiers, proxy_to, hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url)
    # A long deadline: the first request waits on the cut uplink until the test restores it.
    body = {"task": "vision", "input": {"image": hard_images[0]}, "deadline_ms": 60_000}
    proxy.set(mode="blackhole")
    with httpx.Client() as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, client, endpoint.url, body, "busy-1", 90.0)
        # In flight for sure: the endpoint has sent it upstream, where the blackhole holds it.
        wait_for(lambda: proxy.stats["swallowed_bytes"] > 0, timeout_s=30,
                 what="the first request sent upstream")
        duplicate = post(client, endpoint.url, body, key="busy-1")
        assert duplicate.status_code == 409, duplicate.text
        error = duplicate.json()["error"]
        assert (error["code"], error["field"]) == ("idempotency_in_flight", "Idempotency-Key")
        assert "'busy-1' is still being processed by tier endpoint" in error["message"]
        assert not first.done()
        proxy.set(mode="pass")  # resets the held connection; the endpoint's retry gets through
        answer = first.result(90)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["status"], answer.json()["answered_by"]) == ("final", "edge-node")
        after = post(client, endpoint.url, body, key="busy-1")
        assert after.headers["Idempotent-Replayed"] == "true"
        assert after.json()["label"] == answer.json()["label"]
    assert computations(endpoint, "busy-1") == [(1,)]
    assert computations(upstream, "busy-1") == [(1,)]
    assert httpx.get(f"{endpoint.url}/v1/outbox").json()["idempotency_conflicts"] == 1


def test_a_key_reused_with_another_body_gets_422_and_the_first_answer_stays(tiers, hard_images):
    top = tiers("cloud")
    first_body = {"task": "vision", "input": {"image": hard_images[0]}}
    with httpx.Client() as client:
        first = post(client, top.url, first_body, key="reused-1")
        assert first.status_code == 200, first.text
        for other in ({"task": "vision", "input": {"image": hard_images[1]}},
                      {"task": "documents", "input": {"text": "rates rose"}}):
            r = post(client, top.url, other, key="reused-1")
            assert r.status_code == 422, r.text
            assert r.json() == {"error": {
                "code": "idempotency_key_reused", "field": "Idempotency-Key",
                "message": "Idempotency-Key 'reused-1' was already used with a different task or "
                           "input; use a new key for a new request"}}
        # The request id in the body is the same key (the header wins when both are given).
        r = client.post(f"{top.url}/v1/infer", json={**first_body, "request_id": "reused-1",
                                                     "input": {"image": hard_images[1]}})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
        stored = client.get(f"{top.url}/v1/results/reused-1").json()
        assert stored["label"] == first.json()["label"]
    assert computations(top, "reused-1") == [(1,)]
