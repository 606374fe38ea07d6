"""Shadow audits and hard examples of one tier (``docs/field-operations.md``).

:class:`Auditor` is an outcome observer of the node. For each request the tier answered
itself, it decides (by request id, at the policy's ``audit.rate``; always below the hard-example
``confidence_floor``) whether to audit it; an audit is admitted only within the per-second
budget and while the bounded queue has room, else dropped and counted: the answer has already
been sent and is never delayed. Background workers send each audit to the upstream through
their own client (own circuit breaker and counters, so audits never trip the traffic breaker)
with ``X-Cascade-Audit`` set: the upper tier answers without counting it as traffic and
without queueing it. The verdict (same label or not) feeds the task's
:class:`~cascade.gating.agreement.AgreementWindow`: the live agreement with its Wilson
interval and the field-accuracy alarm, on ``/readyz`` and ``/metrics``.

Hard examples (:class:`~cascade.observability.examples.HardExampleStore`) come from here too:
escalated requests the upper tier answered (the outcome), audits that disagreed and audits of
low-confidence answers (the verdict), each with the upper tier's label.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cascade.contract.deadline import Deadline
from cascade.errors import UpstreamError
from cascade.gating.agreement import (
    AgreementWindow,
    ShareWindow,
    TokenBucket,
    stratified_accuracy,
)
from cascade.observability.decisionlog import sampled
from cascade.observability.examples import HardExample, HardExampleStore
from cascade.observability.outcome import RequestOutcome
from cascade.observability.trace_context import (
    current_traceparent,
    sdk_tracer,
    span_link_from_traceparent,
)
from cascade.upstream.base import Upstream

__all__ = ["AUDIT_HEADER", "AUDIT_REFERENCES", "Auditor"]

log = logging.getLogger("cascade.tier.audit")

AUDIT_HEADER: Final[str] = "X-Cascade-Audit"
"""Marks a shadow audit; its value is the policy's ``audit.reference`` (next_tier, chain, top)."""
AUDIT_REFERENCES: Final[tuple[str, ...]] = ("next_tier", "chain", "top")
_COUNTERS: Final[tuple[str, ...]] = (
    "sampled", "sent", "agreed", "disagreed", "inconclusive", "failed", "dropped_budget",
    "dropped_queue_full")


@dataclass(frozen=True, slots=True)
class _Audit:
    """One admitted audit: what to ask the upstream and what this tier answered."""

    request_id: str
    task: str
    body: dict[str, Any]
    hop: int
    local_label: str
    local_confidence: float
    low_confidence: bool
    sampled: bool
    """Drawn at the audit rate: only these feed the agreement (a forced low-confidence audit
    would bias the estimate towards the hard cases)."""
    traceparent: str | None
    reference: Literal["next_tier", "chain", "top"]
    deadline_ms: int


