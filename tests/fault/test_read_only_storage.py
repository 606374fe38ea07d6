"""The outbox's SQLite file on a filesystem that goes read-only and comes back (a failing SD card,
an operator's remount): writes fail as 503 ``storage_unavailable`` while it is read-only, and the
first write after it is writable again succeeds, in the same process.

A real tmpfs is remounted (root; the CI runs as root). The database is left by a process that
died (SIGKILL-like ``os._exit``) with its WAL and WAL index in place, so SQLite can open it
read-only. Such a connection stays read-only after the remount, and while one is open every new
connection of the process shares its read-only WAL index (sqlite3.c, unixShmNode). A tier that
kept one would refuse writes until restarted. Seen in the soak as a flaky
``test_full_disk_and_read_only_database_are_503_not_500``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cascade.errors import ServiceUnavailable
from cascade.outbox.engine import create_outbox_engine
from cascade.outbox.writer import Batch, GroupCommitWriter

LEAVE_WAL_BEHIND = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("CREATE TABLE t (x INTEGER)")
conn.execute("INSERT INTO t VALUES (0)")
conn.commit()
os._exit(0)  # no close: the WAL and its index stay, as after a SIGKILL
"""


def _insert(batch: Batch, payloads: Sequence[Any]) -> list[Any]:
    batch.conn.execute(sa.text("INSERT INTO t VALUES (:x)"), [{"x": p} for p in payloads])
    return list(payloads)


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


@pytest.fixture
def stores(small_disk: Path) -> Iterator[tuple[Path, sa.Engine, GroupCommitWriter]]:
    """A database with its WAL files left behind, then the filesystem read-only; the engine and
    writer a tier would use on it."""
    db = small_disk / "outbox.db"
    subprocess.run([sys.executable, "-c", LEAVE_WAL_BEHIND, str(db)], check=True)
    assert (small_disk / "outbox.db-wal").exists() and (small_disk / "outbox.db-shm").exists()
    _remount(small_disk, "ro")
    engine = create_outbox_engine(f"sqlite:///{db}")
    writer = GroupCommitWriter(engine, {"insert": _insert})
    writer.start()
    try:
        yield small_disk, engine, writer
    finally:
        writer.stop()
        engine.dispose()
        _remount(small_disk, "rw")


def _rows(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [x for (x,) in conn.execute(sa.text("SELECT x FROM t ORDER BY x"))]


def test_connections_opened_read_only_are_not_kept(stores):
    disk, engine, writer = stores
    # Six readers at once while read-only: reads work, from six read-only connections.
    held = [engine.connect() for _ in range(6)]
    assert [c.execute(sa.text("SELECT count(*) FROM t")).scalar() for c in held] == [1] * 6
    for conn in held:
        conn.close()
    with pytest.raises(ServiceUnavailable) as refused:
        writer.submit_sync("insert", 1)
    assert refused.value.code == "storage_unavailable" and "read-only" in refused.value.message

    retried = writer.stats["stale_connections"]  # (the refused write was tried twice)

    _remount(disk, "rw")
    assert writer.submit_sync("insert", 2) == 2  # the first write after the remount
    assert writer.stats["stale_connections"] == retried  # at its first try: none was kept
    assert _rows(engine) == [0, 2]


def test_a_connection_that_turned_out_read_only_is_replaced_and_the_write_retried(stores):
    disk, engine, writer = stores
    old = engine.connect()  # opened read-only, and held across the remount
    assert old.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
    _remount(disk, "rw")
    # Opened on a writable filesystem, yet read-only: it shares the held connection's WAL
    # index. It goes back to the pool looking healthy.
    with engine.connect() as inherited:
        assert inherited.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
    old.close()

    assert writer.submit_sync("insert", 3) == 3  # no 503: replaced, and tried once more
    assert writer.stats["stale_connections"] == 1
    assert _rows(engine) == [0, 3]


def test_idle_connections_that_inherited_the_read_only_index_do_not_keep_writes_refused(stores):
    # The soak's red (fault run 23 of 37855a9): after the remount, several connections were
    # opened while a read-only one was still open (the tier's readers and callback sender). They
    # share its read-only WAL index, yet look healthy and go back to the pool, where each keeps
    # that index alive for the next connection: the writer's retry met one of them, or a new
    # connection poisoned by them, and the first write after the remount got a 503.
    disk, engine, writer = stores
    old = engine.connect()  # opened read-only, held across the remount
    assert old.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
    _remount(disk, "rw")
    inherited = [engine.connect() for _ in range(3)]
    for conn in inherited:
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
        conn.close()  # back to the pool, idle, looking healthy
    old.close()

    assert writer.submit_sync("insert", 4) == 4  # no 503
    assert _rows(engine) == [0, 4]
