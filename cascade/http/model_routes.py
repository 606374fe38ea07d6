"""``/v1/models/...``: signed model bundles over the tier's own API (architecture §2, §5).

- ``GET /v1/models/bundles``: the bundles this tier can hand out (received, its source's).
- ``GET /v1/models/bundles/{name}``: one bundle's bytes (fetched from upstream if needed).
- ``POST /v1/models/pull``: pull from the source now; with an ``application/octet-stream`` body,
  install that bundle instead (``cascade models pull --file``).
- ``POST /v1/models/rollback`` ``{"task", "version"?}``: stop a canary or go back a version.
- ``GET /v1/models/status``: per task the serving version, canary, previous versions.

A tier without ``bundles.trusted_keys`` answers 404 ``bundles_disabled``. Only bundles signed by
a trusted key are ever installed; a rollback only selects versions already installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from cascade.contract.schemas import ErrorBody
from cascade.errors import InvalidInput, MalformedBody, NotFound
from cascade.http.responses import json_response
from cascade.tier.node import Node

__all__ = ["PUSH_PATH", "register_model_routes"]

PUSH_PATH = "/v1/models/pull"

_DISABLED: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "This tier takes no signed model bundles "
          "(bundles_disabled: no bundles.trusted_keys), or no such bundle or task"}}
_TAR: dict[int | str, dict[str, Any]] = {
    200: {"description": "The bundle file", "content": {"application/x-tar": {
        "schema": {"type": "string", "format": "binary"}}}}, **_DISABLED}
_ROLLBACK_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["task"],
        "properties": {"task": {"type": "string", "description": "A task this tier serves"},
                       "version": {"type": "string",
                                   "description": "An installed version (default: stop the "
                                                  "canary, else the previous version)"}}}}}}}
_PULL_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "A bundle file to install"}}}}}


def _rollout(node: Node | None) -> Any:
    rollout = getattr(node, "rollout", None)
    if rollout is None:
        raise NotFound("this tier takes no signed model bundles: list trusted public keys in "
                       "its node config's bundles.trusted_keys", code="bundles_disabled")
    return rollout


def register_model_routes(app: FastAPI, node_of: Callable[[], Node | None]) -> None:
    """Add the ``/v1/models`` routes to ``app``."""

    @app.get("/v1/models/bundles", summary="Signed model bundles this tier can hand out",
             responses=_DISABLED)
    async def list_bundles() -> Response:
        rollout = _rollout(node_of())
        return json_response({"bundles": await rollout.source.available()})

    @app.get("/v1/models/bundles/{name}", summary="One signed model bundle (a tar file)",
             response_class=Response, responses=_TAR)
    async def get_bundle(name: str) -> Response:
        data = await _rollout(node_of()).source.fetch(name)
        return Response(data, media_type="application/x-tar",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post(PUSH_PATH, summary="Pull bundles from the source now, or install the one sent",
              responses=_DISABLED, openapi_extra=_PULL_BODY)
    async def pull(request: Request) -> Response:
        rollout = _rollout(node_of())
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type == "application/octet-stream":
            name = request.headers.get("x-cascade-bundle-name", "uploaded bundle")
            report = await rollout.install(await request.body(), what=name)
            return json_response({"tier": rollout.settings.tier, "results": [report]})
        return json_response({"tier": rollout.settings.tier,
                              "results": await rollout.source.pull()})

    @app.post("/v1/models/rollback", summary="Stop a canary, or serve a previous version",
              responses=_DISABLED, openapi_extra=_ROLLBACK_BODY)
    async def rollback(request: Request) -> Response:
        rollout = _rollout(node_of())
        body = await _json_object(request)
        task, version = body.get("task"), body.get("version")
        if not isinstance(task, str):
            raise InvalidInput("task is required (a task this tier serves)", field="task")
        if version is not None and not isinstance(version, str):
            raise InvalidInput("version must be a string", field="version")
        return json_response(await rollout.rollback(task, version))

    @app.get("/v1/models/status", summary="Model versions per task: serving, canary, previous",
             responses=_DISABLED)
    async def status() -> Response:
        rollout = _rollout(node_of())
        return json_response({"tier": rollout.settings.tier, "tasks": rollout.readiness()})


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise MalformedBody("body must be a JSON object", field="body")
    return body
