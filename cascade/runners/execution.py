"""Where a blocking model call runs: inline on the event loop, or on a bounded thread pool.

A tier serves every request, ``/healthz`` and ``/metrics`` from one event loop. A model that
takes 50 ms to 5 s (an LLM, a real CNN on a Pi) must not run on it, or the tier stops answering
anything else while it computes. But a hop to a worker thread and back costs about 0.2 ms here
(measured: an empty call through ``run_in_executor`` behind a semaphore, 2 cores), which is
more than every built-in ONNX model takes (0.05-0.42 ms per sample, manifest ``latency_ms_p50``):
for those, running inline is both faster and fairer.

So each blocking runner owns one :class:`BlockingCalls`. In ``auto`` mode (the default) the
runner's warm-up measures its latency and calls run inline while that stays under
``offload_above_ms`` (default 2 ms, where the hop would cost under a tenth of the call), and on
``max_concurrency`` worker threads otherwise. Calls waiting for a free thread wait at most until
the request's deadline (then 503 ``model_busy``), and every wait is reported to ``on_wait``
(the tier's ``cascade_runner_wait_seconds`` histogram).

A runtime that is never fast enough to run inline (an LLM: 50 ms to seconds per request) calls
:meth:`BlockingCalls.pin_to_threads` instead of measuring: it always uses threads and may bound
how many calls wait for one (``max_waiting``): a call beyond that is refused at once (503
``model_busy`` with a retry hint) rather than queued until its deadline.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from cascade.contract.deadline import Deadline
from cascade.errors import ServiceUnavailable

__all__ = ["DEFAULT_OFFLOAD_ABOVE_MS", "BlockingCalls", "OffloadMode", "measure_ms"]

T = TypeVar("T")
OffloadMode = Literal["auto", "inline", "thread"]

DEFAULT_OFFLOAD_ABOVE_MS = 2.0
"""``auto`` offloads a model whose warm-up median is at least this (about 10x a thread hop)."""


def measure_ms(call: Callable[[], object], *, repeats: int = 5) -> float:
    """Median wall time of ``repeats`` calls, in milliseconds (the first call is not counted)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


class BlockingCalls:
    """Runs one runner's blocking calls inline or on its own bounded thread pool."""

    def __init__(
        self, *, name: str, mode: OffloadMode = "auto", max_concurrency: int = 1,
        offload_above_ms: float = DEFAULT_OFFLOAD_ABOVE_MS,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.name = name
        self.mode: OffloadMode = mode
        self.max_concurrency = max_concurrency
        self.offload_above_ms = offload_above_ms
        self.on_wait = on_wait
        self.measured_ms: float | None = None
        self.in_flight = 0
        """Calls running on a worker thread right now."""
        self.waiting = 0
        """Calls waiting for a free worker thread right now."""
        self.max_waiting: int | None = None
        self._recent_call_s: float | None = None
        self._inline = mode != "thread"  # auto: inline until a warm-up says otherwise
        self._pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def inline(self) -> bool:
        """True when calls run on the event loop itself."""
        return self._inline

    def calibrate(self, measured_ms: float) -> None:
        """Record the runner's measured latency; in ``auto`` mode, choose inline or threads."""
        self.measured_ms = measured_ms
        if self.mode == "auto":
            self._inline = measured_ms < self.offload_above_ms

    def pin_to_threads(self, *, max_concurrency: int | None = None,
                       max_waiting: int | None = None) -> None:
        """Always run on worker threads (whatever the mode), on ``max_concurrency`` of them if
        given, with at most ``max_waiting`` calls waiting for one (None: no bound). Call it
        before the first call."""
        if self._pool is not None:
            raise RuntimeError(f"{self.name}: pin_to_threads after the first call")
        if max_concurrency is not None:
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            self.max_concurrency = max_concurrency
        if max_waiting is not None and max_waiting < 0:
            raise ValueError("max_waiting must be at least 0")
        self.mode, self._inline, self.max_waiting = "thread", False, max_waiting

    async def call(self, fn: Callable[..., T], *args: object,
                   deadline: Deadline | None = None) -> T:
        """``fn(*args)``, inline or on a worker thread once a slot is free (at most until
        ``deadline``: then 503 ``model_busy``, and the model never ran; at once when
        ``max_waiting`` calls are already waiting)."""
        if self._inline:
            return fn(*args)
        if self._slots is None or self._pool is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._pool = ThreadPoolExecutor(self.max_concurrency,
                                            thread_name_prefix=f"runner-{self.name}")
        if self.max_waiting is not None and self._slots.locked() \
                and self.waiting >= self.max_waiting:
            raise self._queue_full()
        started = time.perf_counter()
        self.waiting += 1
        try:
            timeout = None if deadline is None else deadline.remaining_s()
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError:
            raise ServiceUnavailable(
                f"model {self.name} is busy: all {self.max_concurrency} of its slots stayed "
                "taken until the request's deadline", code="model_busy") from None
        finally:
            self.waiting -= 1
            self._report_wait(time.perf_counter() - started)
        self.in_flight += 1
        running = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.in_flight -= 1
            self._slots.release()
            self._note_call_s(time.perf_counter() - running)

    def _queue_full(self) -> ServiceUnavailable:
        """503 model_busy with a retry hint: the calls ahead, shared by the workers."""
        per_call_s = self._recent_call_s or (self.measured_ms or 1000.0) / 1000.0
        rounds = math.ceil((self.waiting + 1) / self.max_concurrency)
        retry_after_s = max(1.0, math.ceil(per_call_s * rounds))
        return ServiceUnavailable(
            f"model {self.name} is busy: {self.in_flight} call(s) running and {self.waiting} "
            f"waiting, the most it queues (max_waiting={self.max_waiting}); retry in about "
            f"{retry_after_s:g} s", code="model_busy", retry_after_s=retry_after_s)

    def _note_call_s(self, seconds: float) -> None:
        # A moving average of call times: what the retry hint of a refused call is made of.
        recent = self._recent_call_s
        self._recent_call_s = seconds if recent is None else 0.8 * recent + 0.2 * seconds

    def close(self) -> None:
        """Stop the worker threads (calls in flight finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._slots = None

    def _report_wait(self, waited_s: float) -> None:
        if self.on_wait is not None:
            self.on_wait(waited_s)
