"""The escalation client: one tier calling the next one's ``POST /v1/infer``.

Retries only what another attempt can fix (connection errors, timeouts, 5xx), with
exponential backoff and full jitter, and never past the request's :class:`Deadline`. A
:class:`CircuitBreaker` in front makes a dead upstream cost nothing per request. Every failure
surfaces as one of the :mod:`cascade.errors` upstream errors::

    UpstreamUnavailable   breaker open, deadline gone, connection errors / 5xx after retries,
                          upstream overloaded (408/429), or a malformed 200 body
    UpstreamRejected      the upstream answered 4xx: the request itself is refused

Both carry ``.attempts``: how many HTTP requests were sent (0 when none was).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final, Self

import httpx
import orjson

from cascade.contract.answer import Answer
from cascade.contract.deadline import Deadline
from cascade.contract.retrying import MIN_ATTEMPT_MS, JitterBackoff, deadline_retrying
from cascade.contract.streaming import (
    EVENT_ANSWER,
    EVENT_ERROR,
    EVENT_ESCALATE,
    EVENT_TOKEN,
    EventSink,
    SseParser,
)
from cascade.errors import ConfigError, UpstreamError, UpstreamRejected, UpstreamUnavailable
from cascade.upstream.breaker import CircuitBreaker

AttemptHook = Callable[[int], AbstractContextManager[object]]
"""Called with the resend count (0 for the first attempt, 1 for the first retry...); the context
manager it returns wraps that one HTTP exchange, e.g. a CLIENT span. Transport errors and
``TimeoutError`` pass through it; a response of any status leaves it normally."""

# 4xx answers that mean "not now" rather than "never": not retried here (the upstream asked us
# to back off), but reported as unavailable so the caller queues the work instead of dropping it.
_TRANSIENT_4XX: Final[frozenset[int]] = frozenset({408, 429})

_STAT_KEYS: Final[tuple[str, ...]] = (
    "attempts",
    "retries",
    "successes",
    "failures",
    "rejected",
    "breaker_rejections",
)

__all__ = ["AttemptHook", "UpstreamClient"]


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix (5xx, transport error, timeout)."""


