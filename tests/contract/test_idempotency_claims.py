"""Idempotency claims (cascade.outbox.claims) on every backend: on PostgreSQL, which several
processes share (the Serve replicas of one tier), one outbox's claim of a key shuts out every
other outbox on the same database until the answer is stored or the claim is released or its
lease lapses; a SQLite outbox belongs to one process, whose in-memory guard is enough."""

from __future__ import annotations

import asyncio

from cascade.outbox.tables import claims, results
from tests.contract.test_outbox_contract import FINAL, Clock, pending, rows


async def test_a_claimed_key_is_shut_out_elsewhere_until_its_answer_is_stored(
        make_outbox, outbox_url):
    a, b = await make_outbox("edge-server"), await make_outbox("edge-server")
    b.holder = "replica-b"  # two processes: same host and pid here
    assert await a.claim_key("k1", 5.0)
    if a.is_sqlite:  # one process owns the file: nothing is claimed in it
        assert await b.claim_key("k1", 5.0)
        assert rows(outbox_url, claims) == []
        return
    assert not await b.claim_key("k1", 5.0)
    assert [(r.id, r.holder) for r in rows(outbox_url, claims)] == [("k1", a.holder)]
    await a.save_result("k1", "documents", "h", FINAL)  # drops the claim in its transaction
    assert rows(outbox_url, claims) == []
    assert await b.claim_key("k1", 5.0)  # and then finds the stored answer
    assert (await b.lookup("k1"))["label"] == "business"
    await b.release_key("k1")
    assert rows(outbox_url, claims) == []


async def test_a_queued_answer_also_drops_the_claim(make_outbox, outbox_url):
    a = await make_outbox("edge-server")
    assert await a.claim_key("req-1", 5.0)
    await a.enqueue(pending(1))
    assert rows(outbox_url, claims) == []
    assert [r.id for r in rows(outbox_url, results)] == ["req-1"]


async def test_a_released_or_lapsed_claim_can_be_taken(make_outbox, outbox_url):
    clock = Clock()
    a = await make_outbox("edge-server", clock=clock)
    b = await make_outbox("edge-server", clock=clock)
    b.holder = "replica-b"
    if a.is_sqlite:
        return  # nothing to take over: see the first test
    assert await a.claim_key("k2", 5.0)
    await b.release_key("k2")  # only its holder can release a claim
    assert not await b.claim_key("k2", 5.0)
    await a.release_key("k2")
    assert await b.claim_key("k2", 5.0)
    # b "crashes": its claim holds for the request's deadline plus the grace, then lapses
    grace_s = a.settings.claim_grace_s
    clock.now += 5.0 + grace_s - 1
    assert not await a.claim_key("k2", 1.0)
    clock.now += 2
    assert await a.claim_key("k2", 1.0)
    assert [r.holder for r in rows(outbox_url, claims)] == [a.holder]
    clock.now += 1.0 + grace_s + 1
    await a.sweep()  # lapsed claims are swept
    assert rows(outbox_url, claims) == []


async def test_concurrent_claims_of_one_key_have_one_winner(make_outbox):
    boxes = [await make_outbox("edge-server") for _ in range(4)]
    for i, box in enumerate(boxes):
        box.holder = f"replica-{i}"
    won = await asyncio.gather(*(box.claim_key("k3", 5.0) for box in boxes for _ in range(3)))
    assert sum(won) == (12 if boxes[0].is_sqlite else 1)
