"""Pure outbox rules: request identity, backoff, merging the final answer."""

from __future__ import annotations

import random

import pytest

from cascade.outbox.rules import backoff_s, merge_upstream_answer, request_hash, strip_view


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


def test_merge_keeps_own_hop_and_takes_the_upstream_answer():
    stored = {"id": "r1", "task": "vision", "label": "3", "confidence": 0.41,
              "status": "provisional", "answered_by": "endpoint", "trace_id": "t",
              "hops": [{"tier": "endpoint", "decision": "escalate"}],
              "escalation": {"state": "queued"}, "_request_hash": "h"}
    upstream = {"id": "r1", "label": "8", "confidence": 0.99, "status": "final",
                "answered_by": "edge-server",
                "hops": [{"tier": "edge-node", "decision": "escalate"},
                         {"tier": "edge-server", "decision": "answer"}]}
    merged = merge_upstream_answer(stored, upstream)
    assert merged == {
        "id": "r1", "task": "vision", "label": "8", "confidence": 0.99, "status": "final",
        "answered_by": "edge-server", "trace_id": "t",
        "hops": [{"tier": "endpoint", "decision": "escalate"},
                 {"tier": "edge-node", "decision": "escalate"},
                 {"tier": "edge-server", "decision": "answer"}],
    }


def test_merge_replaces_earlier_upstream_hops_on_a_later_poll():
    stored = {"id": "r1", "label": "3", "status": "provisional", "answered_by": "edge-node",
              "hops": [{"tier": "endpoint"}, {"tier": "edge-node"}]}
    merged = merge_upstream_answer(stored, {"label": "9", "status": "final",
                                            "answered_by": "cloud",
                                            "hops": [{"tier": "edge-node"}, {"tier": "cloud"}]})
    assert [h["tier"] for h in merged["hops"]] == ["endpoint", "edge-node", "cloud"]


def test_strip_view_drops_outbox_views_and_private_keys():
    assert strip_view({"id": "a", "escalation": {}, "callback": {}, "_x": 1}) == {"id": "a"}