class _Final(Exception):
    """One attempt ended the escalation; ``upstream_alive`` tells the breaker what it means."""

    def __init__(self, error: UpstreamError, *, upstream_alive: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.upstream_alive = upstream_alive


def _with_attempts(error: UpstreamError, attempts: int) -> UpstreamError:
    error.attempts = attempts
    return error


def _parse_body(response: httpx.Response) -> Any:
    """The response body as JSON if it is JSON, else as text (for error reports)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text


class _Relay:
    """Reads a streamed answer: relays its progress events, keeps its final answer."""

    def __init__(self, sink: EventSink | None) -> None:
        self.sink = sink
        self.relayed = 0
        self._parser = SseParser()

    def feed(self, chunk: str) -> tuple[int, Any] | None:
        """Relay the events completed by ``chunk``; the ``(status, body)`` at the end."""
        for event, data in self._parser.feed(chunk):
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                payload = data
            if event == EVENT_ANSWER:
                return 200, payload
            if event == EVENT_ERROR:
                error = payload.get("error", {}) if isinstance(payload, dict) else {}
                raise _Final(UpstreamUnavailable(
                    f"the upstream's stream ended with an error: {error.get('code', '?')}: "
                    f"{error.get('message', payload)}"), upstream_alive=True)
            if self.sink is not None and event in (EVENT_TOKEN, EVENT_ESCALATE) \
                    and isinstance(payload, dict):
                self.sink(event, payload)
                self.relayed += 1
        return None

    def failed(self, retryable: _Retryable) -> _Retryable | _Final:
        """After events were relayed a retry would repeat them: the failure is final."""
        if not self.relayed:
            return retryable
        return _Final(UpstreamUnavailable(
            f"{retryable} (after {self.relayed} streamed events)"), upstream_alive=False)


class UpstreamClient:
    """Escalates requests to the next tier over HTTP/1.1 with keep-alive.

    The underlying :class:`httpx.AsyncClient` is created on first use, so constructing an
    ``UpstreamClient`` does no I/O; call :meth:`aclose` (or use ``async with``) when done.
    ``stats`` counts attempts, retries, successes, failures, rejected requests and breaker
    rejections since construction, for metrics.
    """

    def __init__(
        self,
        base_url: str,
        *,
        breaker: CircuitBreaker | None = None,
        max_attempts: int = 3,
        backoff_initial_ms: float = 20,
        backoff_max_ms: float = 500,
        connect_timeout_ms: float = 500,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 64,
        on_attempt: AttemptHook | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        for name, value, minimum in (
            ("max_attempts", max_attempts, 1),
            ("backoff_initial_ms", backoff_initial_ms, 0),
            ("backoff_max_ms", backoff_max_ms, 0),
            ("connect_timeout_ms", connect_timeout_ms, 1),
            ("max_connections", max_connections, 1),
        ):
            if value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}", field=name)
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"upstream base_url must start with http:// or https://, got {base_url!r}",
                field="base_url",
            )
        self.base_url = base_url.rstrip("/")
        self._breaker = breaker if breaker is not None else CircuitBreaker()
        self.max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_ms / 1000.0
        self._backoff_max_s = backoff_max_ms / 1000.0
        self._connect_timeout_s = connect_timeout_ms / 1000.0
        self._transport = transport
        self._max_connections = max_connections
        self._on_attempt = on_attempt
        self._tls = tls
        self._client: httpx.AsyncClient | None = None
        self._retired: list[httpx.AsyncClient] = []
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding this upstream."""
        return self._breaker

    async def escalate(
        self,
        body: dict[str, Any],
        *,
        deadline: Deadline,
        hop_count: int,
        idempotency_key: str,
        headers: Mapping[str, str] | None = None,
        events: EventSink | None = None,
    ) -> Answer:
        """POST ``body`` to the upstream's ``/v1/infer`` and return its 200 answer.

        ``hop_count`` is sent as-is in ``X-Cascade-Hop`` (the caller increments it); ``headers``
        (e.g. ``traceparent``) are added to every attempt. Each attempt carries the deadline
        left at that moment, in ``X-Cascade-Deadline-Ms`` and in the body's ``deadline_ms``.
        With ``events``, the answer is asked for as a stream and the upstream's ``token`` and
        ``escalate`` events are relayed to it as they arrive (an attempt that has relayed
        anything is not retried: the client would see the tokens twice).

        Raises :class:`UpstreamUnavailable` or :class:`UpstreamRejected`, both with ``.attempts``.
        """
        self._admit(deadline)
        attempts = 0

        async def attempt() -> Answer:
            nonlocal attempts
            attempts += 1
            self.stats["attempts"] += 1
            if attempts > 1:
                self.stats["retries"] += 1
            hook = self._on_attempt(attempts - 1) if self._on_attempt else nullcontext()
            return await self._attempt_once(
                body, deadline, hop_count, idempotency_key, headers, hook, events
            )

        retrying = deadline_retrying(
            deadline=deadline, max_attempts=self.max_attempts, retry_on=_Retryable,
            backoff=JitterBackoff(self._backoff_initial_s, self._backoff_max_s))
        try:
            result: Answer = await retrying(attempt)
        except _Retryable as exc:
            self._breaker.record_failure()
            self.stats["failures"] += 1
            why = "attempts exhausted" if attempts >= self.max_attempts else "deadline reached"
            raise _with_attempts(
                UpstreamUnavailable(
                    f"upstream {self.base_url} unavailable after {attempts} attempt(s) "
                    f"({why}); last error: {exc}"
                ),
                attempts,
            ) from exc.__cause__
        except _Final as final:
            if final.upstream_alive:
                self._breaker.record_success()
            else:
                self._breaker.record_failure()
            self.stats["rejected" if isinstance(final.error, UpstreamRejected) else "failures"] += 1
            raise _with_attempts(final.error, attempts) from None
        self._breaker.record_success()
        self.stats["successes"] += 1
        return result

    def _admit(self, deadline: Deadline) -> None:
        """Refuse before any attempt when the deadline is gone or the breaker is open."""
        if deadline.remaining_ms() < MIN_ATTEMPT_MS:
            # Checked before the breaker so an expired request never takes the half-open probe.
            raise _with_attempts(
                UpstreamUnavailable(f"deadline exhausted before escalating to {self.base_url}"), 0
            )
        if not self._breaker.allow_request():
            self.stats["breaker_rejections"] += 1
            raise _with_attempts(
                UpstreamUnavailable(
                    f"circuit open for {self.base_url}: it failed "
                    f"{self._breaker.consecutive_failures} times in a row; not calling it "
                    f"until a probe succeeds (every {self._breaker.reset_timeout_s:g}s)"
                ),
                0,
            )

    async def _attempt_once(
        self,
        body: dict[str, Any],
        deadline: Deadline,
        hop_count: int,
        idempotency_key: str,
        extra_headers: Mapping[str, str] | None,
        hook: AbstractContextManager[object],
        events: EventSink | None = None,
    ) -> Answer:
        """One HTTP attempt within what is left of the deadline; classifies the outcome."""
        remaining_ms = deadline.remaining_ms()
        if remaining_ms < MIN_ATTEMPT_MS:
            raise _Retryable("deadline exhausted before the attempt")
        remaining_s = remaining_ms / 1000.0
        wire = {**body, "deadline_ms": remaining_ms}
        headers = {
            **(extra_headers or {}),
            # Ours last: protocol headers are not overridable by callers.
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key,
            "X-Cascade-Hop": str(hop_count),
            "X-Cascade-Deadline-Ms": str(remaining_ms),
        }
        if events is not None:
            wire["stream"] = True
            headers["Accept"] = "text/event-stream"
        timeout = httpx.Timeout(remaining_s, connect=min(self._connect_timeout_s, remaining_s))
        relay = _Relay(events)
        try:
            # The hook sees the exchange itself (httpx errors, TimeoutError), not our wrappers.
            # httpx timeouts bound each phase (connect, each read...), not the whole exchange;
            # asyncio.timeout bounds the attempt as a whole, so a trickling upstream can't
            # outlive the deadline either.
            with hook:
                async with asyncio.timeout(remaining_s):
                    status, parsed = await self._exchange(orjson.dumps(wire), headers, timeout,
                                                          relay)
        except (TimeoutError, httpx.TransportError, AttributeError) as exc:
            raise relay.failed(self._transport_failure(exc, remaining_ms)) from exc
        return self._classify(status, parsed)

    async def _exchange(self, content: bytes, headers: dict[str, str], timeout: httpx.Timeout,
                        relay: _Relay) -> tuple[int, Any]:
        """POST and read the answer: ``(status, parsed body)``; a streamed answer's events are
        relayed as they arrive and its final ``answer`` event is the body."""
        url = f"{self.base_url}/v1/infer"
        if relay.sink is None:
            response = await self._get_client().post(url, content=content, headers=headers,
                                                     timeout=timeout)
            return response.status_code, _parse_body(response)
        async with self._get_client().stream("POST", url, content=content, headers=headers,
                                             timeout=timeout) as response:
            if response.status_code != 200 or not response.headers.get(
                    "content-type", "").startswith("text/event-stream"):
                await response.aread()
                return response.status_code, _parse_body(response)
            async for chunk in response.aiter_text():
                final = relay.feed(chunk)
                if final is not None:
                    return final
        raise relay.failed(_Retryable("the upstream's stream closed before its answer"))

    def _transport_failure(self, exc: BaseException, remaining_ms: int) -> _Retryable:
        """What a failed exchange means for retrying (``AttributeError``: see below)."""
        if isinstance(exc, TimeoutError):
            return _Retryable(f"no answer within the remaining {remaining_ms} ms")
        if isinstance(exc, httpx.TransportError):
            return _Retryable(f"{type(exc).__name__}: {exc or 'transport error'}")
        # httpcore/anyio race: a connection reset (RST) right after connect surfaces as
        # "'NoneType' object has no attribute 'getpeername'" instead of a ConnectError.
        if "getpeername" not in str(exc):
            raise exc
        return _Retryable(f"ConnectError: connection reset while connecting ({exc})")

    def _classify(self, status: int, parsed: Any) -> Answer:
        """The upstream's answer, or the failure its status means (retryable or final)."""
        if status == 200:
            if isinstance(parsed, dict):
                try:
                    return Answer.from_wire(parsed)
                except UpstreamUnavailable as exc:
                    raise _Final(UpstreamUnavailable(
                        f"upstream {self.base_url} answered 200 with a body that is not a "
                        f"cascade answer: {exc.message}"), upstream_alive=False) from None
            raise _Final(UpstreamUnavailable(
                f"upstream {self.base_url} answered 200 with a body that is not a JSON "
                f"object"), upstream_alive=False)
        if status >= 500:
            raise _Retryable(f"HTTP {status} from {self.base_url}")
        if status in _TRANSIENT_4XX:
            raise _Final(
                UpstreamUnavailable(f"upstream {self.base_url} asked to back off (HTTP {status})"),
                upstream_alive=True,
            )
        if 400 <= status < 500:
            raise _Final(
                UpstreamRejected(
                    f"upstream {self.base_url} rejected the request with HTTP {status}",
                    upstream_status=status, upstream_body=parsed),
                upstream_alive=True,
            )
        # 1xx/3xx/other 2xx: not part of the contract; the upstream is misconfigured.
        raise _Final(
            UpstreamUnavailable(f"upstream {self.base_url} answered unexpected HTTP {status}"),
            upstream_alive=False,
        )

    async def probe(self, timeout_s: float = 0.5) -> bool:
        """True if ``GET {base_url}/healthz`` answers 200 within ``timeout_s``. Never raises.

        Leaves the breaker alone: readiness checks report on the upstream, they don't steer it.
        """
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._get_client().get(
                    f"{self.base_url}/healthz", timeout=timeout_s
                )
        except Exception:  # noqa: BLE001 - a probe reports, it never fails its caller
            return False
        return response.status_code == 200

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Connect with ``context`` from now on (reloaded certificates): new requests open new
        connections; the old pool is closed with :meth:`aclose` (requests on it finish)."""
        self._tls = context
        client, self._client = self._client, None
        if client is not None:
            self._retired.append(client)

    async def aclose(self) -> None:
        """Close pooled connections; the client may be used again afterwards (it reconnects)."""
        clients, self._retired = [self._client, *self._retired], []
        self._client = None
        for client in clients:
            if client is not None:
                await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                # https upstreams: the tier's context (site CA only, our client certificate)
                verify=self._tls if self._tls is not None else True,
                http1=True,
                http2=False,
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=self._max_connections,
                ),
                follow_redirects=False,
            )
        return self._client

    def __repr__(self) -> str:
        return f"UpstreamClient({self.base_url!r}, breaker={self._breaker.state})"
