"""Pure outbox rules: request identity, backoff, merging the final answer."""

from __future__ import annotations

import random

import pytest

from cascade.contract.answer import Answer, Hop, merge_upstream
from cascade.errors import UpstreamUnavailable
from cascade.outbox.rules import backoff_s, request_hash, strip_view


def test_request_hash_ignores_key_order_and_delivery_fields():
    a = request_hash("documents", {"text": "hi", "lang": "en"})
    assert a == request_hash("documents", {"lang": "en", "text": "hi"})
    assert a != request_hash("documents", {"text": "hi!", "lang": "en"})
    assert a != request_hash("vision", {"text": "hi", "lang": "en"})
    assert len(a) == 64


@pytest.mark.parametrize("attempt,low,high", [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0),
                                              (10, 5.0, 10.0)])
def test_backoff_doubles_with_a_floor_and_a_cap(attempt, low, high):
    rng = random.Random(7)
    samples = [backoff_s(attempt, 1.0, 10.0, rng) for _ in range(500)]
    assert low <= min(samples) and max(samples) <= high
    assert max(samples) - min(samples) > (high - low) * 0.5  # jittered, not constant


def _hop(tier: str, decision: str) -> Hop:
    return Hop(tier=tier, model=f"m-{tier}", label="3", confidence=0.4, decision=decision, ms=1.0)


def test_merge_keeps_own_hop_and_takes_the_upstream_answer():
    own = Answer(id="r1", task="vision", label="3", confidence=0.41, status="provisional",
                 answered_by="endpoint", hops=[_hop("endpoint", "escalate")], trace_id="t",
                 escalation={"state": "queued"})
    upstream = Answer(id="r1", task="vision", label="8", confidence=0.99, status="final",
                      answered_by="edge-server",
                      hops=[_hop("edge-node", "escalate"), _hop("edge-server", "answer")])
    merged = merge_upstream(own, upstream)
    assert merged.to_wire() == {
        "id": "r1", "task": "vision", "label": "8", "confidence": 0.99, "status": "final",
        "answered_by": "edge-server", "trace_id": "t",
        "hops": [_hop("endpoint", "escalate").to_wire(), _hop("edge-node", "escalate").to_wire(),
                 _hop("edge-server", "answer").to_wire()],
    }
    assert own.label == "3" and len(own.hops) == 1  # the tier's own answer is not modified


def test_merge_carries_the_upstream_escalation_state():
    own = Answer(id="r1", task="vision", label="3", confidence=0.4, status="final",
                 answered_by="endpoint", hops=[_hop("endpoint", "escalate")])
    upstream = Answer(id="r1", task="vision", label="3", confidence=0.5, status="provisional",
                      answered_by="edge-node", hops=[_hop("edge-node", "escalate")],
                      escalation={"state": "queued", "held_by": "edge-node"})
    merged = merge_upstream(own, upstream)
    assert merged.status == "provisional"
    assert merged.escalation == {"state": "queued", "held_by": "edge-node"}


def test_merge_replaces_earlier_upstream_hops_on_a_later_poll():
    stored = Answer.from_wire({"id": "r1", "task": "vision", "label": "3",
                               "status": "provisional", "answered_by": "edge-node",
                               "hops": [{"tier": "endpoint"}, {"tier": "edge-node"}]})
    merged = merge_upstream(stored, Answer.from_wire(
        {"id": "r1", "task": "vision", "label": "9", "status": "final", "answered_by": "cloud",
         "hops": [{"tier": "edge-node"}, {"tier": "cloud"}]}))
    assert [h.tier for h in merged.hops] == ["endpoint", "edge-node", "cloud"]


def test_an_upstream_body_that_is_not_an_answer_is_an_unavailable_upstream():
    with pytest.raises(UpstreamUnavailable, match="not a valid cascade answer"):
        Answer.from_wire({"label": "3"})
    with pytest.raises(UpstreamUnavailable, match="status 'maybe'"):
        Answer.from_wire({"id": "r", "task": "t", "status": "maybe"})


def test_strip_view_drops_outbox_views_and_private_keys():
    assert strip_view({"id": "a", "escalation": {}, "callback": {}, "_x": 1}) == {"id": "a"}
