"""The outbox's routes and ``/v1/infer`` through the idempotency layer.

A node without an outbox (a tier built by hand in a test) answers without idempotency and
has no results routes (503 ``no_outbox``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Path

from cascade.contract.schemas import REQUEST_ID_PATTERN, ErrorBody, ResultResponse
from cascade.errors import InvalidInput, ServiceUnavailable
from cascade.http.responses import json_response
from cascade.outbox.outbox import Outbox
from cascade.tier.idempotency import serve_infer
from cascade.tier.lifecycle import outbox_of

if TYPE_CHECKING:  # pragma: no cover
    from cascade.contract.schemas import InferRequest
    from cascade.contract.streaming import EventSink
    from cascade.tier.node import CallContext, Node

REPLAYED_HEADER = "Idempotent-Replayed"
"""Response header set to ``true`` when an answer was served from the store, not computed."""


async def answer_infer(
    node: Node, request: InferRequest, ctx: CallContext, events: EventSink | None = None,
) -> tuple[dict[str, Any], bool]:
    """``POST /v1/infer`` through the idempotency layer; returns ``(body, replayed)``.
    ``events``: where a streamed answer's progress goes (``cascade.contract.streaming``)."""
    outbox = outbox_of(node)
    if outbox is None or ctx.audit is not None:  # an audit stores nothing here
        return (await node.answer(request, ctx, events)).answer.to_wire(), False
    return await serve_infer(outbox, node, request, ctx, events)


def register_outbox_routes(app: FastAPI, get_node: Callable[[], Node | None]) -> None:
    """Add ``GET /v1/results/{id}`` (latest answer, escalation and callback state) and
    ``GET /v1/outbox`` (queue depth, caps and counters such as refusals)."""
    pattern = re.compile(REQUEST_ID_PATTERN)

    @app.get(
        "/v1/results/{request_id}",
        summary="Latest answer of a request and the state of its escalation "
        "(queued|forwarding|done|expired|dead) and callback",
        response_model=ResultResponse,
        responses={404: {"model": ErrorBody, "description": "Unknown id (or past retention)"},
                   503: {"model": ErrorBody, "description": "Outbox database unavailable"}},
    )
    async def get_result(request_id: str = Path(pattern=REQUEST_ID_PATTERN,
                                                description="The request's id (its "
                                                "Idempotency-Key or request_id)")) -> Any:
        if not pattern.match(request_id):
            raise InvalidInput("id must be 1-128 characters of letters, digits and ._:-",
                               field="id")
        return json_response(await _outbox(get_node).result(request_id))

    @app.get("/v1/outbox", summary="Outbox depth, caps and counters (refusals, dead, expired...)")
    async def outbox_stats() -> Any:
        outbox = _outbox(get_node)
        return json_response({"tier": outbox.tier, **outbox.metrics()})


def _outbox(get_node: Callable[[], Node | None]) -> Outbox:
    node = get_node()
    outbox = outbox_of(node) if node is not None else None
    if outbox is None:
        raise ServiceUnavailable("this tier keeps no results (no outbox configured)",
                                 code="no_outbox")
    return outbox
