"""Outage and lost responses between real tiers: provisional now, final later, exactly once."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cascade.outbox.config import OutboxSettings
from tests.fault.harness import LOOPBACK_CALLBACKS, post, wait_for, write_policy

pytestmark = pytest.mark.integration

N = 40


def test_outage_then_every_request_final_once_with_one_callback(tiers, proxy_to, callbacks,
                                                                hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, callbacks=LOOPBACK_CALLBACKS)
    bodies = [{"task": "vision", "input": {"image": img}} for img in hard_images[:N]]
    with httpx.Client() as client:
        online = [post(client, endpoint.url, b, key=f"online-{i}").json()
                  for i, b in enumerate(bodies)]
        assert {o["status"] for o in online} == {"final"}
        assert {o["answered_by"] for o in online} == {"edge-node"}

        proxy.set(mode="blackhole")  # the uplink is cut: packets vanish
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(
                lambda i: post(client, endpoint.url, {**bodies[i], "callback_url": callbacks.url},
                               key=f"out-{i}"), range(N)))
        assert [r.status_code for r in responses] == [200] * N
        answers = [r.json() for r in responses]
        assert {a["status"] for a in answers} == {"provisional"}
        assert {a["answered_by"] for a in answers} == {"endpoint"}
        assert {a["escalation"]["state"] for a in answers} == {"queued"}
        # Every escalation is held durably and none has reached the upstream. The forwarder keeps
        # trying through the cut, so a row it has claimed for a send (the breaker's half-open
        # probe, hanging in the blackhole) reads ``forwarding``: at most ``forward_concurrency``
        # of them, and none handed over (that would mean the upstream took it).
        held = {id_: (state, handed_over) for id_, state, handed_over in endpoint.query(
            "SELECT id, state, handed_over FROM cascade_outbox WHERE id LIKE 'out-%'")}
        assert set(held) == {f"out-{i}" for i in range(N)}
        assert {state for state, _ in held.values()} <= {"queued", "forwarding"}
        assert not any(handed_over for _, handed_over in held.values())
        in_flight = sum(state == "forwarding" for state, _ in held.values())
        assert in_flight <= OutboxSettings().forward_concurrency
        assert upstream.query("SELECT count(*) FROM cascade_results WHERE id LIKE 'out-%'") == [(0,)]
        for i in range(N):
            pending = client.get(f"{endpoint.url}/v1/results/out-{i}").json()
            assert pending["status"] == "provisional"
            assert pending["escalation"]["state"] in ("queued", "forwarding")
            assert pending["label"] == answers[i]["label"]

        proxy.set(mode="pass")  # the link is back
        wait_for(lambda: all(endpoint.states()[f"out-{i}"] == "done" for i in range(N)),
                 timeout_s=60, what="every escalation done")
        for i in range(N):
            final = client.get(f"{endpoint.url}/v1/results/out-{i}").json()
            assert final["escalation"]["state"] == "done"
            assert (final["status"], final["label"], final["answered_by"]) == (
                online[i]["status"], online[i]["label"], online[i]["answered_by"])
            assert [h["tier"] for h in final["hops"]] == ["endpoint", "edge-node"]

    wait_for(lambda: endpoint.query(
        "SELECT count(*) FROM cascade_callbacks WHERE state = 'delivered'") == [(N,)],
        timeout_s=30, what="every callback delivered")
    fired = Counter(key for key, _ in callbacks.received)
    assert fired == Counter({f"out-{i}": 1 for i in range(N)})
    assert {body["status"] for _, body in callbacks.received} == {"final"}
    computed = dict(upstream.query(
        "SELECT id, computations FROM cascade_results WHERE id LIKE 'out-%'"))
    assert computed == {f"out-{i}": 1 for i in range(N)}  # each key computed once upstream


def test_lost_response_is_not_computed_twice_upstream(tiers, proxy_to, hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, callbacks=LOOPBACK_CALLBACKS)
    body = {"task": "vision", "input": {"image": hard_images[0]}}
    with httpx.Client() as client:
        # Online: the upstream answers, the proxy drops that answer; the retry is a lookup.
        proxy.drop_responses(1)
        r = post(client, endpoint.url, body, key="lost-online")
        assert r.status_code == 200 and r.json()["status"] == "final"
        assert proxy.stats["dropped_responses"] == 1
        assert upstream.query("SELECT computations FROM cascade_results WHERE id = 'lost-online'") \
            == [(1,)]

        # Forwarder: queued while cut, the reply to its first send is lost after the upstream
        # computed it; the resend must find the stored answer.
        proxy.set(mode="reset")
        r = post(client, endpoint.url, {**body, "input": {"image": hard_images[1]}},
                 key="lost-queued")
        assert r.json()["status"] == "provisional"
        proxy.drop_responses(1)
        proxy.set(mode="pass")
        wait_for(lambda: endpoint.states().get("lost-queued") == "done", timeout_s=30,
                 what="the queued request delivered")
        assert proxy.stats["dropped_responses"] == 2
        assert upstream.query("SELECT computations FROM cascade_results WHERE id = 'lost-queued'") \
            == [(1,)]
        again = post(client, upstream.url, {**body, "input": {"image": hard_images[1]}},
                     key="lost-queued")
        assert again.headers.get("Idempotent-Replayed") == "true"


def test_outage_further_up_is_handed_over_and_polled_down(tiers, proxy_to, callbacks, tmp_path,
                                                          hard_images):
    """endpoint → edge-node ⇢ (cut) ⇢ edge-server: the edge-node queues, the endpoint answers
    with the edge-node's provisional answer, tracks it, and fires the callback once."""
    policy = write_policy(tmp_path / "two-escalate.yaml", escalating=("endpoint", "edge-node"))
    server = tiers("edge-server", policy_path=policy)
    proxy = proxy_to(server.url)
    node = tiers("edge-node", upstream=proxy.url, policy_path=policy)
    endpoint = tiers("endpoint", upstream=node.url, policy_path=policy,
                     callbacks=LOOPBACK_CALLBACKS)
    proxy.set(mode="reset")
    n = 5
    with httpx.Client() as client:
        answers = [post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[i]},
                                               "callback_url": callbacks.url}, key=f"up-{i}").json()
                   for i in range(n)]
        assert {a["status"] for a in answers} == {"provisional"}
        assert {a["answered_by"] for a in answers} == {"edge-node"}
        assert {a["escalation"]["state"] for a in answers} == {"forwarding"}  # handed over
        assert {a["escalation"]["upstream"]["held_by"] for a in answers} == {"edge-node"}
        assert all(node.states()[f"up-{i}"] in ("queued", "forwarding") for i in range(n))
        proxy.set(mode="pass")
        wait_for(lambda: all(endpoint.states()[f"up-{i}"] == "done" for i in range(n)),
                 timeout_s=60, what="the endpoint saw every final answer")
        for i in range(n):
            final = client.get(f"{endpoint.url}/v1/results/up-{i}").json()
            assert (final["status"], final["answered_by"]) == ("final", "edge-server")
            assert [h["tier"] for h in final["hops"]] == ["endpoint", "edge-node", "edge-server"]
    wait_for(lambda: endpoint.query(
        "SELECT count(*) FROM cascade_callbacks WHERE state = 'delivered'") == [(n,)],
        timeout_s=30, what="every callback delivered")
    assert Counter(k for k, _ in callbacks.received) == Counter({f"up-{i}": 1 for i in range(n)})
    assert node.query("SELECT count(*) FROM cascade_callbacks") == [(0,)]  # only hop 0 fires
    computed = dict(server.query("SELECT id, computations FROM cascade_results"))
    assert computed == {f"up-{i}": 1 for i in range(n)}


def test_live_requests_are_not_queued_behind_a_draining_backlog(tiers, proxy_to, hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, outbox={"forward_concurrency": 2})
    n = 60
    with httpx.Client() as client:
        proxy.set(mode="reset")
        for i in range(n):
            r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[i]}},
                     key=f"backlog-{i}")
            assert r.json()["status"] == "provisional"
        proxy.set(mode="pass", delay_ms=40)  # a slow uplink: the backlog takes seconds to drain
        wait_for(lambda: client.get(f"{endpoint.url}/v1/outbox").json()["delivered"] >= 1,
                 timeout_s=20, what="the drain started")
        for i in range(3):
            r = post(client, endpoint.url, {"task": "vision",
                                            "input": {"image": hard_images[n + i]}}, key=f"live-{i}")
            assert r.status_code == 200 and r.json()["status"] == "final"  # answered online...
            assert client.get(f"{endpoint.url}/v1/outbox").json()["depth"] > 0  # ...meanwhile
        proxy.set(delay_ms=0)
        wait_for(lambda: client.get(f"{endpoint.url}/v1/outbox").json()["depth"] == 0,
                 timeout_s=30, what="the backlog drained")
