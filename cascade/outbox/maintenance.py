"""Write handlers that maintain the outbox rather than move work through it: TTL sweeps and
retention, releasing backoffs and leases, operator replay and purge, recounting the caps.

Each is a function of the :class:`~cascade.outbox.store.OutboxWrites` it belongs to, run by the
group-commit writer like every other write.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from cascade.outbox.claims import sweep_claims
from cascade.outbox.tables import HELD_STATES, LIVE_STATES, callbacks, outbox, results
from cascade.outbox.writer import Batch

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.store import OutboxWrites

log = logging.getLogger("cascade.outbox")


def chunks(items: Sequence[Any], size: int = 400) -> list[Sequence[Any]]:
    """Split ``items`` for ``IN (...)`` lists."""
    # Stay under SQLite's bound-parameter limit for IN (...) lists.
    return [items[i:i + size] for i in range(0, len(items), size)]


def sweep(writes: OutboxWrites, batch: Batch, jobs: Sequence[None]) -> list[Any]:
    """TTL expiry of live rows, then retention of finished rows, results and callbacks."""
    conn, now = batch.conn, batch.now
    expired = conn.execute(
        sa.select(outbox.c.id)
        .where(sa.text("next_attempt_at IS NOT NULL"), outbox.c.expires_at <= now)).all()
    if expired:
        writes.expire(batch, [r.id for r in expired])
    gone = conn.execute(sa.select(outbox.c.state, sa.func.count(), sa.func.sum(outbox.c.size_bytes))
                        .where(outbox.c.retain_until <= now).group_by(outbox.c.state)).all()
    conn.execute(outbox.delete().where(outbox.c.retain_until <= now))
    live_ids = sa.select(outbox.c.id).where(outbox.c.next_attempt_at.is_not(None))
    purged_results = conn.execute(results.delete().where(
        results.c.retain_until <= now, results.c.id.not_in(live_ids))).rowcount
    conn.execute(callbacks.delete().where(callbacks.c.retain_until <= now))
    sweep_claims(conn, now)
    held_rows = sum(n for state, n, _ in gone if state in HELD_STATES)
    held_bytes = sum(b or 0 for state, _, b in gone if state in HELD_STATES)
    if held_rows:
        batch.after_commit(lambda: writes.counters.add(-held_rows, -held_bytes, 0))
        log.info("retention: removed %d dead/expired escalations older than %.0f s",
                 held_rows, writes.settings.results_retention_s)
    return [{"expired": len(expired), "retired": sum(n for _, n, _ in gone),
             "results_removed": purged_results}] * len(jobs)

def release_backoff(writes: OutboxWrites, batch: Batch, jobs: Sequence[None]) -> list[Any]:
    """The upstream is back: queued rows waiting out a backoff are due now, oldest first."""
    n = batch.conn.execute(outbox.update().where(
        outbox.c.next_attempt_at > batch.now, outbox.c.state == "queued"
    ).values(next_attempt_at=outbox.c.created_at)).rowcount
    return [n] * len(jobs)

def release_leases(writes: OutboxWrites, batch: Batch, jobs: Sequence[None]) -> list[Any]:
    """Void every lease (a restarted process owns a SQLite outbox alone): due now.

    Rows and callbacks a killed process had reserved would otherwise wait out their lease.
    """
    n = batch.conn.execute(outbox.update().where(
        outbox.c.state == "forwarding", outbox.c.next_attempt_at > batch.now
    ).values(next_attempt_at=batch.now)).rowcount
    batch.conn.execute(callbacks.update().where(
        callbacks.c.state == "pending", callbacks.c.next_attempt_at > batch.now
    ).values(next_attempt_at=batch.now))
    return [n] * len(jobs)


def replay(writes: OutboxWrites, batch: Batch, jobs: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Each job is ``("id", ID)`` or ``("state", "dead"|"expired")``, optionally with a third
    item, a new TTL in seconds: make rows due again.

    A fresh TTL (the row's own unless given) and attempt budget are given; a done row with a
    failed callback gets its callback re-armed instead. Returns how many rows were replayed.
    """
    conn, now = batch.conn, batch.now
    out: list[Any] = []
    for selector, value, *rest in jobs:
        ttl_s = rest[0] if rest and rest[0] is not None else outbox.c.ttl_s
        cond = outbox.c.id == value if selector == "id" else outbox.c.state == value
        rows = conn.execute(sa.select(outbox.c.id, outbox.c.state, outbox.c.size_bytes,
                                      outbox.c.callback_url).where(cond)).all()
        n = 0
        for r in rows:
            if r.state in ("dead", "expired"):
                conn.execute(outbox.update().where(outbox.c.id == r.id).values(
                    state="queued", handed_over=False, attempts=0, polls=0, updated_at=now,
                    next_attempt_at=now, ttl_s=ttl_s, expires_at=now + ttl_s, retain_until=None,
                    last_error="replayed by operator; was: " + sa.func.coalesce(
                        outbox.c.last_error, "")))
                batch.after_commit(lambda: writes.counters.add(0, 0, 1))
                n += 1
            elif r.state == "done" and r.callback_url:
                failed = conn.execute(sa.select(callbacks.c.state).where(
                    callbacks.c.id == r.id)).scalar()
                if failed == "failed":
                    writes.arm_callback(conn, r.id, r.callback_url, now)
                    n += 1
        out.append(n)
    return out

def purge(
    writes: OutboxWrites, batch: Batch, jobs: Sequence[tuple[tuple[str, ...], float | None]]
) -> list[Any]:
    """Each job is (states, older_than_s): delete finished rows in those states."""
    conn, now = batch.conn, batch.now
    out: list[Any] = []
    for states, older_than_s in jobs:
        bad = set(states) & set(LIVE_STATES)
        if bad:
            raise ValueError(f"live rows ({', '.join(sorted(bad))}) cannot be purged")
        cond: list[sa.ColumnElement[bool]] = [outbox.c.state.in_(states)]
        if older_than_s is not None:
            cond.append(outbox.c.updated_at <= now - older_than_s)
        rows = conn.execute(sa.select(outbox.c.id, outbox.c.state, outbox.c.size_bytes)
                            .where(*cond)).all()
        ids = [r.id for r in rows]
        for chunk in chunks(ids):
            conn.execute(outbox.delete().where(outbox.c.id.in_(chunk)))
            conn.execute(callbacks.delete().where(callbacks.c.id.in_(chunk)))
        held = [r for r in rows if r.state in HELD_STATES]
        size = sum(r.size_bytes for r in held)
        batch.after_commit(partial(writes.counters.add, -len(held), -size, 0))
        out.append(len(ids))
    return out

def recount(writes: OutboxWrites, batch: Batch, jobs: Sequence[None]) -> list[Any]:
    """Re-read the held counters from the database (after another process changed it)."""
    rows = batch.conn.execute(
        sa.select(outbox.c.state, sa.func.count(), sa.func.sum(outbox.c.size_bytes))
        .where(outbox.c.state.in_(HELD_STATES)).group_by(outbox.c.state)).all()
    held = sum(n for _, n, _ in rows)
    size = sum(b or 0 for _, _, b in rows)
    live = sum(n for state, n, _ in rows if state in LIVE_STATES)
    batch.after_commit(lambda: writes.counters.set(held, size, live))
    return [(held, size, live)] * len(jobs)
