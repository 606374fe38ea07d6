"""Group commit on a real SQLite file: batching, isolation of failures, commit-before-resolve."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cascade.errors import ServiceUnavailable
from cascade.outbox.engine import create_outbox_engine
from cascade.outbox.writer import Batch, GroupCommitWriter

md = sa.MetaData()
items = sa.Table("items", md, sa.Column("id", sa.String, primary_key=True),
                 sa.Column("n", sa.Integer))


@pytest.fixture
def engine(tmp_path: Path):
    eng = create_outbox_engine(f"sqlite:///{tmp_path}/w.db")
    md.create_all(eng)
    yield eng
    eng.dispose()


def committed_ids(engine) -> set[str]:
    """Read through a separate connection (sees committed data only)."""
    fresh = sa.create_engine(engine.url)
    with fresh.connect() as conn:
        out = {r.id for r in conn.execute(sa.select(items.c.id))}
    fresh.dispose()
    return out


def make_writer(engine, seen_after_commit: list[str] | None = None,
                gate: threading.Event | None = None, entered: threading.Event | None = None):
    """``entered`` is set when a batch starts; the batch then waits for ``gate``."""

    def insert(batch: Batch, payloads: list[Any]) -> list[Any]:
        if entered is not None:
            entered.set()
        if gate is not None:
            gate.wait(10)
        out: list[Any] = []
        for p in payloads:
            if p == "refuse":
                out.append(ServiceUnavailable("refused", code="queue_full"))
                continue
            batch.conn.execute(items.insert().values(id=p, n=1))  # "dup" twice → IntegrityError
            if seen_after_commit is not None:
                batch.after_commit(lambda p=p: seen_after_commit.append(p))
            out.append(p.upper())
        return out

    return GroupCommitWriter(engine, {"insert": insert}, max_batch=64)


async def test_results_arrive_after_commit_and_in_batches(engine):
    gate, entered = threading.Event(), threading.Event()
    writer = make_writer(engine, gate=gate, entered=entered)
    writer.start()
    try:
        first = asyncio.ensure_future(writer.submit("insert", "a0"))
        assert await asyncio.to_thread(entered.wait, 10)  # batch 1 is a0 alone, held at the gate
        rest = [asyncio.ensure_future(writer.submit("insert", f"a{i}")) for i in range(1, 50)]
        await asyncio.sleep(0)  # one loop turn: each submission runs up to its queue.put
        assert not first.done()
        gate.set()
        got = await asyncio.gather(first, *rest)
        assert got == [f"A{i}" for i in range(50)]
        assert committed_ids(engine) == {f"a{i}" for i in range(50)}
        assert writer.stats["batches"] == 2 and writer.stats["largest_batch"] == 49
    finally:
        writer.stop()


async def test_a_failing_job_does_not_fail_its_batch(engine):
    gate, entered = threading.Event(), threading.Event()
    seen: list[str] = []
    writer = make_writer(engine, seen, gate=gate, entered=entered)
    writer.start()
    try:
        blocker = asyncio.ensure_future(writer.submit("insert", "first"))
        assert await asyncio.to_thread(entered.wait, 10)  # "first" is a batch of its own
        jobs = [asyncio.ensure_future(writer.submit("insert", p))
                for p in ("ok1", "dup", "dup", "refuse", "ok2")]
        await asyncio.sleep(0)  # one loop turn: all five are queued, so they form one batch
        gate.set()
        got = await asyncio.gather(blocker, *jobs, return_exceptions=True)
    finally:
        writer.stop()
    assert got[:3] == ["FIRST", "OK1", "DUP"]
    assert isinstance(got[3], ServiceUnavailable) and got[3].code == "storage_unavailable"
    assert isinstance(got[4], ServiceUnavailable) and got[4].code == "queue_full"
    assert got[5] == "OK2"
    assert committed_ids(engine) == {"first", "ok1", "dup", "ok2"}
    # after_commit effects ran only for committed work, once each
    assert sorted(seen) == ["dup", "first", "ok1", "ok2"]
    assert writer.stats["failed_batches"] == 1


async def test_stop_commits_everything_submitted_and_then_refuses(engine):
    writer = make_writer(engine)
    writer.start()
    pending = [asyncio.ensure_future(writer.submit("insert", f"s{i}")) for i in range(20)]
    await asyncio.sleep(0)  # let the submissions reach the queue
    await asyncio.to_thread(writer.stop)
    assert len(await asyncio.gather(*pending)) == 20
    assert len(committed_ids(engine)) == 20
    with pytest.raises(ServiceUnavailable):
        await writer.submit("insert", "late")


def test_submit_sync_from_a_plain_thread(engine):
    writer = make_writer(engine)
    writer.start()
    try:
        assert writer.submit_sync("insert", "t1") == "T1"
    finally:
        writer.stop()
    assert committed_ids(engine) == {"t1"}


async def test_only_relaxed_batches_skip_the_fsync(engine):
    seen: list[tuple[str, int]] = []

    def probe(kind: str):
        def handler(batch: Batch, payloads: list[Any]) -> list[Any]:
            level = batch.conn.exec_driver_sql("PRAGMA synchronous").scalar()
            seen.append((kind, level))
            return [None] * len(payloads)
        return handler

    writer = GroupCommitWriter(engine, {"claim": probe("claim"), "enqueue": probe("enqueue")},
                               relaxed_kinds=frozenset({"claim"}), synchronous="full")
    writer.start()
    try:
        await writer.submit("claim", None)
        await writer.submit("enqueue", None)
        await writer.submit("claim", None)
    finally:
        writer.stop()
    # SQLite: 2 = FULL (fsync at commit), 1 = NORMAL (WAL synced later)
    assert seen == [("claim", 1), ("enqueue", 2), ("claim", 1)]
    assert writer.stats["relaxed_batches"] == 2
