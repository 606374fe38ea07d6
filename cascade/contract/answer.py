"""The answer a tier gives, typed: :class:`Answer` and its :class:`Hop` records.

These flow through the node, the outbox, telemetry, the decision log and the forwarder; the
JSON on the wire (``POST /v1/infer`` 200, ``GET /v1/results``, callbacks) is
:meth:`Answer.to_wire`, described for OpenAPI by :class:`cascade.contract.schemas.InferResponse`.
:func:`merge_upstream` is the one place an upstream's answer is folded into a tier's own, for
the online escalation and for the forwarder's later delivery alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cascade.errors import UpstreamUnavailable

__all__ = ["Answer", "AnswerStatus", "Hop", "merge_upstream"]

AnswerStatus = Literal["final", "provisional", "unknown"]
_STATUSES = ("final", "provisional", "unknown")


@dataclass(slots=True)
class Hop:
    """One tier's part in answering: its model, what it predicted, how sure, what it decided,
    and its own time in milliseconds (escalation excluded)."""

    tier: str
    model: str
    label: str | None
    confidence: float
    decision: str
    ms: float

    def to_wire(self) -> dict[str, Any]:
        """The hop as JSON."""
        return {"tier": self.tier, "model": self.model, "label": self.label,
                "confidence": self.confidence, "decision": self.decision, "ms": self.ms}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Hop:
        """A hop read back from JSON (an upstream's answer or a stored one)."""
        return cls(tier=str(data.get("tier", "?")), model=str(data.get("model", "?")),
                   label=data.get("label"), confidence=float(data.get("confidence", 0.0)),
                   decision=str(data.get("decision", "answer")), ms=float(data.get("ms", 0.0)))


@dataclass(slots=True)
class Answer:
    """One request's answer. ``hops`` lists every tier that looked at it, this tier first.

    ``escalation`` is the state of an escalation held by a queue (this tier's or an upstream's),
    present when the answer is provisional; its keys are documented by
    :class:`cascade.contract.schemas.EscalationView`.
    """

    id: str
    task: str
    label: str | None
    confidence: float
    status: AnswerStatus
    answered_by: str
    hops: list[Hop] = field(default_factory=list)
    trace_id: str | None = None
    escalation: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The contract's JSON body (``escalation`` only when there is one)."""
        body: dict[str, Any] = {
            "id": self.id, "task": self.task, "label": self.label,
            "confidence": self.confidence, "status": self.status,
            "answered_by": self.answered_by, "hops": [h.to_wire() for h in self.hops],
            "trace_id": self.trace_id,
        }
        if self.escalation is not None:
            body["escalation"] = self.escalation
        return body

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Answer:
        """An answer read back from JSON. An upstream's body that is not an answer at all
        raises :class:`UpstreamUnavailable` (a broken upstream, retried like one)."""
        try:
            status = data.get("status", "final")
            if status not in _STATUSES:
                raise ValueError(f"status {status!r}")
            return cls(
                id=str(data["id"]), task=str(data["task"]), label=data.get("label"),
                confidence=float(data.get("confidence", 0.0)), status=status,
                answered_by=str(data.get("answered_by", "upstream")),
                hops=[Hop.from_wire(h) for h in data.get("hops") or ()],
                trace_id=data.get("trace_id"), escalation=data.get("escalation"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UpstreamUnavailable(f"the answer is not a valid cascade answer: {exc}") from None


def merge_upstream(own: Answer, upstream: Answer) -> Answer:
    """``own`` (this tier's answer, its hop first) completed by the upstream's answer.

    Label, confidence, status, ``answered_by`` and any escalation state come from the upstream;
    this tier's own hop is kept and the upstream's hops follow it.
    """
    return replace(own, label=upstream.label, confidence=upstream.confidence,
                   status=upstream.status, answered_by=upstream.answered_by,
                   hops=[*own.hops[:1], *upstream.hops], escalation=upstream.escalation)
