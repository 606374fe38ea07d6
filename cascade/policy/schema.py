"""The policy file schema: what operators write in ``policies/*.yaml``.

Every model forbids unknown keys, so a typo (``treshold``) is an error naming the key rather
than a silently ignored setting.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cascade.gate import Calibration, GateRule
from cascade.policy.goals import Goals

TIER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationPolicy(_Strict):
    """How a tier's raw confidence becomes calibrated confidence (fitted by
    ``cascade policy calibrate``); thresholds then apply to the calibrated value."""

    method: Literal["none", "temperature", "isotonic"] = Field(
        "none", description="none, temperature (scales the probabilities) or isotonic (maps "
        "the signal's confidence through `curve`)."
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Temperature, method temperature.")
    curve: tuple[tuple[float, float], ...] = Field(
        (), description="Isotonic knots [raw, calibrated], raw strictly increasing."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "CalibrationPolicy":
        if self.method != "temperature" and self.temperature != 1.0:
            raise ValueError(f"temperature is only used with method temperature (method is {self.method})")
        if self.method != "isotonic" and self.curve:
            raise ValueError(f"curve is only used with method isotonic (method is {self.method})")
        if self.method == "isotonic":
            if not self.curve:
                raise ValueError("method isotonic needs a curve of [raw, calibrated] knots")
            for (x0, y0), (x1, y1) in zip(self.curve, self.curve[1:]):
                if not (x1 > x0 and y1 >= y0):
                    raise ValueError("curve knots must have increasing raw and non-decreasing "
                                     f"calibrated values; got [{x0}, {y0}] then [{x1}, {y1}]")
            if any(not (0.0 <= v <= 1.0) for knot in self.curve for v in knot):
                raise ValueError("curve values must lie in 0.0 to 1.0")
        return self

    def to_gate(self) -> Calibration | None:
        """The gate's plain-data calibration (None: raw confidence)."""
        if self.method == "temperature":
            return Calibration(temperature=self.temperature)
        if self.method == "isotonic":
            return Calibration(curve=tuple(self.curve))
        return None


class TierPolicy(_Strict):
    """How one tier gates one task."""

    signal: Literal["max_prob", "margin", "entropy"] = Field(
        "max_prob", description="Which confidence signal the threshold applies to."
    )
    threshold: float = Field(
        ..., ge=0.0, le=1.0, description="Answer locally when confidence >= threshold."
    )
    class_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per predicted class overrides of the threshold (e.g. a class the model confuses).",
    )
    floor_action: Literal["answer", "unknown"] = Field(
        "answer",
        description="Top tier only: below the threshold, answer anyway or answer 'unknown'.",
    )
    calibration: CalibrationPolicy = Field(
        default_factory=CalibrationPolicy,
        description="Calibration applied to the model's output before the threshold.",
    )

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for label, t in value.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for class {label!r} is {t}; allowed: 0.0 to 1.0")
        return value

    def gate_rule(self) -> GateRule:
        """The plain-data rule the gate decides with."""
        return GateRule(
            signal=self.signal,
            threshold=self.threshold,
            class_thresholds=tuple(sorted(self.class_thresholds.items())),
            floor_action=self.floor_action,
            calibration=self.calibration.to_gate(),
        )


class QueuePolicy(_Strict):
    """Bounds on escalations queued while the upstream is unreachable."""

    ttl_s: float = Field(86_400.0, gt=0, description="A queued escalation older than this expires.")
    max_attempts: int = Field(20, ge=1, le=10_000, description="Send attempts before 'dead'.")


class TaskPolicy(_Strict):
    """How the chain treats one task."""

    deadline_ms: int = Field(
        2_000, ge=10, le=600_000, description="Default end-to-end deadline of a request."
    )
    offline: Literal["provisional", "reject"] = Field(
        "provisional",
        description="Upstream unreachable: answer provisionally and queue, or refuse with 503.",
    )
    queue: QueuePolicy = Field(default_factory=QueuePolicy)
    goals: Goals = Field(
        default_factory=Goals,
        description="What the cascade must achieve for this task; `cascade policy replay` checks it.",
    )
    tiers: dict[str, TierPolicy] = Field(..., min_length=1)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, value: dict[str, TierPolicy]) -> dict[str, TierPolicy]:
        for name in value:
            if not TIER_NAME.match(name):
                raise ValueError(
                    f"tier name {name!r} is not allowed; use lowercase letters, digits and '-'"
                )
        return value


class DecisionLogPolicy(_Strict):
    """Sampling of gate decisions into the local decision log (signals only by default)."""

    sample_rate: float = Field(0.0, ge=0.0, le=1.0)
    include_payloads: bool = False
    path: str = Field(
        "var/decisions-{tier}.db",
        description="SQLite file of the log; {tier} becomes the tier name. "
        "The environment variable CASCADE_DECISION_LOG_PATH overrides it.",
    )


class Policy(_Strict):
    """A whole policy file."""

    version: Literal[1] = Field(1, description="Schema version of the policy file.")
    name: str = Field("unnamed", min_length=1, max_length=128)
    description: str = ""
    decision_log: DecisionLogPolicy = Field(default_factory=DecisionLogPolicy)
    tasks: dict[str, TaskPolicy] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _task_names(self) -> "Policy":
        for name in self.tasks:
            if not TIER_NAME.match(name):
                raise ValueError(f"task name {name!r} is not allowed; use lowercase letters, digits and '-'")
        return self
