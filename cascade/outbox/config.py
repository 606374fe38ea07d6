"""The outbox's knobs: the ``outbox:`` block of a node config (see ``edge_nodes/README.md``).

The database URL itself stays the node config's top-level ``outbox_url`` (an existing contract);
everything that bounds or paces the queue lives here, validated once at startup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class OutboxSettings(BaseModel):
    """Bounds and pacing of one tier's durable outbox, forwarder and callbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rows: int = Field(
        default=100_000, ge=1,
        description="Most escalations held (queued, forwarding, dead, expired); beyond it new "
        "work that would need queueing is refused with 503 queue_full.",
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024,
        description="Most bytes of request bodies and provisional answers held in those rows.",
    )
    sqlite_synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="SQLite fsync policy: 'full' survives power loss; 'normal' (WAL) survives a "
        "process crash only but commits faster.",
    )
    sqlite_max_bytes: int | None = Field(
        default=None, ge=64 * 1024,
        description="Largest size of the SQLite outbox file (PRAGMA max_page_count), for a store "
        "sharing a small disk or card; at the bound writes fail as on a full disk: work that "
        "needs the outbox gets 503 storage_unavailable and what was accepted is kept. None: as "
        "large as the disk allows.",
    )
    commit_batch_max: int = Field(
        default=512, ge=1, le=10_000, description="Most writes grouped into one commit (group commit)."
    )
    forward_concurrency: int = Field(
        default=16, ge=1, le=512, description="Most escalations the forwarder sends upstream at once."
    )
    send_timeout_ms: int = Field(
        default=10_000, ge=50, le=600_000, description="Deadline of one forwarded send (all its retries)."
    )
    retry_initial_s: float = Field(default=1.0, gt=0, description="First backoff after a failed send.")
    retry_max_s: float = Field(default=300.0, gt=0, description="Longest backoff between failed sends.")
    poll_initial_s: float = Field(
        default=0.5, gt=0,
        description="First wait before asking the upstream again for the final answer of work it "
        "accepted provisionally.",
    )
    poll_max_s: float = Field(default=30.0, gt=0, description="Longest wait between such polls.")
    claim_grace_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="With a shared (PostgreSQL) outbox: how long past its request's deadline an "
        "idempotency claim holds; a replica that died computing blocks its key this long.")
    idle_poll_s: float = Field(
        default=1.0, gt=0, le=60,
        description="How often an idle forwarder looks for due work (and for rows replayed by "
        "`cascade queue replay` from another process).",
    )
    sweep_interval_s: float = Field(
        default=5.0, gt=0, description="How often TTL expiry and result retention are applied."
    )
    results_retention_s: float = Field(
        default=7 * 86_400.0, gt=0,
        description="How long answers, finished escalations (done, dead, expired) and callback "
        "records are kept.",
    )
    callback_max_attempts: int = Field(
        default=10, ge=1, le=1_000, description="POSTs of a final answer to a callback_url before 'failed'."
    )
    callback_timeout_ms: int = Field(default=5_000, ge=50, description="Timeout of one callback POST.")
    callback_retry_initial_s: float = Field(default=1.0, gt=0, description="First callback backoff.")
    callback_retry_max_s: float = Field(default=300.0, gt=0, description="Longest callback backoff.")

    @model_validator(mode="after")
    def _ordered(self) -> OutboxSettings:
        for low, high in (
            ("retry_initial_s", "retry_max_s"),
            ("poll_initial_s", "poll_max_s"),
            ("callback_retry_initial_s", "callback_retry_max_s"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")
        return self

    @property
    def lease_s(self) -> float:
        """How long a claimed row stays reserved for one send before another claim may take it."""
        return self.send_timeout_ms / 1000.0 * 1.5 + 5.0
