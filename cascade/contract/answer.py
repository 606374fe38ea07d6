"""The answer a tier gives, typed: :class:`Answer` and its :class:`Hop` records.

These flow through the node, the outbox, telemetry, the decision log and the forwarder; the
JSON on the wire (``POST /v1/infer`` 200, ``GET /v1/results``, callbacks) is
:meth:`Answer.to_wire`, described for OpenAPI by :class:`cascade.contract.schemas.InferResponse`.
:func:`merge_upstream` is the one place an upstream's answer is folded into a tier's own, for
the online escalation and for the forwarder's later delivery alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cascade.contract.outputs import Generation
from cascade.errors import UpstreamUnavailable

__all__ = ["Answer", "AnswerStatus", "GeneratedText", "Hop", "merge_upstream"]

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
    ttft_ms: float | None = None
    """Generative hops: time to this tier's first token."""
    tokens: int | None = None
    """Generative hops: tokens this tier's model generated."""
    finish_reason: str | None = None
    """Generative hops: why generation ended (``stop``, ``length``, ``deadline``, ...)."""

    def to_wire(self) -> dict[str, Any]:
        """The hop as JSON (``ttft_ms``, ``tokens`` and ``finish_reason`` on generative hops
        only)."""
        body: dict[str, Any] = {"tier": self.tier, "model": self.model, "label": self.label,
                                "confidence": self.confidence, "decision": self.decision,
                                "ms": self.ms}
        if self.tokens is not None:
            body["ttft_ms"] = self.ttft_ms
            body["tokens"] = self.tokens
            if self.finish_reason is not None:
                body["finish_reason"] = self.finish_reason
        return body

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Hop:
        """A hop read back from JSON (an upstream's answer or a stored one)."""
        tokens, ttft = data.get("tokens"), data.get("ttft_ms")
        return cls(tier=str(data.get("tier", "?")), model=str(data.get("model", "?")),
                   label=data.get("label"), confidence=float(data.get("confidence", 0.0)),
                   decision=str(data.get("decision", "answer")), ms=float(data.get("ms", 0.0)),
                   ttft_ms=None if ttft is None else float(ttft),
                   tokens=None if tokens is None else int(tokens),
                   finish_reason=data.get("finish_reason"))


@dataclass(slots=True)
class GeneratedText:
    """The words of a generative answer: the text, its fields when the task asks for JSON
    (``None`` when the text is not a JSON object), and the tokens read and written by every
    hop so far (``usage``)."""

    text: str
    fields: dict[str, Any] | None
    input_tokens: int
    output_tokens: int

    def to_wire(self) -> dict[str, Any]:
        """``text``, ``fields`` and ``usage`` as the answer's JSON carries them."""
        return {"text": self.text, "fields": self.fields,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}}

    @classmethod
    def of(cls, generation: Generation) -> GeneratedText:
        """A tier's own generation as an answer's words (fields parsed when it is JSON)."""
        return cls(text=generation.text, fields=json_object(generation.text),
                   input_tokens=generation.prompt_tokens,
                   output_tokens=generation.completion_tokens)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GeneratedText | None:
        """The generative part of an answer's JSON; ``None`` for a classification."""
        if "text" not in data:
            return None
        usage = data.get("usage") or {}
        fields = data.get("fields")
        return cls(text=str(data["text"]), fields=dict(fields) if fields is not None else None,
                   input_tokens=int(usage.get("input_tokens", 0)),
                   output_tokens=int(usage.get("output_tokens", 0)))


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
    generated: GeneratedText | None = None
    """Generative tasks: the answer's text, fields and token usage."""
    reason: str | None = None
    """Why the answer is ``unknown`` when no model could give one (a tier under pressure
    with nowhere to send the request); on the wire only when set."""

    def to_wire(self) -> dict[str, Any]:
        """The contract's JSON body (``escalation`` only when there is one; ``text``,
        ``fields`` and ``usage`` only for a generative task)."""
        body: dict[str, Any] = {
            "id": self.id, "task": self.task, "label": self.label,
            "confidence": self.confidence, "status": self.status,
            "answered_by": self.answered_by, "hops": [h.to_wire() for h in self.hops],
            "trace_id": self.trace_id,
        }
        if self.generated is not None:
            body.update(self.generated.to_wire())
        if self.escalation is not None:
            body["escalation"] = self.escalation
        if self.reason is not None:
            body["reason"] = self.reason
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
                generated=GeneratedText.from_wire(data), reason=data.get("reason"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UpstreamUnavailable(f"the answer is not a valid cascade answer: {exc}") from None


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object, else None (free text, or broken JSON)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def merge_upstream(own: Answer, upstream: Answer) -> Answer:
    """``own`` (this tier's answer, its hop first) completed by the upstream's answer.

    Label, confidence, status, ``answered_by``, any escalation state and a generative answer's
    text and fields come from the upstream; this tier's own hop is kept and the upstream's hops
    follow it. Token usage adds up: every hop's model read and wrote tokens.
    """
    generated = upstream.generated
    if generated is not None and own.generated is not None:
        generated = replace(generated,
                            input_tokens=own.generated.input_tokens + generated.input_tokens,
                            output_tokens=own.generated.output_tokens + generated.output_tokens)
    return replace(own, label=upstream.label, confidence=upstream.confidence,
                   status=upstream.status, answered_by=upstream.answered_by,
                   hops=[*own.hops[:1], *upstream.hops], escalation=upstream.escalation,
                   generated=generated, reason=upstream.reason)
