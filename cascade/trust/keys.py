"""API keys of a tier's clients: hashed in the config, checked per request, rate limited and
metered by token buckets (architecture §10).

A key is ``ck_`` plus 32 random bytes (URL-safe base64): high entropy, so one SHA-256 is the
right stored form (a slow password hash would add milliseconds per request and protect nothing
more). The config holds only the hash; the key itself is printed once by ``cascade keys create``
and never logged, traced or echoed. Clients send it as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``.

Decisions, in order: no key or an unknown key → 401; a disabled key, or a route group outside
its ``scopes`` → 403; its rate bucket empty → 429 ``rate_limited``; its quota bucket empty →
429 ``quota_exceeded``; both 429s say in ``Retry-After`` when a token will be there. Buckets live
in the tier's memory: a restart refills them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RouteGroup = Literal["api", "healthz", "readyz", "metrics", "docs"]
ROUTE_GROUPS: tuple[str, ...] = ("api", "healthz", "readyz", "metrics", "docs")
KEY_PREFIX = "ck_"
_DOCS_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})

__all__ = ["ClientAuthSettings", "ClientKey", "KeyGuard", "Refusal", "TokenBucket",
           "hash_key", "new_key", "route_group"]


def new_key() -> str:
    """A fresh API key (shown once; store only :func:`hash_key` of it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def route_group(path: str) -> RouteGroup:
    """Which group of routes a request path belongs to (what ``protect`` and ``scopes`` name)."""
    if path in _DOCS_PATHS:
        return "docs"
    if path in ("/healthz", "/readyz", "/metrics"):
        return path[1:]  # type: ignore[return-value]
    return "api"


class ClientKey(BaseModel):
    """One client's key: its hash and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]{1,64}$",
                      description="Who holds the key; shown in logs, spans and metrics.")
    sha256: str = Field(..., description="sha256:<64 hex>, as printed by `cascade keys create`.")
    scopes: tuple[RouteGroup, ...] = Field(
        ("api",), description="Route groups this key may call (api, healthz, readyz, metrics, "
        "docs); others answer 403.")
    rate_per_s: float | None = Field(
        None, gt=0, description="Sustained requests per second (token bucket); none: unlimited.")
    burst: int | None = Field(
        None, ge=1, description="Requests allowed at once above the rate (default: one "
        "second's worth, at least 1).")
    quota: int | None = Field(
        None, ge=1, description="Requests per quota_period_s (a second, slow bucket).")
    quota_period_s: float = Field(86_400.0, gt=0, description="The quota's period (a day).")
    disabled: bool = Field(False, description="Refuse this key with 403 (revoked, kept visible).")

    @field_validator("sha256")
    @classmethod
    def _hash_form(cls, value: str) -> str:
        digest = value.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("must be sha256:<64 hex digits> (`cascade keys create` prints it); "
                             "never the key itself")
        return "sha256:" + digest


class ClientAuthSettings(BaseModel):
    """The ``clients:`` block of a node config: who may call this tier (tier 1 usually)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[ClientKey, ...] = Field(
        (), description="Accepted keys (hashed); none: no key is asked for.")
    protect: tuple[RouteGroup, ...] = Field(
        ("api",), description="Route groups that need a key: api (/v1/...), healthz, readyz, "
        "metrics, docs (/docs, /redoc, /openapi.json).")

    @model_validator(mode="after")
    def _unique(self) -> ClientAuthSettings:
        for attr in ("name", "sha256"):
            values = [getattr(k, attr) for k in self.keys]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"keys: {attr} must be unique; repeated: {', '.join(dupes)}")
        return self


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; pure over the ``now`` it is given."""

    __slots__ = ("_at", "_tokens", "capacity", "rate_per_s")

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._tokens = capacity
        self._at = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is there (none taken)."""
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: HTTP status, error code, message, and Retry-After seconds."""

    status: int
    code: str
    message: str
    retry_after_s: int | None = None


@dataclass(slots=True)
class _KeyState:
    key: ClientKey
    rate: TokenBucket | None
    quota: TokenBucket | None


class KeyGuard:
    """Checks one request's key against the config; counts accepted calls per key name and
    refusals per reason (``/metrics``)."""

    def __init__(self, settings: ClientAuthSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        now = clock()
        self._by_hash: dict[str, _KeyState] = {}
        for key in settings.keys:
            rate = quota = None
            if key.rate_per_s is not None:
                rate = TokenBucket(key.rate_per_s, key.burst or max(1.0, key.rate_per_s), now)
            if key.quota is not None:
                quota = TokenBucket(key.quota / key.quota_period_s, key.quota, now)
            self._by_hash[key.sha256] = _KeyState(key, rate, quota)
        self.protected = frozenset(settings.protect) if settings.keys else frozenset()
        self.accepted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def check(self, group: RouteGroup, presented: str | None) -> tuple[str | None, Refusal | None]:
        """``(key name, refusal)`` for a request to ``group`` with the ``presented`` key (or
        None). Unprotected groups pass with no name. The key never appears in a refusal."""
        if group not in self.protected:
            return None, None
        name, refusal = self._decide(group, presented)
        if refusal is not None:
            self.refused[refusal.code] += 1
        else:
            self.accepted[name or ""] += 1
        return name, refusal

    def _decide(self, group: RouteGroup, presented: str | None) -> tuple[str | None, Refusal | None]:
        if not presented:
            return None, Refusal(401, "missing_api_key", "this route needs an API key: send "
                                 "Authorization: Bearer <key> or X-API-Key: <key>")
        digest = hash_key(presented)
        state = self._by_hash.get(digest)
        if state is None or not hmac.compare_digest(state.key.sha256, digest):
            return None, Refusal(401, "invalid_api_key", "the API key is not known to this tier")
        key = state.key
        if key.disabled:
            return key.name, Refusal(403, "api_key_disabled",
                                     f"API key {key.name!r} is disabled")
        if group not in key.scopes:
            return key.name, Refusal(403, "api_key_not_allowed",
                                     f"API key {key.name!r} may not call {group} routes; its "
                                     f"scopes: {', '.join(key.scopes)}")
        now = self.clock()
        for bucket, code, what in ((state.rate, "rate_limited", "rate limit"),
                                   (state.quota, "quota_exceeded", "quota")):
            wait = bucket.take(now) if bucket is not None else 0.0
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return key.name, Refusal(429, code, f"API key {key.name!r} is over its {what}; "
                                         f"retry in {retry} s", retry_after_s=retry)
        return key.name, None


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key a request carries (``Authorization: Bearer`` first, then ``X-API-Key``)."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() or None if key is not None else None
