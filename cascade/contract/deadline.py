"""Absolute request deadlines on a monotonic clock.

A request's budget is fixed once, when it enters a tier; every later step (inference, each
upstream attempt, each backoff) asks the same :class:`Deadline` how much is left, so retries
can never stretch a request past what the client allowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]
"""A monotonic clock in seconds; :func:`time.monotonic` unless a test injects a fake."""

__all__ = ["Clock", "Deadline"]


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point in time, on ``clock``, after which the request is no longer worth serving.

    Immutable: share it freely between tasks. ``at_s`` is on the same clock as ``clock()``.
    """

    at_s: float
    clock: Clock = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def from_ms(cls, ms: float, *, clock: Clock = time.monotonic) -> Deadline:
        """A deadline ``ms`` milliseconds from now (zero or negative: already expired)."""
        return cls(at_s=clock() + ms / 1000.0, clock=clock)

    def remaining_s(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at_s - self.clock())

    def remaining_ms(self) -> int:
        """Whole milliseconds left, rounded down, never negative: what goes on the wire."""
        return int(self.remaining_s() * 1000.0)

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.clock() >= self.at_s
