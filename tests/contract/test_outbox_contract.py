"""The outbox contract: the same behaviour on every backend (SQLite file, real PostgreSQL).

Each test gets a fresh database (see conftest.py) and a fake clock where time matters, so TTL,
backoff and retention are exact rather than slept for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from cascade.contract.escalation import PendingEscalation
from cascade.errors import NotFound, ServiceUnavailable
from cascade.outbox.store import Outcome
from cascade.outbox.tables import callbacks, outbox, results
from cascade.outbox.views import iso

T0 = 1_800_000_000.0


class Clock:
    """A settable wall clock (UNIX seconds)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def pending(i: int | str, *, ttl_s: float = 3600, max_attempts: int = 3, hop_count: int = 1,
            callback_url: str | None = None, text: str = "x",
            handed_over: bool = False) -> PendingEscalation:
    rid = f"req-{i}"
    body: dict[str, Any] = {"task": "documents", "input": {"text": text}}
    if callback_url:
        body["callback_url"] = callback_url
    return PendingEscalation(
        id=rid, task="documents", body=body,
        provisional={"id": rid, "task": "documents", "label": "sport", "confidence": 0.4,
                     "status": "provisional", "answered_by": "endpoint",
                     "hops": [{"tier": "endpoint", "decision": "escalate"}]},
        reason="upstream unreachable", hop_count=hop_count, ttl_s=ttl_s,
        max_attempts=max_attempts, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        callback_url=callback_url, handed_over=handed_over,
    )


FINAL = {"id": "x", "label": "business", "confidence": 0.97, "status": "final",
         "answered_by": "edge-node", "hops": [{"tier": "edge-node", "decision": "answer"}]}


