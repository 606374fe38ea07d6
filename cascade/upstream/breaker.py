"""A circuit breaker as a pure state machine over an injectable clock.

::

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(reset_timeout_s elapsed)──▶ half_open: one probe request allowed at a time
    half_open ──probe succeeds──▶ closed
    half_open ──probe fails──▶ open (timer restarts)

It does no I/O and holds no locks: use one breaker from one event loop (every method runs
to completion without awaiting, so asyncio tasks cannot interleave inside it).
"""

from __future__ import annotations

import time
from typing import Final, Literal

from cascade.contract.deadline import Clock
from cascade.errors import ConfigError

BreakerState = Literal["closed", "open", "half_open"]

STATE_CODES: Final[dict[BreakerState, int]] = {"closed": 0, "open": 1, "half_open": 2}
"""Numeric encoding of :attr:`CircuitBreaker.state` for a metrics gauge."""

__all__ = ["STATE_CODES", "BreakerState", "CircuitBreaker"]


class CircuitBreaker:
    """Stops calling an upstream that keeps failing, and lets one probe through now and then.

    Callers ask :meth:`allow_request` before each request and report the outcome with
    :meth:`record_success` or :meth:`record_failure`. While open, :meth:`allow_request`
    answers False without any I/O, so a dead upstream costs nothing per request.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError(
                f"failure_threshold must be >= 1, got {failure_threshold}",
                field="failure_threshold",
            )
        if reset_timeout_s <= 0:
            raise ConfigError(
                f"reset_timeout_s must be > 0, got {reset_timeout_s}", field="reset_timeout_s"
            )
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive_failures = 0
        self._opened_at_s = 0.0
        self._probe_started_at_s: float | None = None

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` or ``"half_open"``, as of now."""
        self._advance()
        return self._state

    @property
    def state_code(self) -> int:
        """The state as 0 (closed), 1 (open) or 2 (half_open), for metrics."""
        return STATE_CODES[self.state]

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._consecutive_failures

    def allow_request(self) -> bool:
        """May a request be sent now? In half_open this grants the single probe slot."""
        self._advance()
        if self._state == "closed":
            return True
        if self._state == "open":
            return False
        now = self._clock()
        # A probe whose caller vanished (cancelled, never reported) must not wedge the breaker
        # in half_open forever: its slot lapses after reset_timeout_s.
        if (
            self._probe_started_at_s is not None
            and now - self._probe_started_at_s < self.reset_timeout_s
        ):
            return False
        self._probe_started_at_s = now
        return True

    def record_success(self) -> None:
        """The upstream answered (any answer proves it alive): close the circuit."""
        self._state = "closed"
        self._consecutive_failures = 0
        self._probe_started_at_s = None

    def record_failure(self) -> None:
        """The upstream failed; open the circuit at the threshold or when a probe fails."""
        self._advance()
        self._consecutive_failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._consecutive_failures >= self.failure_threshold
        ):
            self._open()
        # Already open: a late failure from a request sent before opening changes nothing,
        # in particular it does not push the next probe further away.

    def _open(self) -> None:
        self._state = "open"
        self._opened_at_s = self._clock()
        self._probe_started_at_s = None

    def _advance(self) -> None:
        """Apply the only time-driven transition, open → half_open."""
        if self._state == "open" and self._clock() - self._opened_at_s >= self.reset_timeout_s:
            self._state = "half_open"
            self._probe_started_at_s = None

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state!r}, failures={self._consecutive_failures}, "
            f"threshold={self.failure_threshold}, reset_timeout_s={self.reset_timeout_s})"
        )
