"""Tracing of a tier at run time (architecture §7): spans, trace context and request telemetry.

What one request leaves behind at each tier it touches::

    SERVER   "POST /v1/infer"         cascade.tier/task/model/confidence/decision/status/answered_by
    ├── INTERNAL cascade.inference    cascade.tier, cascade.task, cascade.model
    ├── INTERNAL cascade.gating.gate         cascade.confidence, cascade.decision, cascade.signal
    ├── CLIENT   "POST"               one per upstream attempt, with http.request.resend_count
    │   └── SERVER of the next tier   (W3C traceparent: same trace, parent = this CLIENT span)
    └── PRODUCER cascade.queue.enqueue   when the escalation is kept in the outbox
    later, from the forwarder: CONSUMER cascade.queue.drain, a new trace ──link──▶ the enqueue span

The SERVER span is made by :class:`RequestTelemetryMiddleware`, a thin pure-ASGI middleware that
also records the request metrics and writes the access line in the same pass. It starts the span
late: the node starts it once the gate has decided (:meth:`TierTelemetry.record_local`, backdated
to the request's arrival), so the sampler can keep every escalation while sampling the routine
local answers (:class:`~cascade.observability.tracing.CascadeRootSampler`); requests that never reach the gate
get theirs when the response is done. The inference and gate spans are made after the fact from
timestamps, so a request that is not sampled pays for no span at all. Measured in
``benchmarks/bench_tracing.py``, the alternatives add more per request: FastAPI's native
telemetry 1.3x (SERVER span only) to 2.4x (default), opentelemetry-instrumentation-fastapi 2.2x
(no send/receive spans) to 4.4x (default), and neither records our metrics or access line.
Process setup (``OTEL_*`` variables, exporters) lives in :mod:`cascade.observability.tracing`, re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from cascade.contract.answer import Answer
from cascade.contract.outputs import Generation
from cascade.observability.caller import caller_attributes
from cascade.observability.metrics import NO_TASK, TierMetrics
from cascade.observability.outcome import RequestOutcome
from cascade.observability.trace_context import (
    current_traceparent,
    drain_span,
    fresh_trace_context,
    outgoing_trace_context,
    sdk_tracer,
    span_link_from_traceparent,
    traceparent_of,
)
from cascade.observability.tracing import (
    HONOURED_ENV,
    SAMPLING_REASON,
    CascadeRootSampler,
    CascadeSampler,
    Tracing,
    TracingConfig,
    build_tracer_provider,
    fastapi_options,
    instrument_httpx,
    setup_tracing,
    upstream_attempt,
)

log = logging.getLogger("cascade.observability.telemetry")
access_log = logging.getLogger("cascade.access")

QUIET_PATHS: Final[frozenset[str]] = frozenset({"/metrics", "/healthz", "/readyz"})
"""Scrapes and probes: no span, no access line, no metrics (they would drown the real ones)."""

__all__ = [
    "HONOURED_ENV",
    "RequestTelemetryMiddleware",
    "RequestTrace",
    "TierTelemetry",
    "Tracing",
    "TracingConfig",
    "build_tracer_provider",
    "current_traceparent",
    "drain_span",
    "fastapi_options",
    "instrument_httpx",
    "outgoing_trace_context",
    "sdk_tracer",
    "setup_tracing",
    "span_link_from_traceparent",
    "upstream_attempt",
]


# -- per request ----------------------------------------------------------------------------------


class RequestRecord:
    """What a request turned into, filled by the node and read when the response is done."""

    __slots__ = ("answered_by", "audit", "decision", "parent", "request_id", "scope", "span",
                 "started_ns", "status", "task", "trace_id", "tracer")

    def __init__(self, scope: Any, tracer: trace.Tracer | None) -> None:
        self.scope = scope
        self.tracer = tracer
        self.parent: otel_context.Context | None = None
        """The caller's trace context (from the request headers)."""
        self.started_ns = 0
        self.span: trace.Span | None = None
        """The SERVER span, once started (see :meth:`TierTelemetry.record_local`)."""
        self.task: str | None = None
        self.decision: str | None = None
        self.status: str | None = None
        self.answered_by: str | None = None
        self.trace_id: str | None = None
        self.request_id: str | None = None
        self.audit = False  # a shadow audit: not traffic (request metrics skip it)


