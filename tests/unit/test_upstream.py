"""UpstreamClient against httpx.MockTransport.

MockTransport is acceptable here because these are unit tests of the retry, deadline and
breaker logic; the real tier-to-tier HTTP path is covered by tests/integration with real
processes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import pytest

from cascade.contract.answer import Answer
from cascade.contract.deadline import Deadline
from cascade.errors import ConfigError, UpstreamError, UpstreamRejected, UpstreamUnavailable
from cascade.upstream.breaker import CircuitBreaker
from cascade.upstream.client import UpstreamClient

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]
BASE_URL = "http://upstream.test"
BODY: dict[str, Any] = {"task": "vision", "input": {"image": [[0] * 8] * 8}}
ANSWER: dict[str, Any] = {"id": "r1", "task": "vision", "label": "7", "confidence": 0.99,
                          "status": "final"}


class Recorder:
    """A scripted upstream: answers each call with the next script entry, records requests."""

    def __init__(self, *script: int | Exception | Handler) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        if callable(step):
            return await step(request)
        if step == 200:
            return httpx.Response(200, json=ANSWER)
        return httpx.Response(step, json={"error": {"code": "x", "message": f"status {step}"}})

    @property
    def calls(self) -> int:
        return len(self.requests)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def attempts(error: BaseException) -> int:
    assert isinstance(error, UpstreamError)
    return error.attempts


def connect_error() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


def client_for(recorder: Recorder, **kwargs: Any) -> UpstreamClient:
    kwargs.setdefault("backoff_initial_ms", 1)
    kwargs.setdefault("backoff_max_ms", 5)
    return UpstreamClient(BASE_URL, transport=recorder.transport(), **kwargs)


async def escalate(
    client: UpstreamClient, deadline_ms: float = 2000, **kwargs: Any
) -> dict[str, Any]:
    return await client.escalate(
        BODY,
        deadline=Deadline.from_ms(deadline_ms),
        hop_count=kwargs.pop("hop_count", 1),
        idempotency_key=kwargs.pop("idempotency_key", "key-1"),
        **kwargs,
    )


async def test_retries_503_then_returns_the_200_body() -> None:
    upstream = Recorder(503, 503, 200)
    client = client_for(upstream)
    assert await escalate(client) == Answer.from_wire(ANSWER)
    assert upstream.calls == 3
    assert client.stats == {
        "attempts": 3,
        "retries": 2,
        "successes": 1,
        "failures": 0,
        "rejected": 0,
        "breaker_rejections": 0,
    }
    assert client.breaker.state == "closed"
    assert client.breaker.consecutive_failures == 0


async def test_sends_protocol_headers_and_body_without_mutating_the_callers_dict() -> None:
    upstream = Recorder(200)
    client = client_for(upstream)
    body = dict(BODY)
    await client.escalate(
        body,
        deadline=Deadline.from_ms(1500),
        hop_count=2,
        idempotency_key="abc-123",
        headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "Idempotency-Key": "x"},
    )
    (request,) = upstream.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/v1/infer"
    assert request.headers["Idempotency-Key"] == "abc-123"  # callers can't override it
    assert request.headers["X-Cascade-Hop"] == "2"
    assert request.headers["traceparent"].startswith("00-aaaa")
    assert request.headers["Content-Type"] == "application/json"
    sent = orjson.loads(request.content)
    assert sent["task"] == "vision" and sent["input"] == BODY["input"]
    assert 1000 < sent["deadline_ms"] <= 1500
    assert sent["deadline_ms"] == int(request.headers["X-Cascade-Deadline-Ms"])
    assert body == BODY


class SteppedClock:
    """A monotonic clock that moves only when told (a test's stand-in for time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_deadline_sent_on_each_attempt_shrinks() -> None:
    clock = SteppedClock()

    async def slow_503(request: httpx.Request) -> httpx.Response:
        clock.now += 0.02  # each failed attempt takes 20 ms of the request's budget
        return httpx.Response(503)

    upstream = Recorder(slow_503, slow_503, 200)
    client = client_for(upstream)
    await client.escalate(BODY, deadline=Deadline.from_ms(2000, clock=clock), hop_count=1,
                          idempotency_key="key-1")
    header_ms = [int(r.headers["X-Cascade-Deadline-Ms"]) for r in upstream.requests]
    body_ms = [orjson.loads(r.content)["deadline_ms"] for r in upstream.requests]
    assert body_ms == header_ms
    assert header_ms == [2000, 1980, 1960]


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_4xx_is_not_retried_and_raises_rejected_with_the_body(status: int) -> None:
    upstream = Recorder(status)
    client = client_for(upstream)
    with pytest.raises(UpstreamRejected) as info:
        await escalate(client)
    assert upstream.calls == 1
    assert info.value.upstream_status == status
    assert info.value.upstream_body == {"error": {"code": "x", "message": f"status {status}"}}
    assert attempts(info.value) == 1
    assert str(status) in info.value.message
    # A 4xx proves the upstream alive: it must not push the breaker towards open.
    assert client.breaker.consecutive_failures == 0
    assert client.stats["rejected"] == 1 and client.stats["failures"] == 0


async def test_rejected_non_json_body_is_kept_as_text() -> None:
    async def plain_400(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="bad things")

    with pytest.raises(UpstreamRejected) as info:
        await escalate(client_for(Recorder(plain_400)))
    assert info.value.upstream_body == "bad things"


async def test_429_is_unavailable_not_retried_and_not_a_breaker_failure() -> None:
    upstream = Recorder(429)
    client = client_for(upstream, breaker=CircuitBreaker(failure_threshold=1))
    with pytest.raises(UpstreamUnavailable, match="back off") as info:
        await escalate(client)
    assert upstream.calls == 1
    assert attempts(info.value) == 1
    assert client.breaker.state == "closed"


async def test_200_with_a_non_object_body_is_unavailable_and_counts_as_failure() -> None:
    async def list_200(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2])

    upstream = Recorder(list_200)
    client = client_for(upstream)
    with pytest.raises(UpstreamUnavailable, match="not a JSON object"):
        await escalate(client)
    assert upstream.calls == 1
    assert client.breaker.consecutive_failures == 1


