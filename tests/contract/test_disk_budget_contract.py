"""The results store's disk budget on every backend: what eviction may remove, and what it never
removes (exact row sets), the refusal when only unevictable work remains, oldest first.

Same fixtures as the outbox contract (a fresh SQLite file or PostgreSQL database per test, a
fake clock), so eviction is decided by the idempotency window exactly, not by sleeping.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from cascade.errors import ServiceUnavailable
from cascade.observability.disk import StoreGauge
from cascade.outbox.store import Outcome
from cascade.outbox.tables import callbacks, outbox, results
from cascade.outbox.upkeep import keep_within_budget
from tests.contract.test_outbox_contract import FINAL, T0, Clock, pending, rows

WINDOW_S = 600.0
FINAL_JSON = orjson.dumps(FINAL).decode()


async def _finish(box, rid: str) -> None:
    """Forward ``rid`` and record its final answer (callback armed if it has one)."""
    claimed = await box.claim(50)
    assert rid in {c.id for c in claimed}
    for c in claimed:
        if c.id != rid:
            await box.record(Outcome(c.id, "release"))
    await box.record(Outcome(rid, "final", response_json=FINAL_JSON))


async def _every_kind_of_row(box, clock: Clock) -> None:
    """One request in each state, all last changed at T0 except ``young``."""
    await box.save_result("saved", "documents", "h", {"id": "saved", "status": "final"})
    await box.enqueue(pending("done"))
    await _finish(box, "req-done")
    await box.enqueue(pending("cb-ok", callback_url="http://127.0.0.1:9/cb"))
    await _finish(box, "req-cb-ok")
    await box.enqueue(pending("cb-pending", callback_url="http://127.0.0.1:9/cb"))
    await _finish(box, "req-cb-pending")
    await box.enqueue(pending("cb-failed", callback_url="http://127.0.0.1:9/cb"))
    await _finish(box, "req-cb-failed")
    for cb in await box.claim_callbacks(10):
        if cb.id == "req-cb-ok":
            await box.record_callback(cb.id, True, None, 0)
        elif cb.id == "req-cb-failed":
            await box.record_callback(cb.id, False, "HTTP 500", 0)  # max_attempts 1: failed
    await box.enqueue(pending("queued"))
    await box.enqueue(pending("forwarding", handed_over=True))
    await box.enqueue(pending("dead"))
    (claimed,) = [c for c in await box.claim(10) if c.id == "req-dead"]
    await box.record(Outcome(claimed.id, "dead", error="poison"))
    await box.enqueue(pending("expired", ttl_s=1))
    clock.now += 2
    await box.sweep()  # req-expired: expired (its provisional answer stays)
    clock.now = T0 + WINDOW_S + 100
    await box.save_result("young", "documents", "h", {"id": "young", "status": "final"})


KEPT = {"req-cb-pending", "req-cb-failed", "req-queued", "req-forwarding", "req-dead",
        "req-expired", "young"}
EVICTABLE = {"saved", "req-done", "req-cb-ok"}


async def test_eviction_removes_only_final_delivered_answers_past_the_window(
        make_outbox, outbox_url):
    clock = Clock()
    box = await make_outbox(clock=clock, callback_max_attempts=1, idempotency_window_s=WINDOW_S)
    await _every_kind_of_row(box, clock)
    assert {r.id for r in rows(outbox_url, results)} == KEPT | EVICTABLE
    gone = await box.writer.submit("evict", (1000, clock.now - WINDOW_S))
    assert set(gone) == EVICTABLE
    assert {r.id for r in rows(outbox_url, results)} == KEPT
    assert {r.id for r in rows(outbox_url, outbox)} == {
        "req-cb-pending", "req-cb-failed", "req-queued", "req-forwarding", "req-dead",
        "req-expired"}
    assert {r.id: r.state for r in rows(outbox_url, callbacks)} == {
        "req-cb-pending": "pending", "req-cb-failed": "failed"}
    # Far past the window only the young answer joins them; owed work still stays.
    clock.now += 10 * WINDOW_S
    assert await box.writer.submit("evict", (1000, clock.now)) == ["young"]
    assert {r.id for r in rows(outbox_url, results)} == KEPT - {"young"}


async def test_eviction_takes_the_oldest_first(make_outbox, outbox_url):
    clock = Clock()
    box = await make_outbox(clock=clock, idempotency_window_s=0)
    for i in range(5):
        await box.save_result(f"k{i}", "documents", "h", {"id": f"k{i}", "status": "final"})
        clock.now += 1
    assert await box.writer.submit("evict", (2, clock.now)) in (["k0", "k1"], ["k1", "k0"])
    assert {r.id for r in rows(outbox_url, results)} == {"k2", "k3", "k4"}


async def _fill(box, prefix: str, n: int) -> None:
    """``n`` saved final answers of about 1 KB each, group-committed."""
    text = "x" * 1000
    await asyncio.gather(*(box.save_result(f"{prefix}{i}", "documents", "h",
                                           {"id": f"{prefix}{i}", "status": "final", "t": text})
                           for i in range(n)))


async def test_budget_squeeze_keeps_owed_work_and_then_refuses_new_work(make_outbox, outbox_url):
    clock = Clock()
    gauge = StoreGauge("results", 1 << 20)
    box = await make_outbox(clock=clock, gauge=gauge, idempotency_window_s=WINDOW_S)
    for i in range(5):
        await box.enqueue(pending(f"owed{i}", text="y" * 500))
    await _fill(box, "old", 3000)  # ~3 MB against a 1 MiB share
    clock.now += WINDOW_S + 1
    space = await keep_within_budget(box)
    assert space is not None and space.live_bytes <= (1 << 20)
    assert box.full_reason is None
    kept = {r.id for r in rows(outbox_url, results)}
    assert {f"req-owed{i}" for i in range(5)} <= kept  # nothing owed was evicted
    assert {r.id for r in rows(outbox_url, outbox)} == {f"req-owed{i}" for i in range(5)}
    assert gauge.evictions["budget"] == 3005 - len(kept)
    assert 0 < gauge.used_bytes
    # Young answers cannot be evicted: over the share again, new stored work is refused.
    await _fill(box, "young", 3000)
    await keep_within_budget(box)
    assert box.full_reason is not None and "disk.idempotency_window_s" in box.full_reason
    with pytest.raises(ServiceUnavailable) as refused:
        await box.enqueue(pending("new"))
    assert refused.value.code == "storage_unavailable" and refused.value.status == 503
    with pytest.raises(ServiceUnavailable):
        await box.save_result("new-key", "documents", "h", {"id": "new-key"})
    assert {f"req-owed{i}" for i in range(5)} <= {r.id for r in rows(outbox_url, results)}
    # Once the young answers pass the window, room is made and work is taken again.
    clock.now += WINDOW_S + 1
    await keep_within_budget(box)
    assert box.full_reason is None
    await box.enqueue(pending("new"))
