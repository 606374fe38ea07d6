"""FastAPI app factory over a :class:`~cascade.tier.node.Node`: the HTTP contract of architecture §2.

Errors are always ``{"error": {"code", "message", "field"?}}`` with a 4xx/503 status; nothing a
client sends can produce a 500 with a traceback. The request body is read and validated here
(not by FastAPI's dependency machinery) so oversize, non-JSON and wrong-shape bodies are
rejected with precise codes before the model is touched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cascade.contract.schemas import (
    REQUEST_ID_PATTERN,
    ErrorBody,
    InferRequest,
    InferResponse,
    infer_request_schema,
)
from cascade.contract.streaming import EVENT_ANSWER, EVENT_ERROR, EVENT_ESCALATE, EVENT_TOKEN
from cascade.errors import (
    CascadeError,
    InvalidInput,
    MalformedBody,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from cascade.http.guard import CallerGuardMiddleware
from cascade.http.model_routes import PUSH_PATH, register_model_routes
from cascade.http.responses import error_response, json_response
from cascade.http.results import (
    REPLAYED_HEADER,
    answer_infer,
    register_outbox_routes,
)
from cascade.http.streaming import stream_infer, wants_stream
from cascade.models.bundle import MAX_BUNDLE_BYTES
from cascade.observability.metrics import metrics_response
from cascade.observability.telemetry import RequestTelemetryMiddleware, fastapi_options
from cascade.tier.audit import AUDIT_HEADER, AUDIT_REFERENCES
from cascade.tier.lifecycle import run_tier_lifecycle
from cascade.tier.node import CallContext, Node

log = logging.getLogger("cascade.http.app")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "Malformed body or hop limit exceeded",
        401: "No or unknown API key; or no client certificate on a tier-to-tier API",
        403: "API key disabled, or not allowed on this route",
        413: "Body larger than max_body_bytes",
        415: "Body is not application/json",
        422: "Invalid input, unknown task, idempotency key reused with another body, or a "
             "callback_url the tier's callback policy refuses",
        429: "API key over its rate limit or quota (Retry-After says when to try again)",
        503: "Cannot take the work now (upstream down with a reject policy, queue full)",
    }.items()
}


_SSE_EVENT: dict[str, Any] = {
    "type": "object", "required": ["event", "data"],
    "description": "One Server-Sent Event; data is one JSON object (answer: the 200 body)",
    "properties": {
        "event": {"enum": [EVENT_TOKEN, EVENT_ESCALATE, EVENT_ANSWER, EVENT_ERROR]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # A pushed model bundle is checked by its signature, not held to a request's size.
        max_bytes = MAX_BUNDLE_BYTES if scope["path"] == PUSH_PATH else self.max_bytes
        too_large = PayloadTooLarge(
            f"request body is larger than {max_bytes} bytes", field="body"
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(MalformedBody("bad Content-Length header"))(scope, receive, send)
                    return
                if declared > max_bytes:
                    await error_response(too_large)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(too_large)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _field_of(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation_error(exc: ValidationError) -> CascadeError:

    first = exc.errors()[0]
    field = _field_of(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        message = (f"unknown field {field!r}; allowed: task, input, deadline_ms, callback_url, "
                   "request_id, max_tokens, stream")
    elif first["type"] == "missing":
        message = f"{field} is required"
    else:
        message = f"{field}: {first['msg']}"
    return InvalidInput(message, field=field)


async def parse_infer_request(request: Request) -> InferRequest:
    """Read, decode and validate a ``POST /v1/infer`` body."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json; got {content_type or 'no Content-Type'}",
            field="Content-Type",
        )
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(data, dict):
        raise MalformedBody(f"body must be a JSON object; got {type(data).__name__}", field="body")
    try:
        return InferRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


def call_context(request: Request) -> CallContext:
    """Transport facts from the headers: idempotency key, hop count, remaining deadline."""

    headers = request.headers
    key = headers.get("idempotency-key")
    if key is not None and not _REQUEST_ID.match(key):
        raise InvalidInput(
            "Idempotency-Key must be 1-128 characters of letters, digits and ._:-",
            field="Idempotency-Key",
        )
    hop, deadline = 0, None
    try:
        if "x-cascade-hop" in headers:
            hop = int(headers["x-cascade-hop"])
        if "x-cascade-deadline-ms" in headers:
            deadline = max(1, int(headers["x-cascade-deadline-ms"]))
    except ValueError:
        raise InvalidInput("X-Cascade-Hop and X-Cascade-Deadline-Ms must be integers",
                           field="X-Cascade-Hop") from None
    audit = headers.get("x-cascade-audit")
    if audit is not None and audit not in AUDIT_REFERENCES:
        raise InvalidInput(f"{AUDIT_HEADER} must be one of {', '.join(AUDIT_REFERENCES)}; "
                           f"got {audit!r}", field=AUDIT_HEADER)
    return CallContext(
        request_id=key, hop_count=hop, deadline_ms=deadline, traceparent=headers.get("traceparent"),
        audit=audit,
    )


