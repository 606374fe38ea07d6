"""Schemathesis hooks for tests/integration/test_openapi_contract.py (loaded by the
``schemathesis`` CLI through ``SCHEMATHESIS_HOOKS``).

* The picture formats of the OpenAPI document (``cascade.contract.input_schemas``): a JSON
  Schema cannot say "base64 of a PNG", so the document names a format and this module teaches
  schemathesis to produce real pictures for it (small random PNGs and JPEGs).
* Idempotency keys made unique per call. A key reused with another body is 422
  ``idempotency_key_reused`` (architecture §2): right, but a fact about the server's state, not
  about one request, which no schema can describe; hypothesis reuses short keys such as ``"0"``
  on purpose. Keys that do not match the pattern are left as they are (they must be refused).
"""

from __future__ import annotations

import base64
import io
import itertools
import re
import uuid
from typing import Any

import schemathesis
from hypothesis import strategies as st

from cascade.contract.input_schemas import PHOTO_BASE64, PNG_BASE64
from cascade.contract.schemas import REQUEST_ID_PATTERN

_KEY = re.compile(REQUEST_ID_PATTERN)
_calls = itertools.count()
_RUN = uuid.uuid4().hex[:8]  # unique across runs too (a tier's store outlives a run)


@st.composite
def _picture(draw: st.DrawFn, formats: tuple[str, ...]) -> str:
    import numpy as np
    from PIL import Image

    side_h, side_w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mode = draw(st.sampled_from(("L", "RGB")))
    shape = (side_h, side_w) if mode == "L" else (side_h, side_w, 3)
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format=draw(st.sampled_from(formats)))
    return base64.b64encode(out.getvalue()).decode()


schemathesis.openapi.format(PNG_BASE64, _picture(("PNG",)))
schemathesis.openapi.format(PHOTO_BASE64, _picture(("PNG", "JPEG")))


def _unique(key: Any) -> Any:
    if isinstance(key, str) and _KEY.match(key):
        return f"{key[:100]}.{_RUN}.{next(_calls)}"
    return key


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Give every call its own idempotency key (see the module docstring)."""
    if isinstance(case.body, dict) and "request_id" in case.body:
        case.body["request_id"] = _unique(case.body["request_id"])
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            headers[name] = _unique(headers[name])
