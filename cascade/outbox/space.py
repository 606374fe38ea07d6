"""Keeping the outbox database within its disk share: measure it, evict what is safe, shrink.

What may be evicted to make room (architecture §6) is exactly a *finished* request: its answer
is final (no escalation still owed: no outbox row, or one that is ``done``), it was delivered
(no callback, or one that is ``delivered``) and it is older than the idempotency window. Pending
escalations, dead and expired ones (replayable), undelivered callbacks and provisional answers
are never evicted: when only they remain and the store is over its share, new work that would
be stored is refused with 503 ``storage_unavailable`` naming the budget.

The eviction is one ``DELETE ... RETURNING`` whose WHERE clause carries those conditions, run by
the group-commit writer like every write, so it re-checks each row in the same statement that
removes it; the forwarder and the callback sender write through the same writer, in order.

SQLite: a file only shrinks by vacuuming, but freed pages are reused, so eviction is decided on
the *live* pages (``page_count - freelist_count``) plus the WAL; a new file is created with
``auto_vacuum=INCREMENTAL`` and is shrunk back (``PRAGMA incremental_vacuum``) when the file
itself exceeds its share. The WAL is kept small by ``journal_size_limit`` and a TRUNCATE
checkpoint when it outgrows it. PostgreSQL: bytes on disk are ``pg_total_relation_size`` of the
three tables; the live estimate is the stored text plus a per-row overhead (dead tuples wait
for autovacuum, which makes their space reusable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from cascade.outbox.maintenance import chunks
from cascade.outbox.tables import callbacks, outbox, results
from cascade.outbox.writer import Batch

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.store import OutboxWrites

EVICT_ABOVE: Final[float] = 0.80
"""Evict once live bytes pass this share of the budget..."""
EVICT_DOWN_TO: Final[float] = 0.65
"""...down to this share (hysteresis: one batch of evictions, then quiet for a while)."""
MAX_EVICT_ROWS: Final[int] = 20_000
"""Most rows one eviction removes (one writer transaction stays short)."""
PG_ROW_OVERHEAD: Final[int] = 160
"""Bytes per stored request besides its text on PostgreSQL (tuple headers, index entries)."""


@dataclass(frozen=True)
class Space:
    """How much room the outbox database takes."""

    on_disk_bytes: int
    """What the disk sees: database file(s) and WAL (PostgreSQL: relation sizes)."""
    live_bytes: int
    """What the stored rows take (freed pages and dead tuples excluded), WAL included."""
    file_bytes: int
    wal_bytes: int
    rows: int
    """Stored answers (``cascade_results`` rows)."""


def wal_limit_bytes(share_bytes: int) -> int:
    """Largest WAL kept between checkpoints: an eighth of the share, 64 KiB..4 MiB (the tier
    checkpoints every second, so a larger WAL would only hold pages already copied)."""
    return max(64 << 10, min(4 << 20, share_bytes // 8))


def measure(conn: sa.Connection, path: Path | None, wal_allowance: int = 0,
            count_above: int = 0) -> Space:
    """The :class:`Space` of the database behind ``conn`` (``path``: its SQLite file).

    SQLite's live bytes reserve ``wal_allowance`` for the WAL (and count the shared-memory
    index), so rows are evicted early enough for the WAL to grow up to its limit between
    checkpoints without the files passing the share. The costlier parts (counting rows; on
    PostgreSQL, summing the stored text) run only when the store is past ``count_above``
    bytes, where an eviction may follow; below it ``rows`` is 0."""
    if conn.dialect.name == "sqlite":
        page_size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
        wal = _size(Path(f"{path}-wal")) if path else 0
        shm = _size(Path(f"{path}-shm")) if path else 0
        file_bytes = _size(path) if path else pages * page_size
        live = (pages - free) * page_size + max(wal, wal_allowance) + shm
        rows = _count(conn) if live > count_above else 0
        return Space(file_bytes + wal + shm, live, file_bytes, wal, rows)
    on_disk = int(conn.execute(sa.text(
        "SELECT pg_total_relation_size('cascade_results') + pg_total_relation_size("
        "'cascade_outbox') + pg_total_relation_size('cascade_callbacks')")).scalar() or 0)
    if on_disk <= count_above:  # relation sizes bound the live bytes from above
        return Space(on_disk, on_disk, on_disk, 0, 0)
    text = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(
        sa.func.length(results.c.response)), 0))).scalar() or 0)
    body = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(outbox.c.size_bytes), 0)))
               .scalar() or 0)
    rows = _count(conn)
    return Space(on_disk, text + body + rows * PG_ROW_OVERHEAD, on_disk, 0, rows)


def _count(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(results)).scalar() or 0)


def rows_to_evict(space: Space, share_bytes: int) -> int:
    """How many of the oldest answers to evict now (0 below :data:`EVICT_ABOVE`)."""
    if space.rows == 0 or space.live_bytes <= EVICT_ABOVE * share_bytes:
        return 0
    per_row = space.live_bytes / space.rows
    excess = space.live_bytes - EVICT_DOWN_TO * share_bytes
    return min(MAX_EVICT_ROWS, space.rows, math.ceil(excess / per_row))


def evictable(cutoff: float) -> sa.ColumnElement[bool]:
    """A stored answer that is final, delivered and last changed at or before ``cutoff``."""
    return sa.and_(
        results.c.updated_at <= cutoff,
        ~sa.exists().where(outbox.c.id == results.c.id, outbox.c.state != "done"),
        ~sa.exists().where(callbacks.c.id == results.c.id, callbacks.c.state != "delivered"),
    )


def evict(writes: OutboxWrites, batch: Batch, jobs: Sequence[tuple[int, float]]) -> list[Any]:
    """Each job is ``(limit, cutoff)``: delete up to ``limit`` of the oldest evictable answers
    (with their ``done`` escalation and ``delivered`` callback); returns the ids removed."""
    conn = batch.conn
    out: list[Any] = []
    for limit, cutoff in jobs:
        oldest = (sa.select(results.c.id).where(evictable(cutoff))
                  .order_by(results.c.retain_until, results.c.id).limit(limit))
        gone = list(conn.execute(results.delete()
                                 .where(results.c.id.in_(oldest.scalar_subquery()),
                                        evictable(cutoff))
                                 .returning(results.c.id)).scalars())
        for chunk in chunks(gone):
            # Only what was final and delivered: the same conditions, from the other side.
            conn.execute(outbox.delete().where(outbox.c.id.in_(chunk), outbox.c.state == "done"))
            conn.execute(callbacks.delete().where(callbacks.c.id.in_(chunk),
                                                  callbacks.c.state == "delivered"))
        writes.stats["evicted_budget"] += len(gone)
        out.append(gone)
    return out


def shrink(writes: OutboxWrites, batch: Batch, jobs: Sequence[None]) -> list[Any]:
    """Give a SQLite file's free pages back to the disk (needs ``auto_vacuum=INCREMENTAL``;
    a no-op on older files, whose free pages are still reused)."""
    conn = batch.conn
    if conn.dialect.name != "sqlite":
        return [0] * len(jobs)
    free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
    if free and conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2:
        conn.exec_driver_sql(f"PRAGMA incremental_vacuum({int(free)})")
    return [free] * len(jobs)


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0
