"""Tracing and metrics across real tier processes exporting OTLP/HTTP to a real receiver.

The receiver is a small HTTP server in this process that decodes the protobuf
``ExportTraceServiceRequest`` bodies the tiers' OTLP exporters send to ``/v1/traces``.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cascade.deploy.supervisor import Chain
from cascade.observability.export import TraceFileError, read_span_records
from tests.conftest import CHAIN_CONFIGS, free_port_block

pytestmark = pytest.mark.integration
TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]
KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}

# Vision climbs every tier (a margin of exactly 1.0 never happens on an ambiguous image);
# documents are answered by the endpoint whatever the model says.
POLICY = """\
version: 1
name: tracing-test
tasks:
  vision:
    deadline_ms: 8000
    queue: {ttl_s: 600, max_attempts: 50}
    tiers:
      endpoint: {signal: margin, threshold: 1.0}
      edge-node: {signal: margin, threshold: 1.0}
      edge-server: {signal: margin, threshold: 1.0}
      cloud: {signal: max_prob, threshold: 0.0}
  documents:
    deadline_ms: 8000
    tiers:
      endpoint: {signal: max_prob, threshold: 0.0}
      edge-node: {signal: max_prob, threshold: 0.0}
      edge-server: {signal: max_prob, threshold: 0.0}
      cloud: {signal: max_prob, threshold: 0.0}
