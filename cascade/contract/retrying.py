"""Retries bounded by a request's :class:`~cascade.contract.deadline.Deadline`: one policy for
every remote call made on a request's behalf (escalating to the next tier,
:mod:`cascade.upstream.client`; asking a remote model, :mod:`cascade.runners.openai_compat`).

Full-jitter exponential backoff; another attempt only while attempts are left and the deadline
leaves time for one after the backoff. What is worth retrying is the caller's choice (an
exception type: connection errors, timeouts and 5xx, never a 4xx).
"""

from __future__ import annotations

from typing import Final

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from cascade.contract.deadline import Deadline

__all__ = ["MIN_ATTEMPT_MS", "JitterBackoff", "deadline_retrying"]

MIN_ATTEMPT_MS: Final[int] = 1
"""An attempt with less budget than this cannot do useful work; don't start one."""


class JitterBackoff:
    """Full-jitter exponential backoff, sampled once per attempt.

    Both tenacity's ``wait`` and the deadline-aware ``stop`` ask for the next sleep; memoizing
    gives them the same random sample whichever order tenacity consults them in.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._wait = wait_random_exponential(multiplier=initial_s, max=max_s)
        self._samples: dict[int, float] = {}

    def __call__(self, retry_state: RetryCallState) -> float:
        attempt = retry_state.attempt_number
        if attempt not in self._samples:
            self._samples[attempt] = self._wait(retry_state)
        return self._samples[attempt]


def deadline_retrying(*, deadline: Deadline, max_attempts: int, backoff: JitterBackoff,
                      retry_on: type[BaseException]) -> AsyncRetrying:
    """A tenacity ``AsyncRetrying`` that retries ``retry_on`` with ``backoff`` and stops when
    ``max_attempts`` are used up or the next backoff would leave no time to try (the last
    error is re-raised)."""

    def out_of_budget(retry_state: RetryCallState) -> bool:
        if retry_state.attempt_number >= max_attempts:
            return True
        remaining_ms = deadline.remaining_s() * 1000.0 - backoff(retry_state) * 1000.0
        return remaining_ms < MIN_ATTEMPT_MS

    return AsyncRetrying(retry=retry_if_exception_type(retry_on), wait=backoff,
                         stop=out_of_budget, reraise=True)