async def test_connection_errors_are_retried_then_unavailable() -> None:
    upstream = Recorder(connect_error())
    client = client_for(upstream, max_attempts=3)
    with pytest.raises(UpstreamUnavailable) as info:
        await escalate(client)
    assert upstream.calls == 3
    assert attempts(info.value) == 3
    assert "3 attempt(s) (attempts exhausted)" in info.value.message
    assert "ConnectError: connection refused" in info.value.message
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert client.stats["failures"] == 1 and client.stats["retries"] == 2
    assert client.breaker.consecutive_failures == 1  # one failed request, not one per attempt


async def test_breaker_opens_and_then_rejects_without_io() -> None:
    upstream = Recorder(503)
    client = client_for(upstream, max_attempts=2, breaker=CircuitBreaker(failure_threshold=2))
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable, match="HTTP 503"):
            await escalate(client)
    assert upstream.calls == 4
    assert client.breaker.state == "open"

    with pytest.raises(UpstreamUnavailable, match="circuit open") as info:
        await escalate(client)
    assert upstream.calls == 4  # no request was sent
    assert attempts(info.value) == 0
    assert client.stats["breaker_rejections"] == 1


async def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0, clock=lambda: now[0])
    entered, release = asyncio.Event(), asyncio.Event()

    async def held_200(request: httpx.Request) -> httpx.Response:
        entered.set()
        await release.wait()
        return httpx.Response(200, json=ANSWER)

    upstream = Recorder(503, held_200)
    client = client_for(upstream, max_attempts=1, breaker=breaker)
    with pytest.raises(UpstreamUnavailable):
        await escalate(client)
    assert breaker.state == "open"

    now[0] = 5.0
    assert breaker.state_code == 2  # half_open
    probe = asyncio.create_task(escalate(client))
    await asyncio.wait_for(entered.wait(), timeout=2)
    with pytest.raises(UpstreamUnavailable, match="circuit open"):
        await escalate(client)  # only one probe at a time
    release.set()
    assert await probe == Answer.from_wire(ANSWER)
    assert breaker.state_code == 0  # closed
    assert upstream.calls == 2
    assert await escalate(client) == Answer.from_wire(ANSWER)


async def test_half_open_probe_failure_reopens() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0, clock=lambda: now[0])
    upstream = Recorder(connect_error())
    client = client_for(upstream, max_attempts=1, breaker=breaker)
    with pytest.raises(UpstreamUnavailable):
        await escalate(client)
    now[0] = 5.0
    with pytest.raises(UpstreamUnavailable, match="ConnectError"):
        await escalate(client)
    assert breaker.state == "open"
    assert upstream.calls == 2


