"""The seam a tier escalates through: anything that can answer a request one tier up.

:class:`~cascade.upstream.client.UpstreamClient` (HTTP to the next tier's ``/v1/infer``) is the
one implementation today; a Ray Serve handle can be another. Failures are typed: an
:class:`~cascade.errors.UpstreamRejected` is final (4xx), an
:class:`~cascade.errors.UpstreamUnavailable` may succeed later (the outbox retries it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from cascade.contract.answer import Answer
from cascade.contract.deadline import Deadline
from cascade.contract.streaming import EventSink

__all__ = ["BreakerView", "Upstream"]


class BreakerView(Protocol):
    """What callers read of an upstream's circuit breaker."""

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        ...

    @property
    def reset_timeout_s(self) -> float:
        """How long the breaker stays open before it lets a probe through."""
        ...


class Upstream(Protocol):
    """The next tier, as a tier and its forwarder use it."""

    @property
    def breaker(self) -> Any:
        """The circuit breaker guarding it (see :class:`BreakerView`)."""
        ...

    async def escalate(self, body: dict[str, Any], *, deadline: Deadline, hop_count: int,
                       idempotency_key: str,
                       headers: Mapping[str, str] | None = None,
                       events: EventSink | None = None) -> Answer:
        """The upstream's 200 answer to ``body``, within ``deadline``. With ``events``, ask
        for a streamed answer and relay its ``token``/``escalate`` events as they arrive."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
