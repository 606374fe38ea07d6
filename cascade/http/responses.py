"""JSON responses of the HTTP layer: the hot-path serialiser and the contract's error body."""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi import Response

from cascade.errors import CascadeError

__all__ = ["error_response", "json_response"]


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response serialised with orjson (the hot path)."""
    # OPT_SERIALIZE_NUMPY: model outputs (confidences) may be numpy scalars.
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def error_response(exc: CascadeError) -> Response:
    """The contract's error body for a :class:`CascadeError`, with ``Retry-After`` (whole
    seconds, at least 1) when the error knows when another try is likely to be accepted."""
    response = json_response(exc.to_body(), exc.status)
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return response