async def test_slow_upstream_cannot_outlive_the_deadline() -> None:
    cut: list[bool] = []

    async def hangs(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cut.append(True)
            raise
        return httpx.Response(200, json=ANSWER)

    upstream = Recorder(hangs)
    client = client_for(upstream, max_attempts=3)
    deadline = Deadline.from_ms(100)
    with pytest.raises(UpstreamUnavailable, match="deadline reached") as info:
        await client.escalate(BODY, deadline=deadline, hop_count=1, idempotency_key="key-1")
    # The attempt was cut (not answered) at the deadline, and never retried. The attempt's
    # budget is the remaining time in whole milliseconds (what goes on the wire), so the cut
    # comes at most 1 ms (and the event loop's clock resolution) before the deadline itself.
    resolution = asyncio.get_running_loop()._clock_resolution
    assert cut == [True] and deadline.remaining_s() <= 0.001 + resolution
    assert upstream.calls == 1
    assert attempts(info.value) == 1


async def test_no_retry_when_the_next_backoff_would_pass_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pin the jitter to the top of its window so the backoff is exactly 1 s.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    upstream = Recorder(503)
    client = client_for(upstream, max_attempts=5, backoff_initial_ms=1000, backoff_max_ms=1000)
    # Time stands still: a client that slept the backoff anyway would find 300 ms left and
    # try again; one that compares the backoff with the deadline gives up after one attempt.
    deadline = Deadline.from_ms(300, clock=SteppedClock())
    with pytest.raises(UpstreamUnavailable, match="1 attempt\\(s\\) \\(deadline reached\\)"):
        await client.escalate(BODY, deadline=deadline, hop_count=1, idempotency_key="key-1")
    assert upstream.calls == 1


async def test_expired_deadline_raises_at_once_without_taking_the_probe() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0, clock=lambda: now[0])
    upstream = Recorder(503, 200)
    client = client_for(upstream, max_attempts=1, breaker=breaker)
    with pytest.raises(UpstreamUnavailable):
        await escalate(client)
    now[0] = 5.0
    with pytest.raises(UpstreamUnavailable, match="deadline exhausted") as info:
        await escalate(client, deadline_ms=0)
    assert attempts(info.value) == 0
    assert upstream.calls == 1
    assert breaker.allow_request()  # the probe slot is still free


async def test_on_attempt_hook_wraps_each_attempt_with_its_resend_count() -> None:
    seen: list[tuple[int, str]] = []

    def on_attempt(resend_count: int) -> Any:
        @contextmanager
        def span() -> Iterator[None]:
            try:
                yield
            except Exception as exc:
                seen.append((resend_count, type(exc).__name__))
                raise
            seen.append((resend_count, "ok"))

        return span()

    upstream = Recorder(connect_error(), 503, 200)
    await escalate(client_for(upstream, on_attempt=on_attempt))
    # The hook wraps the HTTP exchange: it sees transport errors, and any response as "ok".
    assert seen == [(0, "ConnectError"), (1, "ok"), (2, "ok")]


async def test_probe_reports_health_and_never_raises() -> None:
    async def healthz(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET" and request.url.path == "/healthz"
        return httpx.Response(200, json=ANSWER)

    cut: list[bool] = []

    async def hangs(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cut.append(True)
            raise
        return httpx.Response(200)  # would count as healthy had the probe waited for it

    assert await client_for(Recorder(healthz)).probe() is True
    assert await client_for(Recorder(503)).probe() is False
    assert await client_for(Recorder(connect_error())).probe() is False
    assert await client_for(Recorder(hangs)).probe(timeout_s=0.05) is False
    assert cut == [True]  # given up at its timeout, not answered late


async def test_client_is_created_lazily_and_aclose_is_idempotent() -> None:
    upstream = Recorder(200)
    async with client_for(upstream) as client:
        assert client._client is None  # nothing opened by construction
        await escalate(client)
        assert client._client is not None
    assert client._client is None
    await client.aclose()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff_initial_ms": -1}, "backoff_initial_ms"),
        ({"max_connections": 0}, "max_connections"),
    ],
)
def test_rejects_invalid_settings_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        UpstreamClient(BASE_URL, **kwargs)
    assert info.value.field == field


def test_rejects_base_url_without_scheme() -> None:
    with pytest.raises(ConfigError, match="http://"):
        UpstreamClient("upstream:8000")