_RECORD: ContextVar[RequestRecord | None] = ContextVar("cascade_request_record", default=None)
_LOGGED_FIELDS: Final[tuple[str, ...]] = (
    "task", "decision", "status", "answered_by", "request_id")
_TRACE_HEADERS: Final[frozenset[bytes]] = frozenset({b"traceparent", b"tracestate", b"baggage"})


_CUSTOM_PROPAGATORS: Final[bool] = bool(os.environ.get("OTEL_PROPAGATORS"))  # read once


def _extract(headers: list[tuple[bytes, bytes]]) -> otel_context.Context:
    """The caller's trace context from the request headers (via the configured propagators)."""
    if _CUSTOM_PROPAGATORS:  # b3, jaeger...: let them see every header
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    else:  # the default W3C propagators read only these; skip decoding the rest
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                   if k in _TRACE_HEADERS}
        if not carrier:
            return otel_context.Context()
    return propagate.extract(carrier)


class RequestTrace:
    """A request's trace ids as the node needs them: what to report and what to send upstream."""

    __slots__ = ("span", "trace_id", "traceparent")

    def __init__(self, trace_id: str, traceparent: str, span: trace.Span | None = None) -> None:
        self.trace_id = trace_id
        self.traceparent = traceparent
        """``traceparent`` for the upstream (httpx instrumentation replaces it per attempt)."""
        self.span = span
        """The SERVER span to make current around the escalation (None: nothing to switch)."""

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the SERVER span current, so CLIENT and PRODUCER spans become its children."""
        if self.span is None:
            yield
            return
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)


def _http_attributes(scope: Any) -> dict[str, Any]:
    return {"http.request.method": scope["method"], "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"), **caller_attributes(scope),
            "network.protocol.version": scope.get("http_version", "1.1")}


def gen_ai_attributes(model: str, generation: Generation | None) -> dict[str, AttributeValue]:
    """OpenTelemetry GenAI semantic-convention attributes of one local generation (none for a
    classifier)."""
    if generation is None:
        return {}
    return {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": generation.prompt_tokens,
        "gen_ai.usage.output_tokens": generation.completion_tokens,
        "gen_ai.response.finish_reasons": (generation.finish_reason,),
    }


class TierTelemetry:
    """The spans and metrics a :class:`~cascade.tier.node.Node` records; one per node."""

    def __init__(self, tier: str, *, node: Any = None, metrics: TierMetrics | None = None) -> None:
        self.tier = tier
        self.metrics = metrics or TierMetrics(tier)
        if node is not None:
            self.metrics.bind_node(node)

    def record_local(self, *, task: str, model: str, started_ns: int, inferred_ns: int,
                     gated_ns: int, confidence: float, decision: str, signal: str,
                     incoming: str | None = None,
                     generation: Generation | None = None, audit: bool = False) -> RequestTrace:
        """The local model ran (``started_ns``..``inferred_ns``) and the gate decided (..``gated_ns``).

        Starts the request's SERVER span now that the decision is known (the sampler keeps every
        escalation, see :class:`~cascade.observability.tracing.CascadeRootSampler`) and returns the trace ids
        for the answer and the upstream. Timestamps are ``time.time_ns()``; the inference and gate
        spans are made after the fact with those times, and only when the request is sampled.
        ``incoming`` is the caller's ``traceparent``, kept when tracing is off. ``generation``:
        a generative model's output (token metrics; GenAI attributes on the inference span);
        ``audit``: a lower tier's shadow audit."""
        confidence = float(confidence)  # numpy scalars are not valid span attribute values
        if audit:  # not traffic: counted apart
            self.metrics.count_audit_served(task)
        else:
            self._count_local(task, model, (inferred_ns - started_ns) / 1e9, decision, generation)
        record = _RECORD.get()
        if record is not None:
            record.task, record.decision, record.audit = task, decision, audit
            tracer = record.tracer
        else:
            tracer = sdk_tracer()
        if tracer is None:
            return RequestTrace(*outgoing_trace_context(incoming))
        routine_root = False
        if record is not None and record.span is None:
            sampler = getattr(tracer, "sampler", None)
            if (not record.parent and isinstance(sampler, CascadeSampler)
                    and decision not in CascadeRootSampler.ALWAYS_DECISIONS):
                # A new trace of a routine answer: draw the sample before touching the SDK, so
                # the ~99% not kept cost no span at all (not even a non-recording one).
                if not sampler.root.keep_routine():
                    record.span = trace.INVALID_SPAN
                    return RequestTrace(*fresh_trace_context(sampled=False))
                routine_root = True
        attrs: dict[str, AttributeValue] = {
            "cascade.tier": self.tier, "cascade.task": task, "cascade.model": model}
        gate_attrs: dict[str, AttributeValue] = {
            **attrs, "cascade.confidence": confidence, "cascade.decision": decision}
        if record is not None and record.span is None:
            server_attrs = {**_http_attributes(record.scope), **gate_attrs}
            if routine_root:
                server_attrs[SAMPLING_REASON] = "routine"
            span = record.span = tracer.start_span(
                record.scope["method"], context=record.parent, kind=SpanKind.SERVER,
                start_time=record.started_ns, attributes=server_attrs)
        else:  # called outside the middleware: the current span, if any, is the request's
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attributes(gate_attrs)
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return RequestTrace(*outgoing_trace_context(incoming))
        if span.is_recording():
            parent = trace.set_span_in_context(span)
            tracer.start_span("cascade.inference", parent, start_time=started_ns,
                              attributes={**attrs, **gen_ai_attributes(model, generation)},
                              ).end(inferred_ns)
            tracer.start_span("cascade.gate", parent, start_time=inferred_ns,
                              attributes={**gate_attrs, "cascade.signal": signal}).end(gated_ns)
        return RequestTrace(f"{ctx.trace_id:032x}", traceparent_of(ctx),
                            span if record is not None else None)

    def _count_local(self, task: str, model: str, seconds: float, decision: str,
                     generation: Generation | None) -> None:
        self.metrics.observe_inference(task, model, seconds)
        if generation is not None:
            ttft_s = None if generation.ttft_ms is None else generation.ttft_ms / 1e3
            self.metrics.observe_generation(
                task, model, ttft_s=ttft_s, total_s=seconds,
                input_tokens=generation.prompt_tokens, output_tokens=generation.completion_tokens)
        self.metrics.count_decision(task, decision)

    def record_outcome(self, outcome: RequestOutcome) -> None:
        """The node's answer is ready (an outcome observer)."""
        self.record_answer(outcome.answer, escalated=outcome.decision == "escalate")

    def record_answer(self, answer: Answer, *, escalated: bool) -> None:
        """Answer and escalation counters, and the answer's span attributes."""
        task, status, answered_by = answer.task, answer.status, answer.answered_by
        self.metrics.count_answer(task, status)
        if escalated:
            if answered_by != self.tier:
                kind = "upstream"
            elif (answer.escalation or {}).get("state") == "not_queued":
                kind = "not_queued"
            else:
                kind = "queued"
            self.metrics.count_escalation(task, kind)
        record = _RECORD.get()
        if record is not None:
            record.status, record.answered_by = status, answered_by
            record.trace_id, record.request_id = answer.trace_id, answer.id
            span = record.span or trace.INVALID_SPAN
        else:
            span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"cascade.status": status, "cascade.answered_by": answered_by,
                                 "cascade.request_id": str(answer.id)})

    @contextmanager
    def enqueue_span(self, task: str, request_id: str) -> Iterator[str | None]:
        """PRODUCER span around handing an escalation to the outbox; yields its traceparent
        (store it with the row: the drain span links to it)."""
        tracer = sdk_tracer()
        if tracer is None or not trace.get_current_span().is_recording():
            yield current_traceparent()
            return
        with tracer.start_as_current_span(
            "cascade.queue.enqueue", kind=SpanKind.PRODUCER,
            attributes={"cascade.tier": self.tier, "cascade.task": task,
                        "cascade.request_id": request_id, "messaging.operation.type": "send"},
        ):
            yield current_traceparent()


