"""The JSON-lines trace file (written by real SDK spans) and ``cascade traces`` reading it."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from typer.testing import CliRunner

from cascade.cli import app
from cascade.observability.export import JsonLinesSpanExporter, TraceFileError, read_span_records
from cascade.observability.telemetry import span_link_from_traceparent

W3C = TraceContextTextMapPropagator()


def tier_tracer(trace_dir: Path, tier: str, max_bytes: int = 1 << 20) -> trace.Tracer:
    provider = TracerProvider(resource=Resource.create({"service.name": f"cascade-{tier}",
                                                        "cascade.tier": tier}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesSpanExporter(trace_dir / f"{tier}.jsonl", max_bytes=max_bytes)))
    return provider.get_tracer("test")


_CLOCK_NS = itertools.count(1_767_225_600 * 10**9, 1_000)
"""Span times of these tests: 1 µs per tick from a fixed instant, so a trace's duration is what
the test says it is, never what the machine happened to take."""


@contextmanager
def timed_span(tracer: trace.Tracer, name: str, *, extra_ns: int = 0,
               **kw: Any) -> Iterator[trace.Span]:
    """A current span on the test clock, ``extra_ns`` longer than its children make it."""
    with tracer.start_as_current_span(name, start_time=next(_CLOCK_NS), end_on_exit=False,
                                      **kw) as span:
        yield span
        span.end(end_time=next(_CLOCK_NS) + extra_ns)
    if extra_ns:
        for _ in range(extra_ns // 1_000 + 1):  # later spans start after this one ended
            next(_CLOCK_NS)


def request_through(trace_dir: Path, decision_at_endpoint: str, upstream_ns: int = 0) -> str:
    """One request: endpoint SERVER (+gate) and, if it escalates, a CLIENT span to the cloud's
    SERVER span (lasting ``upstream_ns`` more), each tier writing its own file. Returns the
    trace id."""
    endpoint, cloud = tier_tracer(trace_dir, "endpoint"), tier_tracer(trace_dir, "cloud")
    with timed_span(endpoint, "POST /v1/infer", kind=SpanKind.SERVER) as server:
        server.set_attributes({"cascade.decision": decision_at_endpoint, "cascade.confidence": 0.41,
                               "cascade.status": "final", "http.response.status_code": 200,
                               "cascade.answered_by": "cloud" if decision_at_endpoint == "escalate"
                               else "endpoint"})
        with timed_span(endpoint, "cascade.gate") as gate:
            gate.set_attributes({"cascade.decision": decision_at_endpoint, "cascade.confidence": 0.41})
        if decision_at_endpoint == "escalate":
            with timed_span(endpoint, "POST", kind=SpanKind.CLIENT) as client:
                client.set_attributes({"http.request.resend_count": 0, "http.response.status_code": 200})
                carrier: dict[str, str] = {}
                W3C.inject(carrier)
                with timed_span(cloud, "POST /v1/infer", context=W3C.extract(carrier),
                                kind=SpanKind.SERVER, extra_ns=upstream_ns) as up:
                    up.set_attributes({"cascade.decision": "answer", "cascade.confidence": 0.99})
        return format(server.get_span_context().trace_id, "032x")


def test_spans_round_trip_through_the_file(tmp_path: Path) -> None:
    trace_id = request_through(tmp_path, "escalate")
    records, problems = read_span_records(tmp_path)
    assert problems == []
    assert {r["trace_id"] for r in records} == {trace_id}
    by_tier_name = {(r["tier"], r["name"]): r for r in records}
    client = by_tier_name[("endpoint", "POST")]
    upstream = by_tier_name[("cloud", "POST /v1/infer")]
    server = by_tier_name[("endpoint", "POST /v1/infer")]
    assert upstream["parent_id"] == client["span_id"] and client["parent_id"] == server["span_id"]
    assert server["parent_id"] is None and server["kind"] == "SERVER"
    assert server["service"] == "cascade-endpoint"
    assert server["attrs"]["cascade.decision"] == "escalate"
    assert server["end_ns"] >= server["start_ns"]


def test_links_are_kept(tmp_path: Path) -> None:
    tracer = tier_tracer(tmp_path, "endpoint")
    link = span_link_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    with tracer.start_as_current_span("cascade.queue.drain", links=[link]):
        pass
    (record,), _ = read_span_records(tmp_path / "endpoint.jsonl")
    assert record["links"] == [{"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                                "span_id": "00f067aa0ba902b7"}]


def test_file_rotates_past_its_cap_and_both_generations_are_read(tmp_path: Path) -> None:
    tracer = tier_tracer(tmp_path, "endpoint", max_bytes=2000)
    for i in range(20):
        with tracer.start_as_current_span(f"span-{i}"):
            pass
    assert (tmp_path / "endpoint.jsonl.1").is_file()
    assert (tmp_path / "endpoint.jsonl").stat().st_size <= 2000
    records, _ = read_span_records(tmp_path)
    names = {r["name"] for r in records}
    assert "span-19" in names and len(names) > 5


def test_a_torn_line_is_skipped_and_reported(tmp_path: Path) -> None:
    request_through(tmp_path, "answer")
    with open(tmp_path / "endpoint.jsonl", "a") as f:
        f.write('{"trace_id": "abc", "span_')
    records, problems = read_span_records(tmp_path)
    assert len(records) == 2
    (problem,) = problems
    assert problem.startswith(f"{tmp_path / 'endpoint.jsonl'}: skipped 1 unreadable line(s) (line 3:")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: d / "missing.jsonl", "missing.jsonl: no such file or directory"),
    (lambda d: d, "no trace files (*.jsonl) in this directory"),
    (lambda d: (d / "x.jsonl").write_text("hello\nworld\n") and d / "x.jsonl",
     "x.jsonl: not a cascade trace file (2 unreadable line(s); line 1:"),
    (lambda d: (d / "y.jsonl").write_text('{"a": 1}\n') and d / "y.jsonl",
     "y.jsonl: not a cascade trace file (1 unreadable line(s); line 1: not a span record)"),
])
def test_unusable_input_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(TraceFileError) as err:
        read_span_records(setup(tmp_path))
    assert message in str(err.value)


def test_collector_otlp_json_lines_are_readable(tmp_path: Path) -> None:
    line = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "cascade-cloud"}},
        {"key": "cascade.tier", "value": {"stringValue": "cloud"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "4BF92F3577B34DA6A3CE929D0E0E4736", "spanId": "00F067AA0BA902B7",
            "name": "POST /v1/infer", "kind": "SPAN_KIND_SERVER", "startTimeUnixNano": "1000",
            "endTimeUnixNano": "3000", "status": {"code": "STATUS_CODE_OK"},
            "attributes": [{"key": "cascade.confidence", "value": {"doubleValue": 0.5}},
                           {"key": "http.response.status_code", "value": {"intValue": "200"}}]}]}]}]}
    (tmp_path / "collector.jsonl").write_text(json.dumps(line) + "\n")
    (record,), _ = read_span_records(tmp_path / "collector.jsonl")
    assert (record["trace_id"], record["tier"], record["kind"], record["status"]) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "cloud", "SERVER", "OK")
    assert record["attrs"] == {"cascade.confidence": 0.5, "http.response.status_code": 200}
    assert record["end_ns"] - record["start_ns"] == 2000


# -- the command ----------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console() -> Iterator[None]:
    """A terminal wide enough that rows are not wrapped (CliRunner's output is not a tty)."""
    from cascade.cli.common import console

    console.width = 200
    try:
        yield
    finally:
        console._width = None


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["traces", *args])
    return result.exit_code, result.output


