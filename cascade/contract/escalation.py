"""The seam between a tier and whatever keeps escalations it could not deliver.

A tier that fails to reach its upstream hands a :class:`PendingEscalation` to its
:class:`EscalationQueue`. The durable outbox (``cascade.outbox``) implements it; until one is
configured, :class:`UnqueuedEscalations` counts and logs every escalation it could not keep, so
the loss is visible rather than silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("cascade.contract.escalation")


@dataclass(frozen=True, slots=True)
class PendingEscalation:
    """An escalation a tier owes its upstream, with the provisional answer it gave meanwhile."""

    id: str
    task: str
    body: dict[str, Any]
    """The request body to send upstream (task, input, callback_url)."""
    provisional: dict[str, Any]
    """The provisional response the client received."""
    reason: str
    hop_count: int
    ttl_s: float
    max_attempts: int
    traceparent: str | None = None
    callback_url: str | None = None
    request_hash: str | None = None
    """Digest of task + input under the idempotency key (a reused key with another body is 422)."""
    handed_over: bool = False
    """The upstream already holds the work (it answered provisionally); only its final answer
    is still owed, so the queue polls instead of sending."""


class EscalationQueue(Protocol):
    """Keeps escalations until they are delivered; see ``cascade.outbox`` for the durable one."""

    async def enqueue(self, item: PendingEscalation) -> dict[str, Any]:
        """Persist ``item`` before the client is answered; returns its escalation state."""
        ...

    def depth(self) -> int:
        """How many escalations wait to be delivered."""
        ...


class UnqueuedEscalations:
    """No outbox configured: every escalation that could not be delivered is counted and logged."""

    def __init__(self) -> None:
        self.dropped = 0

    async def enqueue(self, item: PendingEscalation) -> dict[str, Any]:
        self.dropped += 1
        log.warning(
            "escalation %s (%s) not queued: this tier has no outbox configured", item.id, item.reason
        )
        return {"state": "not_queued", "reason": item.reason}

    def depth(self) -> int:
        return 0
