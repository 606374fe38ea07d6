"""``POST /v1/infer`` as Server-Sent Events across real tier processes, read by an independent
SSE client (httpx-sse): each tier's ``escalate`` event as the request climbs, the upstream's
events relayed in order, one final ``answer`` event equal to the stored result; refusals before
the stream are plain HTTP errors; a dead upstream ends the stream with the provisional answer and
its queued escalation. Classifier tiers stream no tokens (their models are not generative); the
generative tiers' ``token`` events are tested with the LLM runners."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import connect_sse

from cascade.contract.schemas import InferResponse
from tests.fault.harness import free_port, write_policy

pytestmark = pytest.mark.integration


def read_events(client: httpx.Client, url: str, body: dict, **kw) -> tuple[httpx.Response, list]:
    with connect_sse(client, "POST", f"{url}/v1/infer", json=body, **kw) as source:
        return source.response, [(e.event, e.json()) for e in source.iter_sse()]


def test_a_climbing_request_streams_each_escalation_then_the_answer(tiers, tmp_path, hard_images):
    policy = write_policy(tmp_path / "p.yaml", escalating=("endpoint", "edge-node"))
    cloud = tiers("cloud", policy_path=policy)
    node = tiers("edge-node", policy_path=policy, upstream=cloud.url)
    endpoint = tiers("endpoint", policy_path=policy, upstream=node.url)
    body = {"task": "vision", "input": {"image": hard_images[0]}, "stream": True}
    with httpx.Client(timeout=20) as client:
        response, events = read_events(client, endpoint.url, {**body, "request_id": "climb-1"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert [name for name, _ in events] == ["escalate", "escalate", "answer"]
        (_, first), (_, second), (_, answer) = events
        assert (first["tier"], second["tier"]) == ("endpoint", "edge-node")
        for event, hop in zip((first, second), answer["hops"]):
            assert (event["model"], event["confidence"]) == (hop["model"], hop["confidence"])
            assert event["threshold"] == 1.0 and "below the threshold" in event["reason"]
        InferResponse.model_validate(answer)  # the same JSON as a plain answer
        assert [(h["tier"], h["decision"]) for h in answer["hops"]] == [
            ("endpoint", "escalate"), ("edge-node", "escalate"), ("cloud", "answer")]
        assert (answer["status"], answer["answered_by"]) == ("final", "cloud")
        stored = client.get(f"{endpoint.url}/v1/results/climb-1").json()
        assert {k: stored[k] for k in answer} == answer

        # The same key again: the stored answer, not computed again, as one event.
        again, replayed = read_events(client, endpoint.url, {**body, "request_id": "climb-1"})
        assert again.headers["idempotent-replayed"] == "true"
        plain_replay = client.post(f"{endpoint.url}/v1/infer",
                                   json={**body, "request_id": "climb-1", "stream": False})
        assert replayed == [("answer", plain_replay.json())]
        assert {k: replayed[0][1][k] for k in answer} == answer
        # Accept: text/event-stream alone asks for a stream too.
        plain = {k: v for k, v in body.items() if k != "stream"}
        _, accepted = read_events(client, endpoint.url, plain)
        assert [name for name, _ in accepted] == ["escalate", "escalate", "answer"]


def test_refusals_before_the_stream_are_plain_http_errors(tiers, tmp_path):
    endpoint = tiers("endpoint", policy_path=write_policy(tmp_path / "p.yaml"))
    with httpx.Client(timeout=10) as client:
        for body, status, field in [
            ({"task": "vision", "input": {"image": [[0] * 7] * 8}, "stream": True}, 422,
             "input.image[0]"),
            ({"task": "nope", "input": {"text": "x"}, "stream": True}, 422, "task"),
            ({"task": "vision", "input": {}, "stream": "yes please"}, 422, "stream"),
        ]:
            r = client.post(f"{endpoint.url}/v1/infer", json=body,
                            headers={"Accept": "text/event-stream"})
            assert r.status_code == status, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.json()["error"]["field"] == field


def test_a_dead_upstream_ends_the_stream_with_the_provisional_answer(tiers, tmp_path, hard_images):
    policy = write_policy(tmp_path / "p.yaml", deadline_ms=3000)
    endpoint = tiers("endpoint", policy_path=policy, upstream=f"http://127.0.0.1:{free_port()}")
    body = {"task": "vision", "input": {"image": hard_images[0]}, "stream": True,
            "request_id": "offline-1"}
    with httpx.Client(timeout=20) as client:
        _, events = read_events(client, endpoint.url, body)
        assert [name for name, _ in events] == ["escalate", "answer"]
        answer = events[-1][1]
        InferResponse.model_validate(answer)
        assert (answer["status"], answer["answered_by"]) == ("provisional", "endpoint")
        assert answer["escalation"]["state"] == "queued"
    # Held: queued, or in a send the forwarder keeps trying while the upstream is dead.
    ((row_id, state),) = endpoint.query("SELECT id, state FROM cascade_outbox")
    assert row_id == "offline-1" and state in ("queued", "forwarding")
