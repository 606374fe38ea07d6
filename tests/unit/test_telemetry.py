"""Tracing: configuration from OTEL_*, spans per tier (real SDK spans, in memory), propagation,
CLIENT spans per upstream attempt, queue links, and exporters that never fail a request."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from cascade.contract.deadline import Deadline
from cascade.contract.escalation import PendingEscalation
from cascade.errors import ConfigError
from cascade.http.app import create_app
from cascade.observability.export import GuardedSpanExporter, export_stats, quiet_sdk_loggers
from cascade.observability.telemetry import (
    TracingConfig,
    build_tracer_provider,
    current_traceparent,
    drain_span,
    outgoing_trace_context,
    span_link_from_traceparent,
    upstream_attempt,
)
from cascade.upstream.breaker import CircuitBreaker
from cascade.upstream.client import UpstreamClient
from tests.unit.otel_fixtures import DOC, by_name, make_node, serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(app: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    async with serving(app) as client:
        return await client.post("/v1/infer", json=body, headers=headers or {})


class RecordingQueue:
    """An escalation queue that keeps what it is given (the outbox seam)."""

    def __init__(self) -> None:
        self.items: list[PendingEscalation] = []

    async def enqueue(self, item: PendingEscalation) -> dict[str, Any]:
        self.items.append(item)
        return {"state": "queued"}

    def depth(self) -> int:
        return len(self.items)


# -- configuration ---------------------------------------------------------------------------


def test_no_exporter_configured_means_tracing_is_off() -> None:
    config = TracingConfig.from_env("endpoint", environ={})
    assert config.enabled and config.exporters == () and not config.active


def test_an_otlp_endpoint_turns_on_otlp_over_http_by_default() -> None:
    config = TracingConfig.from_env(
        "endpoint", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert config.active and config.exporters == ("otlp",)
    assert config.otlp_protocol == "http/protobuf"
    assert config.otlp_endpoint == "http://collector:4318"


def test_grpc_protocol_and_explicit_exporter_list() -> None:
    config = TracingConfig.from_env("cloud", environ={
        "OTEL_TRACES_EXPORTER": "otlp, console", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    assert config.exporters == ("otlp", "console") and config.otlp_protocol == "grpc"


def test_trace_dir_gives_one_file_per_tier(tmp_path: Path) -> None:
    config = TracingConfig.from_env("edge-node", trace_dir=tmp_path, environ={})
    assert config.active and config.trace_file == tmp_path / "edge-node.jsonl"


@pytest.mark.parametrize(("raw", "cap"), [(None, 10.0), ("none", None), (" None ", None),
                                          ("2.5", 2.5), ("0", 0.0)])
def test_routine_trace_cap_from_env(raw: str | None, cap: float | None) -> None:
    env = {} if raw is None else {"CASCADE_TRACE_ROUTINE_PER_S": raw}
    assert TracingConfig.from_env("endpoint", environ=env).routine_per_s == cap


def test_sdk_disabled_wins(tmp_path: Path) -> None:
    config = TracingConfig.from_env("endpoint", trace_dir=tmp_path, environ={
        "OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not config.enabled and not config.active


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"},
     "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'; allowed: console, none, otlp"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not supported; allowed: grpc, http/protobuf"),
    *[({"CASCADE_TRACE_ROUTINE_PER_S": bad},
       (f"CASCADE_TRACE_ROUTINE_PER_S: {bad!r} is not a number of traces per second >= 0, "
        "or 'none' (the cap on routine traces per second)")) for bad in ("-1", "lots", "inf")],
])
def test_bad_otel_values_are_config_errors_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        TracingConfig.from_env("endpoint", environ=env)
    assert err.value.message == named


def test_provider_names_the_service_after_the_tier_and_honours_otel_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TracingConfig.from_env("edge-server", trace_dir=tmp_path, environ={})
    provider = build_tracer_provider(config, environ={})
    assert provider.resource.attributes["service.name"] == "cascade-edge-server"
    assert provider.resource.attributes["cascade.tier"] == "edge-server"
    assert provider.sampler.get_description() == (
        "ParentBased{root:CascadeRootSampler{ratio=0.01,routine_per_s=10},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}")
    provider.shutdown()

    monkeypatch.setenv("OTEL_SERVICE_NAME", "field-site-7")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider(TracingConfig.from_env("edge-server", trace_dir=tmp_path))
    assert provider.resource.attributes["service.name"] == "field-site-7"
    assert provider.sampler.get_description() == "TraceIdRatioBased{0.25}"
    provider.shutdown()


# -- spans of one tier -------------------------------------------------------------------------


async def test_locally_answered_request_makes_server_inference_and_gate_spans(
    tmp_path: Path, spans: Any
) -> None:
    response = await call(create_app(make_node(tmp_path)), DOC)
    assert response.status_code == 200
    (server,) = by_name(spans, "POST /v1/infer")
    (inference,) = by_name(spans, "cascade.inference")
    (gate,) = by_name(spans, "cascade.gate")
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert inference.parent.span_id == server.context.span_id
    assert gate.parent.span_id == server.context.span_id
    assert dict(inference.attributes) == {"cascade.tier": "endpoint", "cascade.task": "documents",
                                          "cascade.model": "documents/fixed"}
    assert gate.attributes["cascade.decision"] == "answer"
    assert gate.attributes["cascade.confidence"] == pytest.approx(0.97, abs=1e-6)
    assert gate.attributes["cascade.signal"] == "max_prob"
    assert inference.end_time <= gate.start_time <= gate.end_time <= server.end_time
    # The decision is visible on the SERVER span itself, with the outcome and the route.
    a = server.attributes
    assert (a["cascade.tier"], a["cascade.task"], a["cascade.decision"], a["cascade.status"],
            a["cascade.answered_by"], a["http.route"], a["http.response.status_code"]) == (
        "endpoint", "documents", "answer", "final", "endpoint", "/v1/infer", 200)
    data = response.json()
    assert data["trace_id"] == format(server.context.trace_id, "032x")
    assert a["cascade.request_id"] == data["id"]


async def test_server_span_is_backdated_to_the_arrival_of_the_request(
    tmp_path: Path, spans: Any
) -> None:
    """The SERVER span starts once the gate has decided, but covers the whole request."""
    import time

    before = time.time_ns()
    await call(create_app(make_node(tmp_path)), DOC)
    (server,) = by_name(spans, "POST /v1/infer")
    (inference,) = by_name(spans, "cascade.inference")
    assert before <= server.start_time <= inference.start_time


# -- sampling: every escalation, a share of the routine ---------------------------------------


@pytest.fixture
def sampled_at(spans: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Put the tiers' tracer behind the default ``cascade`` sampler with a given ratio."""
    from cascade.observability.telemetry import sdk_tracer
    from cascade.observability.tracing import cascade_sampler

    def configure(ratio: float) -> Any:
        monkeypatch.setattr(sdk_tracer(), "sampler", cascade_sampler(ratio, per_second=None))
        return spans

    return configure


