"""Decision log: a sample of each tier's gate inputs and decisions, in a local SQLite file.

What ``cascade policy replay`` re-decides offline. Each sampled request at a tier becomes one
row: the model's raw probabilities (the only thing a candidate policy needs to decide again),
the gate's signals, confidence, threshold and decision under the live policy (and whether the
drift alarm's stricter rule applied), and what the request finally got. Inputs are stored
only when the policy says ``include_payloads: true``.

Sampling is a hash of the request id, so every tier samples the same requests (the id is the
idempotency key sent upstream) and replay can follow a request up the chain. Writing never
touches the request path beyond appending a tuple to a bounded in-memory buffer: a daemon
thread commits batches every ``flush_interval_s``. A full buffer drops (and counts) rows rather
than slowing requests; a failing disk is logged and counted, never raised to a client.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.observability.disk import StoreGauge, files_bytes
from cascade.observability.outcome import RequestOutcome

log = logging.getLogger("cascade.observability.decisionlog")

PATH_ENV = "CASCADE_DECISION_LOG_PATH"

COLUMNS: tuple[str, ...] = (
    "ts", "request_id", "trace_id", "tier", "task", "hop", "model", "policy_version",
    "has_upstream", "probs", "label", "max_prob", "margin", "entropy", "signal", "threshold",
    "confidence", "decision", "final_label", "answered_by", "status", "payload", "drift_tightened",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,              -- unix time of the decision
    request_id TEXT NOT NULL,      -- same id at every tier of one request
    trace_id TEXT,
    tier TEXT NOT NULL,
    task TEXT NOT NULL,
    hop INTEGER NOT NULL,          -- hops the request had made before this tier (0 at the entry)
    model TEXT NOT NULL,
    policy_version TEXT NOT NULL,  -- short sha256 of the live policy file
    has_upstream INTEGER NOT NULL,
    probs TEXT NOT NULL,           -- JSON list: the model's raw output, exact floats
    label TEXT NOT NULL,           -- this tier's predicted class
    max_prob REAL, margin REAL, entropy REAL,   -- gate signals (after temperature, if any)
    signal TEXT NOT NULL, threshold REAL NOT NULL, confidence REAL NOT NULL,
    decision TEXT NOT NULL,        -- answer | escalate | unknown
    final_label TEXT,              -- what the request got back through this tier
    answered_by TEXT,
    status TEXT,
    payload TEXT,                  -- the input, only with include_payloads
    true_label TEXT,               -- optional ground truth, e.g. from user feedback; replay uses it
    drift_tightened INTEGER        -- 1: decided under the drift alarm's stricter rule (threshold is it)
);
CREATE INDEX IF NOT EXISTS decisions_request ON decisions (request_id);
"""
# Columns added after the first release: (name, type), added to older files on open.
_ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("drift_tightened", "INTEGER"),)


def sampled(request_id: str, rate: float) -> bool:
    """Whether ``request_id`` is in the sample at ``rate``: the same answer at every tier."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(request_id.encode()) < rate * 4294967296.0


def resolve_path(template: str, tier: str, replica: str | None = None) -> Path:
    """The log file of ``tier``: ``$CASCADE_DECISION_LOG_PATH`` or the policy's ``path``.

    One of several replicas of a tier writes its own file: ``{replica}`` in the template is
    its id, and a template without it gets ``-<replica>`` before the suffix
    (``var/decisions-cloud-<replica>.db``); replay takes every replica's file (``--log``)."""
    path = (os.environ.get(PATH_ENV) or template).replace("{tier}", tier)
    if replica is not None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", replica)
        if "{replica}" in path:
            path = path.replace("{replica}", safe)
        else:
            stem, dot, suffix = path.rpartition(".")
            path = f"{stem}-{safe}.{suffix}" if dot and "/" not in suffix else f"{path}-{safe}"
    return Path(path).expanduser()


@dataclass(frozen=True)
class LogTable:
    """The one table a :class:`DecisionLog` writes: its name, schema, columns in insert order
    and columns added after its first release (added to older files on open)."""

    name: str
    schema: str
    columns: tuple[str, ...]
    added_columns: tuple[tuple[str, str], ...] = ()

    @property
    def insert(self) -> str:
        """The INSERT statement of one row."""
        return (f"INSERT INTO {self.name} ({', '.join(self.columns)}) "
                f"VALUES ({', '.join('?' * len(self.columns))})")


DECISIONS = LogTable("decisions", _SCHEMA, COLUMNS, _ADDED_COLUMNS)


