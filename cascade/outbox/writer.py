"""Group commit: one writer thread applies queued writes in batches, one transaction per batch.

Every durable write of a tier goes through :class:`GroupCommitWriter`. A caller submits a job and
awaits it; the thread takes every job waiting (up to ``max_batch``), applies them in order in one
transaction (``BEGIN IMMEDIATE`` on SQLite) and commits; only then are the callers' futures
resolved. So a 200 that follows ``await writer.submit(...)`` always follows the fsync of its data,
yet 500 concurrent enqueues cost one commit instead of 500. Consecutive jobs of the same kind are
handed to their handler together, so it can use one ``executemany``.

If a batch fails, its jobs are retried one transaction each, so one bad job cannot fail its
neighbours; database errors reach the caller as a 503 ``storage_unavailable``.

Only promises made to clients need the fsync. A batch made only of *relaxed* kinds (the
forwarder's claims and outcomes, sweeps) commits without waiting for the disk (SQLite
``synchronous=NORMAL`` for that batch, PostgreSQL ``synchronous_commit=off``): a power cut may
undo such a commit, and the forwarder then resends, which the upstream's idempotency turns into
a lookup. So draining a backlog is not bounded by one fsync per delivered row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cascade.errors import ServiceUnavailable
from cascade.outbox.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    refused_by_a_stale_connection,
    storage_unavailable,
    writer_connection,
)

log = logging.getLogger("cascade.outbox")


@dataclass
class Batch:
    """What a handler may use besides the connection: deferred effects and shared scratch space."""

    conn: sa.Connection
    now: float
    scratch: dict[str, Any] = field(default_factory=dict)
    _after_commit: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (in the writer thread) only once this batch has committed."""
        self._after_commit.append(fn)


Handler = Callable[[Batch, Sequence[Any]], list[Any]]
"""Applies jobs of one kind; returns one outcome per job (a value, or a CascadeError for a job it
refused without writing anything)."""

_STOP = object()
_WAL_WAIT_MS = 50


@dataclass
class _Job:
    kind: str
    payload: Any
    future: asyncio.Future[Any] | concurrent.futures.Future[Any]
    loop: asyncio.AbstractEventLoop | None = None


