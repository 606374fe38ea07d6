"""Prometheus metrics of one tier, served on ``GET /metrics``.

Each :class:`TierMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` (one per
node, hence one per tier process), so tests can build several nodes in one process without
name clashes. Two kinds of metrics:

* recorded on the request path (cheap: label children are bound once per task and cached):
  request latency, answers per status, HTTP responses per code, gate decisions, escalation
  outcomes, model inference time;
* read at scrape time from the objects that already keep the numbers (the upstream client's
  ``stats`` and breaker, the outbox, the drift detectors, the span exporters), so they cost
  nothing per request.

Every metric name is listed in ``infra/README.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from starlette.responses import Response

log = logging.getLogger("cascade.observability.metrics")

REQUEST_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
INFERENCE_BUCKETS_S: Final[tuple[float, ...]] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)
TTFT_BUCKETS_S: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)
TPOT_BUCKETS_S: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
)
NO_TASK: Final[str] = "none"
"""``task`` label of requests refused before a served task was known (bounded cardinality)."""

# UpstreamClient.stats key -> outcome label of cascade_upstream_requests_total.
_UPSTREAM_OUTCOMES: Final[dict[str, str]] = {
    "successes": "success", "failures": "failure", "rejected": "rejected",
    "breaker_rejections": "breaker_open",
}
# Outbox.metrics() counters exported as cascade_queue_events_total{event}.
_QUEUE_EVENTS: Final[tuple[str, ...]] = (
    "enqueued", "delivered", "dead", "expired", "refused_queue_full", "storage_errors",
    "callbacks_delivered", "callbacks_failed",
)
_QUEUE_REFRESH_TIMEOUT_S: Final[float] = 1.0

__all__ = ["CONTENT_TYPE_LATEST", "NO_TASK", "TierMetrics", "metrics_response"]


class TierMetrics:
    """The metric objects of one tier and the rendering of ``/metrics``."""

    def __init__(self, tier: str, *, process_metrics: bool = True) -> None:
        self.tier = tier
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "cascade_request_duration_seconds",
            "Time to answer POST /v1/infer at this tier (including any escalation), by task.",
            ["tier", "task"], buckets=REQUEST_BUCKETS_S, registry=r,
        )
        self.answers = Counter(
            "cascade_answers",
            "Answers given, by task and status (final, provisional, unknown).",
            ["tier", "task", "status"], registry=r,
        )
        self.http_responses = Counter(
            "cascade_http_responses",
            "HTTP responses by route template and status code (errors included).",
            ["tier", "route", "code"], registry=r,
        )
        self.decisions = Counter(
            "cascade_gate_decisions",
            "Gate decisions on the local model's output (answer, escalate, unknown).",
            ["tier", "task", "decision"], registry=r,
        )
        self.escalations = Counter(
            "cascade_escalations",
            "Escalations by outcome: upstream (answered above), queued (provisional answer, "
            "escalation kept in the outbox), not_queued (no outbox), refused (503).",
            ["tier", "task", "outcome"], registry=r,
        )
        self.inference_seconds = Histogram(
            "cascade_inference_duration_seconds",
            "Local model inference time, by task and model.",
            ["tier", "task", "model"], buckets=INFERENCE_BUCKETS_S, registry=r,
        )
        self.runner_wait_seconds = Histogram(
            "cascade_runner_wait_seconds",
            "Time a request waited for a free slot of a model that runs off the event loop "
            "(models fast enough to run inline never wait and are not observed).",
            ["tier", "task"], buckets=INFERENCE_BUCKETS_S, registry=r,
        )
        self.runner_offloaded = Gauge(
            "cascade_runner_offloaded",
            "1 when a task's model runs on worker threads, 0 when inline on the event loop.",
            ["tier", "task"], registry=r,
        )
        # Generative models (OpenTelemetry GenAI: gen_ai.server.time_to_first_token,
        # gen_ai.server.time_per_output_token, gen_ai.client.token.usage by gen_ai.token.type).
        self.ttft_seconds = Histogram(
            "cascade_gen_ai_time_to_first_token_seconds",
            "Time from the start of a local generation to its first token, by task and model.",
            ["tier", "task", "model"], buckets=TTFT_BUCKETS_S, registry=r,
        )
        self.tpot_seconds = Histogram(
            "cascade_gen_ai_time_per_output_token_seconds",
            "Mean time per output token after the first, per local generation.",
            ["tier", "task", "model"], buckets=TPOT_BUCKETS_S, registry=r,
        )
        self.gen_tokens = Counter(
            "cascade_gen_ai_tokens",
            "Tokens read (type=input: prompts) and written (type=output) by local models.",
            ["tier", "task", "model", "type"], registry=r,
        )
        self.audits_served = Counter(
            "cascade_audit_requests_served",
            "Shadow audits from a lower tier answered here (X-Cascade-Audit): not traffic, so "
            "absent from the request, answer and decision metrics.", ["tier", "task"], registry=r,
        )
        info = Gauge("cascade_tier_info", "Always 1; labels describe this tier.", ["tier"], registry=r)
        info.labels(tier).set(1)
        self._node: Any = None
        self._queue: dict[str, Any] = {}
        self._children: dict[tuple[object, ...], Any] = {}
        r.register(_ScrapeTimeCollector(self))
        if process_metrics:
            from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)

    # -- request path (bound children cached: labels() costs more than inc()) -------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.tier, *labels)
        return child

    def observe_request(self, task: str, seconds: float) -> None:
        """One finished ``POST /v1/infer`` (``task`` is :data:`NO_TASK` if none was accepted)."""
        self._child(self.request_seconds, task).observe(seconds)

    def count_answer(self, task: str, status: str) -> None:
        """One answer of ``status`` (final, provisional, unknown)."""
        self._child(self.answers, task, status).inc()

    def count_response(self, route: str, code: int) -> None:
        """One HTTP response."""
        self._child(self.http_responses, route, str(code)).inc()

    def count_decision(self, task: str, decision: str) -> None:
        """One gate decision."""
        self._child(self.decisions, task, decision).inc()

    def count_escalation(self, task: str, outcome: str) -> None:
        """One escalation that ended with ``outcome``."""
        self._child(self.escalations, task, outcome).inc()

    def observe_inference(self, task: str, model: str, seconds: float) -> None:
        """One local model run."""
        self._child(self.inference_seconds, task, model).observe(seconds)

    def observe_generation(self, task: str, model: str, *, ttft_s: float | None,
                           total_s: float, input_tokens: int, output_tokens: int) -> None:
        """One local generation: time to first token, time per further token, tokens."""
        if ttft_s is not None:
            self._child(self.ttft_seconds, task, model).observe(ttft_s)
            if output_tokens > 1:
                per_token = max(0.0, total_s - ttft_s) / (output_tokens - 1)
                self._child(self.tpot_seconds, task, model).observe(per_token)
        self._child(self.gen_tokens, task, model, "input").inc(input_tokens)
        self._child(self.gen_tokens, task, model, "output").inc(output_tokens)

    def count_audit_served(self, task: str) -> None:
        """One shadow audit answered for a lower tier."""
        self._child(self.audits_served, task).inc()

    def observe_runner_wait(self, task: str, seconds: float) -> None:
        """One wait for a free slot of an offloaded model."""
        self._child(self.runner_wait_seconds, task).observe(seconds)

    def set_runner_offloaded(self, task: str, offloaded: bool) -> None:
        """Where a task's model runs (set once it has been warmed up and measured)."""
        self.runner_offloaded.labels(self.tier, task).set(1 if offloaded else 0)

    # -- scrape time ---------------------------------------------------------------------------

    def bind_node(self, node: Any) -> None:
        """Read upstream, breaker and queue state from ``node`` at scrape time."""
        self._node = node

    async def refresh(self) -> None:
        """Gather the state that needs I/O (the outbox's oldest row, dead letters).

        Bounded by a timeout and never raises: a slow or broken queue store leaves the last
        values in place rather than failing the scrape.
        """
        queue = getattr(self._node, "escalations", None)
        if queue is None:
            return
        try:
            snapshot = await asyncio.wait_for(_queue_snapshot(queue), _QUEUE_REFRESH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.debug("queue stats unavailable for /metrics: %s", exc)
            return
        self._queue = snapshot

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


async def _queue_snapshot(queue: Any) -> dict[str, Any]:
    """Depth, oldest live age and dead rows of an escalation queue, if it can tell."""
    stats_fn = getattr(queue, "queue_stats", None)
    return dict(await stats_fn()) if stats_fn is not None else {}


class _ScrapeTimeCollector(Collector):
    """Upstream, breaker, queue and exporter state, read when Prometheus scrapes."""

    def __init__(self, metrics: TierMetrics) -> None:
        self._m = metrics

    def describe(self) -> list[Any]:
        return []  # dynamic: families depend on what the node has (upstream, outbox)

    def collect(self) -> Iterator[Any]:
        tier = self._m.tier
        node = self._m._node
        yield from _upstream_families(tier, getattr(node, "upstream", None))
        yield from _queue_families(tier, getattr(node, "escalations", None), self._m._queue)
        yield from _drift_families(tier, getattr(node, "drift", None))
        yield from _disk_families(tier, getattr(node, "disk", None))
        for part in ("auditor", "pressure"):  # cascade.tier.audit, cascade.tier.pressure
            families = getattr(getattr(node, part, None), "metric_families", None)
            if callable(families):
                yield from families()
        yield from _telemetry_families(tier)


def _upstream_families(tier: str, upstream: Any) -> Iterator[Any]:
    if upstream is None:
        return
    stats = getattr(upstream, "stats", {})
    url = str(getattr(upstream, "base_url", ""))
    requests = CounterMetricFamily(
        "cascade_upstream_requests",
        "Escalation calls to the upstream by outcome (success, failure after retries, "
        "rejected with 4xx, breaker_open: not sent).",
        labels=["tier", "upstream", "outcome"],
    )
    for key, outcome in _UPSTREAM_OUTCOMES.items():
        requests.add_metric([tier, url, outcome], stats.get(key, 0))
    yield requests
    attempts = CounterMetricFamily(
        "cascade_upstream_attempts", "HTTP attempts sent to the upstream (retries included).",
        labels=["tier", "upstream"],
    )
    attempts.add_metric([tier, url], stats.get("attempts", 0))
    yield attempts
    retries = CounterMetricFamily(
        "cascade_upstream_retries", "HTTP attempts that were retries.", labels=["tier", "upstream"]
    )
    retries.add_metric([tier, url], stats.get("retries", 0))
    yield retries
    breaker = GaugeMetricFamily(
        "cascade_upstream_breaker_state",
        "Circuit breaker guarding the upstream: 0 closed, 1 open, 2 half_open.",
        labels=["tier", "upstream"],
    )
    breaker.add_metric([tier, url], float(upstream.breaker.state_code))
    yield breaker


def _queue_families(tier: str, queue: Any, snapshot: dict[str, Any]) -> Iterator[Any]:
    if queue is None:
        return
    depth = GaugeMetricFamily(
        "cascade_queue_depth", "Escalations waiting in the outbox to be delivered.", labels=["tier"]
    )
    depth.add_metric([tier], float(queue.depth()))
    yield depth
    oldest = GaugeMetricFamily(
        "cascade_queue_oldest_age_seconds",
        "Age of the oldest escalation still to deliver (0 when none).", labels=["tier"],
    )
    oldest.add_metric([tier], float(snapshot.get("oldest_live_age_s") or 0.0))
    yield oldest
    states = snapshot.get("states") or {}
    if states:
        rows = GaugeMetricFamily(
            "cascade_queue_rows", "Outbox rows by state.", labels=["tier", "state"]
        )
        for state, info in sorted(states.items()):
            rows.add_metric([tier, state], float(info.get("rows", 0)))
        yield rows
        dead = GaugeMetricFamily(
            "cascade_queue_dead_letters",
            "Escalations that exhausted their attempts or were refused by the upstream; kept "
            "for inspection and replay (cascade queue ls --state dead).",
            labels=["tier"],
        )
        dead.add_metric([tier], float(states.get("dead", {}).get("rows", 0)))
        yield dead
    outbox_metrics = getattr(queue, "metrics", None)
    if callable(outbox_metrics):
        counters = outbox_metrics()
        events = CounterMetricFamily(
            "cascade_queue_events", "Outbox events since start (enqueued, delivered, dead, "
            "expired, refused_queue_full, storage_errors, callbacks_*).", labels=["tier", "event"],
        )
        for event in _QUEUE_EVENTS:
            if event in counters:
                events.add_metric([tier, event], counters[event])
        yield events
        held = GaugeMetricFamily(
            "cascade_queue_held_bytes", "Bytes the outbox holds against its cap.", labels=["tier"]
        )
        held.add_metric([tier], float(counters.get("held_bytes", 0)))
        yield held
    dropped = getattr(queue, "dropped", None)
    if isinstance(dropped, int):
        lost = CounterMetricFamily(
            "cascade_escalations_not_queued",
            "Escalations that failed with no outbox configured to keep them.", labels=["tier"],
        )
        lost.add_metric([tier], dropped)
        yield lost


def _drift_families(tier: str, monitor: Any) -> Iterator[Any]:
    """The drift alarm of each task (tasks whose tier has no reference are left out)."""
    if monitor is None:
        return
    from cascade.gating.drift import DriftDetector

    detectors = {task: det for task, det in sorted(monitor.detectors().items())
                 if isinstance(det, DriftDetector)}
    if not detectors:
        return
    score = GaugeMetricFamily(
        "cascade_drift_score", "Drift of the gate's calibrated confidence over the recent window "
        "vs the calibration split: PSI (absent until min_samples requests).", labels=["tier", "task"])
    level = GaugeMetricFamily(
        "cascade_drift_alarm_level", "PSI at which the alarm turns on, for the current window and "
        "reference sizes (max of alarm_psi and the sampling-noise level).", labels=["tier", "task"])
    alarm = GaugeMetricFamily(
        "cascade_drift_alarm", "1 while the drift alarm is on (hysteresis: off below clear_psi).",
        labels=["tier", "task"])
    alarms = CounterMetricFamily(
        "cascade_drift_alarms", "Times the drift alarm turned on since start.", labels=["tier", "task"])
    window = GaugeMetricFamily(
        "cascade_drift_window_requests", "Requests in the drift window.", labels=["tier", "task"])
    for task, det in detectors.items():
        if det.score is not None:
            score.add_metric([tier, task], det.score)
            level.add_metric([tier, task], det.level_on)
        alarm.add_metric([tier, task], 1.0 if det.alarm else 0.0)
        alarms.add_metric([tier, task], det.alarms)
        window.add_metric([tier, task], float(det.samples))
    yield from (score, level, alarm, alarms, window)


def _disk_families(tier: str, disk: Any) -> Iterator[Any]:
    """Bytes used and allowed per local store, and what each evicted (``disk:`` budget)."""
    if disk is None:
        return
    view = disk.view()["stores"]
    used = GaugeMetricFamily("cascade_disk_used_bytes", "Bytes a local store takes on disk.",
                             labels=["tier", "store"])
    budget = GaugeMetricFamily("cascade_disk_budget_bytes", "A local store's share of the disk "
                               "budget (disk.<store>_mb or its part of disk.budget_mb).",
                               labels=["tier", "store"])
    evictions = CounterMetricFamily(
        "cascade_disk_evictions", "Rows or files a store removed to stay within its bounds, by "
        "reason: budget (bytes), retention (time), rotation (log and trace files).",
        labels=["tier", "store", "reason"])
    for store, info in view.items():
        used.add_metric([tier, store], float(info["used_bytes"]))
        budget.add_metric([tier, store], float(info["budget_bytes"]))
        for reason, n in sorted(info["evictions"].items()):
            evictions.add_metric([tier, store, reason], n)
    yield from (used, budget, evictions)


def _telemetry_families(tier: str) -> Iterator[Any]:
    from cascade.observability.export import export_stats

    exporters, queue_dropped = export_stats()
    failures = CounterMetricFamily(
        "cascade_telemetry_export_failures",
        "Span batches an exporter failed to deliver (collector unreachable, disk full...).",
        labels=["tier", "exporter"],
    )
    dropped = CounterMetricFamily(
        "cascade_telemetry_spans_dropped",
        "Spans lost to telemetry trouble; requests are never affected.",
        labels=["tier", "exporter", "reason"],
    )
    exported = CounterMetricFamily(
        "cascade_telemetry_spans_exported", "Spans delivered by each exporter.",
        labels=["tier", "exporter"],
    )
    for stats in exporters:
        failures.add_metric([tier, stats.name], stats.failed_batches)
        dropped.add_metric([tier, stats.name, "export_failed"], stats.failed_spans)
        dropped.add_metric([tier, stats.name, "destination_down"], stats.shed_spans)
        exported.add_metric([tier, stats.name], stats.exported_spans)
    dropped.add_metric([tier, "all", "queue_full"], queue_dropped)
    yield failures
    yield dropped
    yield exported
    yield from _routine_trace_families(tier)


def _routine_trace_families(tier: str) -> Iterator[Any]:
    from cascade.observability.trace_context import sdk_tracer
    from cascade.observability.tracing import CascadeSampler

    sampler = getattr(sdk_tracer(), "sampler", None)
    if not isinstance(sampler, CascadeSampler):
        return  # tracing off, or an SDK sampler: nothing of ours to count
    routine = CounterMetricFamily(
        "cascade_telemetry_routine_traces",
        "Locally answered requests the default sampler's ratio picked for a trace: kept, or "
        "capped (this second's CASCADE_TRACE_ROUTINE_PER_S was spent; the answer is unaffected).",
        labels=["tier", "outcome"],
    )
    routine.add_metric([tier, "kept"], sampler.root.routine_kept)
    routine.add_metric([tier, "capped"], sampler.root.routine_capped)
    yield routine


async def metrics_response(node: Any) -> Response:
    """The ``GET /metrics`` response for ``node`` (503 before the node is up)."""
    from starlette.responses import Response

    telemetry = getattr(node, "telemetry", None)
    if telemetry is None:
        return Response(b"# tier not started\n", status_code=503, media_type=CONTENT_TYPE_LATEST)
    await telemetry.metrics.refresh()
    return Response(telemetry.metrics.render(), media_type=CONTENT_TYPE_LATEST)
