"""The outbox schema (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Four tables, one row per request id in each that applies::

    cascade_results    the latest answer a tier gave for a request id, and the hash of the
                       request it answered (idempotency); kept for ``results_retention_s``
    cascade_outbox     an escalation this tier owes its upstream (or handed to it and awaits
                       the final answer of): state, attempts, backoff, TTL
    cascade_callbacks  a final answer owed to a client's ``callback_url``
    cascade_claims     an idempotency key being computed right now by one of the processes
                       sharing this database (Serve replicas on PostgreSQL): a lease

Invariant that keeps every hot query an index range scan: a *live* outbox row (``queued`` or
``forwarding``) has ``next_attempt_at`` set; a finished one (``done``, ``dead``, ``expired``) has
it NULL and ``retain_until`` set instead. Timestamps are UNIX seconds (floats).
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

SCHEMA_VERSION: Final = 1

STATES: Final[tuple[str, ...]] = ("queued", "forwarding", "done", "expired", "dead")
"""Escalation states, in lifecycle order (contract: shown by ``GET /v1/results/{id}``)."""
LIVE_STATES: Final[tuple[str, ...]] = ("queued", "forwarding")
HELD_STATES: Final[tuple[str, ...]] = ("queued", "forwarding", "dead", "expired")
"""States whose rows count against the outbox caps (``done`` rows only wait for retention)."""
CALLBACK_STATES: Final[tuple[str, ...]] = ("pending", "delivered", "failed")

metadata = sa.MetaData()

# BigInteger on PostgreSQL, but the rowid alias INTEGER PRIMARY KEY on SQLite.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

meta = sa.Table(
    "cascade_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

results = sa.Table(
    "cascade_results",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("response", sa.Text, nullable=False),
    # How many times this tier computed an answer for this id: 1 unless idempotency failed.
    sa.Column("computations", sa.Integer, nullable=False, server_default="1"),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("retain_until", sa.Double, nullable=False),
    sa.Index("ix_cascade_results_retain_until", "retain_until"),
)

outbox = sa.Table(
    "cascade_outbox",
    metadata,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(128), nullable=False, unique=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("hop_count", sa.Integer, nullable=False),
    sa.Column("traceparent", sa.String(64), nullable=True),
    # Only on rows of the tier that took the client's request: it alone fires the callback.
    sa.Column("callback_url", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("handed_over", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("ttl_s", sa.Double, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=True),
    sa.Column("retain_until", sa.Double, nullable=True),
    sa.Index("ix_cascade_outbox_due", "next_attempt_at", "seq"),
    sa.Index("ix_cascade_outbox_state", "state", "size_bytes"),
    sa.Index("ix_cascade_outbox_retain_until", "retain_until"),
    # Only live rows (next_attempt_at set) need TTL sweeps; the partial index keeps the sweep
    # from wading through finished rows that wait for retention.
    sa.Index(
        "ix_cascade_outbox_live_expiry",
        "expires_at",
        sqlite_where=sa.text("next_attempt_at IS NOT NULL"),
        postgresql_where=sa.text("next_attempt_at IS NOT NULL"),
    ),
)

callbacks = sa.Table(
    "cascade_callbacks",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=True),
    sa.Column("delivered_at", sa.Double, nullable=True),
    sa.Column("retain_until", sa.Double, nullable=True),
    sa.Index("ix_cascade_callbacks_due", "next_attempt_at"),
    sa.Index("ix_cascade_callbacks_retain_until", "retain_until"),
)

claims = sa.Table(
    "cascade_claims",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    # Who computes it (replica or process); the lease lets another take over after a crash.
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("claimed_at", sa.Double, nullable=False),
    sa.Column("lease_until", sa.Double, nullable=False),
    sa.Index("ix_cascade_claims_lease_until", "lease_until"),
)