class Auditor:
    """A tier's shadow audits (an outcome observer plus background workers) and the source of
    its hard examples. ``upstream``: the audits' own client (None at the top tier)."""

    def __init__(self, tier: str, *, upstream: Upstream | None, examples: HardExampleStore,
                 ) -> None:
        self.tier = tier
        self.upstream = upstream
        self.examples = examples
        self.windows: dict[str, AgreementWindow] = {}
        """Per task: audits of answers given here (agreement: accuracy of own answers)."""
        self.escalated: dict[str, AgreementWindow] = {}
        """Per task: own label vs the upper tier's answer, for every escalation answered."""
        self.local_share: dict[str, ShareWindow] = {}
        """Per task: share of the recent traffic answered here (the strata's weights)."""
        self.counts: dict[str, dict[str, int]] = {}
        self._buckets: dict[str, tuple[float, TokenBucket]] = {}
        self._pending: dict[str, int] = {}
        self._queue: asyncio.Queue[_Audit] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._policy: Any = None

    # -- life -----------------------------------------------------------------------------------

    def configure(self, policy: Any) -> None:
        """Follow a (re)loaded policy: the store's file; each task's window restarts when its
        audit settings change; the workers read hard-example settings from it."""
        self._policy = policy
        self.examples.configure(policy)
        for task, task_policy in policy.policy.tasks.items():
            audit = task_policy.audit
            settings = audit.agreement_settings()
            window = self.windows.get(task)
            if window is None or window.settings != settings:
                self.windows[task] = AgreementWindow(settings, tier=self.tier, task=task)
                # The same horizon for both strata: as many decisions as `window` audits take.
                horizon = min(1_000_000, int(audit.window / max(audit.rate, audit.window / 1e6)))
                self.escalated[task] = AgreementWindow(
                    replace(settings, min_agreement=None, window=horizon))
                self.local_share[task] = ShareWindow(horizon)

    async def start(self, concurrency: int) -> None:
        """Start ``concurrency`` workers (nothing to do without an upstream)."""
        if self.upstream is None or self._workers:
            return
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._work(), name=f"audit-{i}")
                         for i in range(concurrency)]

    async def aclose(self) -> None:
        """Stop the workers (audits still queued are dropped: they are only estimates), close
        the audit client and the example store."""
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        if self.upstream is not None:
            await self.upstream.aclose()
        self.examples.close()

    # -- the observer (on the request path: no I/O, no await) ------------------------------------

    def record_outcome(self, outcome: RequestOutcome) -> None:
        """Audit a sample of the answers given here; keep the escalated ones as examples."""
        answer, task_policy = outcome.answer, outcome.policy.task(outcome.task)
        hard = task_policy.hard_examples
        if outcome.has_upstream and outcome.decision in ("answer", "escalate"):
            share = self.local_share.get(outcome.task)
            if share is not None:
                share.observe(outcome.decision == "answer")
        if outcome.decision == "escalate":
            if answer.answered_by == self.tier or answer.status != "final" \
                    or answer.label is None:
                return  # no upper answer (yet): nothing learned
            escalated = self.escalated.get(outcome.task)
            if escalated is not None:
                escalated.observe(answer.label == outcome.assessment.label)
            if hard.enabled and hard.escalated:
                self.examples.add(HardExample(
                    answer.id, outcome.task, "escalated", outcome.payload,
                    outcome.assessment.label, outcome.assessment.confidence, answer.label,
                    answer.answered_by), include_payload=hard.include_payloads)
            return
        if outcome.decision != "answer" or not outcome.has_upstream or answer.label is None:
            return
        audit = task_policy.audit
        low = hard.enabled and hard.confidence_floor is not None \
            and outcome.assessment.confidence < hard.confidence_floor
        drawn = sampled(answer.id, audit.rate)
        if not low and not drawn:
            return
        self._admit(_Audit(
            answer.id, outcome.task, {"task": outcome.task, "input": outcome.payload},
            outcome.hop, answer.label, outcome.assessment.confidence, low, drawn,
            outcome.traceparent, audit.reference, audit.deadline_ms), audit)

    def _admit(self, item: _Audit, audit: Any) -> None:
        counts = self._counts(item.task)
        counts["sampled"] += 1
        if self._queue is None:
            counts["dropped_queue_full"] += 1  # not started (or stopping): nowhere to go
            return
        rate, bucket = self._buckets.get(item.task, (None, None))
        if bucket is None or rate != audit.per_second:
            bucket = TokenBucket(audit.per_second)
            self._buckets[item.task] = (audit.per_second, bucket)
        if self._pending.get(item.task, 0) >= audit.queue_size:
            counts["dropped_queue_full"] += 1
        elif not bucket.take():
            counts["dropped_budget"] += 1
        else:
            self._pending[item.task] = self._pending.get(item.task, 0) + 1
            self._queue.put_nowait(item)

    def _counts(self, task: str) -> dict[str, int]:
        counts = self.counts.get(task)
        if counts is None:
            counts = self.counts[task] = dict.fromkeys(_COUNTERS, 0)
        return counts

    # -- the workers ----------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            try:
                await self._audit(item)
            except Exception:  # an audit never takes its worker down
                log.exception("audit of request %s failed unexpectedly", item.request_id)
                self._counts(item.task)["failed"] += 1
            finally:
                self._pending[item.task] -= 1

    async def _audit(self, item: _Audit) -> None:
        assert self.upstream is not None
        counts = self._counts(item.task)
        with _audit_span(self.tier, item):
            headers: dict[str, str] = {AUDIT_HEADER: item.reference}
            traceparent = current_traceparent()
            if traceparent is not None:
                headers["traceparent"] = traceparent
            try:
                answer = await self.upstream.escalate(
                    item.body, deadline=Deadline.from_ms(item.deadline_ms),
                    hop_count=item.hop + 1, idempotency_key=f"audit-{item.request_id}"[:128],
                    headers=headers)
            except UpstreamError as exc:
                counts["failed"] += 1
                log.info("audit of request %s not answered: %s", item.request_id, exc)
                return
        counts["sent"] += 1
        if answer.status != "final" or answer.label is None:
            counts["inconclusive"] += 1
            return
        agreed = answer.label == item.local_label
        window = self.windows.get(item.task)
        if item.sampled:
            counts["agreed" if agreed else "disagreed"] += 1
            if window is not None:
                window.observe(agreed)
        self._keep(item, answer.label, answer.answered_by, agreed)

    def _keep(self, item: _Audit, label: str, label_tier: str, agreed: bool) -> None:
        """The audit's hard example, if the live policy wants it."""
        if self._policy is None:
            return
        hard = self._policy.task(item.task).hard_examples
        reason: Literal["disagreed", "low_confidence"] | None = None
        if hard.enabled and not agreed and hard.disagreed:
            reason = "disagreed"
        elif hard.enabled and item.low_confidence:
            reason = "low_confidence"
        if reason is not None:
            self.examples.add(HardExample(
                item.request_id, item.task, reason, item.body["input"], item.local_label,
                item.local_confidence, label, label_tier), include_payload=hard.include_payloads)

    # -- what the tier shows ----------------------------------------------------------------------

    def readiness(self, tasks: list[str]) -> dict[str, Any]:
        """Per task: the live agreement with the upper tier and the audit counters."""
        out: dict[str, Any] = {}
        for task in tasks:
            window = self.windows.get(task)
            rate = self._policy.task(task).audit.rate if self._policy is not None else 0.0
            out[task] = {
                "upstream": self.upstream is not None, "rate": rate,
                **(window.describe() if window is not None else {}),
                "model_accuracy": self.model_accuracy(task),
                "counts": dict(self._counts(task)),
                "hard_examples": dict(self.examples.kept.get(task, {})),
            }
        return out

    def model_accuracy(self, task: str) -> dict[str, Any] | None:
        """The model's live accuracy over all this tier's traffic (both strata), or None."""
        window, escalated, share = (self.windows.get(task), self.escalated.get(task),
                                    self.local_share.get(task))
        if window is None or escalated is None or share is None or share.share() is None:
            return None
        local_share = share.share() or 0.0
        found = stratified_accuracy((window.agreed, window.audits),
                                    (escalated.agreed, escalated.audits), local_share,
                                    window.settings.confidence)
        if found is None:
            return None
        estimate, low, high = found
        return {"estimate": round(estimate, 4), "interval": [round(low, 4), round(high, 4)],
                "local_share": round(local_share, 4), "escalation_verdicts": escalated.audits}

    def metric_families(self) -> Iterator[Any]:
        """``/metrics``: audit counters, agreement and its interval, alarm, hard examples."""
        tier = self.tier
        events = CounterMetricFamily(
            "cascade_audits", "Shadow audits by outcome: sampled, sent, agreed, disagreed, "
            "inconclusive (no final label above), failed, dropped_budget, dropped_queue_full.",
            labels=["tier", "task", "outcome"])
        agreement = GaugeMetricFamily(
            "cascade_audit_agreement", "Share of recent audits on which the upper tier gave "
            "this tier's answer: the live accuracy estimate of answers given here.",
            labels=["tier", "task"])
        bounds = GaugeMetricFamily(
            "cascade_audit_agreement_bound", "Wilson interval of cascade_audit_agreement "
            "(bound=low|high, at the policy's audit.confidence).", labels=["tier", "task", "bound"])
        window = GaugeMetricFamily("cascade_audit_window", "Audits in the agreement window.",
                                   labels=["tier", "task"])
        alarm = GaugeMetricFamily(
            "cascade_audit_alarm", "1 while the field-accuracy alarm is on (agreement's upper "
            "bound below audit.min_agreement).", labels=["tier", "task"])
        model = GaugeMetricFamily(
            "cascade_audit_model_accuracy", "Live accuracy of this tier's model over all its "
            "traffic: audited answers and escalations (own label vs the upper tier's answer), "
            "weighted by their shares; bound=estimate|low|high.", labels=["tier", "task", "bound"])
        kept = CounterMetricFamily(
            "cascade_hard_examples", "Hard examples kept, by reason (escalated, disagreed, "
            "low_confidence).", labels=["tier", "task", "reason"])
        for task, counts in sorted(self.counts.items()):
            for outcome, n in counts.items():
                events.add_metric([tier, task, outcome], n)
        for task, win in sorted(self.windows.items()):
            estimate = win.estimate()
            if estimate is not None:
                low, high = win.interval()
                agreement.add_metric([tier, task], estimate)
                bounds.add_metric([tier, task, "low"], low)
                bounds.add_metric([tier, task, "high"], high)
            window.add_metric([tier, task], float(win.audits))
            found = self.model_accuracy(task)
            if found is not None:
                for bound, value in zip(("estimate", "low", "high"),
                                        (found["estimate"], *found["interval"])):
                    model.add_metric([tier, task, bound], value)
            alarm.add_metric([tier, task], 1.0 if win.alarm else 0.0)
        for task, reasons in sorted(self.examples.kept.items()):
            for reason, n in sorted(reasons.items()):
                kept.add_metric([tier, task, reason], n)
        yield from (events, agreement, bounds, window, alarm, model, kept)


@contextlib.contextmanager
def _audit_span(tier: str, item: _Audit) -> Iterator[None]:
    """An INTERNAL span per audit: a new trace (the CLIENT span and the upper tier's SERVER
    span are its children), linked to the audited request's span."""
    tracer = sdk_tracer()
    if tracer is None:
        yield
        return
    link = span_link_from_traceparent(item.traceparent, **{"cascade.link": "audited_request"})
    with tracer.start_as_current_span(
            "cascade.audit", context=otel_context.Context(), kind=SpanKind.INTERNAL,
            links=[link] if link else None,
            attributes={"cascade.tier": tier, "cascade.task": item.task,
                        "cascade.request_id": item.request_id, "cascade.audit": True}) as span:
        yield
        if not span.is_recording():
            return
        span.set_attribute("cascade.audit.reference", item.reference)