class GroupCommitWriter:
    """A dedicated thread owning the write connection; see the module docstring."""

    def __init__(
        self, engine: Engine, handlers: dict[str, Handler], *, max_batch: int = 512,
        name: str = "outbox-writer", clock: Callable[[], float] = time.time,
        relaxed_kinds: frozenset[str] = frozenset(), synchronous: str = "full",
        wal_limit_bytes: int | None = None,
    ) -> None:
        """``wal_limit_bytes`` (SQLite): after a commit that left the WAL file larger, empty it
        (a TRUNCATE checkpoint on the writer's connection). Under steady reads a PASSIVE
        checkpoint never gets to restart the WAL, which then grows by every commit."""
        self._engine = engine
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        self._wal = (Path(f"{path}-wal"), wal_limit_bytes) if path and wal_limit_bytes else None
        self._relaxed_kinds = relaxed_kinds
        self._synchronous = synchronous.upper()
        self._clock = clock
        self._handlers = handlers
        self._max_batch = max_batch
        self._name = name
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = {"batches": 0, "relaxed_batches": 0, "jobs": 0, "largest_batch": 0,
                      "failed_batches": 0, "wal_truncations": 0, "stale_connections": 0}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Apply every job already submitted, then end the thread."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
            self._thread = None

    # -- submitting -----------------------------------------------------------------------------

    async def submit(self, kind: str, payload: Any) -> Any:
        """Queue a job and wait until its batch has committed; returns the handler's outcome."""
        if self._closed or self._thread is None:
            raise ServiceUnavailable("the outbox is not running (tier starting or stopping)",
                                     code="storage_unavailable")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(kind, payload, future, loop))
        return await future

    def submit_sync(self, kind: str, payload: Any, timeout_s: float = 30.0) -> Any:
        """:meth:`submit` for threads without an event loop (tests, tools)."""
        if self._closed or self._thread is None:
            raise ServiceUnavailable("the outbox is not running", code="storage_unavailable")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Job(kind, payload, future))
        return future.result(timeout_s)

    def apply_now(self, conn: sa.Connection, kind: str, payloads: Sequence[Any]) -> list[Any]:
        """Run a handler in the caller's thread and transaction (the operator CLI uses this)."""
        batch = Batch(conn, self._clock())
        outcomes = self._handlers[kind](batch, payloads)
        for fn in batch._after_commit:
            fn()
        return outcomes

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        conn: sa.Connection | None = None
        stopping = False
        while not stopping:
            jobs: list[_Job] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    jobs.append(item)  # type: ignore[arg-type]
                if len(jobs) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if not jobs:
                continue
            if stopping:  # drain whatever arrived before the stop marker
                while True:
                    try:
                        extra = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if extra is not _STOP:
                        jobs.append(extra)  # type: ignore[arg-type]
            try:
                try:
                    if conn is None:
                        conn = writer_connection(self._engine)
                    outcomes = self._commit(conn, jobs)
                except sa.exc.DBAPIError as exc:
                    if not refused_by_a_stale_connection(exc):
                        raise
                    # A connection left read-only by a read-only spell of the filesystem (see
                    # engine.py), now replaced with the rest of the pool: try once on a new one.
                    self.stats["stale_connections"] += 1
                    _discard(conn)
                    conn = writer_connection(self._engine)
                    outcomes = self._commit(conn, jobs)
            except sa.exc.SQLAlchemyError as exc:
                self.stats["failed_batches"] += 1
                _discard(conn)
                conn = None
                outcomes = self._isolate(jobs, exc)
            except Exception as exc:
                log.exception("outbox writer: unexpected error")
                _discard(conn)
                conn = None
                outcomes = [exc] * len(jobs)
            _deliver(jobs, outcomes)
        _discard(conn)

    def _commit(self, conn: sa.Connection, jobs: list[_Job]) -> list[Any]:
        batch = Batch(conn, self._clock())
        outcomes: list[Any] = []
        relaxed = all(j.kind in self._relaxed_kinds for j in jobs)
        sqlite_relaxed = relaxed and conn.dialect.name == "sqlite" and self._synchronous == "FULL"
        if sqlite_relaxed:  # on the raw connection: SQLAlchemy would wrap it in a transaction
            _pragma(conn, "synchronous=NORMAL")
        try:
            with conn.begin():
                if relaxed and conn.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                self._apply(batch, jobs, outcomes)
        finally:
            if sqlite_relaxed:
                _pragma(conn, f"synchronous={self._synchronous}")
        for fn in batch._after_commit:
            fn()
        if self._wal is not None:
            self._bound_wal(conn)
        self.stats["batches"] += 1
        self.stats["relaxed_batches"] += relaxed
        self.stats["jobs"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        return outcomes

    def _bound_wal(self, conn: sa.Connection) -> None:
        """Empty the WAL once it has passed its limit (never fails the committed batch)."""
        assert self._wal is not None
        wal, limit = self._wal
        # Readers are waited for 50 ms at most: a busy WAL is tried again after the next commit
        # rather than stalling every write behind a long read.
        try:
            if wal.stat().st_size > limit:
                _pragma(conn, f"busy_timeout={_WAL_WAIT_MS}")
                try:
                    _pragma(conn, "wal_checkpoint(TRUNCATE)")
                    self.stats["wal_truncations"] += 1
                finally:
                    _pragma(conn, f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        except Exception:
            log.debug("WAL checkpoint after commit failed", exc_info=True)

    def _apply(self, batch: Batch, jobs: list[_Job], outcomes: list[Any]) -> None:
        """Hand consecutive jobs of one kind to their handler together."""
        start = 0
        while start < len(jobs):
            end = start + 1
            while end < len(jobs) and jobs[end].kind == jobs[start].kind:
                end += 1
            handler = self._handlers[jobs[start].kind]
            outcomes.extend(handler(batch, [j.payload for j in jobs[start:end]]))
            start = end

    def _isolate(self, jobs: list[_Job], first_error: BaseException) -> list[Any]:
        """A batch failed: retry each job alone so only the jobs that really fail, fail."""
        if len(jobs) == 1:
            log.error("outbox write failed: %s", first_error)
            return [storage_unavailable(first_error, url=self._engine.url)]
        outcomes: list[Any] = []
        conn: sa.Connection | None = None
        for job in jobs:
            try:
                if conn is None:
                    conn = writer_connection(self._engine)
                outcomes.extend(self._commit(conn, [job]))
            except sa.exc.SQLAlchemyError as exc:
                _discard(conn)
                conn = None
                outcomes.append(storage_unavailable(exc, url=self._engine.url))
            except Exception as exc:  # noqa: BLE001
                _discard(conn)
                conn = None
                outcomes.append(exc)
        _discard(conn)
        failed = sum(isinstance(o, BaseException) for o in outcomes)
        if failed:
            log.error("outbox writes failed: %d of %d (%s)", failed, len(jobs), first_error)
        return outcomes


def _deliver(jobs: list[_Job], outcomes: list[Any]) -> None:
    """Resolve callers' futures: one wake-up per event loop, not one per job."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
    for job, outcome in zip(jobs, outcomes):
        if job.loop is None:
            sync_future: concurrent.futures.Future[Any] = job.future  # type: ignore[assignment]
            if isinstance(outcome, BaseException):
                sync_future.set_exception(outcome)
            else:
                sync_future.set_result(outcome)
        else:
            per_loop.setdefault(job.loop, []).append((job.future, outcome))
    for loop, settled in per_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, outcome in settled:
        if future.done():  # the caller went away (cancelled); the write itself stands
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _pragma(conn: sa.Connection, setting: str) -> None:
    """Run a SQLite PRAGMA outside any transaction (some, like synchronous, refuse to run in one)."""
    conn.connection.dbapi_connection.execute(f"PRAGMA {setting}")  # type: ignore[union-attr]


def _discard(conn: sa.Connection | None) -> None:
    """Close a connection that may be broken; always returns None (to clear the caller's)."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001, S110 - a broken connection may fail to close; drop it
            pass


__all__ = ["Batch", "GroupCommitWriter", "Handler"]
