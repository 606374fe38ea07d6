"""Structured logs: one JSON line per request with trace and span ids, and no payloads."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

from cascade.http.app import create_app
from cascade.observability.logs import configure_logging
from tests.unit.otel_fixtures import by_name, make_node, serving

SECRET_TEXT = "Quarterly results of ACME-CONFIDENTIAL-7731 leaked"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    handler = configure_logging("endpoint", "info", fmt="json", stream=stream)
    try:
        yield stream
    finally:
        handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    for handler in logging.getLogger().handlers:
        handler.flush()  # lines are written in batches
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_one_json_line_per_request_with_trace_ids_and_no_payload(
    tmp_path: Path, spans: Any, log_stream: io.StringIO
) -> None:
    app = create_app(make_node(tmp_path))
    body = {"task": "documents", "input": {"text": SECRET_TEXT}}
    async with serving(app) as c:
        r = await c.post("/v1/infer", json=body, headers={"Idempotency-Key": "req-1"})
        await c.get("/healthz")  # probes are not logged
    assert r.status_code == 200
    access = [line for line in lines(log_stream) if line["logger"] == "cascade.access"]
    (line,) = access
    (server,) = by_name(spans, "POST /v1/infer")
    assert line["trace_id"] == format(server.context.trace_id, "032x") == r.json()["trace_id"]
    assert line["span_id"] == format(server.context.span_id, "016x")
    assert {k: line[k] for k in ("level", "tier", "msg", "method", "route", "code", "task",
                                 "status", "answered_by", "decision", "request_id")} == {
        "level": "info", "tier": "endpoint", "msg": "POST /v1/infer 200", "method": "POST",
        "route": "/v1/infer", "code": 200, "task": "documents", "status": "final",
        "answered_by": "endpoint", "decision": "answer", "request_id": "req-1"}
    assert isinstance(line["duration_ms"], float) and line["ts"].endswith("Z")
    assert "ACME" not in log_stream.getvalue()


def test_any_log_inside_a_span_carries_its_ids(spans: Any, log_stream: io.StringIO) -> None:
    with trace.get_tracer("test").start_as_current_span("work") as span:
        logging.getLogger("cascade.tier.node").warning("model %s slow", "m1")
    logging.getLogger("cascade.tier.node").error("outside", exc_info=ValueError("boom"))
    inside, outside = lines(log_stream)
    ctx = span.get_span_context()
    assert (inside["msg"], inside["level"], inside["trace_id"], inside["span_id"]) == (
        "model m1 slow", "warning", format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
    assert "trace_id" not in outside and outside["exc"].endswith("ValueError: boom")


def test_text_format_for_humans(log_stream: io.StringIO) -> None:
    stream = io.StringIO()
    handler = configure_logging("cloud", "debug", fmt="text", stream=stream)
    logging.getLogger("cascade.access").info("POST /v1/infer 200", extra={"fields": {"code": 200}})
    handler.flush()
    text = stream.getvalue()
    assert "INFO cascade.access [cloud] POST /v1/infer 200 code=200" in text
    assert log_stream.getvalue() == ""  # the earlier handler was replaced, not duplicated


def test_info_lines_are_batched_warnings_written_at_once() -> None:
    stream = io.StringIO()
    handler = configure_logging("edge-node", "info", stream=stream, flush_interval_s=0)
    try:
        log = logging.getLogger("cascade.test")
        log.info("one")
        log.info("two")
        assert stream.getvalue() == ""  # pending: no write per request
        log.warning("three")  # a warning flushes everything before it, in order
        assert [json.loads(x)["msg"] for x in stream.getvalue().splitlines()] == ["one", "two", "three"]
        for i in range(handler.max_pending):
            log.info("n%d", i)
        assert len(stream.getvalue().splitlines()) == 3 + handler.max_pending
    finally:
        handler.close()
        logging.getLogger().removeHandler(handler)
