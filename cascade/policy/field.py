"""Field operations in the policy file: shadow audits (``tasks.<task>.audit``) and the store of
hard examples (``tasks.<task>.hard_examples``). See ``docs/field-operations.md``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cascade.gating.agreement import AgreementSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditPolicy(_Strict):
    """Shadow audits: every tier with an upstream re-asks it, in the background, about a sample
    of the requests it answered itself, and publishes how often the upper tier agreed."""

    rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of the requests a tier answered itself that it "
        "audits (0: off). Sampled by request id, so the same requests at every tier.")
    per_second: float = Field(
        5.0, gt=0.0, le=10_000.0, description="Most audits a tier sends per second (budget; "
        "bursts up to one second's worth). Over it, audits are dropped and counted.")
    queue_size: int = Field(
        64, ge=1, le=100_000, description="Audits waiting to be sent; when full, new ones are "
        "dropped and counted (an audit never delays an answer).")
    concurrency: int = Field(2, ge=1, le=64, description="Audits in flight at once.")
    deadline_ms: int = Field(5_000, ge=10, le=600_000, description="Deadline of one audit call.")
    reference: Literal["next_tier", "chain", "top"] = Field(
        "next_tier", description="next_tier: the upstream answers an audit with its own model "
        "and never escalates it; chain: the upstream may escalate it online as its gate says "
        "(still never queued); top: every tier above passes it up unread, so the top tier's "
        "model judges (the most accurate judge, the most hops).")
    window: int = Field(2_000, ge=10, le=1_000_000,
                        description="Audits the live agreement is computed over (most recent).")
    confidence: float = Field(0.95, gt=0.5, lt=1.0,
                              description="Confidence level of the Wilson interval.")
    min_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Field-accuracy alarm: on when the interval's upper "
        "bound is below this (the tier is worse than allowed), off when the estimate is back "
        "at it. None: no alarm.")
    min_audits: int = Field(50, ge=1, description="Audits before the alarm may turn on.")

    def agreement_settings(self) -> AgreementSettings:
        """The plain-data settings of the agreement window."""
        return AgreementSettings(window=self.window, confidence=self.confidence,
                                 min_agreement=self.min_agreement, min_audits=self.min_audits)


class HardExamplesPolicy(_Strict):
    """Hard examples kept for retraining: inputs this tier escalated, that an audit disagreed
    on, or whose confidence was below ``confidence_floor``, labelled with the upper tier's
    answer (``cascade examples export`` writes them as a dataset)."""

    enabled: bool = Field(False, description="Keep hard examples at every tier of this task.")
    escalated: bool = Field(True, description="Keep inputs this tier escalated and got an "
                                              "upper tier's answer for.")
    disagreed: bool = Field(True, description="Keep inputs an audit disagreed on.")
    confidence_floor: float | None = Field(
        None, ge=0.0, le=1.0, description="Inputs answered here below this calibrated "
        "confidence are audited (within the audit budget, whatever the rate) and kept with "
        "the upper tier's label. None: no floor.")
    include_payloads: bool = Field(
        False, description="Store the inputs themselves; false: only their sha256 (enough to "
        "count and deduplicate, not to retrain).")
    max_rows: int = Field(10_000, ge=1, le=10_000_000,
                          description="Rows kept per tier; the oldest go first.")
    path: str = Field("var/examples-{tier}.db", description="SQLite file; {tier} becomes the "
                      "tier name. CASCADE_EXAMPLES_PATH overrides it.")


class PressurePolicy(_Strict):
    """What one tier does when its own model gets slow (CPU contention, thermal throttling):
    ``tasks.<task>.tiers.<tier>.pressure``."""

    latency_budget_ms: float | None = Field(
        None, gt=0.0, le=600_000.0, description="Pressure turns on when the p95 of this tier's "
        "own model latency over the last `window` runs passes this (None: never).")
    window: int = Field(50, ge=5, le=10_000, description="Model runs the p95 is taken over.")
    min_runs: int = Field(20, ge=1, le=10_000, description="Runs before pressure can turn on.")
    recover_below: float = Field(
        0.7, gt=0.0, lt=1.0, description="Pressure turns off when the p95 is below "
        "latency_budget_ms x this (hysteresis).")
    action: Literal["fallback", "escalate"] = Field(
        "fallback", description="Under pressure: fallback (answer with fallback_model, gated "
        "by its own section of this task if the policy has one) or escalate (skip the local "
        "model and send the request up at once). Without a fallback model loaded, fallback "
        "escalates; with no upstream either, the answer is `unknown` with the reason.")
    fallback_model: str | None = Field(
        None, description="The ladder tier whose model this tier falls back to (loaded at "
        "start, e.g. endpoint for a tier running a bigger model).")
    probe_every: int = Field(
        10, ge=2, le=10_000, description="Under pressure, one request in this many still runs "
        "the own model, so its latency is measured and pressure can clear.")


class CachePolicy(_Strict):
    """Recent answers by input (``tasks.<task>.cache``): a repeated frame or document is
    answered from memory, at every tier of the task."""

    ttl_s: float = Field(0.0, ge=0.0, le=86_400.0,
                         description="How long an answer is reused (0: no cache).")
    max_entries: int = Field(1_000, ge=1, le=1_000_000,
                             description="Answers kept; the least recently used go first.")
