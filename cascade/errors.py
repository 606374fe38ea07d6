"""The one exception tree of cascade.

Callers catch what they can handle; everything derives from :class:`CascadeError`::

    CascadeError
    ├── ConfigError                 node config / settings invalid (names source and key)
    │   └── PolicyError             policy YAML invalid (names file, key path, allowed values)
    ├── ModelError                  a model file is missing, corrupt or fails its checksum
    │   ├── RegistrationError       a task folder cannot be registered (names file and key)
    │   └── BundleRejected          422: a model bundle failed its signature, hashes or probe
    ├── RequestError                a client request is unacceptable (maps to a 4xx)
    │   ├── InvalidInput            422: wrong shape, type, range, empty text...
    │   ├── UnknownTask             422: task not served by this tier
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415
    │   ├── MalformedBody           400: not JSON
    │   ├── NotFound                404
    │   ├── IdempotencyConflict     409 (in flight) / 422 (same key, different body)
    │   ├── Unauthenticated         401: no or unknown API key, no client certificate
    │   ├── Forbidden               403: a disabled key, or a route outside the key's scopes
    │   ├── TooManyRequests         429: a key over its rate limit or quota (Retry-After)
    │   └── HopLimitExceeded        508-like loop guard, reported as 400
    ├── ServiceUnavailable          503: cannot take the work now (queue full, disk full, not ready)
    └── UpstreamError               escalation to the next tier failed
        ├── UpstreamUnavailable     connection errors / 5xx after retries / breaker open / deadline
        └── UpstreamRejected        the upstream answered 4xx: retrying will not help

Every :class:`RequestError` and :class:`ServiceUnavailable` carries an HTTP ``status``,
a machine-readable ``code`` and an optional ``field`` naming the offending input.
"""

from __future__ import annotations

from typing import Any


class CascadeError(Exception):
    """Base of every error cascade raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, Any]:
        """The JSON error body of the API contract: ``{"error": {code, message, field?}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class ConfigError(CascadeError):
    """A node config or setting is invalid; the message names its source and key."""

    code = "config_error"


class PolicyError(ConfigError):
    """A policy file is invalid; the message names the file, the key path and what is allowed."""

    code = "policy_error"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message, field=key)
        self.file = file
        self.key = key


class ModelError(CascadeError):
    """A model could not be loaded: missing file, checksum mismatch, wrong signature."""

    code = "model_error"


class RegistrationError(ModelError):
    """``cascade models register`` refused a task folder: the message names the file (task.yaml,
    a model, the held-out file) and the key path or line, and what is allowed."""

    code = "registration_error"

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message, field=key)
        self.file = file
        self.key = key


class BundleRejected(ModelError):
    """A signed model bundle was refused (``cascade.models.bundle``, the tier's installer):
    unsigned, signed by an untrusted key, a hash or signature that does not match, a truncated
    file, or a probe set the model fails. ``code`` says which (``bundle_unsigned``,
    ``bundle_untrusted_key``, ``bundle_bad_signature``, ``bundle_hash_mismatch``,
    ``bundle_truncated``, ``bundle_invalid``, ``probe_accuracy``, ``probe_latency``...)."""

    status = 422
    code = "bundle_rejected"


class RequestError(CascadeError):
    """A client request cannot be served as sent (a 4xx)."""

    status = 400
    code = "bad_request"


class MalformedBody(RequestError):
    status = 400
    code = "malformed_body"


class InvalidInput(RequestError):
    status = 422
    code = "invalid_input"


class UnknownTask(RequestError):
    status = 422
    code = "unknown_task"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class IdempotencyConflict(RequestError):
    """The same idempotency key is in flight (409) or was used with another body (422)."""

    status = 409
    code = "idempotency_conflict"

    def __init__(self, message: str, *, status: int = 409, code: str | None = None) -> None:
        super().__init__(message, field="Idempotency-Key", code=code)
        self.status = status


class Unauthenticated(RequestError):
    """The caller did not prove who it is (API key, client certificate)."""

    status = 401
    code = "unauthenticated"


class Forbidden(RequestError):
    """The caller is known but may not do this."""

    status = 403
    code = "forbidden"


class TooManyRequests(RequestError):
    """The caller is over its rate limit or quota; ``retry_after_s`` says when to try again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class HopLimitExceeded(RequestError):
    status = 400
    code = "hop_limit_exceeded"


class ServiceUnavailable(CascadeError):
    """The tier cannot accept this work now (queue full, disk full, offline with reject policy).

    ``retry_after_s``: when another try is likely to be accepted, if known (an HTTP layer may
    send it as ``Retry-After``); the message says it too.
    """

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, field=field, code=code)
        self.retry_after_s = retry_after_s


class UpstreamError(CascadeError):
    """Escalating to the next tier failed."""

    status = 502
    code = "upstream_error"
    attempts: int = 0
    """How many HTTP attempts were made before giving up."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached in time (connect errors, 5xx, breaker open, deadline)."""

    code = "upstream_unavailable"


class UpstreamRejected(UpstreamError):
    """The upstream refused the request with a 4xx; retrying cannot help (a poison request)."""

    code = "upstream_rejected"

    def __init__(self, message: str, *, upstream_status: int, upstream_body: Any = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.upstream_body = upstream_body
