"""Idempotency at the API: the same key returns the same answer, computed and escalated once.

:func:`serve_infer` wraps :meth:`Node.answer` for ``POST /v1/infer``:

* no key: the node answers; nothing is written unless the answer is provisional (then the
  escalation is already committed by :meth:`Outbox.enqueue`, or, if the *upstream* answered
  provisionally, this tier records it as handed over and polls for the final answer);
* a key seen before with the same task and input: the stored latest answer, not recomputed;
* the same key with another task or input: 422 ``idempotency_key_reused``;
* the same key while its first request is still being computed here: 409
  ``idempotency_in_flight``.

The in-flight guard lives in memory: a crash forgets it, and that is right, since a request
interrupted by a crash was never answered and may be computed again. Processes that share one
outbox database (the Serve replicas of a tier on PostgreSQL) also claim the key in it
(:mod:`cascade.outbox.claims`), so a duplicate sent to another replica at the same moment gets
the same 409 and the key is still computed once; a crashed replica's claim lapses with its
lease.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cascade.errors import CascadeError, IdempotencyConflict
from cascade.outbox.rules import request_hash
from cascade.tier.node import Answered, CallContext, Node, owed_escalation

if TYPE_CHECKING:  # pragma: no cover
    from cascade.contract.answer import Answer
    from cascade.contract.schemas import InferRequest
    from cascade.contract.streaming import EventSink
    from cascade.outbox.outbox import Outbox

log = logging.getLogger("cascade.tier.idempotency")


async def serve_infer(
    outbox: Outbox, node: Node, request: InferRequest, ctx: CallContext,
    events: EventSink | None = None,
) -> tuple[dict[str, Any], bool]:
    """Answer one request idempotently; returns ``(body, replayed)``. ``events``: stream the
    computation's progress there (a replayed answer has none)."""
    key = ctx.request_id or request.request_id
    if key is None:
        return (await _compute(outbox, node, request, ctx, events)).answer.to_wire(), False
    digest = request_hash(request.task, request.input)
    if key in outbox.inflight:
        raise _in_flight(outbox, key, "")
    outbox.inflight.add(key)  # before any await: a concurrent duplicate must see it
    try:
        # Processes sharing the outbox (Serve replicas on PostgreSQL) claim the key in it
        # first, then look for a stored answer: a claim is dropped only in the transaction
        # that stores the answer, so a claim that succeeds finds any answer already stored.
        if not await outbox.claim_key(key, _deadline_s(node, request, ctx)):
            raise _in_flight(outbox, key, " (another replica)")
        try:
            body, replayed = await _answer_once(outbox, node, request, ctx, key, digest, events)
        except BaseException:
            await _release_quietly(outbox, key)
            raise
        if replayed:  # nothing stored: the claim is not dropped by a write, release it
            await _release_quietly(outbox, key)
        return body, replayed
    finally:
        outbox.inflight.discard(key)


def _in_flight(outbox: Outbox, key: str, where: str) -> IdempotencyConflict:
    """The 409 for a key whose first request is still being computed (``where``: by whom)."""
    outbox.stats["idempotency_conflicts"] += 1
    return IdempotencyConflict(
        f"a request with Idempotency-Key {key!r} is still being processed by tier "
        f"{outbox.tier}{where}; retry once it has been answered", status=409,
        code="idempotency_in_flight")


async def _answer_once(
    outbox: Outbox, node: Node, request: InferRequest, ctx: CallContext, key: str, digest: str,
    events: EventSink | None,
) -> tuple[dict[str, Any], bool]:
    """The stored answer for ``key``, or a new one computed and stored (the key is ours)."""
    stored = await outbox.lookup(key)
    if stored is not None:
        if stored["_request_hash"] not in (None, digest):
            outbox.stats["idempotency_conflicts"] += 1
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was already used with a different task or input; "
                "use a new key for a new request", status=422, code="idempotency_key_reused")
        outbox.stats["idempotent_replays"] += 1
        return {k: v for k, v in stored.items() if not k.startswith("_")}, True
    outbox.check_room()  # its answer could not be kept: refuse before computing it
    answered = await _compute(outbox, node, request,
                              replace(ctx, request_id=key, request_hash=digest), events)
    body = answered.answer.to_wire()
    if not answered.queued:  # a queued answer was committed with its escalation
        await outbox.save_result(key, request.task, digest, body)  # drops the claim
    return body, False


async def _release_quietly(outbox: Outbox, key: str) -> None:
    """Give up the claim of a computation that failed; if even that fails, its lease lapses."""
    try:
        await outbox.release_key(key)
    except CascadeError as exc:
        log.warning("idempotency claim of %r not released (it lapses with its lease): %s",
                    key, exc)


def _deadline_s(node: Node, request: InferRequest, ctx: CallContext) -> float | None:
    """The request's deadline in seconds (what its claim must outlast), if known."""
    deadline_ms = ctx.deadline_ms or request.deadline_ms
    if deadline_ms is None:
        try:
            deadline_ms = node.policy.task(request.task).deadline_ms
        except CascadeError:  # an unknown task: refused before anything is computed
            return None
    return deadline_ms / 1000.0


async def _compute(outbox: Outbox, node: Node, request: InferRequest, ctx: CallContext,
                   events: EventSink | None = None) -> Answered:
    answered = await node.answer(request, ctx, events)
    if answered.answer.status == "provisional" and not answered.queued:
        await _track_handover(outbox, node, request, ctx, answered.answer)
        return Answered(answered.answer, queued=True)
    return answered


async def _track_handover(
    outbox: Outbox, node: Node, request: InferRequest, ctx: CallContext, answer: Answer,
) -> None:
    """The upstream answered provisionally (it queued the work): keep our own record of it.

    So this tier can show the request in ``GET /v1/results/{id}``, fire the client's callback,
    and poll the upstream (re-sending with the same key) until its answer is final.
    """
    upstream_escalation, answer.escalation = answer.escalation, None
    pending = owed_escalation(
        request, ctx, answer,
        reason=f"upstream {answer.answered_by} answered provisionally and queued it",
        task_policy=node.policy.task(request.task), traceparent=ctx.traceparent,
        handed_over=True)
    answer.escalation = await outbox.enqueue(pending)
    if upstream_escalation is not None:
        answer.escalation["upstream"] = upstream_escalation
