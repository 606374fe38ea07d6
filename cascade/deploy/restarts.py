"""When to restart a tier that died: exponential backoff within a restart budget.

Pure logic over plain data (times are the caller's monotonic seconds), used by the chain
supervisor (``cascade up``); systemd does the same for the units in ``infra/systemd/``
(``RestartSec``/``RestartSteps``/``RestartMaxDelaySec`` and ``StartLimitBurst`` in
``StartLimitIntervalSec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.errors import ConfigError

__all__ = ["RestartHistory", "RestartPolicy"]


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervisor restarts a tier that exits.

    The n-th restart within ``window_s`` waits ``initial_delay_s * multiplier**(n-1)`` seconds
    (at most ``max_delay_s``); past ``budget`` restarts within ``window_s`` the tier is left
    down (a crash loop needs an operator, not more restarts)."""

    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0
    multiplier: float = 2.0
    budget: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        checks = {
            "initial_delay_s": self.initial_delay_s >= 0,
            "max_delay_s": self.max_delay_s >= self.initial_delay_s,
            "multiplier": self.multiplier >= 1,
            "budget": self.budget >= 0,
            "window_s": self.window_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(
                    f"restart policy: {name}={getattr(self, name)!r} is not allowed (delays "
                    "≥ 0 with max ≥ initial, multiplier ≥ 1, budget ≥ 0, window > 0)",
                    field=name)


@dataclass
class RestartHistory:
    """The restarts of one tier and what its policy says about the next one."""

    policy: RestartPolicy
    restarted_at: list[float] = field(default_factory=list)

    def recent(self, now: float) -> int:
        """Restarts within the policy's window before ``now``."""
        return sum(1 for at in self.restarted_at if now - at < self.policy.window_s)

    def next_delay_s(self, now: float) -> float | None:
        """Seconds to wait before restarting a tier that died at ``now``; None: the budget is
        spent (leave it down)."""
        done = self.recent(now)
        if done >= self.policy.budget:
            return None
        return min(self.policy.max_delay_s,
                   self.policy.initial_delay_s * self.policy.multiplier ** done)

    def record(self, now: float) -> None:
        """A restart happened at ``now``."""
        self.restarted_at.append(now)