UNMATCHED: Final[str] = "unmatched"
"""``route`` label of requests that match no route (404s): bounded cardinality."""


def _route_of(scope: Any) -> str:
    """The route template the request matched (``/v1/results/{request_id}``), even when a
    middleware answered before routing (413)."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED))
    from starlette.routing import Match

    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        if candidate.matches(scope)[0] is Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
    return UNMATCHED


class RequestTelemetryMiddleware:
    """Pure ASGI: the SERVER span, request metrics and the access line of every request.

    ``telemetry`` returns the node's :class:`TierTelemetry` once the app has started.
    """

    def __init__(self, app: Any, *, telemetry: Callable[[], TierTelemetry | None]) -> None:
        self.app = app
        self._get_telemetry = telemetry

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        tracer = sdk_tracer()
        record = RequestRecord(scope, tracer)
        if tracer is not None:  # the span itself starts later (see the module docstring)
            record.started_ns = time.time_ns()
            record.parent = _extract(scope["headers"])
        record_token = _RECORD.set(record)
        status_code = 500  # if the app raises before responding, the server answers 500
        error: BaseException | None = None

        async def send_observed(message: Any) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except BaseException as exc:
            status_code, error = 500, exc
            raise
        finally:
            self._finish(scope, record, status_code, time.perf_counter() - started, error)
            _RECORD.reset(record_token)

    def _finish(self, scope: Any, record: RequestRecord, code: int, seconds: float,
                error: BaseException | None) -> None:
        route = _route_of(scope)
        method = scope["method"]
        span = record.span
        if span is None and record.tracer is not None:  # the request never reached the gate
            attributes = {**_http_attributes(scope), "http.response.status_code": code}
            if route != UNMATCHED:
                attributes["http.route"] = route
            span = record.tracer.start_span(
                f"{method} {route}" if route != UNMATCHED else method, context=record.parent,
                kind=SpanKind.SERVER, start_time=record.started_ns, attributes=attributes)
        elif span is not None and span.is_recording():
            if route != UNMATCHED:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", code)
        if span is not None:
            if span.is_recording():
                if error is not None:
                    span.record_exception(error)
                if code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
        telemetry = self._get_telemetry()
        if telemetry is not None:
            telemetry.metrics.count_response(route, code)
            if route == "/v1/infer" and not record.audit:
                task = record.task or NO_TASK
                telemetry.metrics.observe_request(task, seconds)
                if record.decision == "escalate" and record.status is None:
                    telemetry.metrics.count_escalation(task, "refused")
        if access_log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "method": method, "route": route, "code": code,
                "duration_ms": round(seconds * 1000, 3),
            }
            for name in _LOGGED_FIELDS:
                value = getattr(record, name)
                if value is not None:
                    fields[name] = value
            fields.update(caller_attributes(scope))  # certificate subject, key *name*
            ctx = span.get_span_context() if span is not None else None
            if ctx is not None and ctx.is_valid:
                fields["trace_id"], fields["span_id"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
            elif record.trace_id is not None:
                fields["trace_id"] = record.trace_id
            # makeRecord + handle: Logger.info() would also walk the stack to find the caller.
            access_log.handle(access_log.makeRecord(
                access_log.name, logging.INFO, __file__, 0, f"{method} {route} {code}", (), None,
                extra={"fields": fields}))