"""
CLIMBS = {"task": "vision", "input": {"image": [[8.0] * 8 for _ in range(8)]}}
STAYS = {"task": "documents", "input": {"text": "The striker scored twice in the cup final"}}


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """A real OTLP/HTTP trace endpoint on 127.0.0.1 keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        out = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex() or None, "name": s.name,
                        "kind": KINDS.get(s.kind, str(s.kind)),
                        "service": resource.get("service.name"), "tier": resource.get("cascade.tier"),
                        "attrs": {a.key: _value(a.value) for a in s.attributes},
                        "links": [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    })
        with self._changed:
            self.requests += 1
            self.spans.extend(out)
            self._changed.notify_all()

    def wait_for(self, what: Callable[[list[dict[str, Any]]], Any], timeout_s: float = 20) -> Any:
        """Block until ``what(spans)`` is truthy; return it."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not (result := what(list(self.spans))):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not received within {timeout_s} s; have {len(self.spans)} spans")
                self._changed.wait(left)
            return result

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_trace(trace_id: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda spans: [s for s in spans if s["trace_id"] == trace_id]


def chain_env(models_dir: Path, tmp: Path, otlp_url: str) -> dict[str, str]:
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    return {
        "CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url, "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        # Every routine local answer too (the default keeps 1% of them, at most 10 per second;
        # escalations always).
        "OTEL_TRACES_SAMPLER_ARG": "1", "CASCADE_TRACE_ROUTINE_PER_S": "none",
        "CASCADE_OUTBOX__RETRY_INITIAL_S": "0.2", "CASCADE_OUTBOX__RETRY_MAX_S": "0.5",
        "CASCADE_OUTBOX__IDLE_POLL_S": "0.2",
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_chain(models_dir: Path, receiver: OtlpReceiver,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Chain, Path]]:
    """The four tiers exporting OTLP/HTTP to ``receiver`` and writing trace files."""
    tmp = tmp_path_factory.mktemp("traced")
    env = {**chain_env(models_dir, tmp, receiver.url), "CASCADE_TRACE_DIR": str(tmp / "traces")}
    with Chain(CHAIN_CONFIGS, base_port=free_port_block(4), env=env, log_dir=tmp / "logs",
               state_dir=tmp) as chain:
        yield chain, tmp / "traces"


def servers_by_tier(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["tier"]: s for s in spans if s["kind"] == "SERVER"}


def test_request_that_climbs_is_one_trace_across_four_tiers(traced_chain: Any,
                                                           receiver: OtlpReceiver) -> None:
    chain, _ = traced_chain
    r = httpx.post(f"{chain.entry_url}/v1/infer", json=CLIMBS, timeout=10)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["answered_by"] == "cloud" and [h["tier"] for h in data["hops"]] == TIERS
    spans = receiver.wait_for(lambda s: len(servers_by_tier(in_trace(data["trace_id"])(s))) == 4
                              and in_trace(data["trace_id"])(s))
    by_id = {s["span_id"]: s for s in spans}
    servers = servers_by_tier(spans)
    assert {s["service"] for s in spans} == {f"cascade-{t}" for t in TIERS}
    assert servers["endpoint"]["parent_id"] is None
    for lower, upper in pairwise(TIERS):
        client = by_id[servers[upper]["parent_id"]]  # the upper tier is called by ...
        assert client["kind"] == "CLIENT" and client["tier"] == lower  # ... the lower's CLIENT
        assert client["parent_id"] == servers[lower]["span_id"]
        assert client["attrs"]["http.request.resend_count"] == 0
        assert client["attrs"]["http.response.status_code"] == 200
        assert servers[lower]["attrs"]["cascade.decision"] == "escalate"
    for tier in TIERS:
        server = servers[tier]
        assert server["name"] == "POST /v1/infer"
        assert server["attrs"]["cascade.tier"] == tier and server["attrs"]["cascade.task"] == "vision"
        children = {s["name"]: s for s in spans if s["parent_id"] == server["span_id"]}
        assert children["cascade.inference"]["attrs"]["cascade.model"] == server["attrs"]["cascade.model"]
        assert children["cascade.gate"]["attrs"]["cascade.decision"] == server["attrs"]["cascade.decision"]
    assert servers["cloud"]["attrs"]["cascade.decision"] == "answer"
    assert servers["endpoint"]["attrs"]["cascade.answered_by"] == "cloud"


def test_request_answered_at_tier_1_is_a_single_tier_trace(traced_chain: Any,
                                                           receiver: OtlpReceiver) -> None:
    chain, _ = traced_chain
    r = httpx.post(f"{chain.entry_url}/v1/infer", json=STAYS, timeout=10)
    assert r.status_code == 200 and r.json()["answered_by"] == "endpoint"
    trace_id = r.json()["trace_id"]
    spans = receiver.wait_for(lambda s: len(in_trace(trace_id)(s)) >= 3 and in_trace(trace_id)(s))
    assert sorted(s["name"] for s in spans) == ["POST /v1/infer", "cascade.gate", "cascade.inference"]
    assert {s["service"] for s in spans} == {"cascade-endpoint"}
    assert not any(s["kind"] == "CLIENT" for s in spans)


def test_incoming_traceparent_is_continued(traced_chain: Any, receiver: OtlpReceiver) -> None:
    chain, _ = traced_chain
    trace_id, parent = "5bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.post(f"{chain.entry_url}/v1/infer", json=STAYS, timeout=10,
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.json()["trace_id"] == trace_id
    (server,) = receiver.wait_for(lambda s: [x for x in in_trace(trace_id)(s) if x["kind"] == "SERVER"])
    assert server["parent_id"] == parent


def test_trace_files_show_the_climb_in_cascade_traces(traced_chain: Any) -> None:
    from cascade.cli import app

    chain, trace_dir = traced_chain
    trace_id = httpx.post(f"{chain.entry_url}/v1/infer", json=CLIMBS, timeout=10).json()["trace_id"]

    def servers_written() -> set[str]:
        try:
            records, _ = read_span_records(trace_dir)
        except TraceFileError:  # no file yet
            return set()
        return {r["tier"] for r in records if r["trace_id"] == trace_id and r["kind"] == "SERVER"}

    # A tier's SERVER span ends after its other spans and is written after them: once every
    # tier's is in the files, the whole trace is (waiting for the trace id alone found the
    # first spans, and sometimes read the files before the endpoint's SERVER span was there).
    deadline = time.monotonic() + 20
    while servers_written() != set(TIERS):
        assert time.monotonic() < deadline, f"trace files have SERVER spans of {servers_written()}"
        time.sleep(0.05)
    result = CliRunner().invoke(app, ["traces", str(trace_dir), "--trace", trace_id[:12]])
    assert result.exit_code == 0, result.output
    assert f"trace {trace_id}" in result.output
    assert "endpoint → edge-node → edge-server → cloud" in result.output
    assert "final, answered by cloud" in result.output


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_parse_and_move_as_requests_flow(traced_chain: Any) -> None:
    chain, _ = traced_chain
    endpoint = chain.tiers[0]
    upstream = f"http://127.0.0.1:{chain.tiers[1].port}"

    def get(m: dict[Any, float], name: str, **labels: str) -> float:
        return m.get((name, frozenset({"tier": "endpoint", **labels}.items())), 0.0)

    before = scrape(endpoint.url)
    for body in (CLIMBS, STAYS, STAYS):
        assert httpx.post(f"{endpoint.url}/v1/infer", json=body, timeout=10).status_code == 200
    after = scrape(endpoint.url)
    delta = lambda name, **kw: get(after, name, **kw) - get(before, name, **kw)
    assert delta("cascade_answers_total", task="vision", status="final") == 1
    assert delta("cascade_answers_total", task="documents", status="final") == 2
    assert delta("cascade_gate_decisions_total", task="vision", decision="escalate") == 1
    assert delta("cascade_escalations_total", task="vision", outcome="upstream") == 1
    assert delta("cascade_request_duration_seconds_count", task="documents") == 2
    model = next(dict(k)["model"] for (n, k) in after
                 if n == "cascade_inference_duration_seconds_count"
                 and dict(k)["tier"] == "endpoint" and dict(k)["task"] == "vision")
    assert delta("cascade_inference_duration_seconds_count", task="vision", model=model) == 1
    assert delta("cascade_upstream_requests_total", upstream=upstream, outcome="success") == 1
    assert get(after, "cascade_upstream_breaker_state", upstream=upstream) == 0
    assert ("cascade_queue_depth", frozenset({"tier": "endpoint"}.items())) in after
    exported = ("cascade_telemetry_spans_exported_total",
                frozenset({"tier": "endpoint", "exporter": "otlp-http"}.items()))
    assert after[exported] > 0


def test_collector_down_requests_still_succeed_and_the_failure_is_counted_and_logged_once(
    models_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again before the chain starts
    env = chain_env(models_dir, tmp_path, dead)
    chain = Chain([CHAIN_CONFIGS[0], CHAIN_CONFIGS[-1]], base_port=free_port_block(2), env=env,
                  log_dir=tmp_path / "logs", state_dir=tmp_path)
    with chain:
        for i in range(20):
            r = httpx.post(f"{chain.entry_url}/v1/infer", json=CLIMBS if i % 2 else STAYS, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "final"
        deadline = time.monotonic() + 30
        key = ("cascade_telemetry_export_failures_total",
               frozenset({"tier": "endpoint", "exporter": "otlp-http"}.items()))
        while scrape(chain.entry_url).get(key, 0) < 1:
            assert time.monotonic() < deadline, "export failure never counted"
            time.sleep(0.2)
    log = (tmp_path / "logs" / "endpoint.log").read_text()
    assert log.count("trace export to") == 1 and f"{dead} failing" in log
    # Stopped cleanly (SIGTERM → exit 0), not killed after the supervisor's timeout.
    assert [t.process.returncode for t in chain.tiers] == [0, 0]


def test_drain_span_of_a_queued_escalation_links_to_the_original_request(
    models_dir: Path, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    base = free_port_block(2)
    env = chain_env(models_dir, tmp_path, receiver.url)
    endpoint = Chain([CHAIN_CONFIGS[0]], base_port=base, env=env, log_dir=tmp_path / "logs",
                     state_dir=tmp_path, top_upstream_url=f"http://127.0.0.1:{base + 1}")
    with endpoint:
        r = httpx.post(f"{endpoint.entry_url}/v1/infer", json=CLIMBS, timeout=10)
        data = r.json()
        assert r.status_code == 200 and data["status"] == "provisional", r.text
        spans = receiver.wait_for(lambda s: [x for x in in_trace(data["trace_id"])(s)
                                             if x["name"] == "cascade.queue.enqueue"])
        (enqueue,) = spans
        with Chain([CHAIN_CONFIGS[-1]], base_port=base + 1, env=env, log_dir=tmp_path / "logs",
                   state_dir=tmp_path):
            drained = receiver.wait_for(lambda s: [
                x for x in s if x["name"] == "cascade.queue.drain"
                and x["attrs"].get("cascade.queue.outcome") == "final"
                and (enqueue["trace_id"], enqueue["span_id"]) in x["links"]], timeout_s=40)
            drain = drained[0]
            assert drain["kind"] == "CONSUMER" and drain["parent_id"] is None
            assert drain["trace_id"] != data["trace_id"]  # a new trace, linked, not continued
            assert drain["attrs"]["cascade.request_id"] == data["id"]
            # The cloud's work for the drained send belongs to the drain's trace.
            cloud = receiver.wait_for(lambda s: [x for x in in_trace(drain["trace_id"])(s)
                                                 if x["kind"] == "SERVER" and x["tier"] == "cloud"])
            assert cloud
            result = httpx.get(f"{endpoint.entry_url}/v1/results/{data['id']}", timeout=5).json()
            assert result["status"] == "final"
