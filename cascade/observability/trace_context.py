"""W3C trace context of a tier (architecture §7): the tracer when the SDK is on, the
``traceparent`` a request carries upstream or stores with queued work, fresh contexts when
tracing is off, and the CONSUMER span around an outbox send (a new trace, linked to the request
that queued it). Re-exported by :mod:`cascade.observability.telemetry`."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACER_NAME", "current_traceparent", "drain_span", "fresh_trace_context",
           "outgoing_trace_context", "sdk_tracer", "span_link_from_traceparent",
           "traceparent_of"]

TRACER_NAME: Final[str] = "cascade"
_W3C = TraceContextTextMapPropagator()

_cached_tracer: tuple[object, trace.Tracer | None] = (None, None)


def sdk_tracer() -> trace.Tracer | None:
    """The cascade tracer when an SDK provider is installed, else None (tracing off)."""
    global _cached_tracer
    provider = trace.get_tracer_provider()
    if provider is not _cached_tracer[0]:
        from cascade import __version__

        tracer = provider.get_tracer(TRACER_NAME, __version__) if isinstance(provider, TracerProvider) else None
        _cached_tracer = (provider, tracer)
    return _cached_tracer[1]


def traceparent_of(ctx: trace.SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None outside any trace.

    Store it with work that outlives the request (a queued escalation) and hand it to
    :func:`span_link_from_traceparent` when the work is picked up.
    """
    ctx = trace.get_current_span().get_span_context()
    return traceparent_of(ctx) if ctx.is_valid else None


def span_link_from_traceparent(traceparent: str | None, **attributes: Any) -> Link | None:
    """A span :class:`Link` to the span a stored ``traceparent`` names; None if it is unusable."""
    if not traceparent:
        return None
    ctx = trace.get_current_span(_W3C.extract({"traceparent": traceparent})).get_span_context()
    return Link(ctx, attributes or None) if ctx.is_valid else None


def outgoing_trace_context(incoming: str | None) -> tuple[str, str]:
    """(trace id for the response, ``traceparent`` to send upstream) for the current request.

    With tracing on, both come from the current (SERVER) span; httpx instrumentation then
    re-parents each attempt on its CLIENT span. With tracing off, the caller's trace id is kept
    (or a new one made) so every tier still reports the same ``trace_id``.
    """
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return f"{ctx.trace_id:032x}", traceparent_of(ctx)
    if incoming:
        parts = incoming.split("-")
        if len(parts) == 4 and len(parts[1]) == 32:
            return parts[1], f"00-{parts[1]}-{random.getrandbits(64) or 1:016x}-{parts[3]}"
    return fresh_trace_context(sampled=True)


def fresh_trace_context(*, sampled: bool) -> tuple[str, str]:
    """(trace id, ``traceparent``) of a new trace that has no span here.

    Random ids as the SDK's own ``RandomIdGenerator`` makes them (ids are unique, not secret).
    ``sampled`` is the ``traceparent`` flag the upstream sees: with tracing off it is set, so an
    upstream that traces keeps the climb; a tier whose sampler declined sends it clear.
    """
    trace_id = f"{random.getrandbits(128) or 1:032x}"
    return trace_id, f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-{'01' if sampled else '00'}"


@contextmanager
def drain_span(tier: str, *, traceparent: str | None, request_id: str, task: str,
               attempt: int = 0) -> Iterator[trace.Span]:
    """CONSUMER span around one outbox send: a new trace, linked to the request that queued it."""
    tracer = sdk_tracer()
    if tracer is None:
        yield trace.INVALID_SPAN
        return
    link = span_link_from_traceparent(traceparent, **{"cascade.link": "queued_request"})
    with tracer.start_as_current_span(
        "cascade.queue.drain", context=otel_context.Context(), kind=SpanKind.CONSUMER,
        links=[link] if link else None,
        attributes={"cascade.tier": tier, "cascade.task": task, "cascade.request_id": request_id,
                    "cascade.queue.attempt": attempt, "messaging.operation.type": "process"},
    ) as span:
        yield span
