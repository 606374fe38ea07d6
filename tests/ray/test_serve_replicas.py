"""State across replicas (architecture §2, §6): the two ingress replicas of one tier share its
PostgreSQL outbox (real server), so the same Idempotency-Key sent to both at once is computed
once (model calls and results rows counted) and every duplicate gets the stored answer or 409
``idempotency_in_flight``; each replica names itself in ``X-Cascade-Replica`` and ``/readyz``
(its own drift windows and decision log)."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

pytest.importorskip("ray.serve")

from cascade.deploy.replicas import REPLICA_HEADER
from cascade.outbox.tables import claims, results
from tests.fault.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ray]

KEYS_PER_ROUND = 12
COPIES = 4  # concurrent requests per key
MAX_ROUNDS = 10  # until a duplicate met its twin at the other replica (bounded poll)


def _model_requests(app: str) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("cloud-model-documents", app_name=app)
    return int(handle.stats.remote().result(timeout_s=60)["requests"])


def _send(url: str, key: str, text: str) -> httpx.Response:
    body = {"task": "documents", "input": {"text": text}, "deadline_ms": 30_000}
    return httpx.post(f"{url}/v1/infer", json=body, headers={"Idempotency-Key": key},
                      timeout=60)


def _one_round(tier: Any, pool: ThreadPoolExecutor, round_no: int) -> tuple[int, set[str]]:
    """Send every key of this round COPIES times at once; check each was computed once.
    Returns how many keys had a duplicate refused by a replica other than the one computing
    it, and the replicas seen."""
    keys = [f"rep-{round_no}-{i}" for i in range(KEYS_PER_ROUND)]
    texts = {key: f"report {key}: the election, the markets and the cup final" for key in keys}
    before = _model_requests(tier.app)
    jobs = [(key, pool.submit(_send, tier.url, key, texts[key]))
            for _ in range(COPIES) for key in keys]
    by_key: dict[str, list[httpx.Response]] = defaultdict(list)
    for key, job in jobs:
        by_key[key].append(job.result())
    crossed, replicas = 0, set()
    for key, responses in by_key.items():
        computed = [r for r in responses
                    if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
        assert len(computed) == 1, [(r.status_code, r.text[:200]) for r in responses]
        for r in responses:
            replicas.add(r.headers[REPLICA_HEADER])
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "idempotency_in_flight"
            else:
                assert r.status_code == 200, r.text
                assert r.json() == {**computed[0].json(), "escalation": None} or \
                    r.json() == computed[0].json()
        owner = computed[0].headers[REPLICA_HEADER]
        crossed += any(r.status_code == 409 and r.headers[REPLICA_HEADER] != owner
                       for r in responses)
    # Each key went through the model once, however many replicas saw it.
    assert _model_requests(tier.app) - before == KEYS_PER_ROUND
    return crossed, replicas


def test_one_key_sent_to_two_replicas_at_once_is_computed_once(replicated_cloud):
    crossed, replicas = 0, set()
    with ThreadPoolExecutor(KEYS_PER_ROUND * COPIES) as pool:
        for round_no in range(MAX_ROUNDS):
            got, seen = _one_round(replicated_cloud, pool, round_no)
            crossed, replicas = crossed + got, replicas | seen
            if crossed and len(replicas) == 2:
                break
    assert len(replicas) == 2, replicas
    assert crossed > 0  # a duplicate really met its twin at the other replica
    engine = sa.create_engine(replicated_cloud.outbox_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(results.c.id, results.c.computations)).all()
            left = conn.execute(sa.select(claims.c.id)).all()
    finally:
        engine.dispose()
    assert len(stored) == KEYS_PER_ROUND * (round_no + 1)
    assert {n for _, n in stored} == {1}  # no key stored twice
    assert left == []  # every claim ended with its stored answer


def test_readyz_names_each_replica(replicated_cloud):
    seen: dict[str, dict[str, Any]] = {}

    def both_answered() -> bool:
        response = httpx.get(f"{replicated_cloud.url}/readyz", timeout=10)
        body = response.json()
        assert body["replica"] == response.headers[REPLICA_HEADER]
        seen[body["replica"]] = body
        return len(seen) == 2

    # The proxy picks a replica per request: ask until both have answered.
    wait_for(both_answered, timeout_s=60, what="/readyz from both replicas")
    for body in seen.values():
        assert body["ready"] is True and set(body["drift"]) >= {"documents"}