@pytest.mark.parametrize(("decision", "kind", "code", "kept"), [
    ("answer", SpanKind.SERVER, None, False), ("escalate", SpanKind.SERVER, None, True),
    ("unknown", SpanKind.SERVER, None, True), (None, SpanKind.SERVER, 404, False),
    (None, SpanKind.SERVER, 503, True), (None, SpanKind.CONSUMER, None, True),
    (None, SpanKind.CLIENT, None, False),
])
def test_cascade_sampler_keeps_what_sres_chase_at_ratio_zero(
    decision: str | None, kind: SpanKind, code: int | None, kept: bool
) -> None:
    from cascade.observability.tracing import cascade_sampler

    attributes: dict[str, Any] = {}
    if decision:
        attributes["cascade.decision"] = decision
    if code:
        attributes["http.response.status_code"] = code
    result = cascade_sampler(0.0).should_sample(None, 0x1234, "span", kind, attributes)
    assert result.decision.is_sampled() is kept


def test_cascade_sampler_follows_the_callers_decision_and_its_ratio() -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from cascade.observability.tracing import cascade_sampler

    def parent(flags: int) -> Any:
        ctx = SpanContext(int(TRACE_ID, 16), int(PARENT_SPAN, 16), True, TraceFlags(flags))
        return trace.set_span_in_context(NonRecordingSpan(ctx))

    escalate = {"cascade.decision": "escalate"}
    assert cascade_sampler(0.0).should_sample(parent(1), 1, "s", SpanKind.SERVER).decision.is_sampled()
    # A caller that chose not to trace is obeyed, even for an escalation.
    assert not cascade_sampler(1.0).should_sample(
        parent(0), 1, "s", SpanKind.SERVER, escalate).decision.is_sampled()
    # Routine answers: trace-id ratio (the low 64 bits against the bound), so about that share.
    sampler = cascade_sampler(0.25, per_second=None)
    kept = sum(sampler.should_sample(None, tid * 0x9E3779B97F4A7C15 % 2**128, "s",
                                     SpanKind.SERVER).decision.is_sampled()
               for tid in range(1, 4001))
    assert 800 < kept < 1200


