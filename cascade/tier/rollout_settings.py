"""The node config's ``bundles:`` section: which keys a tier trusts, where it pulls signed model
bundles from, how it checks them before serving them, and the canary that guards the swap.
Every knob is described in ``docs/model-updates.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CanarySettings(BaseModel):
    """How a newly installed version earns its place (``bundles.canary``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(
        0.1, ge=0, le=1, description="Share of a task's requests the new version answers while "
        "it is a canary (every 1/share-th request, counted, not drawn); 0: no canary, a version "
        "that passes its probe serves everything at once.")
    mode: Literal["split", "shadow"] = Field(
        "split", description="split: the canary answers its share of requests; shadow: the "
        "serving version answers everything and the canary runs on its share in the "
        "background (never delaying an answer), judged on what it would have done.")
    min_requests: int = Field(
        20, ge=1, description="Canary requests before the guards judge it (too few say nothing).")
    window_requests: int = Field(
        200, ge=1, description="Canary requests that make its window: promoted once it has "
        "served this many (and window_s has passed) without a guard tripping.")
    window_s: float = Field(0.0, ge=0, description="Shortest canary window in seconds.")
    max_error_rate: float = Field(
        0.02, ge=0, le=1, description="Roll back when more than this share of canary calls fail.")
    max_escalation_increase: float = Field(
        0.15, ge=0, le=1, description="Roll back when the canary escalates this much more often "
        "(absolute share) than the version it would replace did over the same window.")
    max_p99_ratio: float = Field(
        3.0, gt=0, description="Roll back when the canary's p99 model latency exceeds the old "
        "version's p99 times this, plus p99_slack_ms.")
    p99_slack_ms: float = Field(
        20.0, ge=0, description="Absolute slack on the latency guard (a fast model's p99 is "
        "noise-dominated).")


class BundleSettings(BaseModel):
    """Signed model bundles: trust, distribution, install checks (node config ``bundles:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trusted_keys: list[Path] = Field(
        default_factory=list, description="Public key files (PEM, `cascade models keygen`) whose "
        "signatures this tier accepts; none: every bundle is refused.")
    source: str | None = Field(
        None, description="Where to pull bundles from: a directory, or 'upstream' (the next "
        "tier's GET /v1/models/bundles, which relays its own source); unset: only bundles "
        "pushed with `cascade models pull --file`.")
    pull_interval_s: float = Field(
        0.0, ge=0, description="Pull from source this often (seconds); 0: only on demand "
        "(`cascade models pull`, POST /v1/models/pull).")
    store_dir: Path | None = Field(
        None, description="Installed versions, staging and received bundles; default "
        "var/models-<tier>.")
    keep_versions: int = Field(
        2, ge=0, le=50, description="Previous versions kept on disk per task for rollback.")
    probe_tolerance: float = Field(
        0.05, ge=0, le=1, description="Refuse a version whose probe accuracy is more than this "
        "below the served model's manifest accuracy, or below its own; 1 disables the check.")
    probe_latency_p95_ms: float = Field(
        250.0, gt=0, description="Refuse a version whose p95 latency on the probe set (one "
        "sample per call, on this tier) exceeds this.")
    canary: CanarySettings = Field(default_factory=CanarySettings)

    def source_kind(self) -> Literal["none", "upstream", "directory"]:
        """What ``source`` names."""
        if not self.source:
            return "none"
        return "upstream" if self.source == "upstream" else "directory"
