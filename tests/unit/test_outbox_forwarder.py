"""The forwarder's decisions over a real SQLite outbox and a scripted upstream.

``ScriptedUpstream`` stands in for :class:`cascade.upstream.client.UpstreamClient` (same ``escalate``
signature and a real :class:`CircuitBreaker`), so each outcome can be forced; the real HTTP path
between real tier processes is covered by tests/fault.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from cascade.contract.answer import Answer
from cascade.contract.escalation import PendingEscalation
from cascade.errors import UpstreamRejected, UpstreamUnavailable
from cascade.observability import trace_context
from cascade.outbox import Outbox, OutboxSettings
from cascade.outbox.forwarder import Forwarder
from cascade.upstream.breaker import CircuitBreaker

Reply = dict[str, Any] | Exception | Callable[[str], Any]


class ScriptedUpstream:
    def __init__(self, breaker: CircuitBreaker | None = None) -> None:
        self.breaker = breaker or CircuitBreaker(failure_threshold=1000, reset_timeout_s=0.2)
        self.script: dict[str, list[Reply]] = {}
        self.default: Reply = {"label": "business", "confidence": 0.99, "status": "final",
                               "answered_by": "edge-node", "hops": [{"tier": "edge-node"}]}
        self.calls: list[tuple[str, dict[str, Any], int, dict[str, str]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay_s = 0.0

    async def escalate(self, body: dict[str, Any], *, deadline: Any, hop_count: int,
                       idempotency_key: str, headers: dict[str, str]) -> Answer:
        if not self.breaker.allow_request():
            raise _unavailable("circuit open", attempts=0)
        self.calls.append((idempotency_key, body, hop_count, dict(headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            queue = self.script.get(idempotency_key)
            reply = queue.pop(0) if queue else self.default
            if callable(reply):
                reply = reply(idempotency_key)
            if isinstance(reply, Exception):
                if isinstance(reply, UpstreamUnavailable):
                    self.breaker.record_failure()
                raise reply
            self.breaker.record_success()
            return Answer.from_wire({"id": idempotency_key, "task": body["task"], **reply})
        finally:
            self.in_flight -= 1


def _unavailable(message: str, attempts: int = 1) -> UpstreamUnavailable:
    exc = UpstreamUnavailable(message)
    exc.attempts = attempts
    return exc


def pending(i: int, **kw: Any) -> PendingEscalation:
    rid = f"r{i:03d}"
    return PendingEscalation(
        id=rid, task="documents",
        body={"task": "documents", "input": {"text": f"t{i}"}, "callback_url": "http://c/cb"},
        provisional={"id": rid, "task": "documents", "label": "sport", "confidence": 0.3,
                     "status": "provisional", "answered_by": "endpoint",
                     "hops": [{"tier": "endpoint"}]},
        reason="down", hop_count=1, ttl_s=kw.pop("ttl_s", 60), callback_url="http://c/cb",
        max_attempts=kw.pop("max_attempts", 5),
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01", **kw)


@pytest.fixture
async def outbox(tmp_path: Path):
    box = Outbox(f"sqlite:///{tmp_path}/f.db", tier="endpoint", settings=OutboxSettings(
        retry_initial_s=0.02, retry_max_s=0.05, poll_initial_s=0.02, poll_max_s=0.05,
        idle_poll_s=0.05, sweep_interval_s=0.1, forward_concurrency=4, send_timeout_ms=2000))
    await box.start(background=False)
    yield box
    await box.aclose()


async def until(check: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll an async or sync predicate until truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def state_of(box: Outbox, rid: str) -> str:
    return (await box.result(rid))["escalation"]["state"]


async def run_forwarder(box: Outbox, upstream: ScriptedUpstream) -> Forwarder:
    fwd = Forwarder(box, upstream)
    fwd.start()
    return fwd


async def test_drains_with_the_key_hop_and_trace_and_stores_the_final_answer(outbox, monkeypatch):
    # Tracing off, whatever an earlier test installed (the OpenTelemetry provider is process-
    # global): the traceparent stored with the row is what travels. With tracing on, the drain
    # span's own trace travels instead, linked to it (tests/integration/test_tracing.py).
    monkeypatch.setattr(trace_context, "sdk_tracer", lambda: None)
    up = ScriptedUpstream()
    for i in range(10):
        await outbox.enqueue(pending(i))
    fwd = await run_forwarder(outbox, up)
    try:
        await until(lambda: outbox.depth() == 0)
    finally:
        await fwd.stop()
    assert sorted(c[0] for c in up.calls) == [f"r{i:03d}" for i in range(10)]
    key, body, hop, headers = up.calls[0]
    assert key == "r000" and body == {"task": "documents", "input": {"text": "t0"}}
    assert hop == 1 and headers["traceparent"].startswith("00-111")
    got = await outbox.result("r003")
    assert (got["status"], got["label"], got["answered_by"]) == ("final", "business", "edge-node")
    assert [h["tier"] for h in got["hops"]] == ["endpoint", "edge-node"]
    assert got["escalation"]["state"] == "done" and got["callback"]["state"] == "pending"
    assert up.max_in_flight <= 4


async def test_poison_is_dead_at_once_and_409_is_retried_free(outbox):
    up = ScriptedUpstream()
    up.script["r000"] = [UpstreamRejected("refused", upstream_status=422,
                                          upstream_body={"error": {"code": "unknown_task"}})]
    up.script["r001"] = [UpstreamRejected("busy", upstream_status=409), up.default]
    await outbox.enqueue(pending(0))
    await outbox.enqueue(pending(1, max_attempts=1))
    fwd = await run_forwarder(outbox, up)
    try:
        await until(lambda: outbox.depth() == 0)
    finally:
        await fwd.stop()
    dead = (await outbox.result("r000"))["escalation"]
    assert dead["state"] == "dead" and "HTTP 422" in dead["last_error"]
    assert "unknown_task" in dead["last_error"]
    ok = (await outbox.result("r001"))["escalation"]
    assert ok["state"] == "done" and ok["attempts"] == 0  # the 409 spent no attempt


async def test_failures_spend_attempts_until_dead(outbox):
    up = ScriptedUpstream()
    up.script["r000"] = [_unavailable("HTTP 503") for _ in range(3)]
    await outbox.enqueue(pending(0, max_attempts=3))
    fwd = await run_forwarder(outbox, up)
    try:
        await until(lambda: outbox.depth() == 0)
    finally:
        await fwd.stop()
    esc = (await outbox.result("r000"))["escalation"]
    assert esc["state"] == "dead" and esc["attempts"] == 3 and "HTTP 503" in esc["last_error"]
    assert len(up.calls) == 3


async def test_provisional_upstream_answer_is_polled_until_final(outbox):
    up = ScriptedUpstream()
    up.script["r000"] = [{"label": "sport", "status": "provisional", "answered_by": "edge-node",
                          "hops": [{"tier": "edge-node"}]}] * 2 + [
        {"label": "politics", "status": "final", "answered_by": "cloud",
         "hops": [{"tier": "edge-node"}, {"tier": "cloud"}]}]
    await outbox.enqueue(pending(0, max_attempts=1))
    fwd = await run_forwarder(outbox, up)
    try:
        await until(lambda: outbox.depth() == 0)
    finally:
        await fwd.stop()
    got = await outbox.result("r000")
    assert (got["label"], got["answered_by"]) == ("politics", "cloud")
    assert [h["tier"] for h in got["hops"]] == ["endpoint", "edge-node", "cloud"]
    assert len(up.calls) == 3 and {c[0] for c in up.calls} == {"r000"}


class SteppedClock:
    """A clock that moves only when told; counts how often it is read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