def test_routine_traces_are_capped_per_second_and_the_cap_refills(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cascade.observability import tracing

    clock = FakeClock()
    monkeypatch.setattr(tracing.time, "monotonic", clock)
    root = tracing.cascade_sampler(1.0, per_second=5).root
    # A burst of at most one second's worth, whichever path draws the sample.
    assert sum(root.keep_routine() for _ in range(50)) == 5
    assert not root.should_sample(None, 7, "s", SpanKind.SERVER).decision.is_sampled()
    clock.now += 0.4  # two tokens back
    assert sum(root.should_sample(None, t, "s", SpanKind.SERVER).decision.is_sampled()
               for t in range(1, 50)) == 2
    clock.now += 100.0  # refills up to the burst, not beyond
    assert sum(root.keep_routine() for _ in range(50)) == 5
    # What an SRE chases is never capped.
    for _ in range(20):
        assert root.should_sample(None, 9, "s", SpanKind.SERVER,
                                  {"cascade.decision": "escalate"}).decision.is_sampled()
        assert root.should_sample(None, 9, "s", SpanKind.CONSUMER).decision.is_sampled()


def test_a_zero_cap_keeps_no_routine_trace_and_a_slow_cap_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cascade.observability import tracing

    clock = FakeClock()
    monkeypatch.setattr(tracing.time, "monotonic", clock)
    assert not any(tracing.cascade_sampler(1.0, per_second=0).root.keep_routine()
                   for _ in range(100))
    slow = tracing.cascade_sampler(1.0, per_second=0.5).root
    assert [slow.keep_routine() for _ in range(3)] == [True, False, False]
    clock.now += 2.0
    assert [slow.keep_routine() for _ in range(3)] == [True, False, False]


async def test_unsampled_local_answer_makes_no_span_but_keeps_a_trace_id(
    tmp_path: Path, sampled_at: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spans = sampled_at(0.0)
    with caplog.at_level(logging.INFO, logger="cascade.access"):
        response = await call(create_app(make_node(tmp_path)), DOC)
    assert response.status_code == 200 and response.json()["status"] == "final"
    assert spans.get_finished_spans() == ()
    trace_id = response.json()["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
    # The access line still names the trace, so logs and answers can be matched up.
    (line,) = [r for r in caplog.records if r.name == "cascade.access"]
    assert line.fields["trace_id"] == trace_id


async def test_at_ratio_one_every_routine_answer_is_kept_and_says_why(
    tmp_path: Path, sampled_at: Any
) -> None:
    spans = sampled_at(1.0)
    app = create_app(make_node(tmp_path))
    async with serving(app) as client:
        answers = [(await client.post("/v1/infer", json=DOC)).json() for _ in range(5)]
    servers = by_name(spans, "POST /v1/infer")
    assert len(servers) == 5 and len(by_name(spans, "cascade.gate")) == 5
    assert {s.attributes["cascade.sampling.reason"] for s in servers} == {"routine"}
    assert sorted(a["trace_id"] for a in answers) == sorted(
        format(s.context.trace_id, "032x") for s in servers)


async def test_the_cap_keeps_the_first_routine_traces_of_a_second_and_counts_the_rest(
    tmp_path: Path, spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cascade.observability import tracing
    from cascade.observability.telemetry import sdk_tracer

    monkeypatch.setattr(tracing.time, "monotonic", FakeClock())  # all within one second
    monkeypatch.setattr(sdk_tracer(), "sampler", tracing.cascade_sampler(1.0, per_second=2))
    app = create_app(make_node(tmp_path))
    async with serving(app) as client:
        answers = [await client.post("/v1/infer", json=DOC) for _ in range(5)]
        scrape = (await client.get("/metrics")).text
    assert [a.status_code for a in answers] == [200] * 5  # capped answers are answered alike
    assert len(by_name(spans, "POST /v1/infer")) == 2
    counted = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(scrape)
               if f.name == "cascade_telemetry_routine_traces" for s in f.samples
               if s.name.endswith("_total")}
    assert counted == {"kept": 2.0, "capped": 3.0}


async def test_escalation_is_traced_even_at_ratio_zero_with_the_answers_trace_id(
    tmp_path: Path, sampled_at: Any
) -> None:
    spans = sampled_at(0.0)
    upstream = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=2,
                              backoff_initial_ms=1, backoff_max_ms=2,
                              breaker=CircuitBreaker(failure_threshold=10),
                              on_attempt=upstream_attempt)
    node = make_node(tmp_path, confident=False, upstream=upstream, escalations=RecordingQueue())
    response = await call(create_app(node), DOC)
    assert response.json()["status"] == "provisional"
    (server,) = by_name(spans, "POST /v1/infer")
    assert format(server.context.trace_id, "032x") == response.json()["trace_id"]
    assert server.attributes["cascade.decision"] == "escalate"
    assert server.attributes["cascade.sampling.reason"] == "escalate"
    names = sorted(s.name for s in spans.get_finished_spans() if s.parent is not None)
    assert names == ["POST", "POST", "cascade.gate", "cascade.inference", "cascade.queue.enqueue"]
    assert all(s.context.trace_id == server.context.trace_id for s in spans.get_finished_spans())


async def test_incoming_traceparent_continues_the_callers_trace(tmp_path: Path, spans: Any) -> None:
    response = await call(create_app(make_node(tmp_path)), DOC, {"traceparent": TRACEPARENT})
    (server,) = by_name(spans, "POST /v1/infer")
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_SPAN and server.parent.is_remote
    assert response.json()["trace_id"] == TRACE_ID


async def test_failed_escalation_makes_client_spans_per_attempt_and_an_enqueue_span(
    tmp_path: Path, spans: Any
) -> None:
    upstream = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=3,
                              backoff_initial_ms=1, backoff_max_ms=2,
                              breaker=CircuitBreaker(failure_threshold=10),
                              on_attempt=upstream_attempt)
    queue = RecordingQueue()
    node = make_node(tmp_path, confident=False, upstream=upstream, escalations=queue)
    response = await call(create_app(node), DOC)
    assert response.status_code == 200 and response.json()["status"] == "provisional"

    (server,) = by_name(spans, "POST /v1/infer")
    clients = sorted((s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT),
                     key=lambda s: s.start_time)
    assert [c.attributes["http.request.resend_count"] for c in clients] == [0, 1, 2]
    assert all(c.parent.span_id == server.context.span_id for c in clients)
    assert all(c.status.status_code is StatusCode.ERROR for c in clients)
    (enqueue,) = by_name(spans, "cascade.queue.enqueue")
    assert enqueue.kind is SpanKind.PRODUCER and enqueue.parent.span_id == server.context.span_id
    assert server.attributes["cascade.decision"] == "escalate"
    assert server.attributes["cascade.status"] == "provisional"
    # The queued row carries the enqueue span's context: the drain span will link to it.
    (item,) = queue.items
    ctx = enqueue.context
    assert item.traceparent == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


async def test_each_attempt_sends_the_traceparent_of_its_own_client_span(spans: Any) -> None:
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = {k.lower(): v for k, v in
                   (line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)}
        await reader.readexactly(int(headers["content-length"]))
        seen.append(headers["traceparent"])
        status, body = (b"503 Service Unavailable", b"{}") if len(seen) == 1 else (b"200 OK", b'{"id": "k", "task": "t", "label": "x"}')
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tracer = trace.get_tracer("test")
    async with server, UpstreamClient(f"http://127.0.0.1:{port}", backoff_initial_ms=1,
                                      backoff_max_ms=2, on_attempt=upstream_attempt) as client:
        with tracer.start_as_current_span("caller"):
            sent = current_traceparent()
            answer = await client.escalate({"task": "t"}, deadline=Deadline.from_ms(2000),
                                           hop_count=1, idempotency_key="k",
                                           headers={"traceparent": sent})
    assert (answer.id, answer.task, answer.label) == ("k", "t", "x")
    clients = sorted((s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT),
                     key=lambda s: s.start_time)
    assert [c.attributes["http.request.resend_count"] for c in clients] == [0, 1]
    assert [c.attributes["http.response.status_code"] for c in clients] == [503, 200]
    assert seen == [f"00-{c.context.trace_id:032x}-{c.context.span_id:016x}-"
                    f"{int(c.context.trace_flags):02x}" for c in clients]


def test_drain_span_starts_a_new_trace_linked_to_the_queued_request(spans: Any) -> None:
    with trace.get_tracer("test").start_as_current_span("ambient"), drain_span(
            "endpoint", traceparent=TRACEPARENT, request_id="r1", task="vision", attempt=2):
        pass
    (drain,) = by_name(spans, "cascade.queue.drain")
    assert drain.kind is SpanKind.CONSUMER and drain.parent is None
    assert format(drain.context.trace_id, "032x") != TRACE_ID
    (link,) = drain.links
    assert (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) == (
        TRACE_ID, PARENT_SPAN)
    assert drain.attributes["cascade.queue.attempt"] == 2


@pytest.mark.parametrize("bad", [None, "", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"])
def test_unusable_traceparent_gives_no_link(bad: str | None) -> None:
    assert span_link_from_traceparent(bad) is None


def test_with_tracing_off_the_callers_trace_id_still_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    trace_id, upstream = outgoing_trace_context(TRACEPARENT)
    assert trace_id == TRACE_ID and upstream.startswith(f"00-{TRACE_ID}-") and upstream.endswith("-01")
    assert upstream.split("-")[2] != PARENT_SPAN
    fresh, tp = outgoing_trace_context(None)
    assert len(fresh) == 32 and tp.split("-")[1] == fresh


async def test_scrapes_and_probes_make_no_spans(tmp_path: Path, spans: Any) -> None:
    app = create_app(make_node(tmp_path))
    async with serving(app) as c:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert (await c.get(path)).status_code == 200
        assert (await c.get("/nope")).status_code == 404
    (only,) = spans.get_finished_spans()
    assert only.name == "GET" and only.attributes["http.response.status_code"] == 404
    assert "http.route" not in only.attributes


# -- exporters never fail the program ------------------------------------------------------------


class FlakyExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0
        self.fail = True

    def export(self, spans: Any) -> SpanExportResult:
        self.calls += 1
        if self.fail:
            raise ConnectionError("collector:4318 refused")
        return SpanExportResult.SUCCESS


class FakeClock:
    """A clock under the test's control (``time.monotonic`` or an injected ``clock``)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_guarded_exporter_counts_logs_once_sheds_while_down_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner, clock = FlakyExporter(), FakeClock()
    guarded = GuardedSpanExporter(inner, "otlp-test", destination="collector:4318",
                                  cooldown_s=1.0, clock=clock)
    batch: list[Any] = [object(), object()]
    with caplog.at_level(logging.INFO, logger="cascade.observability.telemetry"):
        assert guarded.export(batch) is SpanExportResult.FAILURE  # raises inside: swallowed
        assert guarded.export(batch) is SpanExportResult.FAILURE  # within cool-down: not tried
        clock.now += 1.5
        assert guarded.export(batch) is SpanExportResult.FAILURE  # tried again, fails again
        clock.now += 1.5  # cool-down doubled to 2 s: still shedding
        assert guarded.export(batch) is SpanExportResult.FAILURE
        clock.now += 1.0
        inner.fail = False
        assert guarded.export(batch) is SpanExportResult.SUCCESS
    assert inner.calls == 3
    s = guarded.stats
    assert (s.failed_batches, s.failed_spans, s.shed_spans, s.exported_spans) == (2, 4, 4, 2)
    messages = [r.getMessage() for r in caplog.records if r.name == "cascade.observability.telemetry"]
    assert len(messages) == 2
    assert messages[0].startswith("trace export to collector:4318 failing (ConnectionError: "
                                  "collector:4318 refused)")
    assert messages[1] == "trace export to collector:4318 recovered after 2 failed batch(es)"
    assert s in export_stats()[0]


def test_unreachable_collector_is_tried_off_the_request_path_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Real OTLP/HTTP exporter, real batch processor, nothing listening on the port: ending a
    span (what a request does) never calls the exporter; its thread does, and fails quietly."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")
    port = closed_port()
    config = TracingConfig.from_env("endpoint", environ={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_TRACES_SAMPLER_ARG": "1",
        "CASCADE_TRACE_ROUTINE_PER_S": "none"})
    quiet_sdk_loggers()
    provider = build_tracer_provider(config, environ={})
    tracer = provider.get_tracer("test")
    (processor,) = provider._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor.span_exporter
    export, callers = exporter.export, []

    def recording_export(batch: Any) -> SpanExportResult:
        callers.append(threading.current_thread())
        return export(batch)

    exporter.export = recording_export  # the instance the batch processor calls
    with caplog.at_level(logging.DEBUG):
        for _ in range(200):  # a request's worth of span work, 200 times
            with tracer.start_as_current_span("request"):
                pass
        during_requests = list(callers)
        provider.force_flush()
        provider.force_flush()
    assert threading.current_thread() not in during_requests
    assert callers  # it was tried (by the worker, or by the flushes above)
    stats = exporter.stats
    assert stats.failed_batches >= 1 and stats.failed_spans + stats.shed_spans == 200
    assert stats.exported_spans == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "cascade.observability.telemetry"
    assert f"127.0.0.1:{port}" in warnings[0].getMessage()
    provider.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_reaches_a_real_receiver_over_both_protocols(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter chosen from OTEL_EXPORTER_OTLP_PROTOCOL delivers to a real OTLP server."""
    import threading
    from concurrent import futures
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc

    names: list[str] = []

    def keep(request: pb.ExportTraceServiceRequest) -> None:
        names.extend(s.name for rs in request.resource_spans for ss in rs.scope_spans
                     for s in ss.spans)

    if protocol == "grpc":
        class Service(pb_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                keep(request)
                return pb.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_TraceServiceServicer_to_server(Service(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        endpoint, stop = f"http://127.0.0.1:{port}", lambda: server.stop(0)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    else:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                keep(pb.ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{http.server_address[1]}"
        stop = lambda: (http.shutdown(), http.server_close())
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_TRACES_SAMPLER_ARG": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        provider = build_tracer_provider(TracingConfig.from_env("cloud", environ=env))
        with provider.get_tracer("test").start_as_current_span(f"over-{protocol}"):
            pass
        provider.force_flush()
        provider.shutdown()
    finally:
        stop()
    assert names == [f"over-{protocol}"]