def create_app(node_factory: Callable[[], Node] | Node, *, max_body_bytes: int = 256 * 1024) -> FastAPI:
    """Build the FastAPI app of one tier.

    ``node_factory`` is called in the lifespan (so model loading happens in the server process,
    after fork); pass a ready :class:`Node` in tests. The tier's background parts start and stop
    with :func:`~cascade.tier.lifecycle.run_tier_lifecycle`.
    """
    state: dict[str, Node] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        node = node_factory if isinstance(node_factory, Node) else node_factory()
        state["node"] = app.state.node = node
        async with run_tier_lifecycle(node):
            yield

    app = FastAPI(
        title="cascade tier",
        summary="Confidence-gated inference tier; escalates hard cases to the next tier.",
        version="1",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
        **fastapi_options(),  # our middleware makes the SERVER span (cheaper); no second one
    )
    _install_error_handlers(app)
    _document_served_inputs(app, state)
    _add_infer_route(app, state)
    _add_probe_routes(app, state)
    register_outbox_routes(app, lambda: state.get("node"))
    register_model_routes(app, lambda: state.get("node"))
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    # Before the body is read: API keys, client certificates (cascade.http.guard).
    app.add_middleware(CallerGuardMiddleware,
                       trust=lambda: getattr(state.get("node"), "trust", None))
    # Outermost: sees every response (413s included) and times the whole request.
    app.add_middleware(RequestTelemetryMiddleware,
                       telemetry=lambda: getattr(state.get("node"), "telemetry", None))
    return app


def _document_served_inputs(app: FastAPI, state: dict[str, Node]) -> None:
    """The OpenAPI document's request body of ``POST /v1/infer`` is one variant per task this
    tier serves, each with exactly the ``input`` its decoder accepts (built once the node is
    loaded: the document is made on its first request, after the lifespan started)."""

    generic = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generic()  # FastAPI's document, cached in app.openapi_schema
        node = state.get("node")
        if node is None:  # not serving yet: the generic body, not kept
            app.openapi_schema = None
            return document
        inputs = {name: task.input_schema for name, task in node.tasks.items()
                  if task.input_schema is not None}
        schema, components = infer_request_schema(inputs)
        body = document["paths"]["/v1/infer"]["post"]["requestBody"]
        body["content"]["application/json"]["schema"] = schema
        document.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    """Every error becomes the contract's body; nothing a client sends yields a traceback."""

    @app.exception_handler(CascadeError)
    async def _cascade_error(_: Request, exc: CascadeError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        field = _field_of(tuple(first["loc"]))
        return error_response(InvalidInput(f"{field}: {first['msg']}", field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = json_response({"error": {"code": code, "message": str(exc.detail)}},
                                 exc.status_code)
        response.headers.update(exc.headers or {})  # 405: Allow, the methods the path takes
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return json_response(
            {"error": {"code": "internal_error", "message": "unexpected error; see the tier's log"}},
            500,
        )


def _add_infer_route(app: FastAPI, state: dict[str, Node]) -> None:
    """``POST /v1/infer``: documented through FastAPI, served by a plain Starlette route."""

    @app.post(
        "/v1/infer",
        response_model=InferResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": InferRequest.model_json_schema()}},
            },
            "responses": {"200": {"content": {"text/event-stream": {
                "schema": _SSE_EVENT,
                "description": "With \"stream\": true (generative tasks): events token, "
                               "escalate, then one answer (or error); see architecture §2"}}}},
            "parameters": [
                {"name": "Idempotency-Key", "in": "header", "required": False,
                 "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
                 "description": "Same key, same result: never computed or escalated twice."},
            ],
        },
        summary="Answer one request, escalating it up the chain when the local model is unsure",
    )
    async def infer(request: Request) -> Response:
        """Documented here for OpenAPI; served by the plain route below (same function)."""
        body = await parse_infer_request(request)
        ctx = call_context(request)
        node = state["node"]
        if body.callback_url and ctx.hop_count == 0 and node.trust is not None:
            # Only the tier a client called fires the callback: only it applies its policy.
            await node.trust.callbacks.check_request(body.callback_url)
        if wants_stream(body, request.headers.get("accept")) and ctx.audit is None:
            return await stream_infer(state["node"], body, ctx)
        answer, replayed = await answer_infer(state["node"], body, ctx)
        response = json_response(answer)
        if replayed:
            response.headers[REPLAYED_HEADER] = "true"
        return response

    # The hot path skips FastAPI's dependency solving (it only needs the raw Request): a plain
    # Starlette route with the same handler, matched first. The APIRoute above stays for /docs.
    app.router.routes.insert(0, Route("/v1/infer", infer, methods=["POST"], include_in_schema=False))


def _add_probe_routes(app: FastAPI, state: dict[str, Node]) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``."""

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> Response:
        node = state.get("node")
        return json_response({"status": "ok", "tier": node.tier if node else None})

    @app.get("/readyz", summary="Readiness: models loaded, policy valid, upstream and queue state")
    async def readyz() -> Response:
        node = state.get("node")
        if node is None:
            return json_response({"ready": False}, 503)
        return json_response(node.readiness())

    @app.get("/metrics", summary="Prometheus metrics of this tier (text exposition format)",
             response_class=Response, responses={200: {
                 "description": "Prometheus text exposition format",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return await metrics_response(state.get("node"))
