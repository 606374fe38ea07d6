"""``POST /v1/infer`` as Server-Sent Events (the events: ``cascade.contract.streaming``).

The answer is computed by the same code as a plain request (idempotency layer, node, upstream),
with an event sink: this module turns what lands in the sink into the response stream. The
response starts only once the first event (or the whole answer) is there, so a request refused
before any work (bad input, unknown task, idempotency conflict, a full queue) gets the plain
HTTP error with its status, not a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse

from cascade.contract.streaming import EVENT_ANSWER, EVENT_ERROR, sse_event
from cascade.errors import CascadeError
from cascade.http.results import REPLAYED_HEADER, answer_infer

if TYPE_CHECKING:  # pragma: no cover
    from cascade.contract.schemas import InferRequest
    from cascade.tier.node import CallContext, Node

log = logging.getLogger("cascade.http.streaming")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_Item = tuple[str, dict[str, Any]] | None
"""An event for the stream; ``None``: the computation has finished."""


def wants_stream(request: InferRequest, accept: str | None) -> bool:
    """Streamed when the body says ``"stream": true`` or the client accepts only events."""
    return request.stream or "text/event-stream" in (accept or "")


async def stream_infer(node: Node, request: InferRequest, ctx: CallContext) -> StreamingResponse:
    """Compute the answer with an event sink and stream what arrives; errors raised before the
    first event propagate (the caller's error handler makes them plain HTTP errors)."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    work = asyncio.create_task(answer_infer(node, request, ctx,
                                            lambda event, data: queue.put_nowait((event, data))))
    work.add_done_callback(lambda _: queue.put_nowait(None))
    first = await queue.get()
    headers = dict(SSE_HEADERS)
    if first is None:
        _, replayed = work.result()  # raises the refusal as it is
        if replayed:
            headers[REPLAYED_HEADER] = "true"
    return StreamingResponse(_events(first, queue, work), media_type="text/event-stream",
                             headers=headers)


async def _events(first: _Item, queue: asyncio.Queue[_Item],
                  work: asyncio.Task[tuple[dict[str, Any], bool]]) -> AsyncIterator[bytes]:
    """The events in order, then the final ``answer`` (or ``error``). A client that goes away
    cancels the computation: its tokens would have nowhere to go."""
    item = first
    try:
        while item is not None:
            yield sse_event(*item)
            item = await queue.get()
        yield _final_event(work)
    finally:
        if not work.done():
            work.cancel()


def _final_event(work: asyncio.Task[tuple[dict[str, Any], bool]]) -> bytes:
    try:
        body, _ = work.result()
    except CascadeError as exc:
        return sse_event(EVENT_ERROR, exc.to_body())
    except Exception:  # the stream has started: say so in it instead of a 500
        log.exception("unexpected error while streaming an answer")
        return sse_event(EVENT_ERROR, {"error": {"code": "internal_error",
                                                 "message": "unexpected error; see the tier's log"}})
    return sse_event(EVENT_ANSWER, body)
