"""API request and response models (the HTTP contract of every tier, architecture §2)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_TOKENS_LIMIT = 4096


def _integral(value: Any) -> Any:
    """JSON has one number type: ``5.0`` is the integer 5 (as JSON Schema says), ``5.5`` and
    ``true`` are not integers (the strict check after this refuses them)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# Integer fields as JSON Schema reads them (5 and 5.0, not "5", 5.5 or true); the bounds come
# first so that the document states them (as minimum and maximum).
DeadlineMs = Annotated[int, Field(ge=1, le=600_000), BeforeValidator(_integral)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), BeforeValidator(_integral)]


class InferRequest(BaseModel):
    """``POST /v1/infer`` body."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # exactly the JSON types the document names: no "5" or 0 for 5 or false
        json_schema_extra={
            "examples": [
                {"task": "documents", "input": {"text": "Shares rose after the bank cut rates."}},
                {"task": "vision", "input": {"image": [[0] * 8] * 8}, "deadline_ms": 500},
            ]
        },
    )

    task: str = Field(..., min_length=1, max_length=64, description="Which task: vision or documents.")
    input: dict[str, Any] = Field(
        ...,
        description=(
            "vision: {'image': 8x8 nested lists of numbers 0..16} or {'png_base64': str}; "
            "documents: {'text': str}."
        ),
    )
    deadline_ms: DeadlineMs | None = Field(
        None, description="End-to-end deadline; default from the policy."
    )
    callback_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://",
        description="Where to POST the final answer when this one is provisional; the tier's "
        "callback policy (schemes, hosts, public addresses only unless allowed) may refuse it: "
        "422 naming callback_url.",
    )
    request_id: str | None = Field(
        None,
        pattern=REQUEST_ID_PATTERN,
        description="Idempotency key (the Idempotency-Key header takes precedence).",
    )
    max_tokens: MaxTokens | None = Field(
        None,
        description="Generative tasks: most tokens to generate (default from the task); each "
                    "tier also caps it by its model's context.",
    )
    stream: bool = Field(
        False,
        description="Generative tasks: answer with Server-Sent Events as tokens are produced "
                    "(also with 'Accept: text/event-stream').",
    )


def infer_request_schema(inputs: Mapping[str, dict[str, Any]],
                         ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The JSON Schema of a ``POST /v1/infer`` body at a tier serving ``inputs`` (task -> the
    JSON Schema of its ``input``), and the OpenAPI components it refers to: one variant per
    task, told apart by ``task`` (a discriminator), so the document says exactly which
    ``input`` each task accepts."""
    base = InferRequest.model_json_schema()
    if not inputs:
        return base, {}
    components: dict[str, dict[str, Any]] = {}
    mapping: dict[str, str] = {}
    for task, input_schema in sorted(inputs.items()):
        name = "InferRequest_" + re.sub(r"[^A-Za-z0-9._-]", "_", task)
        properties = {**base["properties"],
                      "task": {"type": "string", "const": task, "title": "Task"},
                      "input": {**input_schema, "title": "Input"}}
        components[name] = {"type": "object", "title": f"InferRequest ({task})",
                            "properties": properties, "required": base["required"],
                            "additionalProperties": False}
        mapping[task] = f"#/components/schemas/{name}"
    schema = {
        "title": "InferRequest", "description": base.get("description", ""),
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "task", "mapping": mapping},
        "examples": [example for example in base.get("examples", [])
                     if example["task"] in inputs],
    }
    return schema, components


class _Exact(BaseModel):
    """Response models describe the wire exactly: an undocumented key fails validation."""

    model_config = ConfigDict(extra="forbid")


class Hop(_Exact):
    """One tier's part in answering a request."""

    tier: str
    model: str
    label: str | None = None
    confidence: float
    decision: Literal["answer", "escalate", "unknown"]
    ms: float
    ttft_ms: float | None = Field(None, description="Generative hops: time to the first token.")
    tokens: int | None = Field(None, description="Generative hops: tokens generated here.")
    finish_reason: str | None = Field(
        None, description="Generative hops: why generation ended: stop (the answer is whole), "
        "length (max_tokens), deadline (the request's deadline cut it).")


class Usage(_Exact):
    """Tokens read (prompts) and written (answers) by every hop's model."""

    input_tokens: int
    output_tokens: int


class EscalationView(_Exact):
    """State of the escalation a queue holds for a provisional answer.

    In a ``POST /v1/infer`` answer it is what the queue said on accepting the work; in
    ``GET /v1/results/{id}`` it is the row's current state. ``upstream`` appears when this tier
    tracks work an upstream tier holds (it answered provisionally and queued it there)."""

    state: Literal["queued", "forwarding", "done", "expired", "dead", "not_queued"]
    held_by: str | None = None
    attempts: int | None = None
    max_attempts: int | None = None
    handed_over: bool | None = None
    last_error: str | None = None
    reason: str | None = None
    queued_at: str | None = None
    updated_at: str | None = None
    expires_at: str | None = None
    next_attempt_at: str | None = None
    results_url: str | None = None
    upstream: EscalationView | None = None


class InferResponse(_Exact):
    """``POST /v1/infer`` 200 body."""

    id: str
    task: str
    label: str | None = Field(description="Predicted class; null when status is 'unknown'.")
    confidence: float
    status: Literal["final", "provisional", "unknown"]
    answered_by: str
    hops: list[Hop]
    trace_id: str | None = None
    text: str | None = Field(None, description="Generative tasks: the answer's text.")
    fields: dict[str, Any] | None = Field(
        None, description="Generative tasks asking for JSON: the answer's fields (null when "
                          "the text is not a JSON object).")
    usage: Usage | None = Field(None, description="Generative tasks: tokens of every hop.")
    reason: str | None = Field(
        None, description="When status is 'unknown' because no model could answer in time "
        "(a tier under pressure with nowhere to send the request): why.")
    escalation: EscalationView | None = Field(
        None, description="When provisional: the state of the queued escalation."
    )


class CallbackView(_Exact):
    """Delivery state of a request's ``callback_url``."""

    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    max_attempts: int
    last_error: str | None = None
    delivered_at: str | None = None


class ResultResponse(InferResponse):
    """``GET /v1/results/{id}`` 200 body: the latest answer, escalation and callback state."""

    callback: CallbackView | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every non-200 answer: ``{"error": {"code", "message", "field"?}}``."""

    error: ErrorDetail
