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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cascade.deadline import Deadline
from cascade.decisionlog import DecisionRecorder
from cascade.drift import DriftMonitor
from cascade.errors import (
    HopLimitExceeded,
    ServiceUnavailable,
    UnknownTask,
    UpstreamError,
    UpstreamRejected,
)
from cascade.escalation import EscalationQueue, PendingEscalation, UnqueuedEscalations
from cascade.gate import Decision, assess, decide
from cascade.inputs import DECODERS, InputDecoder
from cascade.policy import LoadedPolicy, load_policy
from cascade.runners.base import Runner
from cascade.schemas import InferRequest
from cascade.settings import NodeSettings
from cascade.telemetry import TierTelemetry, upstream_attempt

log = logging.getLogger("cascade.node")

# Below this much time left, escalating cannot help: answer with what we have.
MIN_ESCALATION_BUDGET_MS = 5


@dataclass(frozen=True)
class TaskRuntime:
    """What a node needs to serve one task."""

    name: str
    runner: Runner
    decode: InputDecoder


@dataclass(frozen=True, slots=True)
class CallContext:
    """Per-request facts from the transport (headers), kept out of the request body."""

    request_id: str | None = None
    hop_count: int = 0
    deadline_ms: int | None = None
    traceparent: str | None = None


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
        upstream: Any | None = None,
        escalations: EscalationQueue | None = None,
    ) -> None:
        self.settings = settings
        self.tier = settings.tier
        self.tasks = tasks
        self._policy = policy
        self.upstream = upstream
        self.escalations: EscalationQueue = escalations or UnqueuedEscalations()
        self.started_at = time.time()
        self.telemetry = TierTelemetry(self.tier, node=self)  # spans + /metrics of this tier
        self._check_policy_covers(policy)
        self.decisions = DecisionRecorder(self.tier)  # sampled gate log, per the policy
        self.decisions.configure(policy)
        # Hot reload outcomes (cascade.policy.reload), shown on /readyz.
        self.policy_reloads: dict[str, Any] = {"reloads": 0, "errors": 0, "last_error": None}
        self.drift = DriftMonitor(self.tier)  # drift alarm per task (cascade.drift)
        self.drift.prime(policy, list(tasks))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> Node:
        """Load models (verifying checksums), the policy, and the upstream client."""
        from cascade.models.manifest import load_manifest
        from cascade.runners.onnx import OnnxRunner

        manifest = load_manifest(Path(settings.models_dir))
        tasks: dict[str, TaskRuntime] = {}
        for task, model_tier in settings.tasks.items():
            runner = OnnxRunner.from_manifest(
                Path(settings.models_dir), task, model_tier, verify_sha256=settings.verify_models
            )
            runner.warmup()
            kind = manifest.tasks[task].input_kind
            tasks[task] = TaskRuntime(name=task, runner=runner, decode=DECODERS[kind])
        policy = load_policy(settings.policy)
        upstream = None
        if settings.upstream_url:
            from cascade.breaker import CircuitBreaker
            from cascade.upstream import UpstreamClient

            upstream = UpstreamClient(
                settings.upstream_url,
                breaker=CircuitBreaker(
                    failure_threshold=settings.breaker_failure_threshold,
                    reset_timeout_s=settings.breaker_reset_s,
                ),
                max_attempts=settings.upstream_max_attempts,
                backoff_initial_ms=settings.upstream_backoff_initial_ms,
                backoff_max_ms=settings.upstream_backoff_max_ms,
                connect_timeout_ms=settings.upstream_connect_timeout_ms,
                on_attempt=upstream_attempt,
            )
        from cascade.outbox import Outbox

        # The durable outbox also keeps idempotent results, so the top tier has one too.
        escalations = Outbox.from_settings(settings)
        return cls(settings, tasks=tasks, policy=policy, upstream=upstream,
                   escalations=escalations)

    async def aclose(self) -> None:
        """Release the upstream connection pool."""
        if self.upstream is not None:
            await self.upstream.aclose()
        self.decisions.close()

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

    # -- serving ------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, ctx: CallContext) -> dict[str, Any]:
        """Answer one request (the body of ``POST /v1/infer``)."""
        started = time.perf_counter()
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
        policy = self._policy  # one consistent policy for the whole request
        task_policy = policy.task(request.task)
        x = runtime.decode(request.input, max_text_chars=self.settings.max_text_chars)

        deadline_ms = ctx.deadline_ms or request.deadline_ms or task_policy.deadline_ms
        deadline = Deadline.from_ms(deadline_ms)
        request_id = ctx.request_id or request.request_id or new_request_id()

        runner = runtime.runner
        started_ns = time.time_ns()
        probs = runner.predict_proba(x)[0]
        inferred_ns = time.time_ns()
        rule = policy.rule(request.task, self.tier)
        signals, conf = assess(probs, rule)  # calibrated confidence, as replay computes it
        label = runner.classes[signals.top_index]
        # Feeds the drift window; while a `tighten` alarm is on, the stricter rule (also what
        # the decision log records, so replay re-decides with it).
        rule = self.drift.observe(policy, request.task, conf, label, rule)
        decision = decide(conf, label, rule, has_upstream=self.upstream is not None)
        request_trace = self.telemetry.record_local(  # starts the SERVER span, decision known
            task=request.task, model=runner.model_name, started_ns=started_ns,
            inferred_ns=inferred_ns, gated_ns=time.time_ns(), confidence=conf,
            decision=decision.value, signal=rule.signal, incoming=ctx.traceparent,
        )
        trace_id = request_trace.trace_id
        hop = {
            "tier": self.tier,
            "model": runner.model_name,
            "label": label,
            "confidence": round(conf, 6),
            "decision": decision.value,
            "ms": 0.0,
        }
        response: dict[str, Any] = {
            "id": request_id,
            "task": request.task,
            "label": label if decision is not Decision.UNKNOWN else None,
            "confidence": round(conf, 6),
            "status": "unknown" if decision is Decision.UNKNOWN else "final",
            "answered_by": self.tier,
            "hops": [hop],
            "trace_id": trace_id,
        }
        hop["ms"] = round((time.perf_counter() - started) * 1000, 3)  # this tier's own time
        if decision is Decision.ESCALATE:
            with request_trace.current():  # CLIENT and PRODUCER spans are its children
                await self._escalate(request, ctx, response, deadline, request_trace.traceparent,
                                     task_policy)
        self.decisions.observe(
            policy, task=request.task, request_id=request_id, trace_id=trace_id,
            hop=ctx.hop_count, model=runner.model_name, has_upstream=self.upstream is not None,
            probabilities=probs, signals=signals, rule=rule, label=label, conf=conf,
            decision=decision.value, response=response, payload=request.input,
        )
        self.telemetry.record_answer(response)
        return response

    async def _escalate(
        self,
        request: InferRequest,
        ctx: CallContext,
        response: dict[str, Any],
        deadline: Deadline,
        traceparent: str,
        task_policy: Any,
    ) -> None:
        """Ask the upstream; on failure turn ``response`` into a provisional answer and queue."""
        assert self.upstream is not None
        body: dict[str, Any] = {"task": request.task, "input": request.input}
        if request.callback_url:
            body["callback_url"] = request.callback_url
        reason: str
        try:
            if deadline.remaining_ms() < MIN_ESCALATION_BUDGET_MS:
                raise _NoBudget(f"only {deadline.remaining_ms()} ms left of the deadline")
            upstream = await self.upstream.escalate(
                body,
                deadline=deadline,
                hop_count=ctx.hop_count + 1,
                idempotency_key=response["id"],
                headers={"traceparent": traceparent},
            )
        except UpstreamRejected as exc:
            reason = f"upstream rejected the request ({exc.upstream_status}): {exc.message}"
        except (UpstreamError, _NoBudget) as exc:
            reason = str(exc)
        else:
            response["label"] = upstream.get("label")
            response["confidence"] = upstream.get("confidence", response["confidence"])
            response["status"] = upstream.get("status", "final")
            response["answered_by"] = upstream.get("answered_by", "upstream")
            response["hops"].extend(upstream.get("hops", []))
            if "escalation" in upstream:
                response["escalation"] = upstream["escalation"]
            return
        if task_policy.offline == "reject":
            raise ServiceUnavailable(
                f"upstream unavailable and the policy for {request.task!r} says reject: {reason}",
                code="upstream_unavailable",
            )
        response["status"] = "provisional"
        pending = PendingEscalation(
            id=response["id"],
            task=request.task,
            body=body,
            provisional=dict(response),
            reason=reason,
            hop_count=ctx.hop_count + 1,
            ttl_s=task_policy.queue.ttl_s,
            max_attempts=task_policy.queue.max_attempts,
            traceparent=traceparent,
            callback_url=request.callback_url,
        )
        with self.telemetry.enqueue_span(request.task, response["id"]) as queued_traceparent:
            if queued_traceparent:  # the drain span links to the enqueue span
                pending = replace(pending, traceparent=queued_traceparent)
            response["escalation"] = await self.escalations.enqueue(pending)

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` reports."""
        policy = self._policy
        return {
            "tier": self.tier,
            "ready": True,
            "models": {task: rt.runner.model_name for task, rt in self.tasks.items()},
            "policy": {"path": policy.path, "name": policy.policy.name, "version": policy.version,
                       "sha256": policy.sha256, "reload": dict(self.policy_reloads)},
            "upstream": None
            if self.upstream is None
            else {"url": self.settings.upstream_url, "breaker": self.upstream.breaker.state},
            "queue_depth": self.escalations.depth(),
            "drift": self.drift.readiness(policy, list(self.tasks)),
            "uptime_s": round(time.time() - self.started_at, 3),
        }


class _NoBudget(Exception):
    """Too little of the deadline is left to try the upstream at all."""
