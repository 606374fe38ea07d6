"""Schemathesis hooks for tests/integration/test_openapi_contract.py (loaded by the
``schemathesis`` CLI through ``SCHEMATHESIS_HOOKS``).

* The picture formats of the OpenAPI document (``cascade.contract.input_schemas``): a JSON
  Schema cannot say "base64 of a PNG", so the document names a format and this module teaches
  schemathesis to produce real pictures for it (small random PNGs and JPEGs).
* Idempotency keys made unique per call. A key reused with another body is 422
  ``idempotency_key_reused`` (architecture §2): right, but a fact about the server's state, not
  about one request, which no schema can describe; hypothesis reuses short keys such as ``"0"``
  on purpose. Keys that do not match the pattern are left as they are (they must be refused).
* A schema-valid ``callback_url`` replaced by one the tier's callback policy allows. Where
  callbacks may go (public addresses, allowed schemes and hosts: docs/security.md) is the
  tier's configuration and the network's, not the request's shape; a refused one is the
  documented 422 naming ``callback_url`` (tests/integration/test_callback_policy.py).
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any

import schemathesis

from cascade.contract.input_schemas import PHOTO_BASE64, PNG_BASE64
from cascade.contract.schemas import REQUEST_ID_PATTERN
from tests.helpers import picture_base64

_KEY = re.compile(REQUEST_ID_PATTERN)
_CALLBACK = re.compile(r"^https?://")
ALLOWED_CALLBACK = "https://93.184.215.14/cascade/done"  # a public address: the default policy
_calls = itertools.count()
_RUN = uuid.uuid4().hex[:8]  # unique across runs too (a tier's store outlives a run)


schemathesis.openapi.format(PNG_BASE64, picture_base64(("PNG",)))
schemathesis.openapi.format(PHOTO_BASE64, picture_base64(("PNG", "JPEG")))


def _unique(key: Any) -> Any:
    if isinstance(key, str) and _KEY.match(key):
        return f"{key[:100]}.{_RUN}.{next(_calls)}"
    return key


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Give every call its own idempotency key (see the module docstring)."""
    if isinstance(case.body, dict) and "request_id" in case.body:
        case.body["request_id"] = _unique(case.body["request_id"])
    if isinstance(case.body, dict) and isinstance(case.body.get("callback_url"), str) \
            and _CALLBACK.match(case.body["callback_url"]) and len(case.body["callback_url"]) <= 2048:
        case.body["callback_url"] = ALLOWED_CALLBACK
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            headers[name] = _unique(headers[name])
