"""The forwarder: drains a tier's outbox into its upstream once the upstream is reachable.

One asyncio task per tier process. Each round it looks at the upstream's circuit breaker:

* open: the upstream is known down; send nothing, look again shortly (no I/O per row);
* half-open: send exactly one row, the oldest due, as the probe; its outcome closes or reopens
  the breaker;
* closed: claim up to ``forward_concurrency`` due rows (oldest first) and send them
  concurrently. The bound keeps live traffic, which escalates directly and not through the
  outbox, from being starved by a draining backlog.

Every send carries the request id as ``Idempotency-Key``: a send retried after a lost response
is answered from the upstream's stored result, never computed or escalated twice. Outcomes:
final answer → ``done`` (+ callback armed); provisional answer → handed over, polled later with
the same key; 4xx → ``dead`` at once (poison); 409 (the upstream is still computing it) and
breaker refusals → due again without spending an attempt; other failures → one attempt spent,
backoff with jitter, ``dead`` at ``max_attempts``. (TTL sweeps run in the outbox's maintenance
task, which every tier has, forwarder or not.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cascade.contract.answer import Answer, merge_upstream
from cascade.contract.deadline import Deadline
from cascade.errors import ServiceUnavailable, UpstreamRejected, UpstreamUnavailable
from cascade.observability.trace_context import current_traceparent, drain_span
from cascade.outbox.background import BackgroundLoop
from cascade.outbox.rules import backoff_s, strip_view, to_json, wait_event
from cascade.outbox.store import Claimed, Outcome

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.outbox import Outbox

log = logging.getLogger("cascade.outbox.forwarder")

_BUSY_RETRY_S = 0.2
"""Pause after the breaker refused a send (another request holds the half-open probe)."""


class Forwarder(BackgroundLoop):
    """Drains one outbox into one upstream client (see the module docstring)."""

    def __init__(self, outbox: Outbox, upstream: Any, *, rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.upstream = upstream
        self.settings = outbox.settings
        self._rng = rng or random.Random()
        super().__init__()
        self._sends: dict[str, asyncio.Task[None]] = {}
        self._pause_until = 0.0

    def start(self) -> None:
        """Run the drain loop as a background task of the current event loop."""
        self._start_loop(self._run(), f"outbox-forwarder-{self.outbox.tier}")

    async def stop(self) -> None:
        """Stop sending; rows whose send was interrupted become due again at once."""
        await self._stop_loop()
        interrupted = list(self._sends)
        for task in self._sends.values():
            task.cancel()
        await asyncio.gather(*self._sends.values(), return_exceptions=True)
        for id_ in interrupted:
            try:
                await self.outbox.record(Outcome(id_, "release"))
            except ServiceUnavailable:
                pass  # the lease runs out on its own

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        breaker = self.upstream.breaker
        was_closed = breaker.state == "closed"
        while not self._stopping:
            try:
                state = breaker.state
                if state == "open" or time.monotonic() < self._pause_until:
                    was_closed = False
                    await self._idle(min(self.settings.idle_poll_s, breaker.reset_timeout_s / 4))
                    continue
                if state == "closed" and not was_closed:
                    was_closed = True
                    await self.outbox.release_backoff()  # the link is back: no row waits it out
                # Refill when at least half the slots are free: one claim (one commit) then
                # reserves several rows instead of one row per finished send.
                busy = len(self._sends) > self.settings.forward_concurrency // 2
                if busy or (state == "half_open" and self._sends):
                    await asyncio.wait(list(self._sends.values()),
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                limit = 1 if state == "half_open" else (
                    self.settings.forward_concurrency - len(self._sends))
                rows = await self.outbox.claim(limit)
                if not rows:
                    await self._idle(await self._until_next_due())
                    continue
                for row in rows:
                    task = asyncio.create_task(self._send(row), name=f"outbox-send-{row.id}")
                    self._sends[row.id] = task
                    task.add_done_callback(self._forget)
                if state == "half_open":
                    await asyncio.gather(*self._sends.values(), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except ServiceUnavailable as exc:  # the database is unwell: say so, try again later
                log.error("forwarder of %s: %s", self.outbox.tier, exc.message)
                await self._idle(self.settings.idle_poll_s)
            except Exception:
                log.exception("forwarder of %s: unexpected error", self.outbox.tier)
                await self._idle(self.settings.idle_poll_s)

    def _forget(self, task: asyncio.Task[None]) -> None:
        """Done callback of a send: drop it from the in-flight map."""
        for id_, running in list(self._sends.items()):
            if running is task:
                del self._sends[id_]

    async def _until_next_due(self) -> float:
        due = await self.outbox.next_due_at()
        if due is None:
            return self.settings.idle_poll_s
        return min(self.settings.idle_poll_s, max(0.005, due - self.outbox.clock()))

    async def _idle(self, timeout_s: float) -> None:
        """Sleep up to ``timeout_s``; new work (an enqueue) wakes us early."""
        event = self.outbox.work_ready
        if event is None:
            await asyncio.sleep(timeout_s)
            return
        await wait_event(event, timeout_s)

    # -- one send -------------------------------------------------------------------------------

    async def _send(self, row: Claimed) -> None:
        # A new trace per send, linked to the request that queued the row (architecture §7).
        # The outcome is recorded before the span ends, so a drain span that reports an outcome
        # is never seen (exported, read by a test or an operator) before that outcome is stored.
        with drain_span(self.outbox.tier, traceparent=row.traceparent, request_id=row.id,
                        task=row.task, attempt=row.attempts) as span:
            try:
                outcome = await self._attempt(row)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("forwarding %s failed unexpectedly", row.id)
                span.record_exception(exc)
                outcome = Outcome(row.id, "retry", error=f"{type(exc).__name__}: {exc}",
                                  delay_s=self._retry_delay(row))
            span.set_attribute("cascade.queue.outcome", outcome.kind)
            try:
                await self.outbox.record(outcome)
            except ServiceUnavailable as exc:
                # Not recorded: the lease expires and the row is sent again; the upstream's
                # idempotency turns that resend into a lookup.
                log.error("cannot record the outcome of %s: %s", row.id, exc.message)
                span.set_attribute("cascade.queue.outcome_recorded", False)

    async def _attempt(self, row: Claimed) -> Outcome:
        """Send one row (inside its drain span) and classify what happened."""
        # The upstream's work joins the drain span's trace when tracing is on.
        traceparent = current_traceparent() or row.traceparent
        try:
            answer = await self.upstream.escalate(
                row.body,
                deadline=Deadline.from_ms(self.settings.send_timeout_ms),
                hop_count=row.hop_count,
                idempotency_key=row.id,
                headers={"traceparent": traceparent} if traceparent else {},
            )
        except UpstreamRejected as exc:
            if exc.upstream_status == 409:  # the upstream is still computing this very key
                return Outcome(row.id, "release", error=exc.message,
                               delay_s=self.settings.poll_initial_s)
            detail = exc.upstream_body
            if not isinstance(detail, str):
                detail = to_json(detail)
            return Outcome(row.id, "dead",
                           error=f"upstream refused it with HTTP {exc.upstream_status}: {detail[:1000]}")
        except UpstreamUnavailable as exc:
            if exc.attempts == 0:  # the breaker said no: not this row's fault
                self._pause_until = time.monotonic() + _BUSY_RETRY_S
                return Outcome(row.id, "release")
            if row.handed_over:  # the upstream has the work; only the final answer is pending
                return Outcome(row.id, "release", error=exc.message, delay_s=self._poll_delay(row))
            return Outcome(row.id, "retry", error=exc.message, delay_s=self._retry_delay(row))
        # The upstream's escalation state is a view of its queue, not part of our stored answer.
        merged = replace(merge_upstream(Answer.from_wire(strip_view(row.response)), answer),
                         escalation=None)
        response_json = to_json(merged.to_wire())
        if answer.status == "provisional":
            return Outcome(row.id, "handover", response_json=response_json,
                           delay_s=self._poll_delay(row))
        return Outcome(row.id, "final", response_json=response_json)

    def _retry_delay(self, row: Claimed) -> float:
        s = self.settings
        return backoff_s(row.attempts + 1, s.retry_initial_s, s.retry_max_s, self._rng)

    def _poll_delay(self, row: Claimed) -> float:
        s = self.settings
        return backoff_s(row.polls + 1, s.poll_initial_s, s.poll_max_s, self._rng)
