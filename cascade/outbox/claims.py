"""Idempotency claims shared by every process that writes one outbox database.

A tier run as several processes (Ray Serve ingress replicas, all on one PostgreSQL outbox)
cannot keep "this key is being computed" in memory: a duplicate may reach another replica.
Before computing a keyed request, a replica claims its key with one statement::

    INSERT INTO cascade_claims (id, holder, claimed_at, lease_until) VALUES (...)
    ON CONFLICT (id) DO UPDATE SET ... WHERE cascade_claims.lease_until < :now
    RETURNING holder

A row comes back only to the one that inserted it (or took over a lease its holder let lapse,
i.e. crashed): on PostgreSQL a concurrent second insert waits for the first to commit, then
finds the live lease and gets nothing. The claim is deleted in the same transaction that
stores the answer (:mod:`cascade.outbox.store`), so a later claim of the key always finds the
stored answer; a computation that fails releases it, and a crashed holder's claim lapses after
its lease (the deadline of its request plus ``outbox.claim_grace_s``, 60 s by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cascade.outbox.tables import claims
from cascade.outbox.writer import Batch

__all__ = ["ClaimJob", "claim_keys", "drop_claims", "release_claims", "sweep_claims"]


@dataclass(frozen=True, slots=True)
class ClaimJob:
    """Claim ``id`` for ``holder`` for ``lease_s`` seconds."""

    id: str
    holder: str
    lease_s: float


def _insert(conn: sa.Connection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(claims)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(claims)


def claim_keys(batch: Batch, jobs: Sequence[ClaimJob]) -> list[Any]:
    """True per job whose key is now this holder's; False if another holds a live lease."""
    conn, now = batch.conn, batch.now
    out: list[Any] = []
    for job in jobs:  # one at a time: two jobs of one batch may claim the same key
        ins = _insert(conn).values(id=job.id, holder=job.holder, claimed_at=now,
                                   lease_until=now + job.lease_s)
        stmt = ins.on_conflict_do_update(
            index_elements=["id"],
            set_={"holder": ins.excluded.holder, "claimed_at": ins.excluded.claimed_at,
                  "lease_until": ins.excluded.lease_until},
            where=claims.c.lease_until < now,
        ).returning(claims.c.holder)
        out.append(conn.execute(stmt).first() is not None)
    return out


def release_claims(batch: Batch, jobs: Sequence[tuple[str, str]]) -> list[Any]:
    """Delete each ``(id, holder)`` claim (a computation that failed or was replayed)."""
    for id_, holder in jobs:
        batch.conn.execute(claims.delete().where(claims.c.id == id_, claims.c.holder == holder))
    return [None] * len(jobs)


def drop_claims(conn: sa.Connection, ids: Sequence[str]) -> None:
    """Delete the claims of ``ids`` (their answers are being stored in this transaction)."""
    if ids:
        conn.execute(claims.delete().where(claims.c.id.in_(list(ids))))


def sweep_claims(conn: sa.Connection, now: float) -> int:
    """Delete claims whose lease lapsed (their holder crashed); returns how many."""
    return int(conn.execute(claims.delete().where(claims.c.lease_until < now)).rowcount)