def connect(path: Path, wal_limit_bytes: int = 4 << 20,
            table: LogTable = DECISIONS) -> sqlite3.Connection:
    """Open (creating if needed) a decision log database (or another :class:`LogTable`'s);
    its WAL is checkpointed every ``wal_limit_bytes`` and truncated back to that size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # a new file only: freed pages can shrink it
    conn.execute(f"PRAGMA journal_size_limit={int(wal_limit_bytes)}")
    conn.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_limit_bytes // 4096)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(table.schema)
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table.name})")}
    for name, kind in table.added_columns:
        if name not in have:
            conn.execute(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}")
    return conn


EVICT_ABOVE = 0.85
"""The oldest rows go once the live bytes pass this fraction of the share..."""
EVICT_DOWN_TO = 0.70
"""...down to this fraction (hysteresis: one eviction, then quiet for a while)."""
_PAGES_PER_ROW = 3
"""Pages one row written or deleted may change, at most: its table leaf, its index leaf, a split."""
_PAGES_PER_COMMIT = 4
"""Pages any commit may change besides its rows': the header, a pointer map, two b-tree parents."""
_WAL_FRAME_HEADER = 24


def rows_per_commit(share_bytes: int, wal_limit_bytes: int, page_bytes: int) -> int:
    """Most rows one commit may write or delete so that a log's files stay within its share.

    The share is checked after every commit; at each check the live pages plus the whole WAL
    allowance are kept below :data:`EVICT_ABOVE` of it, and the WAL is emptied once it passes
    half its allowance. Between two checks one commit appends a frame to the WAL for each page
    it changes and may add as many pages to the file, so the pages it may change are the room
    above that line plus half the allowance, over a page and a frame each."""
    room = (1 - EVICT_ABOVE) * share_bytes + wal_limit_bytes / 2
    pages = int(room // (2 * page_bytes + _WAL_FRAME_HEADER))
    return max(1, (pages - _PAGES_PER_COMMIT) // _PAGES_PER_ROW)


class DecisionLog:
    """Buffered writer of decision rows into one SQLite file (one per tier).

    With a ``gauge`` (its share of the tier's disk budget) the writer thread also keeps the
    files (database, WAL, shared-memory index) within it at every moment, not only on average:
    after every commit it measures them; past :data:`EVICT_ABOVE` of the share the oldest rows
    go down to :data:`EVICT_DOWN_TO`, the WAL is emptied once it passes half its allowance, and
    each commit carries at most :func:`rows_per_commit` rows, so one commit cannot outgrow the
    room left. Rows older than ``retention_s`` go at each upkeep; freed pages are reused, and
    given back to the disk when the files pass their share (a share lowered by a reload).
    The project's readers of a live file (``cascade policy replay``, :func:`read_log`) read it in
    short chunks, so they never keep the WAL from being emptied; another program holding a read
    open on it can, until that read ends.
    """

    def __init__(self, path: Path, *, flush_interval_s: float = 0.25, max_pending: int = 20_000,
                 gauge: StoreGauge | None = None, retention_s: float | None = None,
                 upkeep_interval_s: float = 1.0, table: LogTable = DECISIONS,
                 max_rows: int | None = None) -> None:
        """``table``: what rows are (the decisions by default); ``max_rows``: the oldest rows
        past this many go at each upkeep."""
        self.path = path
        self.table = table
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.gauge = gauge
        self.retention_s = retention_s
        self.upkeep_interval_s = upkeep_interval_s
        self._next_upkeep = 0.0
        self.stats = {"recorded": 0, "written": 0, "dropped_full": 0, "write_errors": 0, "lost": 0,
                      "evicted": 0}
        self._pending: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._flushed = threading.Condition()
        # An eighth of the share, 64 KiB..1 MiB: a few seconds of rows at most between the
        # checkpoints SQLite runs at this size (its default, 4 MiB, outgrew small shares).
        self.wal_limit = max(64 << 10, min(1 << 20, gauge.budget_bytes // 8)) if gauge else 1 << 20
        # fail early (unwritable path) rather than in the thread
        self._conn = connect(path, self.wal_limit, table)
        self._page_bytes = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self.commit_rows = (rows_per_commit(gauge.budget_bytes, self.wal_limit, self._page_bytes)
                            if gauge else 10_000)
        self._thread = threading.Thread(target=self._run, name=f"decisionlog:{path.name}", daemon=True)
        self._thread.start()

    def record(self, row: tuple[Any, ...]) -> None:
        """Queue one row (a tuple in :data:`COLUMNS` order; the nullable columns added later,
        :data:`_ADDED_COLUMNS`, may be left off the end). Never blocks, never raises."""
        if len(self._pending) >= self.max_pending:
            self.stats["dropped_full"] += 1
            return
        width = len(self.table.columns)
        if len(row) < width:
            row = (*row, *(None,) * (width - len(row)))
        self._pending.append(row)
        self.stats["recorded"] += 1

    def _drain(self) -> None:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        for start in range(0, len(batch), self.commit_rows):
            chunk = batch[start:start + self.commit_rows]
            try:
                with self._conn:
                    self._conn.executemany(self.table.insert, chunk)
            except sqlite3.Error as exc:
                self.stats["write_errors"] += 1
                self.stats["lost"] += len(batch) - start
                log.error("decision log %s: cannot write %d rows: %s", self.path,
                          len(batch) - start, exc)
                return
            self.stats["written"] += len(chunk)
            self._after_commit()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self._drain()
            if time.monotonic() >= self._next_upkeep:
                self._next_upkeep = time.monotonic() + self.upkeep_interval_s
                self._upkeep()
            with self._flushed:
                self._flushed.notify_all()
            if self._stopping:
                self._drain()
                self._conn.close()
                return

    def _upkeep(self) -> None:
        """Row limits, retention and the disk share (see the class docstring); never raises."""
        try:
            if self.max_rows is not None:
                self.stats["evicted"] += self._delete_oldest(
                    f"id <= (SELECT max(id) FROM {self.table.name}) - ?", (self.max_rows,))
            if self.retention_s is not None and self.gauge is not None:
                removed = self._delete_oldest("ts < ?", (time.time() - self.retention_s,))
                self.gauge.evicted("retention", removed)
                self.stats["evicted"] += removed
        except sqlite3.Error as exc:
            log.warning("log %s: cannot keep it within its bounds: %s", self.path, exc)
        self._after_commit()

    def _after_commit(self) -> None:
        """Keep the WAL short and, with a gauge, the files within their share; never raises."""
        try:
            self._keep_wal_short()
            if self.gauge is None:
                return
            share = self.gauge.budget_bytes
            data, live, on_disk = self._space()
            if live > EVICT_ABOVE * share:
                rows = self._conn.execute(f"SELECT count(*) FROM {self.table.name}").fetchone()[0]
                if rows:
                    per_row = max(1.0, data / rows)
                    n = min(rows, math.ceil((live - EVICT_DOWN_TO * share) / per_row))
                    gone = self._delete_oldest("1", (), most=n)
                    self.gauge.evicted("budget", gone)
                    self.stats["evicted"] += gone
                    data, live, on_disk = self._space()
            if on_disk > share:
                self._give_back_free_pages()
                data, live, on_disk = self._space()
            self.gauge.set_used(on_disk)
        except sqlite3.Error as exc:
            log.warning("log %s: cannot keep it within its bounds: %s", self.path, exc)

    def _delete_oldest(self, where: str, params: tuple[Any, ...], most: int | None = None) -> int:
        """Delete the oldest rows matching ``where`` (at most ``most``), a commit of at most
        :attr:`commit_rows` rows at a time, the WAL kept short between them; how many went."""
        table, gone = self.table.name, 0
        while most is None or gone < most:
            step = self.commit_rows if most is None else min(self.commit_rows, most - gone)
            with self._conn:
                n = self._conn.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} "
                    f"ORDER BY id LIMIT ?)", (*params, step)).rowcount
            gone += n
            self._keep_wal_short()
            if n < step:
                break
        return gone

    def _keep_wal_short(self) -> None:
        """Empty the WAL (a TRUNCATE checkpoint) once it passes half its allowance."""
        if files_bytes([Path(f"{self.path}-wal")]) > self.wal_limit // 2:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _give_back_free_pages(self) -> None:
        """Shrink the file by its free pages, a few per commit so the WAL stays short (moving a
        page changes about as many pages as writing a row: itself, its parent, a pointer map)."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        while free > 0:
            self._conn.execute(f"PRAGMA incremental_vacuum({self.commit_rows})").fetchall()
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            before, free = free, self._conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free >= before:  # a file made without auto_vacuum cannot shrink this way
                break

    def _space(self) -> tuple[int, int, int]:
        """(bytes of the rows' pages, live bytes, bytes on disk) of the log; live bytes reserve
        the WAL's allowance and count the shared-memory index (see cascade.outbox.space)."""
        pages, free = (self._conn.execute(f"PRAGMA {name}").fetchone()[0]
                       for name in ("page_count", "freelist_count"))
        wal = files_bytes([Path(f"{self.path}-wal")])
        shm = files_bytes([Path(f"{self.path}-shm")])
        data = (pages - free) * self._page_bytes
        return data, data + max(wal, self.wal_limit) + shm, files_bytes([self.path]) + wal + shm

    def flush(self, timeout_s: float = 5.0) -> None:
        """Block until everything recorded so far is committed (tests, shutdown)."""
        target = self.stats["recorded"]
        deadline = time.monotonic() + timeout_s
        with self._flushed:
            while (self.stats["written"] + self.stats["lost"] < target
                   and self._thread.is_alive() and time.monotonic() < deadline):
                self._wake.set()
                self._flushed.wait(0.05)

    def close(self) -> None:
        """Commit what is pending and stop the writer thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10.0)


class DecisionRecorder:
    """A tier's view of its decision log: follows the live policy's ``decision_log`` settings.

    :meth:`configure` is called with every new policy (hot reload may turn logging on or off,
    change the rate or the file); :meth:`observe` is the per-request hook.
    """

    def __init__(self, tier: str, *, gauge: StoreGauge | None = None,
                 retention_s: float | None = None, replica: str | None = None) -> None:
        """``gauge``: the decision log's disk share (rows past it or ``retention_s`` go);
        ``replica``: one of several processes serving the tier (a file of its own)."""
        self.tier = tier
        self.replica = replica
        self.gauge = gauge
        self.retention_s = retention_s
        self.log: DecisionLog | None = None

    def configure(self, policy: Any) -> None:
        """Open, switch or close the log file to match ``policy.policy.decision_log``."""
        settings = policy.policy.decision_log
        path = (resolve_path(settings.path, self.tier, self.replica)
                if settings.sample_rate > 0 else None)
        if self.log is not None and (path is None or path != self.log.path):
            self.log.close()
            self.log = None
        if path is not None and self.log is None:
            try:
                self.log = DecisionLog(path, gauge=self.gauge, retention_s=self.retention_s)
            except (OSError, sqlite3.Error) as exc:
                log.error("decision log %s cannot be opened, not logging: %s", path, exc)

    def record_outcome(self, outcome: RequestOutcome) -> None:
        """Record one decision if logging is on and the request is in the sample."""
        policy, answer, scored, rule = outcome.policy, outcome.answer, outcome.assessment, \
            outcome.rule
        settings = policy.policy.decision_log
        if self.log is None or not sampled(answer.id, settings.sample_rate):
            return
        # The node passes the rule the gate applied: not the policy's own means the drift
        # alarm's stricter twin (cascade.gating.drift.effective_rule), which replay must apply too.
        tightened = rule != policy.rule(outcome.task, self.tier)
        signals, payload = scored.signals, outcome.payload
        self.log.record((
            time.time(), answer.id, answer.trace_id, self.tier, outcome.task, outcome.hop,
            outcome.model, policy.version, int(outcome.has_upstream),
            json.dumps([float(p) for p in scored.probabilities]), scored.label,
            signals.max_prob, signals.margin, signals.entropy, rule.signal,
            rule.threshold_for(scored.label), scored.confidence, outcome.decision, answer.label,
            answer.answered_by, answer.status,
            json.dumps(payload) if settings.include_payloads and payload is not None else None,
            int(tightened),
        ))

    def close(self) -> None:
        """Flush and close the log."""
        if self.log is not None:
            self.log.close()
            self.log = None


READ_CHUNK_ROWS = 1000
"""Rows one read of a live log file takes (:func:`read_log`)."""


def read_log(path: Path, table: str, what: str, *, field: str | None = None,
             chunk: int = READ_CHUNK_ROWS) -> Iterator[dict[str, Any]]:
    """Every row of ``table`` in the log file ``path`` (a tier may be writing it), as dicts,
    oldest first.

    Rows are read ``chunk`` at a time, each chunk a short read of its own, so a slow consumer (a
    replay of a day of decisions) never holds a read open on the live file: one would keep the
    tier from emptying the file's WAL, which then grows past the file's disk share. Rows the
    tier evicts meanwhile (its oldest) may be missed. Errors are a :class:`ConfigError` naming
    the file and ``what`` it should have been."""
    from cascade.errors import ConfigError

    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot open the {what}: {exc}", field=field) from None
    conn.row_factory = sqlite3.Row
    try:
        last = 0  # ids start at 1 (AUTOINCREMENT)
        while True:
            try:
                rows = conn.execute(f"SELECT * FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                                    (last, chunk)).fetchall()
            except sqlite3.Error as exc:
                raise ConfigError(f"{path}: not a {what} ({exc})", field=field) from None
            yield from (dict(row) for row in rows)
            if len(rows) < chunk:
                return
            last = rows[-1]["id"]
    finally:
        conn.close()


def read_rows(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Every row of the given decision log files, as dicts (oldest first per file; see
    :func:`read_log`)."""
    for path in paths:
        yield from read_log(path, "decisions", "cascade decision log")
