"""Keeping the outbox database within its disk share: measure it, evict what is safe, shrink.

What may be evicted to make room (architecture §6) is exactly a *finished* request: its answer
is final (no escalation still owed: no outbox row, or one that is ``done``), it was delivered
(no callback, or one that is ``delivered``) and it is older than the idempotency window. Pending
escalations, dead and expired ones (replayable), undelivered callbacks and provisional answers
are never evicted: when only they remain and the store is past :data:`EVICT_ABOVE` of its share,
new work that would be stored is refused with 503 ``storage_unavailable`` naming the budget (the
room above is kept for the next commit and for what is still owed).

The eviction is one ``DELETE ... RETURNING`` whose WHERE clause carries those conditions, run by
the group-commit writer like every write, so it re-checks each row in the same statement that
removes it; the forwarder and the callback sender write through the same writer, in order.

A SQLite store is kept within its share at every moment, not only on average
(:func:`keep_within_share`): the writer checks it after every batch, before the next can commit,
and a batch may change at most :func:`pages_per_commit` pages (:func:`job_pages` weighs each
job), so no commit can outgrow the room left above the eviction line. New work that would be
stored is refused by the writer itself from the batch after the one that filled the share, so
work queued before the refusal cannot overfill it either. What is owed (final answers of queued
escalations, callbacks) is always written. PostgreSQL's files are its own to manage: there the
share is checked once a second (:mod:`cascade.outbox.upkeep`).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa

from cascade.outbox.maintenance import chunks
from cascade.outbox.tables import callbacks, outbox, results
from cascade.outbox.writer import Batch, GroupCommitWriter

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.store import OutboxWrites

EVICT_ABOVE: Final[float] = 0.80
"""Evict once live bytes pass this share of the budget..."""
EVICT_DOWN_TO: Final[float] = 0.65
"""...down to this share (hysteresis: one batch of evictions, then quiet for a while)."""
MAX_EVICT_ROWS: Final[int] = 20_000
"""Most rows one eviction removes (one writer transaction stays short)."""
MAX_EVICT_PASSES: Final[int] = 8
"""Evictions in one check at most; each re-measures (rows differ in size from the average)."""
WAL_FRAME_HEADER: Final[int] = 24
PAGES_PER_COMMIT: Final[int] = 4
"""Pages any commit may change besides its jobs': the header, a pointer map, two b-tree parents."""
PAGES_PER_EVICTED_ROW: Final[int] = 12
"""Leaf pages one evicted request may change: its answer (table, key, retention index), its
finished escalation (table and five indexes) and its delivered callback (table, two indexes)."""
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
    rows_bytes: int = 0
    """What the rows themselves take: the live bytes without the WAL and its index (0: not
    measured, take the live bytes)."""


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
        return Space(file_bytes + wal + shm, live, file_bytes, wal, rows,
                     (pages - free) * page_size)
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
    live = text + body + rows * PG_ROW_OVERHEAD
    return Space(on_disk, live, on_disk, 0, rows, live)


def _count(conn: sa.Connection) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(results)).scalar() or 0)


def rows_to_evict(space: Space, share_bytes: int) -> int:
    """How many of the oldest answers to evict now (0 below :data:`EVICT_ABOVE`)."""
    if space.rows == 0 or space.live_bytes <= EVICT_ABOVE * share_bytes:
        return 0
    # The rows' own bytes, not the WAL's allowance: dividing that in too would make each row
    # look larger, and too few would go.
    per_row = max(1.0, (space.rows_bytes or space.live_bytes) / space.rows)
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


def shrink(writes: OutboxWrites, batch: Batch, jobs: Sequence[int | None]) -> list[Any]:
    """Give a SQLite file's free pages back to the disk (needs ``auto_vacuum=INCREMENTAL``;
    a no-op on older files, whose free pages are still reused). A job is the most pages to give
    back (None: all); each outcome is the free pages there were before."""
    conn = batch.conn
    if conn.dialect.name != "sqlite":
        return [0] * len(jobs)
    out: list[Any] = []
    for most in jobs:
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
        if free and conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2:
            n = free if most is None else min(free, most)
            conn.exec_driver_sql(f"PRAGMA incremental_vacuum({int(n)})")
        out.append(free)
    return out