def rows(url: str, table: sa.Table) -> list[Any]:
    """Read a table through a brand-new engine: what is committed, not what is cached."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(table)))
    finally:
        engine.dispose()


async def test_enqueue_commits_answer_and_escalation_together(make_outbox, outbox_url):
    box = await make_outbox()
    state = await box.enqueue(pending(1))
    assert state["state"] == "queued" and state["held_by"] == "endpoint"
    assert state["results_url"] == "/v1/results/req-1"
    (row,) = rows(outbox_url, outbox)
    (res,) = rows(outbox_url, results)
    assert (row.id, row.state, row.attempts, res.id) == ("req-1", "queued", 0, "req-1")
    assert orjson.loads(row.body) == {"task": "documents", "input": {"text": "x"}}
    assert orjson.loads(res.response)["status"] == "provisional"
    assert box.depth() == 1


async def test_result_shows_latest_answer_and_state(make_outbox):
    box = await make_outbox()
    await box.enqueue(pending(1))
    got = await box.result("req-1")
    assert got["label"] == "sport" and got["status"] == "provisional"
    assert got["escalation"]["state"] == "queued"
    assert got["escalation"]["attempts"] == 0 and got["escalation"]["last_error"] is None
    with pytest.raises(NotFound):
        await box.result("nope")


async def test_survives_reopen_with_counters_restored(make_outbox):
    box = await make_outbox()
    for i in range(5):
        await box.enqueue(pending(i))
    await box.aclose()
    again = await make_outbox()
    assert again.depth() == 5 and again.counters.rows == 5
    assert [r.id for r in await again.claim(10)] == [f"req-{i}" for i in range(5)]


async def test_claim_is_oldest_first_limited_and_leased(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock)
    for i in range(5):
        await box.enqueue(pending(i))
        clock.now += 1
    first = await box.claim(2)
    assert [r.id for r in first] == ["req-0", "req-1"]
    assert first[0].body == {"task": "documents", "input": {"text": "x"}}
    assert first[0].response["status"] == "provisional"
    second = await box.claim(10)
    assert [r.id for r in second] == ["req-2", "req-3", "req-4"]  # leased rows are not reissued
    assert await box.claim(10) == []
    clock.now += box.settings.lease_s + 1  # a lease that runs out (sender died) frees the row
    assert len(await box.claim(10)) == 5


async def test_concurrent_enqueues_are_group_committed(make_outbox, outbox_url):
    box = await make_outbox()
    before = box.writer.stats["batches"]
    await asyncio.gather(*(box.enqueue(pending(i)) for i in range(300)))
    assert len(rows(outbox_url, outbox)) == 300
    assert box.writer.stats["batches"] - before < 300  # fewer commits than enqueues
    assert box.depth() == 300


async def test_duplicate_enqueue_keeps_one_row(make_outbox, outbox_url):
    box = await make_outbox()
    await box.enqueue(pending(1))
    again = await box.enqueue(pending(1))
    assert again["state"] == "queued"
    assert len(rows(outbox_url, outbox)) == 1 and box.depth() == 1


async def test_final_answer_marks_done_and_arms_the_callback(make_outbox, outbox_url):
    box = await make_outbox()
    await box.enqueue(pending(1, callback_url="http://127.0.0.1:9/cb"))
    (row,) = await box.claim(1)
    final = {**row.response, **FINAL, "id": "req-1"}
    assert await box.record(Outcome("req-1", "final", response_json=orjson.dumps(final).decode())) == "done"
    got = await box.result("req-1")
    assert (got["status"], got["label"], got["escalation"]["state"]) == ("final", "business", "done")
    assert got["callback"]["state"] == "pending" and got["callback"]["url"] == "http://127.0.0.1:9/cb"
    assert box.depth() == 0 and box.counters.rows == 0
    assert [c.id for c in await box.claim_callbacks(5)] == ["req-1"]


async def test_only_the_client_facing_tier_owns_the_callback(make_outbox, outbox_url):
    box = await make_outbox(tier="edge-node")
    await box.enqueue(pending(1, hop_count=2, callback_url="http://127.0.0.1:9/cb"))
    await box.claim(1)
    await box.record(Outcome("req-1", "final", response_json=orjson.dumps(FINAL).decode()))
    assert rows(outbox_url, callbacks) == []
    (row,) = rows(outbox_url, outbox)
    assert row.callback_url is None
    assert "callback_url" not in orjson.loads(row.body)  # never forwarded upstream


async def test_failed_sends_back_off_then_go_dead(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock)
    await box.enqueue(pending(1, max_attempts=2))
    await box.claim(1)
    assert await box.record(Outcome("req-1", "retry", error="connect refused", delay_s=30)) == "queued"
    esc = (await box.result("req-1"))["escalation"]
    assert esc["attempts"] == 1 and esc["last_error"] == "connect refused"
    assert await box.claim(1) == []  # backing off
    clock.now += 31
    await box.claim(1)
    assert await box.record(Outcome("req-1", "retry", error="HTTP 503", delay_s=30)) == "dead"
    esc = (await box.result("req-1"))["escalation"]
    assert esc["state"] == "dead" and esc["attempts"] == 2
    assert "gave up after 2 attempts" in esc["last_error"] and "HTTP 503" in esc["last_error"]
    assert box.depth() == 0 and box.counters.rows == 1  # dead rows are kept (and capped)


async def test_poison_goes_dead_at_once_with_the_upstream_error(make_outbox):
    box = await make_outbox()
    await box.enqueue(pending(1, max_attempts=20))
    await box.claim(1)
    err = 'upstream refused it with HTTP 422: {"error":{"code":"unknown_task"}}'
    assert await box.record(Outcome("req-1", "dead", error=err)) == "dead"
    esc = (await box.result("req-1"))["escalation"]
    assert esc["state"] == "dead" and esc["last_error"] == err and esc["attempts"] == 1


async def test_release_and_handover_spend_no_attempt(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock)
    await box.enqueue(pending(1, max_attempts=1))
    await box.claim(1)
    assert await box.record(Outcome("req-1", "release")) == "queued"
    (row,) = await box.claim(1)
    provisional_up = {**row.response, "answered_by": "edge-node", "status": "provisional"}
    assert await box.record(Outcome("req-1", "handover", delay_s=5,
                                    response_json=orjson.dumps(provisional_up).decode())) == "forwarding"
    got = await box.result("req-1")
    assert got["escalation"]["state"] == "forwarding" and got["escalation"]["handed_over"]
    assert got["escalation"]["attempts"] == 0 and got["answered_by"] == "edge-node"
    clock.now += 6
    (again,) = await box.claim(1)
    assert again.handed_over and again.polls == 1


async def test_ttl_expires_queued_rows(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock)
    await box.enqueue(pending(1, ttl_s=10))
    await box.enqueue(pending(2, ttl_s=1000))
    clock.now += 11
    assert (await box.sweep())["expired"] == 1
    assert (await box.result("req-1"))["escalation"]["state"] == "expired"
    assert box.depth() == 1 and box.counters.rows == 2
    await box.enqueue(pending(3, ttl_s=5))
    clock.now += 6
    assert [r.id for r in await box.claim(5)] == ["req-2"]  # claim expires what it skips
    assert (await box.result("req-3"))["escalation"]["state"] == "expired"


async def test_row_cap_refuses_with_queue_full_and_counts(make_outbox):
    box = await make_outbox(max_rows=3)
    for i in range(3):
        await box.enqueue(pending(i))
    with pytest.raises(ServiceUnavailable) as info:
        await box.enqueue(pending(99))
    assert info.value.code == "queue_full" and info.value.status == 503
    assert "max_rows 3" in info.value.message and "nothing was queued" in info.value.message
    assert box.stats["refused_queue_full"] == 1
    with pytest.raises(NotFound):
        await box.result("req-99")


async def test_concurrent_burst_never_overshoots_the_cap(make_outbox, outbox_url):
    box = await make_outbox(max_rows=50)
    got = await asyncio.gather(*(box.enqueue(pending(i)) for i in range(120)),
                               return_exceptions=True)
    refused = [g for g in got if isinstance(g, ServiceUnavailable)]
    assert len(refused) == 70 and all(r.code == "queue_full" for r in refused)
    assert len(rows(outbox_url, outbox)) == 50


async def test_byte_cap_refuses_large_work(make_outbox):
    box = await make_outbox(max_bytes=2048)
    await box.enqueue(pending(1, text="a" * 500))
    with pytest.raises(ServiceUnavailable) as info:
        await box.enqueue(pending(2, text="b" * 2000))
    assert info.value.code == "queue_full" and "max_bytes 2048" in info.value.message


async def test_replay_and_purge(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock, max_rows=2)
    await box.enqueue(pending(1, ttl_s=10))
    await box.enqueue(pending(2, max_attempts=1))
    await box.claim(2)
    await box.record(Outcome("req-2", "retry", error="boom"))
    clock.now += 11
    await box.sweep()
    with pytest.raises(ServiceUnavailable):  # dead and expired rows still count
        await box.enqueue(pending(3))
    assert await box.writer.submit("replay", ("state", "dead", 7200.0)) == 1  # a TTL given
    esc = (await box.result("req-2"))["escalation"]
    assert esc["state"] == "queued" and esc["attempts"] == 0 and "replayed" in esc["last_error"]
    assert esc["expires_at"] == iso(clock.now + 7200)
    assert await box.writer.submit("replay", ("id", "req-1")) == 1  # its own TTL again
    assert (await box.result("req-1"))["escalation"]["expires_at"] == iso(clock.now + 10)
    assert box.depth() == 2
    assert [r.id for r in await box.claim(5)] == ["req-1", "req-2"]
    with pytest.raises(ValueError):
        await box.writer.submit("purge", (("queued",), None))
    await box.record(Outcome("req-1", "retry", error="x"))  # max_attempts 3: queued again
    await box.record(Outcome("req-2", "dead", error="poison"))
    assert await box.writer.submit("purge", (("dead",), None)) == 1
    assert box.counters.rows == 1
    await box.enqueue(pending(3))  # room again


async def test_retention_removes_finished_rows_and_results(make_outbox, outbox_url):
    clock = Clock()
    box = await make_outbox(clock=clock, results_retention_s=100)
    await box.save_result("kept-answer", "documents", "h", {"id": "kept-answer", "status": "final"})
    await box.enqueue(pending(1, ttl_s=10_000))
    await box.enqueue(pending(2, ttl_s=10_000))
    await box.claim(1)
    await box.record(Outcome("req-1", "final", response_json=orjson.dumps(FINAL).decode()))
    clock.now += 101
    await box.sweep()
    assert {r.id for r in rows(outbox_url, outbox)} == {"req-2"}  # live rows outlive retention
    assert {r.id for r in rows(outbox_url, results)} == {"req-2"}


async def test_saved_results_count_computations(make_outbox):
    box = await make_outbox()
    await box.save_result("k1", "documents", "hash-1", {"id": "k1", "label": "tech"})
    found = await box.lookup("k1")
    assert found["label"] == "tech" and found["_request_hash"] == "hash-1"
    assert found["_computations"] == 1
    await box.save_result("k1", "documents", "hash-1", {"id": "k1", "label": "tech"})
    assert (await box.lookup("k1"))["_computations"] == 2


async def test_callbacks_retry_then_fail_and_can_be_rearmed(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock, callback_max_attempts=2)
    await box.enqueue(pending(1, callback_url="http://127.0.0.1:9/cb"))
    await box.claim(1)
    await box.record(Outcome("req-1", "final", response_json=orjson.dumps(FINAL).decode()))
    (cb,) = await box.claim_callbacks(5)
    await box.record_callback(cb.id, False, "HTTP 500", 10)
    assert await box.claim_callbacks(5) == []
    clock.now += 11
    (cb,) = await box.claim_callbacks(5)
    await box.record_callback(cb.id, False, "HTTP 502", 10)
    got = (await box.result("req-1"))["callback"]
    assert got["state"] == "failed" and "HTTP 502" in got["last_error"] and got["attempts"] == 2
    assert await box.writer.submit("replay", ("id", "req-1")) == 1
    (cb,) = await box.claim_callbacks(5)
    await box.record_callback(cb.id, True, None, 0)
    assert (await box.result("req-1"))["callback"]["state"] == "delivered"


async def test_link_restored_releases_backoff_oldest_first(make_outbox):
    clock = Clock()
    box = await make_outbox(clock=clock)
    for i in range(3):
        await box.enqueue(pending(i))
        clock.now += 1
    for row in await box.claim(3):
        await box.record(Outcome(row.id, "retry", error="down", delay_s=300))
    assert await box.claim(3) == []
    assert await box.release_backoff() == 3
    assert [r.id for r in await box.claim(3)] == ["req-0", "req-1", "req-2"]
