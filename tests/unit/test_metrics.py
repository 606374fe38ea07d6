"""``GET /metrics``: Prometheus text that parses, and counters that move as requests flow."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cascade.http.app import create_app
from cascade.observability.metrics import TierMetrics
from cascade.upstream.breaker import CircuitBreaker
from cascade.upstream.client import UpstreamClient
from tests.unit.otel_fixtures import DOC, make_node, serving


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (name, labels); parsing it is part of the test."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


class Scraper:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self) -> dict[Any, float]:
        r = await self.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=")
        return samples(r.text)


async def test_counters_move_as_requests_flow(tmp_path: Path) -> None:
    app = create_app(make_node(tmp_path), max_body_bytes=2048)
    async with serving(app) as c:
        scrape = Scraper(c)
        before = await scrape()
        assert value(before, "cascade_tier_info", tier="endpoint") == 1
        for _ in range(3):
            assert (await c.post("/v1/infer", json=DOC)).status_code == 200
        assert (await c.post("/v1/infer", json={"task": "nope", "input": {}})).status_code == 422
        assert (await c.post("/v1/infer", content=b"x" * 4096,
                             headers={"content-type": "application/json"})).status_code == 413
        after = await scrape()

    t = {"tier": "endpoint"}
    assert value(after, "cascade_answers_total", **t, task="documents", status="final") == 3
    assert value(after, "cascade_gate_decisions_total", **t, task="documents", decision="answer") == 3
    assert value(after, "cascade_request_duration_seconds_count", **t, task="documents") == 3
    assert value(after, "cascade_request_duration_seconds_count", **t, task="none") == 2
    assert value(after, "cascade_inference_duration_seconds_count", **t, task="documents",
                 model="documents/fixed") == 3
    assert value(after, "cascade_http_responses_total", **t, route="/v1/infer", code="200") == 3
    assert value(after, "cascade_http_responses_total", **t, route="/v1/infer", code="422") == 1
    assert value(after, "cascade_http_responses_total", **t, route="/v1/infer", code="413") == 1
    # Scrapes do not count themselves.
    assert value(after, "cascade_http_responses_total", **t, route="/metrics", code="200") == 0
    assert value(after, "cascade_queue_depth", **t) == 0
    assert ("process_cpu_seconds_total", frozenset()) in after


async def test_escalation_upstream_errors_breaker_and_queue_are_exported(tmp_path: Path) -> None:
    upstream = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=2,
                              backoff_initial_ms=1, backoff_max_ms=2,
                              breaker=CircuitBreaker(failure_threshold=2, reset_timeout_s=60))
    node = make_node(tmp_path, confident=False, upstream=upstream)
    app = create_app(node)
    async with serving(app) as c:
        for _ in range(3):
            r = await c.post("/v1/infer", json=DOC)
            assert r.status_code == 200 and r.json()["status"] == "provisional"
        after = await Scraper(c)()

    t = {"tier": "endpoint"}
    up = {**t, "upstream": upstream.base_url}
    assert value(after, "cascade_gate_decisions_total", **t, task="documents", decision="escalate") == 3
    assert value(after, "cascade_answers_total", **t, task="documents", status="provisional") == 3
    # No outbox in this node: the escalations were not kept, and that is visible.
    assert value(after, "cascade_escalations_total", **t, task="documents", outcome="not_queued") == 3
    assert value(after, "cascade_escalations_not_queued_total", **t) == 3
    # Two calls failed after 2 attempts each and opened the breaker; the third was not sent.
    assert value(after, "cascade_upstream_requests_total", **up, outcome="failure") == 2
    assert value(after, "cascade_upstream_requests_total", **up, outcome="breaker_open") == 1
    assert value(after, "cascade_upstream_attempts_total", **up) == 4
    assert value(after, "cascade_upstream_retries_total", **up) == 2
    assert value(after, "cascade_upstream_breaker_state", **up) == 1


class SnapshotQueue:
    """An escalation queue that reports outbox-like stats."""

    def __init__(self) -> None:
        self.calls = 0

    async def enqueue(self, item: Any) -> dict[str, Any]:
        return {"state": "queued"}

    def depth(self) -> int:
        return 7

    async def queue_stats(self) -> dict[str, Any]:
        self.calls += 1
        return {"oldest_live_age_s": 42.5,
                "states": {"queued": {"rows": 7}, "dead": {"rows": 2}, "done": {"rows": 9}}}

    def metrics(self) -> dict[str, Any]:
        return {"enqueued": 20, "delivered": 9, "dead": 2, "refused_queue_full": 1, "held_bytes": 512}


async def test_queue_depth_oldest_age_and_dead_letters(tmp_path: Path) -> None:
    queue = SnapshotQueue()
    node = make_node(tmp_path, escalations=queue)
    metrics = node.telemetry.metrics
    await metrics.refresh()
    scrape = samples(metrics.render().decode())
    t = {"tier": "endpoint"}
    assert value(scrape, "cascade_queue_depth", **t) == 7
    assert value(scrape, "cascade_queue_oldest_age_seconds", **t) == 42.5
    assert value(scrape, "cascade_queue_dead_letters", **t) == 2
    assert value(scrape, "cascade_queue_rows", **t, state="done") == 9
    assert value(scrape, "cascade_queue_events_total", **t, event="refused_queue_full") == 1
    assert value(scrape, "cascade_queue_events_total", **t, event="enqueued") == 20
    assert value(scrape, "cascade_queue_held_bytes", **t) == 512


async def test_a_broken_queue_store_never_fails_the_scrape(tmp_path: Path) -> None:
    class Broken(SnapshotQueue):
        async def queue_stats(self) -> dict[str, Any]:
            raise OSError("disk I/O error")

    metrics = make_node(tmp_path, escalations=Broken()).telemetry.metrics
    await metrics.refresh()
    scrape = samples(metrics.render().decode())
    assert value(scrape, "cascade_queue_depth", tier="endpoint") == 7
    assert value(scrape, "cascade_queue_oldest_age_seconds", tier="endpoint") == 0


def test_each_tier_has_its_own_registry() -> None:
    a, b = TierMetrics("endpoint", process_metrics=False), TierMetrics("cloud", process_metrics=False)
    a.count_answer("vision", "final")
    a.count_answer("vision", "final")
    sa, sb = samples(a.render().decode()), samples(b.render().decode())
    assert value(sa, "cascade_answers_total", tier="endpoint", task="vision", status="final") == 2
    assert not [k for k in sb if k[0] == "cascade_answers_total"]


async def test_metrics_before_the_node_starts_is_503() -> None:
    from cascade.observability.metrics import metrics_response

    response = await metrics_response(None)
    assert response.status_code == 503
