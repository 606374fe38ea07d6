"""The canary of a newly installed model version: who answers, what each version did, and the
verdict (pure: :func:`judge` over two :class:`VersionStats`).

Every served runner is wrapped in a :class:`MeteredRunner` that counts its calls, failures and
latency and knows how many calls are in flight (a retired runner is closed only when none is).
While a canary runs, :class:`Canary` sends every 1/share-th request of its task to the new
version (counted, not drawn: the canary never sees more than its share), and the tier's outcome
observer counts each version's escalations. The guards compare the canary with the version it
would replace *over the same window*, so traffic that got harder for both does not trip them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import CompletionInput, Generation, Output, TokenDelta
from cascade.errors import ServiceUnavailable
from cascade.runners.base import Runner, StreamingRunner
from cascade.tier.rollout_settings import CanarySettings

__all__ = ["Canary", "MeteredRunner", "MeteredStreamingRunner", "Verdict", "VersionStats",
           "judge", "metered"]

_LATENCY_SAMPLES = 2048


@dataclass
class VersionStats:
    """What one version did since the canary started."""

    calls: int = 0
    errors: int = 0
    answered: int = 0
    escalated: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))

    def p99_ms(self) -> float:
        """p99 of the model's call latency (0 without calls)."""
        return float(np.percentile(np.fromiter(self.latencies_ms, float), 99)) \
            if self.latencies_ms else 0.0

    def escalation_rate(self) -> float:
        """Share of this version's answers its gate escalated."""
        return self.escalated / self.answered if self.answered else 0.0

    def view(self) -> dict[str, Any]:
        """For /readyz and the status command."""
        return {"calls": self.calls, "errors": self.errors, "answered": self.answered,
                "escalation_rate": round(self.escalation_rate(), 4),
                "p99_ms": round(self.p99_ms(), 3)}


class MeteredRunner:
    """A runner that counts calls, failures (not ``model_busy``: capacity is not the model's
    fault) and latency into ``stats``, and the calls in flight. Everything else is the inner
    runner's (``path``, ``classes``, ``stream``...)."""

    def __init__(self, inner: Runner, version: str) -> None:
        self.inner = inner
        self.version = version
        self.model_name = inner.model_name
        self.task = inner.task
        self.stats = VersionStats()
        self.in_flight = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """The inner runner's ``run``, metered."""
        with self.metering():
            return await self.inner.run(inputs, deadline)

    @contextmanager
    def metering(self) -> Iterator[None]:
        """Count one call: in flight while it runs, its latency when it answers, an error when
        it fails (not when the runner is only busy: ``ServiceUnavailable``)."""
        self.in_flight += 1
        started = time.perf_counter()
        try:
            yield
        except ServiceUnavailable:
            raise
        except Exception:
            self.stats.errors += 1
            raise
        finally:
            self.in_flight -= 1
            self.stats.calls += 1
        self.stats.latencies_ms.append((time.perf_counter() - started) * 1000)

    def warmup(self) -> None:
        """The inner runner's warm-up."""
        self.inner.warmup()

    def close(self) -> None:
        """Close the inner runner."""
        self.inner.close()


class MeteredStreamingRunner(MeteredRunner):
    """A metered generative runner: ``stream`` is the inner one's, counted as one call (an
    explicit method, so protocol checks that look attributes up statically still see it)."""

    async def stream(self, inputs: CompletionInput,
                     deadline: Deadline | None = None) -> AsyncIterator[TokenDelta | Generation]:
        """The inner runner's stream, metered."""
        with self.metering():
            async for item in self.inner.stream(inputs, deadline):  # type: ignore[attr-defined]
                yield item


def metered(inner: Runner, version: str) -> MeteredRunner:
    """``inner`` metered as ``version`` (streaming runners keep their ``stream``)."""
    if isinstance(inner, StreamingRunner):
        return MeteredStreamingRunner(inner, version)
    return MeteredRunner(inner, version)


Verdict = Literal["continue", "promote", "rollback"]


def judge(canary: VersionStats, stable: VersionStats, settings: CanarySettings,
          elapsed_s: float) -> tuple[Verdict, str]:
    """The canary's verdict and why: roll back on the first guard it breaks (once it has
    ``min_requests``), promote when its window is over, else continue."""
    if canary.calls < settings.min_requests:
        return "continue", f"{canary.calls} of {settings.min_requests} requests before judging"
    error_rate = canary.errors / canary.calls
    if error_rate > settings.max_error_rate:
        return "rollback", (f"error rate {error_rate:.1%} over {canary.calls} calls exceeds "
                            f"max_error_rate {settings.max_error_rate:.1%}")
    increase = canary.escalation_rate() - stable.escalation_rate()
    if canary.answered and increase > settings.max_escalation_increase:
        return "rollback", (f"escalation rate {canary.escalation_rate():.1%} vs "
                            f"{stable.escalation_rate():.1%} for the serving version: "
                            f"+{increase:.1%} exceeds max_escalation_increase "
                            f"{settings.max_escalation_increase:.1%}")
    limit = stable.p99_ms() * settings.max_p99_ratio + settings.p99_slack_ms
    if stable.latencies_ms and canary.p99_ms() > limit:
        return "rollback", (f"p99 latency {canary.p99_ms():.2f} ms exceeds {limit:.2f} ms "
                            f"(serving version's p99 {stable.p99_ms():.2f} ms x "
                            f"{settings.max_p99_ratio} + {settings.p99_slack_ms} ms)")
    if canary.calls >= settings.window_requests and elapsed_s >= settings.window_s:
        return "promote", (f"{canary.calls} requests over {elapsed_s:.1f} s within every guard")
    return "continue", f"{canary.calls} of {settings.window_requests} requests, guards hold"


class Canary:
    """A canary in progress for one task: the new version's runner and the counted split."""

    def __init__(self, runner: MeteredRunner, stable: MeteredRunner,
                 settings: CanarySettings) -> None:
        self.runner = runner
        self.stable = stable
        self.settings = settings
        self.started = time.monotonic()
        self.seen = 0
        self.verdict: Verdict = "continue"
        self.reason = "starting"
        self.shadow_skipped = 0  # shadow runs not started: too many already in flight
        runner.stats, stable.stats = VersionStats(), VersionStats()  # one window for both

    def take(self) -> bool:
        """Does this request go to the canary (split mode)? Exactly floor(n * share) of the
        first n do."""
        return self.settings.mode == "split" and self._counted_in()

    def take_shadow(self) -> bool:
        """Does the canary also run on this request in the background (shadow mode)? The same
        count as :meth:`take`; None of its answers reach a client."""
        return self.settings.mode == "shadow" and self._counted_in()

    def _counted_in(self) -> bool:
        if self.verdict != "continue":
            return False
        self.seen += 1
        share = self.settings.share
        return math.floor(self.seen * share) > math.floor((self.seen - 1) * share)

    def judge(self) -> tuple[Verdict, str]:
        """Judge the canary now (once it has a verdict other than continue, it keeps it)."""
        if self.verdict == "continue":
            self.verdict, self.reason = judge(self.runner.stats, self.stable.stats,
                                              self.settings, time.monotonic() - self.started)
        return self.verdict, self.reason

    def view(self) -> dict[str, Any]:
        """For /readyz: the version, its share, both versions' numbers and the verdict."""
        return {"version": self.runner.version, "share": self.settings.share,
                "mode": self.settings.mode, "shadow_skipped": self.shadow_skipped,
                "requests_seen": self.seen, "canary": self.runner.stats.view(),
                "serving": self.stable.stats.view(), "verdict": self.verdict,
                "reason": self.reason}
