"""The policy file schema: what operators write in ``policies/*.yaml``.

Every model forbids unknown keys, so a typo (``treshold``) is an error naming the key rather
than a silently ignored setting.
"""

from __future__ import annotations

import itertools
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cascade.gating.drift import DriftReference, DriftSettings
from cascade.gating.gate import Calibration, GateRule, SignalName, is_generation_signal
from cascade.policy.field import AuditPolicy, CachePolicy, HardExamplesPolicy, PressurePolicy
from cascade.policy.goals import Goals

TIER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationPolicy(_Strict):
    """How a tier's raw confidence becomes calibrated confidence (fitted by
    ``cascade policy calibrate``); thresholds then apply to the calibrated value."""

    method: Literal["none", "temperature", "isotonic"] = Field(
        "none", description="none, temperature (scales the probabilities; for a generation, "
        "its log-probability: exp(logprob / T)) or isotonic (maps the signal's confidence "
        "through `curve`)."
    )
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Temperature, method temperature.")
    curve: tuple[tuple[float, float], ...] = Field(
        (), description="Isotonic knots [raw, calibrated], raw strictly increasing."
    )

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationPolicy:
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


class DriftReferencePolicy(_Strict):
    """The calibration split's histogram of a tier's calibrated confidence (written by
    ``cascade policy calibrate``; the drift alarm compares live traffic with it)."""

    split: str = Field("calibration", description="Where the reference came from (never test data).")
    edges: tuple[float, ...] = Field(
        (), description="Bin edges, strictly increasing, in 0.0 to 1.0 (a bin holds "
        "edges[i-1] <= confidence < edges[i])."
    )
    counts: tuple[int, ...] = Field(
        ..., min_length=1, description="Reference samples per bin: one more than edges."
    )
    escalation_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of the reference samples the tier escalated."
    )

    @field_validator("edges")
    @classmethod
    def _edges_increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= e <= 1.0 for e in value):
            raise ValueError("edges must lie in 0.0 to 1.0")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("edges must be strictly increasing")
        return value

    @field_validator("counts")
    @classmethod
    def _counts_match_edges(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        edges = info.data.get("edges")
        if edges is not None and len(value) != len(edges) + 1:
            raise ValueError(f"counts must have one entry more than edges: {len(edges)} edges "
                             f"need {len(edges) + 1} counts, got {len(value)}")
        if any(c < 0 for c in value) or sum(value) == 0:
            raise ValueError("counts must be non-negative and not all zero")
        return value

    def to_reference(self) -> DriftReference:
        """The detector's plain-data reference."""
        return DriftReference(tuple(self.edges), tuple(self.counts), self.escalation_rate)


class DriftPolicy(_Strict):
    """How every tier of a task judges drift of its confidence distribution (the drift alarm)."""

    enabled: bool = Field(True, description="Watch for drift at tiers that have a reference.")
    window: int = Field(300, ge=20, le=100_000, description="Recent requests compared with the reference.")
    min_samples: int = Field(200, ge=10, description="Requests before any verdict.")
    alarm_psi: float = Field(0.1, gt=0.0, le=10.0, description="PSI that turns the alarm on.")
    clear_psi: float = Field(0.05, ge=0.0, le=10.0, description="PSI below which it turns off.")
    significance: float = Field(
        0.001, gt=0.0, lt=0.5,
        description="Chance per check that sampling noise alone reaches the alarm level."
    )
    action: Literal["alert", "tighten"] = Field(
        "alert", description="alert: metrics, /readyz and a log line only; tighten: also raise "
        "every threshold by tighten_by while the alarm is on."
    )
    tighten_by: float = Field(0.05, ge=0.0, le=1.0, description="Threshold increase under tighten.")

    @field_validator("min_samples")
    @classmethod
    def _min_within_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"min_samples must not exceed window ({window})")
        return value

    @field_validator("clear_psi")
    @classmethod
    def _clear_below_alarm(cls, value: float, info: ValidationInfo) -> float:
        alarm = info.data.get("alarm_psi")
        if alarm is not None and value >= alarm:
            raise ValueError(f"clear_psi must be below alarm_psi ({alarm}): the gap is the "
                             "hysteresis")
        return value

    @field_validator("tighten_by")
    @classmethod
    def _tighten_needs_a_step(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("action") == "tighten" and value <= 0.0:
            raise ValueError("action tighten needs tighten_by > 0 (allowed: above 0.0 up to 1.0)")
        return value

    def to_settings(self) -> DriftSettings:
        """The detector's plain-data settings."""
        return DriftSettings(**self.model_dump())


class TierPolicy(_Strict):
    """How one tier gates one task."""

    signal: SignalName = Field(
        "max_prob", description="Which confidence signal the threshold applies to: max_prob, "
        "margin or entropy for a classifier; for a generative model its token log-probability "
        "signals mean_logprob, min_logprob, field_mean_logprob, field_min_logprob or "
        "answer_logprob (confidence exp(value))."
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
    drift_reference: DriftReferencePolicy | None = Field(
        None, description="Calibration-split confidence histogram for the drift alarm (fitted "
        "by calibrate; without it this tier has no drift alarm)."
    )
    pressure: PressurePolicy = Field(default_factory=PressurePolicy,
                                     description="Fallbacks when this tier's model gets slow.")

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for label, t in value.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for class {label!r} is {t}; allowed: 0.0 to 1.0")
        return value

    @model_validator(mode="after")
    def _classes_of_classifiers(self) -> TierPolicy:
        if self.class_thresholds and is_generation_signal(self.signal):
            raise ValueError(f"class_thresholds apply to classifier signals; signal "
                             f"{self.signal} scores generated answers, which have no classes")
        return self

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
    drift: DriftPolicy = Field(default_factory=DriftPolicy,
                               description="The drift alarm of every tier of this task.")
    audit: AuditPolicy = Field(default_factory=AuditPolicy,
                               description="Shadow audits: live field accuracy per tier.")
    hard_examples: HardExamplesPolicy = Field(
        default_factory=HardExamplesPolicy, description="Hard examples kept for retraining.")
    cache: CachePolicy = Field(default_factory=CachePolicy,
                               description="Answers to repeated inputs, from memory.")
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
        description="SQLite file of the log; {tier} becomes the tier name, {replica} the "
        "replica's id when a tier runs as several Serve replicas (each writes its own file; "
        "without {replica}, -<replica> is added before the suffix). "
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
    def _task_names(self) -> Policy:
        for name in self.tasks:
            if not TIER_NAME.match(name):
                raise ValueError(f"task name {name!r} is not allowed; use lowercase letters, digits and '-'")
        return self