def test_waterfall_across_tiers_with_decisions(tmp_path: Path) -> None:
    trace_id = request_through(tmp_path, "escalate")
    code, out = run(str(tmp_path))
    assert code == 0, out
    assert f"trace {trace_id}" in out and "endpoint → cloud" in out
    assert "final, answered by cloud" in out
    rows = [line for line in out.splitlines() if "█" in line]
    names = [line.split("│")[0].strip() for line in rows]
    assert names == ["POST /v1/infer", "cascade.gate", "POST → upstream", "POST /v1/infer"]
    indents = [len(line) - len(line.lstrip()) for line in rows]
    assert indents[0] < indents[1] == indents[2] < indents[3]  # the cloud span nests under CLIENT
    assert "escalate @ 0.410" in rows[0] and "answer @ 0.990" in rows[3]
    assert "attempt 1" in rows[2] and "HTTP 200" in rows[2]


def test_filters(tmp_path: Path) -> None:
    local = request_through(tmp_path, "answer")
    climbed = request_through(tmp_path, "escalate", upstream_ns=30_000_000)
    _, out = run(str(tmp_path), "--escalated")
    assert climbed in out and local not in out
    _, out = run(str(tmp_path), "--slow", "25")
    assert climbed in out and local not in out
    _, out = run(str(tmp_path), "--trace", local[:10])
    assert local in out and climbed not in out
    _, out = run(str(tmp_path), "-n", "1")
    assert climbed in out and local not in out  # most recent first
    code, out = run(str(tmp_path), "--trace", "ffff")
    assert code == 1 and "no trace 'ffff'" in out


@pytest.mark.parametrize("make", [
    lambda d: d / "nope",
    lambda d: (d / "t.jsonl").write_bytes(b"\x00\xff\x10garbage\n") and d / "t.jsonl",
])
def test_bad_input_is_an_error_message_not_a_traceback(tmp_path: Path, make) -> None:
    code, out = run(str(make(tmp_path)))
    assert code == 2
    assert out.startswith("error: ") and "Traceback" not in out
