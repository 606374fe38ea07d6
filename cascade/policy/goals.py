"""Operator goals for a cascade: what ``calibrate`` aims at and what ``replay`` checks.

A goal is a set of bounds on what the whole chain does with one task's traffic:

- ``min_accuracy``: accuracy of the final answers (the cascade's, not one tier's);
- ``max_accuracy_drop_vs_top``: the cascade may be at most this much less accurate than the top
  tier answering everything (``0`` means "as accurate as the cloud alone");
- ``max_cloud_share``: share of requests reaching the top tier (the cloud budget);
- ``max_escalation_rate``: share of the requests *reaching* a tier that it escalates, for every
  tier below the top, or per tier as a mapping.

On the command line a goal is ``[TASK:]METRIC OP VALUE``, e.g. ``accuracy>=0.99``,
``accuracy>=top`` (as accurate as the top tier alone), ``accuracy>=top-0.3%``, ``cloud<=10%``,
``vision:escalation<=0.3``, ``escalation.endpoint<=0.15``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

GOAL_SYNTAX = (
    "[TASK:]METRIC OP VALUE with METRIC accuracy (>=), cloud (<=) or escalation[.TIER] (<=), "
    "VALUE a fraction or a percentage (accuracy also takes top or top-VALUE: relative to the "
    "top tier alone); e.g. accuracy>=0.99, accuracy>=top-0.3%, cloud<=10%, "
    "vision:escalation.endpoint<=0.2"
)


class Goals(BaseModel):
    """Bounds one task's cascade must meet (every bound optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="Accuracy of the cascade's final answers, at least."
    )
    max_accuracy_drop_vs_top: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Accuracy the cascade may lose against the top tier answering everything, at most.",
    )
    max_cloud_share: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of requests reaching the top tier, at most."
    )
    max_escalation_rate: float | dict[str, float] | None = Field(
        None,
        description="Share of requests reaching a tier that it escalates, at most: one number "
        "for every tier below the top, or a mapping tier -> rate.",
    )

    @field_validator("max_escalation_rate")
    @classmethod
    def _rates_in_range(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        rates = value.values() if isinstance(value, dict) else [] if value is None else [value]
        for rate in rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"escalation rate {rate} is not allowed; allowed: 0.0 to 1.0")
        return value

    def escalation_limit(self, tier: str) -> float | None:
        """The escalation-rate bound of ``tier`` (None: unbounded)."""
        if isinstance(self.max_escalation_rate, dict):
            return self.max_escalation_rate.get(tier)
        return self.max_escalation_rate

    def is_empty(self) -> bool:
        """True when no bound is set."""
        return (self.min_accuracy is None and self.max_cloud_share is None
                and self.max_accuracy_drop_vs_top is None
                and self.max_escalation_rate in (None, {}))

    def accuracy_floor(self, top_accuracy: float | None) -> float | None:
        """The accuracy the cascade must reach, given the top tier's own accuracy (if known)."""
        floors = [] if self.min_accuracy is None else [self.min_accuracy]
        if self.max_accuracy_drop_vs_top is not None and top_accuracy is not None:
            floors.append(top_accuracy - self.max_accuracy_drop_vs_top)
        return max(floors) if floors else None

    def resolved(self, top_accuracy: float | None) -> Goals:
        """These goals with the relative accuracy bound turned into ``min_accuracy``."""
        return self.model_copy(update={"min_accuracy": self.accuracy_floor(top_accuracy),
                                       "max_accuracy_drop_vs_top": None})

    def merged(self, other: Goals) -> Goals:
        """These goals with every bound ``other`` sets overriding (escalation maps merge)."""
        esc = self.max_escalation_rate
        if isinstance(esc, dict) and isinstance(other.max_escalation_rate, dict):
            esc = {**esc, **other.max_escalation_rate}
        elif other.max_escalation_rate is not None:
            esc = other.max_escalation_rate
        return Goals(
            min_accuracy=other.min_accuracy if other.min_accuracy is not None else self.min_accuracy,
            max_accuracy_drop_vs_top=other.max_accuracy_drop_vs_top
            if other.max_accuracy_drop_vs_top is not None else self.max_accuracy_drop_vs_top,
            max_cloud_share=other.max_cloud_share if other.max_cloud_share is not None
            else self.max_cloud_share,
            max_escalation_rate=esc,
        )

    def describe(self) -> str:
        """The goals in the command-line syntax, e.g. ``accuracy>=0.99, cloud<=0.1``."""
        parts = []
        if self.min_accuracy is not None:
            parts.append(f"accuracy>={self.min_accuracy:g}")
        if self.max_accuracy_drop_vs_top is not None:
            drop = self.max_accuracy_drop_vs_top
            parts.append("accuracy>=top" + (f"-{drop:g}" if drop else ""))
        if self.max_cloud_share is not None:
            parts.append(f"cloud<={self.max_cloud_share:g}")
        if isinstance(self.max_escalation_rate, dict):
            parts += [f"escalation.{t}<={r:g}" for t, r in self.max_escalation_rate.items()]
        elif self.max_escalation_rate is not None:
            parts.append(f"escalation<={self.max_escalation_rate:g}")
        return ", ".join(parts) or "(none)"


class GoalSyntaxError(ValueError):
    """A goal string that does not follow :data:`GOAL_SYNTAX`."""