def pages_per_commit(share_bytes: int, wal_limit: int, page_bytes: int) -> int:
    """Most pages one commit may change so that a SQLite store stays within its share.

    After every batch the live bytes (the rows' pages plus the whole WAL allowance) are brought
    below :data:`EVICT_ABOVE` of the share, and the WAL is emptied once past half its allowance.
    One commit then appends a WAL frame for each page it changes and may add as many pages to
    the file, so the pages it may change are the room above that line plus half the allowance,
    over a page and a frame each."""
    room = (1 - EVICT_ABOVE) * share_bytes + wal_limit / 2
    return max(1, int(room // (2 * page_bytes + WAL_FRAME_HEADER)) - PAGES_PER_COMMIT)


PAGES_PER_SPLIT: Final[int] = 2
"""Pages a full leaf adds when a row lands in it: the new leaf and the parent pointing to it."""


def job_pages(page_bytes: int) -> Callable[[str, Any], int]:
    """How many pages a writer job may change, at most, on a SQLite store (see
    :func:`pages_per_commit`): a leaf of each table and index it touches, a split, and the
    overflow pages of text too long to stay in its leaf (idempotency claims are a shared,
    PostgreSQL store's: a SQLite store has none to drop)."""

    def overflow(n: int) -> int:
        return n // page_bytes

    def pages(kind: str, payload: Any) -> int:
        if kind == "enqueue":  # answer (table, key, retention) + escalation (table, 5 indexes)
            return overflow(len(payload.body_json)) + overflow(len(payload.response_json)) \
                + 3 + 6 + PAGES_PER_SPLIT
        if kind == "save_result":
            return overflow(len(payload.response_json)) + 3 + PAGES_PER_SPLIT
        if kind == "outcome":  # answer and escalation rewritten (index entries move), callback
            return overflow(len(payload.response_json or "")) + 3 + 2 * 5 + 3 + PAGES_PER_SPLIT
        if kind in ("claim", "claim_callbacks"):  # payload: how many rows, each re-indexed
            return 4 * int(payload) + PAGES_PER_SPLIT
        if kind == "evict":
            return PAGES_PER_EVICTED_ROW * int(payload[0])
        return 8

    return pages


def keep_within_share(writer: GroupCommitWriter, conn: sa.Connection, *, path: Path,
                      share_bytes: int, wal_limit: int, commit_pages: int, page_bytes: int,
                      cutoff: float) -> tuple[Space, int]:
    """The check after every batch of a SQLite store with a share (the writer's ``after_batch``
    hook: its thread, its connection, between batches). Evicts past :data:`EVICT_ABOVE`, down to :data:`EVICT_DOWN_TO`,
    at most :func:`pages_per_commit` pages a commit; gives free pages back while they would leave
    the next commit no room; returns the space measured last and how many answers were evicted."""
    above = int(EVICT_ABOVE * share_bytes)

    def now() -> Space:
        with conn.begin():  # the writer's connection begins IMMEDIATE: nothing writes meanwhile
            return measure(conn, path, wal_limit, above)

    space = now()
    per_commit = max(1, commit_pages // PAGES_PER_EVICTED_ROW)
    evicted = 0
    for _ in range(MAX_EVICT_PASSES):
        wanted = rows_to_evict(space, share_bytes)
        if not wanted:
            break
        gone = 0
        while gone < wanted:
            step = min(per_commit, wanted - gone)
            n = len(writer.commit_one(conn, "evict", (step, cutoff)))
            gone += n
            if n < step:
                break
        evicted += gone
        space = now()
        if gone < wanted:  # what is left over the line may not be evicted yet
            break
    # The next commit's worst case must fit: its pages, in the file and in the WAL (emptied
    # once past half its allowance). Free pages are reused first, so this holds after evictions
    # and only a lowered share (or an old, larger file) needs the file to give pages back.
    worst = wal_limit // 2 + commit_pages * (2 * page_bytes + WAL_FRAME_HEADER)
    step = max(1, commit_pages // 3)  # moving a page changes it, its parent and a pointer map
    last_free: int | None = None
    while space.on_disk_bytes - space.wal_bytes + worst > share_bytes:
        free = writer.commit_one(conn, "shrink", step)
        if not free or (last_free is not None and free >= last_free):
            break  # nothing free, or a file made without auto_vacuum: it cannot shrink this way
        last_free = free
        writer.empty_wal(conn)  # the file itself shrinks at a checkpoint
        space = now()
    return space, evicted


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0