async def test_open_breaker_sends_nothing_then_one_probe_then_drains(outbox):
    clock = SteppedClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.3, clock=clock)
    breaker.record_failure()  # open, and it stays open until the clock is moved
    up = ScriptedUpstream(breaker)
    up.delay_s = 0.05
    for i in range(8):
        await outbox.enqueue(pending(i))
    fwd = await run_forwarder(outbox, up)
    try:
        # The forwarder reads the breaker once per round: several rounds with work due and the
        # breaker open, and not one send.
        reads = clock.reads
        await until(lambda: clock.reads >= reads + 5)
        assert up.calls == []
        clock.now = 0.3  # the reset timeout has passed: half-open
        await until(lambda: len(up.calls) >= 1)
        assert up.calls[0][0] == "r000"  # the probe is the oldest row
        await until(lambda: outbox.depth() == 0)
    finally:
        await fwd.stop()
    assert len(up.calls) == 8 and up.max_in_flight > 1


class StateAtSpanEnd(SpanProcessor):
    """Reads a row's stored state (a separate SQLite connection) when its drain span ends."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: list[tuple[Any, str]] = []

    def on_end(self, span: ReadableSpan) -> None:
        if span.name != "cascade.queue.drain":
            return
        conn = sqlite3.connect(self.db)
        try:
            (state,) = conn.execute("SELECT state FROM cascade_outbox WHERE id = ?",
                                    (span.attributes["cascade.request_id"],)).fetchone()
        finally:
            conn.close()
        self.seen.append((span.attributes["cascade.queue.outcome"], state))


async def test_the_outcome_is_stored_before_its_drain_span_ends(outbox, tmp_path, spans):
    # Whoever reads an ended drain span (an exporter, a test, an operator with the trace) must
    # find the outcome it reports already in the database.
    from tests.unit import otel_fixtures

    up = ScriptedUpstream()
    up.script["r001"] = [UpstreamRejected("refused", upstream_status=422, upstream_body="no")]
    up.script["r002"] = [_unavailable("HTTP 503")]
    for i in range(3):
        await outbox.enqueue(pending(i))
    probe = StateAtSpanEnd(tmp_path / "f.db")
    switch, otel_fixtures._SWITCH.target = otel_fixtures._SWITCH.target, probe
    fwd = await run_forwarder(outbox, up)
    try:
        await until(lambda: len(probe.seen) >= 3)
    finally:
        await fwd.stop()
        otel_fixtures._SWITCH.target = switch
    assert sorted(probe.seen[:3]) == [("dead", "dead"), ("final", "done"), ("retry", "queued")]


async def test_stop_releases_rows_whose_send_was_interrupted(outbox):
    up = ScriptedUpstream()
    up.delay_s = 10
    await outbox.enqueue(pending(0))
    fwd = await run_forwarder(outbox, up)
    await until(lambda: len(up.calls) == 1)
    await fwd.stop()
    assert await state_of(outbox, "r000") == "queued"
    (row,) = await outbox.claim(1)  # due again at once, not after the lease
    assert row.id == "r000"
