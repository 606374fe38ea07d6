"""Idempotency at the API layer over a real SQLite outbox.

``FakeNode`` stands in for :class:`cascade.tier.node.Node` (whose models need a build): it counts
computations and either answers, queues an escalation through the real outbox, or returns an
upstream's provisional answer. The real node is exercised end to end by tests/fault.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cascade.contract.answer import Answer, Hop
from cascade.contract.schemas import InferRequest
from cascade.errors import IdempotencyConflict
from cascade.outbox import Outbox, OutboxSettings
from cascade.tier.idempotency import serve_infer
from cascade.tier.node import Answered, CallContext, owed_escalation


class FakeNode:
    def __init__(self, outbox: Outbox, mode: str = "final") -> None:
        self.escalations = outbox
        self.mode = mode
        self.calls = 0
        self.release: asyncio.Event | None = None
        queue = SimpleNamespace(ttl_s=60.0, max_attempts=5)
        self.policy = SimpleNamespace(task=lambda task: SimpleNamespace(queue=queue, deadline_ms=2000))

    async def answer(self, request: InferRequest, ctx: CallContext,
                     events: Any = None) -> Answered:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        rid = ctx.request_id or request.request_id or f"gen-{self.calls}"
        answer = Answer(id=rid, task=request.task, label="tech", confidence=0.5, status="final",
                        answered_by="endpoint", hops=[hop("endpoint", "answer")], trace_id="t")
        if self.mode == "offline":
            answer.status = "provisional"
            pending = owed_escalation(request, ctx, answer, reason="down",
                                      task_policy=self.policy.task(request.task),
                                      traceparent=None)
            answer.escalation = await self.escalations.enqueue(pending)
            return Answered(answer, queued=True)
        if self.mode == "upstream_provisional":
            answer.status, answer.answered_by = "provisional", "edge-node"
            answer.escalation = {"state": "queued", "held_by": "edge-node"}
            answer.hops.append(hop("edge-node", "escalate"))
        return Answered(answer, queued=False)


def hop(tier: str, decision: str) -> Hop:
    return Hop(tier=tier, model=f"m-{tier}", label="tech", confidence=0.5, decision=decision,
               ms=0.1)


@pytest.fixture
async def outbox(tmp_path: Path):
    box = Outbox(f"sqlite:///{tmp_path}/o.db", tier="endpoint", settings=OutboxSettings())
    await box.start(background=False)
    yield box
    await box.aclose()


def req(text: str = "chips and servers", **kw: Any) -> InferRequest:
    return InferRequest(task="documents", input={"text": text}, **kw)


async def test_unkeyed_local_answer_writes_nothing(outbox):
    node = FakeNode(outbox)
    jobs = outbox.writer.stats["jobs"]
    body, replayed = await serve_infer(outbox, node, req(), CallContext())
    assert body["status"] == "final" and not replayed
    assert outbox.writer.stats["jobs"] == jobs  # the hot path never touches the database


async def test_same_key_returns_the_stored_answer_without_recomputing(outbox):
    node = FakeNode(outbox)
    first, replayed1 = await serve_infer(outbox, node, req(), CallContext(request_id="k-1"))
    again, replayed2 = await serve_infer(outbox, node, req(), CallContext(request_id="k-1"))
    assert (replayed1, replayed2, node.calls) == (False, True, 1)
    assert {k: again[k] for k in first} == first
    assert (await outbox.lookup("k-1"))["_computations"] == 1


async def test_body_request_id_is_the_key_too(outbox):
    node = FakeNode(outbox)
    await serve_infer(outbox, node, req(request_id="b-1"), CallContext())
    _, replayed = await serve_infer(outbox, node, req(request_id="b-1"), CallContext())
    assert replayed and node.calls == 1


async def test_same_key_other_body_is_422(outbox):
    node = FakeNode(outbox)
    await serve_infer(outbox, node, req("one"), CallContext(request_id="k-2"))
    with pytest.raises(IdempotencyConflict) as info:
        await serve_infer(outbox, node, req("two"), CallContext(request_id="k-2"))
    assert info.value.status == 422 and info.value.code == "idempotency_key_reused"
    assert info.value.field == "Idempotency-Key" and node.calls == 1


async def test_concurrent_duplicate_in_flight_is_409(outbox):
    node = FakeNode(outbox)
    node.release = asyncio.Event()
    first = asyncio.ensure_future(serve_infer(outbox, node, req(), CallContext(request_id="k-3")))
    async with asyncio.timeout(10):  # until the first request is being computed (held there)
        while node.calls == 0:
            await asyncio.sleep(0)
    with pytest.raises(IdempotencyConflict) as info:
        await serve_infer(outbox, node, req(), CallContext(request_id="k-3"))
    assert info.value.status == 409 and info.value.code == "idempotency_in_flight"
    node.release.set()
    body, _ = await first
    assert body["status"] == "final" and node.calls == 1
    _, replayed = await serve_infer(outbox, node, req(), CallContext(request_id="k-3"))
    assert replayed


async def test_provisional_answer_is_stored_once_with_its_escalation(outbox):
    node = FakeNode(outbox, mode="offline")
    body, _ = await serve_infer(outbox, node, req(), CallContext(request_id="k-4"))
    assert body["status"] == "provisional" and body["escalation"]["state"] == "queued"
    again, replayed = await serve_infer(outbox, node, req(), CallContext(request_id="k-4"))
    assert replayed and again["escalation"]["state"] == "queued" and node.calls == 1
    stored = await outbox.lookup("k-4")
    assert stored["_computations"] == 1 and stored["_request_hash"] is not None


async def test_upstream_provisional_is_tracked_as_handed_over(outbox):
    node = FakeNode(outbox, mode="upstream_provisional")
    body, _ = await serve_infer(outbox, node, req(callback_url="http://127.0.0.1:9/cb"),
                                CallContext())
    esc = body["escalation"]
    assert esc["state"] == "forwarding" and esc["held_by"] == "endpoint"
    assert esc["upstream"] == {"state": "queued", "held_by": "edge-node"}
    got = await outbox.result(body["id"])
    assert got["escalation"]["handed_over"] and got["answered_by"] == "edge-node"
    assert outbox.depth() == 1
