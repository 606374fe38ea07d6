"""The outbox's writes: one handler per kind of job, run by the group-commit writer thread.

Each handler receives every consecutive job of its kind in the current batch and returns one
outcome per job. Handlers check bounds before they write, so a refused job (a
:class:`~cascade.errors.ServiceUnavailable`) leaves nothing behind and does not fail its batch.
In-memory counters of held rows and bytes are changed only after the batch commits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import orjson
import sqlalchemy as sa

from cascade.errors import ServiceUnavailable
from cascade.outbox import claims, maintenance, space
from cascade.outbox.config import OutboxSettings
from cascade.outbox.maintenance import chunks
from cascade.outbox.tables import callbacks, outbox, results
from cascade.outbox.writer import Batch, Handler

log = logging.getLogger("cascade.outbox")


@dataclass(frozen=True, slots=True)
class EnqueueJob:
    """A provisional answer and the escalation it owes, to be committed together."""

    id: str
    task: str
    body_json: str
    response_json: str
    request_hash: str | None
    reason: str
    hop_count: int
    traceparent: str | None
    callback_url: str | None
    ttl_s: float
    max_attempts: int
    handed_over: bool
    """True when the upstream already accepted the work (answered provisionally itself)."""

    @property
    def size_bytes(self) -> int:
        return len(self.body_json) + len(self.response_json)


@dataclass(frozen=True, slots=True)
class SaveResult:
    """An answer to keep for an idempotency key (the request was not queued)."""

    id: str
    task: str
    request_hash: str | None
    response_json: str


OutcomeKind = Literal["final", "handover", "retry", "release", "dead"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one forwarded send.

    final     the upstream gave the final answer: done (and the callback is armed)
    handover  the upstream accepted the work provisionally: keep polling it for the final answer
    retry     the send failed: one attempt spent, backoff ``delay_s`` (or dead at max attempts)
    release   no attempt spent (breaker open, upstream busy): due again after ``delay_s``
    dead      the upstream refused the request (4xx): dead at once, with its error
    """

    id: str
    kind: OutcomeKind
    response_json: str | None = None
    error: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row reserved for one send."""

    id: str
    task: str
    body: dict[str, Any]
    hop_count: int
    traceparent: str | None
    handed_over: bool
    attempts: int
    max_attempts: int
    polls: int
    response: dict[str, Any]
    """The latest answer this tier gave for the request (merged with the upstream's later)."""


@dataclass(frozen=True, slots=True)
class ClaimedCallback:
    """A callback reserved for one POST."""

    id: str
    url: str
    attempts: int
    max_attempts: int


class HeldCounters:
    """Rows and bytes held against the caps (queued, forwarding, dead, expired), and live rows.

    Written only by the writer thread after commits; read anywhere (plain ints).
    """

    def __init__(self) -> None:
        self.rows = 0
        self.bytes = 0
        self.live = 0
        self.lock = threading.Lock()

    def add(self, rows: int, size: int, live: int) -> None:
        with self.lock:
            self.rows += rows
            self.bytes += size
            self.live += live

    def set(self, rows: int, size: int, live: int) -> None:
        with self.lock:
            self.rows, self.bytes, self.live = rows, size, live


class _HotStatements:
    """Statements of the hot paths, built once per dialect.

    Building a SQLAlchemy statement costs more than running a cached one on SQLite; the enqueue
    and idempotency paths run these for every escalation.
    """

    def __init__(self, conn: sa.Connection) -> None:
        self.existing_one = sa.select(outbox.c.id, outbox.c.state).where(
            outbox.c.id == sa.bindparam("id"))
        ins = _insert(conn, results)
        self.results_for_enqueue = ins.on_conflict_do_update(
            index_elements=["id"],
            set_={"response": ins.excluded.response, "updated_at": ins.excluded.updated_at,
                  "request_hash": sa.func.coalesce(ins.excluded.request_hash,
                                                   results.c.request_hash)})
        ins = _insert(conn, results)
        # A second computation for one id only happens if idempotency failed; count it.
        self.results_for_save = ins.on_conflict_do_update(
            index_elements=["id"],
            set_={"response": ins.excluded.response, "updated_at": ins.excluded.updated_at,
                  "computations": results.c.computations + 1})
        self.outbox_insert = outbox.insert()


_HOT: dict[str, _HotStatements] = {}


def _hot(conn: sa.Connection) -> _HotStatements:
    name = conn.dialect.name
    if name not in _HOT:
        _HOT[name] = _HotStatements(conn)
    return _HOT[name]


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    """INSERT with ``on_conflict_do_*`` (same API in both dialects)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


class OutboxWrites:
    """The handlers of every write job, bound to one tier's settings and counters."""

    def __init__(self, tier: str, settings: OutboxSettings, counters: HeldCounters,
                 stats: dict[str, int]) -> None:
        self.tier = tier
        self.settings = settings
        self.counters = counters
        self.stats = stats

    def handlers(self) -> dict[str, Handler]:
        """Job kind -> handler, for :class:`~cascade.outbox.writer.GroupCommitWriter`."""
        return {
            "enqueue": self.enqueue,
            "save_result": self.save_result,
            "claim": self.claim,
            "outcome": self.outcome,
            "sweep": partial(maintenance.sweep, self),
            "release_backoff": partial(maintenance.release_backoff, self),
            "release_leases": partial(maintenance.release_leases, self),
            "replay": partial(maintenance.replay, self),
            "purge": partial(maintenance.purge, self),
            "recount": partial(maintenance.recount, self),
            "evict": partial(space.evict, self),
            "shrink": partial(space.shrink, self),
            "claim_callbacks": self.claim_callbacks,
            "callback_outcome": self.callback_outcome,
            "claim_keys": claims.claim_keys,
            "release_claims": claims.release_claims,
        }

    # -- enqueue and answers --------------------------------------------------------------------

    def enqueue(self, batch: Batch, jobs: Sequence[EnqueueJob]) -> list[Any]:
        conn, now, s = batch.conn, batch.now, self.settings
        hot = _hot(conn)
        existing: dict[str, str] = {}
        if len(jobs) == 1:  # the common case at low load: a cached point lookup
            for row in conn.execute(hot.existing_one, {"id": jobs[0].id}):
                existing[row.id] = row.state
        else:
            for chunk in chunks([j.id for j in jobs]):
                for row in conn.execute(sa.select(outbox.c.id, outbox.c.state)
                                        .where(outbox.c.id.in_(chunk))):
                    existing[row.id] = row.state
        pending_rows = batch.scratch.get("rows", 0)
        pending_bytes = batch.scratch.get("bytes", 0)
        outcomes: list[Any] = []
        accepted: list[EnqueueJob] = []
        for job in jobs:
            if job.id in existing or any(a.id == job.id for a in accepted):
                outcomes.append({"state": existing.get(job.id, "queued"), "duplicate": True})
                continue
            rows_after = self.counters.rows + pending_rows + 1
            bytes_after = self.counters.bytes + pending_bytes + job.size_bytes
            if rows_after > s.max_rows or bytes_after > s.max_bytes:
                self.stats["refused_queue_full"] += 1
                outcomes.append(self.queue_full_error(job))
                continue
            pending_rows += 1
            pending_bytes += job.size_bytes
            accepted.append(job)
            outcomes.append(None)  # filled below
        batch.scratch["rows"], batch.scratch["bytes"] = pending_rows, pending_bytes
        if not accepted:
            return outcomes
        conn.execute(
            hot.results_for_enqueue,
            [{"id": j.id, "task": j.task, "request_hash": j.request_hash,
              "response": j.response_json, "computations": 1, "created_at": now,
              "updated_at": now, "retain_until": now + s.results_retention_s} for j in accepted],
        )
        conn.execute(hot.outbox_insert, [
            {"id": j.id, "task": j.task, "body": j.body_json, "hop_count": j.hop_count,
             "traceparent": j.traceparent, "reason": j.reason[:2000],
             "state": "forwarding" if j.handed_over else "queued", "handed_over": j.handed_over,
             "attempts": 0, "max_attempts": j.max_attempts, "polls": 0, "ttl_s": j.ttl_s,
             "last_error": None, "size_bytes": j.size_bytes, "created_at": now,
             "updated_at": now, "expires_at": now + j.ttl_s, "callback_url": j.callback_url,
             "next_attempt_at": now + (s.poll_initial_s if j.handed_over else 0.0),
             "retain_until": None} for j in accepted
        ])
        claims.drop_claims(conn, [j.id for j in accepted])
        size = sum(j.size_bytes for j in accepted)
        batch.after_commit(lambda: self.counters.add(len(accepted), size, len(accepted)))
        it = iter(accepted)
        for i, outcome in enumerate(outcomes):
            if outcome is None:
                job = next(it)
                outcomes[i] = {
                    "state": "forwarding" if job.handed_over else "queued",
                    "attempts": 0, "queued_at": now, "expires_at": now + job.ttl_s,
                }
        self.stats["enqueued"] += len(accepted)
        return outcomes

    def queue_full_error(self, job: EnqueueJob) -> ServiceUnavailable:
        """The 503 for work that would overflow the caps (nothing is stored)."""
        c, s = self.counters, self.settings
        return ServiceUnavailable(
            f"tier {self.tier} cannot queue this escalation: its outbox holds {c.rows} rows / "
            f"{c.bytes} bytes (caps: outbox.max_rows {s.max_rows}, outbox.max_bytes "
            f"{s.max_bytes}); nothing was queued. Retry later; operators can free space with "
            "`cascade queue purge --expired --dead`",
            code="queue_full",
        )

    def save_result(self, batch: Batch, jobs: Sequence[SaveResult]) -> list[Any]:
        conn, now = batch.conn, batch.now
        conn.execute(
            _hot(conn).results_for_save,
            [{"id": j.id, "task": j.task, "request_hash": j.request_hash,
              "response": j.response_json, "computations": 1, "created_at": now,
              "updated_at": now, "retain_until": now + self.settings.results_retention_s}
             for j in jobs],
        )
        claims.drop_claims(conn, [j.id for j in jobs])
        return [None] * len(jobs)

    # -- forwarding -----------------------------------------------------------------------------

    def claim(self, batch: Batch, jobs: Sequence[int]) -> list[Any]:
        """Each job is a row limit; reserves that many due rows, oldest first."""
        conn, now = batch.conn, batch.now
        out: list[Any] = []
        for limit in jobs:
            rows = conn.execute(
                sa.select(outbox.c.id, outbox.c.task, outbox.c.body, outbox.c.hop_count,
                          outbox.c.traceparent, outbox.c.handed_over, outbox.c.attempts,
                          outbox.c.max_attempts, outbox.c.polls, outbox.c.expires_at,
                          outbox.c.size_bytes, results.c.response)
                .select_from(outbox.outerjoin(results, results.c.id == outbox.c.id))
                .where(outbox.c.next_attempt_at <= now)
                .order_by(outbox.c.next_attempt_at, outbox.c.seq)
                .limit(limit)
                .with_for_update(skip_locked=True, of=outbox)
            ).all()
            claimed: list[Any] = []
            expired: list[Any] = []
            for r in rows:
                (expired if r.expires_at <= now else claimed).append(r)
            if claimed:
                conn.execute(
                    outbox.update().where(outbox.c.id.in_([r.id for r in claimed]))
                    .values(state="forwarding", updated_at=now,
                            next_attempt_at=now + self.settings.lease_s))
            if expired:
                self.expire(batch, [r.id for r in expired])
            out.append([
                Claimed(r.id, r.task, orjson.loads(r.body), r.hop_count, r.traceparent,
                        bool(r.handed_over), r.attempts, r.max_attempts, r.polls,
                        orjson.loads(r.response) if r.response else {})
                for r in claimed
            ])
        return out

    def outcome(self, batch: Batch, jobs: Sequence[Outcome]) -> list[Any]:
        conn, now, s = batch.conn, batch.now, self.settings
        states: list[Any] = []
        for job in jobs:
            row = conn.execute(
                sa.select(outbox.c.state, outbox.c.attempts, outbox.c.max_attempts,
                          outbox.c.handed_over, outbox.c.size_bytes, outbox.c.callback_url,
                          outbox.c.next_attempt_at)
                .where(outbox.c.id == job.id)).first()
            if row is None or row.next_attempt_at is None:
                states.append(row.state if row else None)  # purged or finished meanwhile
                continue
            where = outbox.c.id == job.id
            if job.response_json is not None:
                conn.execute(results.update().where(results.c.id == job.id).values(
                    response=job.response_json, updated_at=now,
                    retain_until=now + s.results_retention_s))
            if job.kind == "final":
                conn.execute(outbox.update().where(where).values(
                    state="done", updated_at=now, next_attempt_at=None, last_error=None,
                    retain_until=now + s.results_retention_s))
                if row.callback_url:
                    self.arm_callback(conn, job.id, row.callback_url, now)
                self._finish(batch, row.size_bytes, held=False)
                self.stats["delivered"] += 1
                states.append("done")
            elif job.kind == "handover":
                conn.execute(outbox.update().where(where).values(
                    state="forwarding", handed_over=True, polls=outbox.c.polls + 1,
                    updated_at=now, next_attempt_at=now + job.delay_s, last_error=job.error))
                states.append("forwarding")
            elif job.kind == "release":
                conn.execute(outbox.update().where(where).values(
                    state="forwarding" if row.handed_over else "queued", updated_at=now,
                    next_attempt_at=now + job.delay_s,
                    last_error=job.error if job.error else outbox.c.last_error))
                states.append("forwarding" if row.handed_over else "queued")
            elif job.kind == "retry" and row.attempts + 1 < row.max_attempts:
                conn.execute(outbox.update().where(where).values(
                    state="queued", attempts=row.attempts + 1, updated_at=now,
                    next_attempt_at=now + job.delay_s, last_error=job.error))
                states.append("queued")
            else:  # dead: refused by the upstream, or the last attempt failed
                error = job.error if job.kind == "dead" else (
                    f"gave up after {row.attempts + 1} attempts (max_attempts "
                    f"{row.max_attempts}); last error: {job.error}")
                conn.execute(outbox.update().where(where).values(
                    state="dead", attempts=row.attempts + 1, updated_at=now,
                    next_attempt_at=None, last_error=error,
                    retain_until=now + s.results_retention_s))
                self._finish(batch, 0, held=True)
                self.stats["dead"] += 1
                states.append("dead")
        return states

    def arm_callback(self, conn: sa.Connection, id_: str, url: str, now: float) -> None:
        ins = _insert(conn, callbacks)
        conn.execute(ins.on_conflict_do_update(
            index_elements=["id"],
            set_={"url": url, "state": "pending", "attempts": 0, "next_attempt_at": now,
                  "updated_at": now, "last_error": None, "retain_until": None},
        ), {"id": id_, "url": url, "state": "pending", "attempts": 0,
            "max_attempts": self.settings.callback_max_attempts, "created_at": now,
            "updated_at": now, "next_attempt_at": now})

    def _finish(self, batch: Batch, size: int, *, held: bool) -> None:
        """A live row finished: it stops being live; it stops being held unless dead/expired."""
        if held:
            batch.after_commit(lambda: self.counters.add(0, 0, -1))
        else:
            batch.after_commit(lambda: self.counters.add(-1, -size, -1))

    def expire(self, batch: Batch, ids: Sequence[str]) -> None:
        now = batch.now
        for chunk in chunks(ids):
            batch.conn.execute(outbox.update().where(outbox.c.id.in_(chunk)).values(
                state="expired", updated_at=now, next_attempt_at=None,
                last_error=sa.func.coalesce(outbox.c.last_error, "") + " [expired: TTL reached]",
                retain_until=now + self.settings.results_retention_s))
        n = len(ids)
        batch.after_commit(lambda: self.counters.add(0, 0, -n))
        self.stats["expired"] += n

    # -- callbacks ------------------------------------------------------------------------------

    def claim_callbacks(self, batch: Batch, jobs: Sequence[int]) -> list[Any]:
        conn, now = batch.conn, batch.now
        lease = self.settings.callback_timeout_ms / 1000.0 * 2 + 5.0
        out: list[Any] = []
        for limit in jobs:
            rows = conn.execute(
                sa.select(callbacks.c.id, callbacks.c.url, callbacks.c.attempts,
                          callbacks.c.max_attempts)
                .where(callbacks.c.next_attempt_at <= now)
                .order_by(callbacks.c.next_attempt_at).limit(limit)
                .with_for_update(skip_locked=True)).all()
            if rows:
                conn.execute(callbacks.update().where(callbacks.c.id.in_([r.id for r in rows]))
                             .values(next_attempt_at=now + lease, updated_at=now))
            out.append([ClaimedCallback(r.id, r.url, r.attempts, r.max_attempts) for r in rows])
        return out

    def callback_outcome(
        self, batch: Batch, jobs: Sequence[tuple[str, bool, str | None, float]]
    ) -> list[Any]:
        """Each job is (id, delivered, error, retry_delay_s)."""
        conn, now = batch.conn, batch.now
        out: list[Any] = []
        for id_, delivered, error, delay in jobs:
            row = conn.execute(sa.select(callbacks.c.attempts, callbacks.c.max_attempts)
                               .where(callbacks.c.id == id_)).first()
            if row is None:
                out.append(None)
                continue
            attempts = row.attempts + 1
            if delivered:
                values: dict[str, Any] = {"state": "delivered", "delivered_at": now,
                                          "next_attempt_at": None, "last_error": None}
                self.stats["callbacks_delivered"] += 1
            elif attempts >= row.max_attempts:
                values = {"state": "failed", "next_attempt_at": None,
                          "last_error": f"gave up after {attempts} attempts; last error: {error}"}
                self.stats["callbacks_failed"] += 1
                log.warning("callback for %s failed for good: %s", id_, error)
            else:
                values = {"state": "pending", "next_attempt_at": now + delay, "last_error": error}
            if values["next_attempt_at"] is None:
                values["retain_until"] = now + self.settings.results_retention_s
            conn.execute(callbacks.update().where(callbacks.c.id == id_).values(
                attempts=attempts, updated_at=now, **values))
            out.append(values["state"])
        return out