_GOAL = re.compile(
    r"^\s*(?:(?P<task>[a-z][a-z0-9-]*)\s*:\s*)?(?P<metric>[a-z_]+)(?:\.(?P<tier>[a-z][a-z0-9-]*))?"
    r"\s*(?P<op><=|>=|=)\s*(?P<top>top\s*(?:-\s*)?)?(?P<value>[0-9.]*)\s*(?P<pct>%)?\s*$"
)
_METRICS = {
    "accuracy": ("accuracy", ">="), "acc": ("accuracy", ">="),
    "cloud": ("cloud", "<="), "cloud_share": ("cloud", "<="), "top_share": ("cloud", "<="),
    "escalation": ("escalation", "<="), "escalation_rate": ("escalation", "<="),
    "esc": ("escalation", "<="),
}


def parse_goal(text: str) -> tuple[str | None, Goals]:
    """Parse one command-line goal into ``(task or None for every task, Goals)``."""
    m = _GOAL.match(text.lower())
    if not m:
        raise GoalSyntaxError(f"goal {text!r} is not understood; use {GOAL_SYNTAX}")
    metric = _METRICS.get(m["metric"])
    if metric is None:
        raise GoalSyntaxError(
            f"goal {text!r}: unknown metric {m['metric']!r}; allowed: accuracy, cloud, escalation"
        )
    kind, op = metric
    if m["op"] not in (op, "="):
        raise GoalSyntaxError(f"goal {text!r}: {kind} takes {op} (a {'floor' if op == '>=' else 'ceiling'})")
    if m["tier"] and kind != "escalation":
        raise GoalSyntaxError(f"goal {text!r}: only escalation takes a tier (escalation.TIER)")
    relative = m["top"] is not None
    if relative and kind != "accuracy":
        raise GoalSyntaxError(f"goal {text!r}: only accuracy can be relative to the top tier")
    if relative and m["value"] and "-" not in m["top"]:
        raise GoalSyntaxError(f"goal {text!r}: write top-VALUE, e.g. accuracy>=top-0.3%")
    try:
        value = float(m["value"]) if m["value"] else 0.0 if relative else float("nan")
    except ValueError:
        raise GoalSyntaxError(f"goal {text!r}: {m['value']!r} is not a number") from None
    if m["pct"]:
        value /= 100.0
    if not 0.0 <= value <= 1.0 or (kind == "accuracy" and value == 0.0 and not relative):
        raise GoalSyntaxError(f"goal {text!r}: value must be a fraction in (0, 1] or a percentage")
    if relative:
        goals = Goals(max_accuracy_drop_vs_top=value)
    elif kind == "accuracy":
        goals = Goals(min_accuracy=value)
    elif kind == "cloud":
        goals = Goals(max_cloud_share=value)
    else:
        goals = Goals(max_escalation_rate={m["tier"]: value} if m["tier"] else value)
    return m["task"], goals


def parse_goals(texts: list[str], tasks: list[str]) -> dict[str, Goals]:
    """Per task, the goals a list of command-line goal strings state (later ones win).

    Raises :class:`GoalSyntaxError` for bad syntax or a task not in ``tasks``.
    """
    out: dict[str, Goals] = {task: Goals() for task in tasks}
    for text in texts:
        task, goals = parse_goal(text)
        if task is not None and task not in out:
            raise GoalSyntaxError(f"goal {text!r}: unknown task {task!r}; allowed: {', '.join(tasks)}")
        for name in [task] if task else tasks:
            out[name] = out[name].merged(goals)
    return out


@dataclass(frozen=True)
class GoalCheck:
    """One bound checked against one outcome; ``met`` is None when it could not be measured."""

    goal: str
    measured: str
    met: bool | None


def check_goals(
    goals: Goals,
    *,
    accuracy: float | None,
    cloud_share: float,
    escalation_rate: Mapping[str, float],
    top_tier: str,
    top_accuracy: float | None = None,
) -> list[GoalCheck]:
    """Every bound of ``goals`` against measured numbers (``accuracy`` None: not measurable;
    ``top_accuracy``: the top tier's accuracy alone on the same traffic, if known)."""
    checks: list[GoalCheck] = []
    if goals.max_accuracy_drop_vs_top is not None:
        drop = goals.max_accuracy_drop_vs_top
        name = "accuracy>=top" + (f"-{drop:g}" if drop else "")
        if accuracy is None or top_accuracy is None or math.isnan(accuracy):
            checks.append(GoalCheck(name, "unknown", None))
        else:
            drop = top_accuracy - accuracy
            checks.append(GoalCheck(name, f"{accuracy:.4f} (top alone {top_accuracy:.4f})",
                                    drop <= goals.max_accuracy_drop_vs_top + 1e-12))
    if goals.min_accuracy is not None:
        if accuracy is None or math.isnan(accuracy):
            checks.append(GoalCheck(f"accuracy>={goals.min_accuracy:g}", "unknown", None))
        else:
            checks.append(GoalCheck(f"accuracy>={goals.min_accuracy:g}", f"{accuracy:.4f}",
                                    accuracy >= goals.min_accuracy - 1e-12))
    if goals.max_cloud_share is not None:
        checks.append(GoalCheck(f"cloud<={goals.max_cloud_share:g}", f"{cloud_share:.4f}",
                                cloud_share <= goals.max_cloud_share + 1e-12))
    for tier, rate in escalation_rate.items():
        limit = goals.escalation_limit(tier)
        if limit is None or tier == top_tier:
            continue
        checks.append(GoalCheck(f"escalation.{tier}<={limit:g}", f"{rate:.4f}", rate <= limit + 1e-12))
    return checks
