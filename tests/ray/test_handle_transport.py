"""HandleTransport without a cluster: the upstream client's request reaches the ingress's
``handle_http`` with the route prefix removed and every header kept; an unreachable ingress is
a connect error and a slow one a read timeout, which the client retries and counts as for HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from ray.serve.exceptions import DeploymentUnavailableError

from cascade.deploy.ray_serve import HandleTransport

pytestmark = pytest.mark.ray


class _Call:
    """What ``handle.handle_http.remote(...)`` returns: awaitable, cancellable."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.cancelled = False

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        if self.result == "slow":
            await asyncio.sleep(30)
        return self.result

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """A DeploymentHandle stand-in recording the calls of ``handle_http``."""

    def __init__(self, result: Any) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.result = result
        self.handle_http = self

    def remote(self, *args: Any) -> _Call:
        self.calls.append(args)
        self.call = _Call(self.result)
        return self.call


async def _post(handle: FakeHandle, **timeout: float) -> httpx.Response:
    transport = HandleTransport(handle, strip_prefix="/cloud")  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport) as client:
        return await client.post("http://proxy:8000/cloud/v1/infer?x=1", content=b"{}",
                                 headers={"traceparent": "00-ab-cd-01", "X-Cascade-Hop": "2"},
                                 timeout=httpx.Timeout(5.0, **timeout))


def test_the_request_reaches_the_ingress_without_the_prefix():
    handle = FakeHandle((200, [("content-type", "application/json")], b'{"ok": true}'))
    response = asyncio.run(_post(handle))
    assert (response.status_code, response.json()) == (200, {"ok": True})
    method, path, headers, body = handle.calls[0]
    assert (method, path, body) == ("POST", "/v1/infer?x=1", b"{}")
    assert ("traceparent", "00-ab-cd-01") in headers and ("x-cascade-hop", "2") in headers


def test_an_unreachable_ingress_is_a_connect_error_and_a_slow_one_a_read_timeout():
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_post(FakeHandle(DeploymentUnavailableError("cloud-ingress"))))
    slow = FakeHandle("slow")
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(_post(slow, read=0.05))
    assert slow.call.cancelled
