"""The answer contract on the wire, through real tiers: every body a tier sends is exactly what
the OpenAPI document describes (response models forbid undocumented keys), and the typed
:class:`Answer` reads and writes it without loss."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cascade.contract.answer import Answer
from cascade.contract.schemas import InferResponse, ResultResponse
from tests.fault.harness import LOOPBACK_CALLBACKS, post, wait_for, write_policy

pytestmark = pytest.mark.integration


def assert_exact_answer(body: dict[str, Any]) -> None:
    """``body`` validates against the documented model and round-trips through Answer."""
    InferResponse.model_validate(body)
    assert Answer.from_wire(body).to_wire() == body


def test_final_provisional_handed_over_and_results_bodies_match_the_contract(
        tiers, proxy_to, callbacks, tmp_path, hard_images):
    policy = write_policy(tmp_path / "two-escalate.yaml", escalating=("endpoint", "edge-node"))
    server = tiers("edge-server", policy_path=policy)
    proxy = proxy_to(server.url)
    node = tiers("edge-node", upstream=proxy.url, policy_path=policy)
    node_proxy = proxy_to(node.url)
    endpoint = tiers("endpoint", upstream=node_proxy.url, policy_path=policy,
                     callbacks=LOOPBACK_CALLBACKS)
    image = {"task": "vision", "input": {"image": hard_images[0]}}
    with httpx.Client() as client:
        final = post(client, endpoint.url, image, key="c-final").json()
        assert final["status"] == "final" and final["answered_by"] == "edge-server"
        assert [h["tier"] for h in final["hops"]] == ["endpoint", "edge-node", "edge-server"]
        assert "escalation" not in final
        assert_exact_answer(final)

        node_proxy.set(mode="reset")  # the endpoint's uplink is down: it queues
        queued = post(client, endpoint.url, {**image, "callback_url": callbacks.url},
                      key="c-queued").json()
        assert (queued["status"], queued["escalation"]["state"]) == ("provisional", "queued")
        assert_exact_answer(queued)
        result = client.get(f"{endpoint.url}/v1/results/c-queued").json()
        ResultResponse.model_validate(result)
        assert "callback" not in result  # armed once the final answer is in
        assert result["escalation"]["held_by"] == "endpoint"

        proxy.set(mode="reset")  # now the edge-node's uplink is down: it queues, we track it
        node_proxy.set(mode="pass")
        # The endpoint's uplink is back once its breaker is closed. c-queued's failed sends
        # (the request's own, then the forwarder's retry) opened it, and a request sent before it
        # closes is queued at the endpoint (seen under load). So wait for the forwarder to hand
        # c-queued over to the edge-node: that success closes the breaker.
        wait_for(lambda: endpoint.query(
            "SELECT handed_over FROM cascade_outbox WHERE id = 'c-queued'") == [(1,)],
            timeout_s=30, what="c-queued handed over to the edge-node")
        handed = post(client, endpoint.url, {**image, "input": {"image": hard_images[1]}},
                      key="c-handed").json()
        assert handed["escalation"]["state"] == "forwarding"
        assert handed["escalation"]["upstream"]["held_by"] == "edge-node"
        assert_exact_answer(handed)

        proxy.set(mode="pass")
        wait_for(lambda: endpoint.states().get("c-handed") == "done"
                 and endpoint.states().get("c-queued") == "done",
                 timeout_s=60, what="both escalations delivered")
        for key in ("c-queued", "c-handed"):
            done = client.get(f"{endpoint.url}/v1/results/{key}").json()
            ResultResponse.model_validate(done)
            assert (done["status"], done["answered_by"]) == ("final", "edge-server")
            assert done["escalation"]["state"] == "done"
            assert [h["tier"] for h in done["hops"]] == ["endpoint", "edge-node", "edge-server"]
        wait_for(lambda: client.get(f"{endpoint.url}/v1/results/c-queued").json()
                 .get("callback", {}).get("state") == "delivered",
                 timeout_s=30, what="the callback delivered")
        delivered = client.get(f"{endpoint.url}/v1/results/c-queued").json()
        ResultResponse.model_validate(delivered)
        assert delivered["callback"]["url"] == callbacks.url
        assert [key for key, _ in callbacks.received] == ["c-queued"]


def test_the_openapi_document_names_the_typed_bodies(tiers):
    endpoint = tiers("endpoint")
    with httpx.Client() as client:
        spec = client.get(f"{endpoint.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"InferResponse", "ResultResponse", "EscalationView", "CallbackView", "Hop",
            "ErrorBody"} <= set(schemas)
    assert schemas["InferResponse"]["additionalProperties"] is False
    assert schemas["InferResponse"]["properties"]["escalation"]["anyOf"][0] == {
        "$ref": "#/components/schemas/EscalationView"}
    results = spec["paths"]["/v1/results/{request_id}"]["get"]["responses"]
    assert results["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResultResponse"}
    assert results["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
