"""One tier: runner + gate + upstream + escalation queue. No HTTP server in here.

:class:`Node` is what ``cascade serve`` wraps in FastAPI; tests and benchmarks can drive it
directly. Per request it validates the input, runs the local model, scores and gates the
output, and escalates to the upstream within the remaining deadline; when the upstream cannot
be reached it answers provisionally and hands the escalation to its queue.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cascade.contract.answer import Answer, GeneratedText, Hop, merge_upstream
from cascade.contract.deadline import Deadline
from cascade.contract.escalation import EscalationQueue, PendingEscalation, UnqueuedEscalations
from cascade.contract.inputs import InputDecoder
from cascade.contract.outputs import CompletionInput, Generation, Output, TokenDelta
from cascade.contract.schemas import InferRequest
from cascade.contract.streaming import EVENT_ESCALATE, EVENT_TOKEN, EventSink
from cascade.errors import (
    HopLimitExceeded,
    ServiceUnavailable,
    UnknownTask,
    UpstreamError,
    UpstreamRejected,
)
from cascade.gating.drift_monitor import DriftMonitor
from cascade.gating.gate import Decision, decide
from cascade.gating.scoring import assess_output
from cascade.observability.decisionlog import DecisionRecorder
from cascade.observability.disk import DiskUsage
from cascade.observability.examples import HardExampleStore
from cascade.observability.outcome import OutcomeObserver, RequestOutcome
from cascade.observability.telemetry import TierTelemetry, outgoing_trace_context
from cascade.policy import LoadedPolicy
from cascade.runners.base import Runner, StreamingRunner
from cascade.tier.audit import AUDIT_HEADER, Auditor
from cascade.tier.canary import Canary
from cascade.tier.pressure import Plan, PressureGuard
from cascade.tier.settings import NodeSettings
from cascade.trust import TierTrust
from cascade.upstream.base import Upstream

log = logging.getLogger("cascade.tier.node")

# Below this much time left, escalating cannot help: answer with what we have.
MIN_ESCALATION_BUDGET_MS = 5


@dataclass(frozen=True)
class TaskRuntime:
    """What a node needs to serve one task."""

    name: str
    runner: Runner
    decode: InputDecoder
    fields: tuple[str, ...] | None = None
    """A structured generative task's answer keys (the gate checks every one is there)."""
    canary: Canary | None = None
    """A newly installed model version answering its share of requests (cascade.tier.canary)."""
    input_schema: dict[str, Any] | None = None
    """JSON Schema of what ``decode`` accepts (the OpenAPI document's request body)."""

    def pick_runner(self) -> Runner:
        """The runner that answers this request: the canary's on its share, else the task's."""
        canary = self.canary
        return canary.runner if canary is not None and canary.take() else self.runner


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-request facts from the transport (headers), kept out of the request body."""

    request_id: str | None = None
    hop_count: int = 0
    deadline_ms: int | None = None
    traceparent: str | None = None
    request_hash: str | None = None
    """Set by the idempotency layer: kept with a queued escalation so a reused key is caught."""
    audit: str | None = None
    """A lower tier's shadow audit (``X-Cascade-Audit``: next_tier or chain): not traffic, no
    drift window, no observers, never queued; escalated online only under ``chain``."""


@dataclass(slots=True)
class Answered:
    """What :meth:`Node.answer` did for one request: the answer and whether this tier queued
    an escalation (then the answer is already committed with it, under the request's id)."""

    answer: Answer
    queued: bool


def owed_escalation(
    request: InferRequest, ctx: CallContext, answer: Answer, *, reason: str,
    task_policy: Any, traceparent: str | None, handed_over: bool = False,
) -> PendingEscalation:
    """The one place a :class:`PendingEscalation` is built: the node's own failed escalation
    and the idempotency layer's record of work the upstream took over both come here."""
    body = upstream_body(request)
    return PendingEscalation(
        id=answer.id, task=request.task, body=body, provisional=answer.to_wire(),
        reason=reason, hop_count=ctx.hop_count + 1, ttl_s=task_policy.queue.ttl_s,
        max_attempts=task_policy.queue.max_attempts, traceparent=traceparent,
        callback_url=request.callback_url, request_hash=ctx.request_hash,
        handed_over=handed_over,
    )


def upstream_body(request: InferRequest) -> dict[str, Any]:
    """What this tier sends up for ``request`` (online and from the queue alike)."""
    body: dict[str, Any] = {"task": request.task, "input": request.input}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.callback_url:
        body["callback_url"] = request.callback_url
    return body


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id (used as the idempotency key upstream).

    A random per-process prefix plus a counter: unique across processes and restarts like a
    uuid4, without a call to the OS random source on every request.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class Node:
    """One tier of the cascade, transport-agnostic."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        tasks: dict[str, TaskRuntime],
        policy: LoadedPolicy,
        upstream: Upstream | None = None,
        escalations: EscalationQueue | None = None,
        telemetry: TierTelemetry | None = None,
        decisions: DecisionRecorder | None = None,
        drift: DriftMonitor | None = None,
        disk: DiskUsage | None = None,
        auditor: Auditor | None = None,
        pressure: PressureGuard | None = None,
        replica: str | None = None,
        trust: TierTrust | None = None,
    ) -> None:
        """Collaborators are given, not built here (:func:`cascade.tier.compose.build_node`
        builds them from settings); the defaults suit a tier assembled by hand in a test.
        ``replica``: which of several processes serving this tier this is (Serve's replica
        id); None for a tier that is one process."""
        self.settings = settings
        self.replica = replica
        self.tier = settings.tier
        self.tasks = tasks
        self._policy = policy
        self.upstream = upstream
        self.escalations: EscalationQueue = escalations or UnqueuedEscalations()
        self.disk = disk  # bytes used per local store vs the disk budget (/readyz, /metrics)
        # TLS, client keys, callback policy (a hand-built test node: none of them)
        self.trust = trust
        self.started_at = time.time()
        self.telemetry = telemetry or TierTelemetry(self.tier)  # spans + /metrics of this tier
        self.telemetry.metrics.bind_node(self)
        self._check_policy_covers(policy)
        self.decisions = decisions or DecisionRecorder(self.tier)  # sampled gate log
        self.decisions.configure(policy)
        # Hot reload outcomes (cascade.policy.reload), shown on /readyz.
        self.policy_reloads: dict[str, Any] = {"reloads": 0, "errors": 0, "last_error": None}
        self.drift = drift or DriftMonitor(self.tier)  # drift alarm per task
        self.drift.prime(policy, list(tasks))
        # Shadow audits and hard examples (cascade.tier.audit), following the live policy.
        self.auditor = auditor or Auditor(self.tier, upstream=None,
                                          examples=HardExampleStore(self.tier))
        self.auditor.configure(policy)
        # Answer cache and fallbacks under latency pressure (cascade.tier.pressure).
        self.pressure = pressure or PressureGuard(self.tier)
        self.pressure.configure(policy)
        self._observers: tuple[OutcomeObserver, ...] = (
            self.decisions.record_outcome, self.telemetry.record_outcome,
            self.auditor.record_outcome)
        # Extra sections of /readyz by name, e.g. "model_versions" (cascade.tier.rollout).
        self.readiness_sections: dict[str, Callable[[], Any]] = {}
        self.rollout: Any = None  # cascade.tier.rollout.Rollout when it takes signed bundles

    def add_observer(self, observe: OutcomeObserver) -> None:
        """Also hand every request's outcome to ``observe`` (e.g. the canary's guards)."""
        self._observers = (*self._observers, observe)

    # -- construction -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Release the upstream connection pool, the models' threads and the decision log."""
        if self.upstream is not None:
            await self.upstream.aclose()
        for runtime in self.tasks.values():
            runtime.runner.close()
        self.decisions.close()
        self.pressure.close()
        await self.auditor.aclose()

    # -- policy -------------------------------------------------------------------------------

    @property
    def policy(self) -> LoadedPolicy:
        """The live policy (swapped atomically by :meth:`set_policy`)."""
        return self._policy

    def _check_policy_covers(self, policy: LoadedPolicy) -> None:
        for task in self.tasks:
            policy.rule(task, self.tier)  # raises PolicyError naming file and key

    def set_policy(self, policy: LoadedPolicy) -> None:
        """Replace the live policy; raises (keeping the old one) if it does not cover this tier."""
        self._check_policy_covers(policy)
        self._policy = policy  # one reference swap: requests see old or new, never a mix
        self.decisions.configure(policy)
        self.auditor.configure(policy)
        self.pressure.configure(policy)

    # -- serving ------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, ctx: CallContext) -> Answer:
        """Answer one request (``POST /v1/infer``'s body is its :meth:`Answer.to_wire`)."""
        return (await self.answer(request, ctx)).answer

    async def answer(self, request: InferRequest, ctx: CallContext,
                     events: EventSink | None = None) -> Answered:
        """Answer one request and say whether its escalation was queued here.

        ``events``: stream the answer (``cascade.contract.streaming``): this tier's tokens as
        its model produces them, an ``escalate`` event when its gate sends the request up, and
        the upstream's events relayed; the caller sends the final ``answer`` event itself."""
        started = time.perf_counter()
        runtime = self._runtime_for(request, ctx)
        policy = self._policy  # one consistent policy for the whole request
        task_policy = policy.task(request.task)
        x = runtime.decode(request.input, max_text_chars=self.settings.max_text_chars,
                           max_tokens=request.max_tokens)

        deadline_ms = ctx.deadline_ms or request.deadline_ms or task_policy.deadline_ms
        deadline = Deadline.from_ms(deadline_ms)
        request_id = ctx.request_id or request.request_id or new_request_id()
        if ctx.audit is not None:  # an audit is judged by the model itself, never the cache
            plan = Plan(runtime.runner, self.tier, measure=False)
        else:
            cached = self.pressure.lookup(request.task, request.input, request_id,
                                          outgoing_trace_context(ctx.traceparent)[0])
            if cached is not None:
                self.telemetry.record_answer(cached, escalated=False)
                return Answered(cached, False)
            plan = self.pressure.plan(request.task, runtime.pick_runner())
        if plan.runner is None:
            answered = await self._escalate_early(request, ctx, request_id, deadline,
                                                  runtime.runner.model_name, plan)
        else:
            answered = await self._answer_with(plan, runtime, request, ctx, x, deadline,
                                               request_id, started, events)
        if ctx.audit is None:
            self.pressure.remember(request.task, request.input, answered.answer)
        return answered

    async def _answer_with(self, plan: Plan, runtime: TaskRuntime, request: InferRequest,
                           ctx: CallContext, x: Any, deadline: Deadline, request_id: str,
                           started: float, events: EventSink | None) -> Answered:
        """Run ``plan``'s model, gate its output, escalate if the gate says so."""
        policy = self._policy
        runner = plan.runner
        assert runner is not None
        started_ns = time.time_ns()
        output = await self._run_local(runner, x, deadline, events)
        inferred_ns = time.time_ns()
        if plan.measure:
            self.pressure.observe(request.task, (inferred_ns - started_ns) / 1e6)
        rule = policy.rule(request.task, plan.rule_tier)
        # calibrated confidence, as replay computes it
        scored = assess_output(output, rule, fields=runtime.fields)
        conf, label = scored.confidence, scored.label
        # Feeds the drift window; while a `tighten` alarm is on, the stricter rule (also what
        # the decision log records, so replay re-decides with it).
        if ctx.audit is None:  # an audit is not traffic: it stays out of the drift window
            rule = self.drift.observe(policy, request.task, conf, label, rule)
        decision = decide(conf, label, rule, has_upstream=self.upstream is not None
                          and ctx.audit != "next_tier")
        if ctx.audit == "top" and self.upstream is not None:
            decision = Decision.ESCALATE  # the top tier judges this audit
        request_trace = self.telemetry.record_local(  # starts the SERVER span, decision known
            task=request.task, model=runner.model_name, started_ns=started_ns,
            inferred_ns=inferred_ns, gated_ns=time.time_ns(), confidence=conf,
            decision=decision.value, signal=rule.signal, incoming=ctx.traceparent,
            generation=output if isinstance(output, Generation) else None,
            audit=ctx.audit is not None,
        )
        hop = Hop(tier=self.tier, model=runner.model_name, label=label,
                  confidence=round(conf, 6), decision=decision.value, ms=0.0)
        answer = Answer(
            id=request_id, task=request.task,
            label=label if decision is not Decision.UNKNOWN else None,
            confidence=round(conf, 6),
            status="unknown" if decision is Decision.UNKNOWN else "final",
            answered_by=self.tier, hops=[hop], trace_id=request_trace.trace_id,
        )
        if isinstance(output, Generation):
            hop.tokens, hop.ttft_ms = output.completion_tokens, _round_ms(output.ttft_ms)
            hop.finish_reason = output.finish_reason
            answer.generated = GeneratedText.of(output)
        hop.ms = round((time.perf_counter() - started) * 1000, 3)  # this tier's own time
        queued = False
        if decision is Decision.ESCALATE:
            if events is not None:
                events(EVENT_ESCALATE, {
                    "tier": self.tier, "model": runner.model_name, "confidence": hop.confidence,
                    "threshold": rule.threshold_for(label),
                    "reason": f"confidence {conf:.3f} is below the threshold "
                              f"{rule.threshold_for(label):.3f} of tier {self.tier}"})
            with request_trace.current():  # CLIENT and PRODUCER spans are its children
                answer, queued = await self._escalate(request, ctx, answer, deadline,
                                                      request_trace.traceparent,
                                                      policy.task(request.task), events)
        if ctx.audit is not None:
            return Answered(answer, queued)
        outcome = RequestOutcome(
            tier=self.tier, task=request.task, hop=ctx.hop_count, model=runner.model_name,
            policy=policy, rule=rule, assessment=scored, decision=decision.value,
            has_upstream=self.upstream is not None, answer=answer, queued=queued,
            payload=request.input, traceparent=request_trace.traceparent,
        )
        for observe in self._observers:
            observe(outcome)
        return Answered(answer, queued)

    async def _escalate_early(self, request: InferRequest, ctx: CallContext, request_id: str,
                              deadline: Deadline, model: str, plan: Plan) -> Answered:
        """Under pressure with no fallback: send the request up without running the model;
        when there is no upstream or it fails, ``unknown`` with the reason (nothing queued:
        there is no answer of ours to give provisionally)."""
        trace_id, traceparent = outgoing_trace_context(ctx.traceparent)
        hop = Hop(tier=self.tier, model=model, label=None, confidence=0.0, decision="escalate",
                  ms=0.0)
        answer = Answer(id=request_id, task=request.task, label=None, confidence=0.0,
                        status="unknown", answered_by=self.tier, hops=[hop], trace_id=trace_id)
        reason = f"{plan.reason} and it has no upstream"
        if self.upstream is not None:
            try:
                upstream = await self.upstream.escalate(
                    upstream_body(request), deadline=deadline, hop_count=ctx.hop_count + 1,
                    idempotency_key=request_id, headers={"traceparent": traceparent})
            except UpstreamError as exc:
                reason = f"{plan.reason} and its upstream failed: {exc}"
            else:
                answer = merge_upstream(answer, upstream)
                self.telemetry.record_answer(answer, escalated=True)
                return Answered(answer, False)
        answer.reason = reason
        self.pressure.gave_up(request.task)
        self.telemetry.record_answer(answer, escalated=False)
        return Answered(answer, False)

    def _runtime_for(self, request: InferRequest, ctx: CallContext) -> TaskRuntime:
        """The served task's runtime; refuses unknown tasks and requests past the hop limit."""
        runtime = self.tasks.get(request.task)
        if runtime is None:
            raise UnknownTask(
                f"task {request.task!r} is not served by tier {self.tier}; "
                f"allowed: {', '.join(sorted(self.tasks))}",
                field="task",
            )
        if ctx.hop_count > self.settings.max_hops:
            raise HopLimitExceeded(
                f"request has crossed {ctx.hop_count} hops; this tier allows at most "
                f"{self.settings.max_hops} (escalation loop?)",
                field="X-Cascade-Hop",
            )
        return runtime

    async def _run_local(self, runner: Runner, x: Any, deadline: Deadline,
                         events: EventSink | None) -> Output:
        """This tier's model on one input; streamed token by token when asked and possible."""
        if events is None or not isinstance(x, CompletionInput) \
                or not isinstance(runner, StreamingRunner):
            (output,) = await runner.run(x, deadline)
            return output
        final: Generation | None = None
        async for item in runner.stream(x, deadline):
            if isinstance(item, TokenDelta):
                events(EVENT_TOKEN, {"tier": self.tier, "text": item.text})
            else:
                final = item
        if final is None:  # a runner that broke its contract: no answer to gate
            raise ServiceUnavailable(f"{runner.model_name} ended its stream without an answer",
                                     code="model_error")
        return final

    async def _escalate(
        self,
        request: InferRequest,
        ctx: CallContext,
        answer: Answer,
        deadline: Deadline,
        traceparent: str,
        task_policy: Any,
        events: EventSink | None = None,
    ) -> tuple[Answer, bool]:
        """Ask the upstream; on failure answer provisionally and queue the escalation.

        Returns the answer and whether the escalation was handed to this tier's queue."""
        assert self.upstream is not None
        body = upstream_body(request)
        reason: str
        try:
            if deadline.remaining_ms() < MIN_ESCALATION_BUDGET_MS:
                raise _NoBudget(f"only {deadline.remaining_ms()} ms left of the deadline")
            upstream = await self.upstream.escalate(
                body,
                deadline=deadline,
                hop_count=ctx.hop_count + 1,
                idempotency_key=answer.id,
                headers={"traceparent": traceparent} if ctx.audit is None
                else {"traceparent": traceparent, AUDIT_HEADER: ctx.audit},
                events=events,
            )
        except UpstreamRejected as exc:
            reason = f"upstream rejected the request ({exc.upstream_status}): {exc.message}"
        except (UpstreamError, _NoBudget) as exc:
            reason = str(exc)
        else:
            return merge_upstream(answer, upstream), False
        if ctx.audit is not None:  # an audit is never queued: its caller counts it as failed
            answer.status = "provisional"
            return answer, False
        if task_policy.offline == "reject":
            raise ServiceUnavailable(
                f"upstream unavailable and the policy for {request.task!r} says reject: {reason}",
                code="upstream_unavailable",
            )
        answer.status = "provisional"
        with self.telemetry.enqueue_span(request.task, answer.id) as queued_traceparent:
            # the drain span links to the enqueue span when there is one
            pending = owed_escalation(request, ctx, answer, reason=reason,
                                      task_policy=task_policy,
                                      traceparent=queued_traceparent or traceparent)
            answer.escalation = await self.escalations.enqueue(pending)
        return answer, answer.escalation.get("state") != "not_queued"

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` reports."""
        policy = self._policy
        return {
            "tier": self.tier,
            # drift, policy reloads, uptime and the decision log are this replica's own; the
            # outbox (queue, results) is the tier's, shared by its replicas (edge_nodes/README)
            "replica": self.replica,
            "instance": self.settings.instance,
            "ready": True,
            "models": {task: rt.runner.model_name for task, rt in self.tasks.items()},
            "policy": {"path": policy.path, "name": policy.policy.name, "version": policy.version,
                       "sha256": policy.sha256, "reload": dict(self.policy_reloads)},
            "upstream": None
            if self.upstream is None
            else {"url": self.settings.upstream_url, "breaker": self.upstream.breaker.state},
            "queue_depth": self.escalations.depth(),
            "drift": self.drift.readiness(policy, list(self.tasks)),
            "audit": self.auditor.readiness(list(self.tasks)),
            "pressure": self.pressure.readiness(list(self.tasks)),
            "disk": self.disk.view() if self.disk is not None else None,
            "security": self.trust.readiness() if self.trust is not None else None,
            "uptime_s": round(time.time() - self.started_at, 3),
            **{name: section() for name, section in self.readiness_sections.items()},
        }


def _round_ms(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


class _NoBudget(Exception):
    """Too little of the deadline is left to try the upstream at all."""
