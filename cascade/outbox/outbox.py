"""The durable outbox of one tier: what :class:`~cascade.tier.node.Node` hands escalations to.

:class:`Outbox` implements the :class:`~cascade.contract.escalation.EscalationQueue` seam. It owns the
database engine, the group-commit writer thread, a small pool of reader threads, the forwarder
and the callback sender. Nothing here blocks the event loop on database I/O: writes go to the
writer thread, reads to the reader pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa

from cascade.contract.escalation import PendingEscalation
from cascade.errors import NotFound, ServiceUnavailable
from cascade.observability.disk import DiskUsage, StoreGauge
from cascade.outbox.claims import ClaimJob
from cascade.outbox.config import OutboxSettings
from cascade.outbox.engine import (
    DEFAULT_WAL_LIMIT_BYTES,
    create_outbox_engine,
    ensure_schema,
    parse_outbox_url,
    storage_unavailable,
)
from cascade.outbox.rules import to_json
from cascade.outbox.space import wal_limit_bytes
from cascade.outbox.store import (
    Claimed,
    ClaimedCallback,
    EnqueueJob,
    HeldCounters,
    OutboxWrites,
    Outcome,
    SaveResult,
)
from cascade.outbox.views import (
    iso,
    next_callback_due_at,
    next_due_at,
    read_result,
    read_stats,
)
from cascade.outbox.writer import GroupCommitWriter
from cascade.trust.callbacks import CallbackGuard

log = logging.getLogger("cascade.outbox")
T = TypeVar("T")

RELAXED_KINDS = frozenset({
    "claim", "outcome", "claim_callbacks", "callback_outcome", "sweep", "recount",
    "release_backoff", "release_leases", "evict", "shrink", "claim_keys", "release_claims",
})
"""Writes a power cut may undo harmlessly (see :mod:`cascade.outbox.writer`): the forwarder's
bookkeeping. Enqueues, stored answers and operator actions are always flushed to disk."""

_STAT_KEYS = (
    "enqueued", "refused_queue_full", "storage_errors", "delivered", "dead", "expired",
    "callbacks_delivered", "callbacks_failed", "idempotent_replays", "idempotency_conflicts",
    "evicted_budget", "refused_disk_budget",
)


class Outbox:
    """Durable store-and-forward for one tier (see the package docstring for the lifecycle)."""

    def __init__(
        self, url: str, *, tier: str, settings: OutboxSettings | None = None,
        clock: Callable[[], float] = time.time, gauge: StoreGauge | None = None,
        idempotency_window_s: float = 600.0, callbacks: CallbackGuard | None = None,
    ) -> None:
        """Open (creating if needed) the outbox database at ``url``; no threads start yet.

        ``clock`` (UNIX seconds) stamps rows and decides what is due; tests inject a fake one.
        ``gauge``: the results store's disk share (:mod:`cascade.outbox.space` keeps the
        database within it, never evicting answers younger than ``idempotency_window_s``).
        ``callbacks``: where callbacks may go and how they are signed (None: anywhere, unsigned;
        only outboxes built by hand in tests).
        """
        self.tier = tier
        self.callback_guard = callbacks
        self.settings = settings or OutboxSettings()
        self.url = parse_outbox_url(url)
        self.gauge = gauge
        self.idempotency_window_s = idempotency_window_s
        self.full_reason: str | None = None
        """Set while the store is over its disk share with nothing evictable (new work: 503)."""
        self.wal_limit_bytes = (wal_limit_bytes(gauge.budget_bytes) if gauge else
                                DEFAULT_WAL_LIMIT_BYTES)
        self.engine = create_outbox_engine(
            self.url, synchronous=self.settings.sqlite_synchronous,
            sqlite_max_bytes=self.settings.sqlite_max_bytes, wal_limit_bytes=self.wal_limit_bytes)
        ensure_schema(self.engine)
        self.counters = HeldCounters()
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self.writes = OutboxWrites(tier, self.settings, self.counters, self.stats)
        self.writer = GroupCommitWriter(self.engine, self.writes.handlers(),
                                        max_batch=self.settings.commit_batch_max,
                                        name=f"outbox-writer-{tier}", clock=clock,
                                        relaxed_kinds=RELAXED_KINDS,
                                        synchronous=self.settings.sqlite_synchronous,
                                        wal_limit_bytes=self.wal_limit_bytes)
        self.clock = clock
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"outbox-read-{tier}")
        self.last_storage_error: str | None = None
        """The latest database failure (shown by ``GET /v1/outbox``)."""
        self.inflight: set[str] = set()
        """Idempotency keys being computed right now in this process (a duplicate gets 409)."""
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        """This process among those sharing the database (names its idempotency claims)."""
        self.work_ready: asyncio.Event | None = None
        self.callbacks_ready: asyncio.Event | None = None
        self._workers: list[Any] = []
        self._started = False

    @classmethod
    def from_settings(cls, settings: Any, disk: DiskUsage | None = None,
                      callbacks: CallbackGuard | None = None) -> Outbox:
        """The outbox a node config asks for (``outbox_url``, the ``outbox:`` block and, with
        ``disk``, the results store's share of the ``disk:`` budget; ``callbacks``: the tier's
        callback policy)."""
        window = disk.settings.idempotency_window_s if disk is not None else 600.0
        return cls(settings.resolved_outbox_url, tier=settings.tier,
                   settings=getattr(settings, "outbox", None),
                   gauge=disk.gauge("results") if disk is not None else None,
                   idempotency_window_s=window, callbacks=callbacks)

    @property
    def is_sqlite(self) -> bool:
        """True for a SQLite file (single process: leases can be voided at start)."""
        return self.url.get_backend_name() == "sqlite"

    @property
    def shared(self) -> bool:
        """True when several processes may write this database (PostgreSQL: e.g. the Serve
        replicas of one tier): idempotency keys are then claimed in it, not only in memory."""
        return not self.is_sqlite

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, upstream: Any | None = None, *, background: bool = True) -> None:
        """Start the writer, the callback sender and (with an ``upstream``) the forwarder.

        ``background=False`` starts only the writer (tests drive claims and outcomes by hand).
        """
        if self._started:
            return
        self._started = True
        self.work_ready = asyncio.Event()
        self.callbacks_ready = asyncio.Event()
        self.writer.start()
        try:
            if self.is_sqlite:
                # One process owns a SQLite outbox: leases left by a killed process are void.
                await self.writer.submit("release_leases", None)
            await self.writer.submit("recount", None)
        except ServiceUnavailable as exc:
            log.error("outbox %s: %s", self.tier, exc.message)
        if not background:
            return
        from cascade.outbox.callbacks import CallbackSender
        from cascade.outbox.forwarder import Forwarder
        from cascade.outbox.upkeep import Upkeep

        self._workers = [CallbackSender(self), Upkeep(self)]
        if upstream is not None:
            self._workers.insert(0, Forwarder(self, upstream))
        for worker in self._workers:
            worker.start()

    async def aclose(self) -> None:
        """Stop sending, commit what is pending, close the database."""
        for worker in self._workers:
            await worker.stop()
        self._workers = []
        await asyncio.to_thread(self.writer.stop)
        self._readers.shutdown(wait=True)
        self.engine.dispose()
        self._started = False

    # -- the EscalationQueue seam ---------------------------------------------------------------

    async def enqueue(self, item: PendingEscalation) -> dict[str, Any]:
        """Commit the provisional answer and the escalation together; returns its state.

        Raises a 503 :class:`ServiceUnavailable` (``queue_full`` or ``storage_unavailable``)
        when the work cannot be kept; then nothing was stored.
        """
        body = {k: v for k, v in item.body.items() if k != "callback_url"}
        job = EnqueueJob(
            id=item.id, task=item.task, body_json=to_json(body),
            response_json=to_json(item.provisional),
            request_hash=item.request_hash,
            reason=item.reason, hop_count=item.hop_count, traceparent=item.traceparent,
            # Only the tier that took the client's request fires its callback (hop 1 here):
            # upstream tiers holding the same work would otherwise fire it again.
            callback_url=item.callback_url if item.hop_count <= 1 else None,
            ttl_s=item.ttl_s, max_attempts=item.max_attempts,
            handed_over=item.handed_over,
        )
        if self.counters.rows >= self.settings.max_rows:  # fast refusal, no writer round trip
            self.stats["refused_queue_full"] += 1
            raise self.writes.queue_full_error(job)
        self.check_room()
        state = await self._write("enqueue", job)
        if self.work_ready is not None:
            self.work_ready.set()
        return {
            "state": state["state"], "held_by": self.tier, "attempts": state.get("attempts", 0),
            "reason": item.reason, "queued_at": iso(state.get("queued_at")),
            "expires_at": iso(state.get("expires_at")), "results_url": f"/v1/results/{item.id}",
        }

    def check_room(self) -> None:
        """503 ``storage_unavailable`` while the store is over its disk share and holds only
        what may not be evicted (see :mod:`cascade.outbox.space`)."""
        if self.full_reason is not None:
            self.stats["refused_disk_budget"] += 1
            raise ServiceUnavailable(self.full_reason, code="storage_unavailable")

    def depth(self) -> int:
        """Escalations still to deliver (queued or forwarding)."""
        return self.counters.live

    async def queue_stats(self) -> dict[str, Any]:
        """Depth, oldest live age, dead letters and held bytes, read from the database."""
        return await self._read(read_stats)

    # -- results and idempotency ----------------------------------------------------------------

    async def save_result(self, id_: str, task: str, request_hash: str | None,
                          response: dict[str, Any]) -> None:
        """Keep an answer under its idempotency key (group-committed)."""
        self.check_room()
        await self._write("save_result", SaveResult(id_, task, request_hash,
                                                    to_json(response)))

    async def claim_key(self, id_: str, deadline_s: float | None) -> bool:
        """Claim idempotency key ``id_`` for this process while it computes the answer; False
        if another process sharing the database holds it (see :mod:`cascade.outbox.claims`).
        The claim ends when the answer is stored, on :meth:`release_key`, or
        ``outbox.claim_grace_s`` after ``deadline_s``. Without a shared database: always True (the
        caller's in-memory guard is the whole story)."""
        if not self.shared:
            return True
        lease_s = max(deadline_s or 0.0, 0.0) + self.settings.claim_grace_s
        claimed: bool = await self._write("claim_keys", ClaimJob(id_, self.holder, lease_s))
        return claimed

    async def release_key(self, id_: str) -> None:
        """Give up this process's claim of ``id_`` (its computation failed or was replayed)."""
        if self.shared:
            await self._write("release_claims", (id_, self.holder))

    async def lookup(self, id_: str) -> dict[str, Any] | None:
        """The stored answer for ``id_`` with its escalation state, or None."""
        return await self._read(lambda conn: read_result(conn, id_, self.tier))

    async def result(self, id_: str) -> dict[str, Any]:
        """``GET /v1/results/{id}``: latest answer and escalation state; 404 if unknown."""
        found = await self.lookup(id_)
        if found is None:
            raise NotFound(
                f"tier {self.tier} has no result for id {id_!r}: it never saw it, it was answered "
                "locally without an Idempotency-Key (such answers are not stored), or it is older "
                f"than the retention ({self.settings.results_retention_s:g} s), or it was final, delivered "
                f"and older than disk.idempotency_window_s ({self.idempotency_window_s:g} s) "
                "when the tier made room within its disk budget", field="id")
        return {k: v for k, v in found.items() if not k.startswith("_")}

    # -- used by the forwarder and the callback sender ------------------------------------------

    async def claim(self, limit: int) -> list[Claimed]:
        """Reserve up to ``limit`` due rows, oldest first."""
        rows: list[Claimed] = await self._write("claim", limit)
        return rows

    async def record(self, outcome: Outcome) -> str | None:
        """Store what one send achieved; returns the row's new state."""
        state: str | None = await self._write("outcome", outcome)
        if state == "done" and self.callbacks_ready is not None:
            self.callbacks_ready.set()
        return state

    async def claim_callbacks(self, limit: int) -> list[ClaimedCallback]:
        rows: list[ClaimedCallback] = await self._write("claim_callbacks", limit)
        return rows

    async def record_callback(self, id_: str, delivered: bool, error: str | None,
                              delay_s: float) -> None:
        await self._write("callback_outcome", (id_, delivered, error, delay_s))

    async def sweep(self) -> dict[str, int]:
        """Apply TTLs and retention, then re-read the counters (other processes may write)."""
        out: dict[str, int] = await self._write("sweep", None)
        await self._write("recount", None)
        return out

    async def release_backoff(self) -> int:
        n: int = await self._write("release_backoff", None)
        return n

    async def next_due_at(self) -> float | None:
        return await self._read(next_due_at)

    async def next_callback_due_at(self) -> float | None:
        return await self._read(next_callback_due_at)

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges for ``/metrics`` and ``/readyz``."""
        return {
            **self.stats,
            "depth": self.counters.live,
            "held_rows": self.counters.rows,
            "held_bytes": self.counters.bytes,
            "max_rows": self.settings.max_rows,
            "max_bytes": self.settings.max_bytes,
            "commit_batches": self.writer.stats["batches"],
            "commit_jobs": self.writer.stats["jobs"],
            "last_storage_error": self.last_storage_error,
            "disk": self.gauge.view() if self.gauge is not None else None,
        }

    # -- plumbing -------------------------------------------------------------------------------

    async def _write(self, kind: str, payload: Any) -> Any:
        try:
            return await self.writer.submit(kind, payload)
        except ServiceUnavailable as exc:
            if exc.code == "storage_unavailable":
                self.stats["storage_errors"] += 1
                self.last_storage_error = exc.message
            raise

    async def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        def run() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, run)
        except sa.exc.SQLAlchemyError as exc:
            self.stats["storage_errors"] += 1
            error = storage_unavailable(exc, reading=True, url=self.url)
            self.last_storage_error = error.message
            raise error from None
