"""SIGKILL the endpoint at random moments while it queues and drains: nothing lost, nothing twice."""

from __future__ import annotations

import os
import random
import threading
import time

import httpx
import pytest

from tests.fault.conftest import post, wait_for

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("CASCADE_CRASH_ROUNDS", "10"))
CLIENTS = 6


def _burst(url: str, round_no: int, body: dict, acked: dict[str, str], stop: threading.Event) -> None:
    def client(worker: int) -> None:
        with httpx.Client() as c:
            for j in range(100_000):
                if stop.is_set():
                    return
                key = f"k{round_no}-{worker}-{j}"
                try:
                    r = post(c, url, body, key=key, timeout=5)
                except httpx.HTTPError:
                    return  # the server died under us: this request was never acknowledged
                if r.status_code == 200:
                    acked[key] = r.json()["status"]

    threads = [threading.Thread(target=client, args=(w,)) for w in range(CLIENTS)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(10)


def test_sigkill_at_random_moments_loses_nothing_and_sends_nothing_twice(tiers, proxy_to,
                                                                       hard_images):
    seed = int(os.environ.get("CASCADE_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, start=False,
                     outbox={"forward_concurrency": 8})
    body = {"task": "vision", "input": {"image": hard_images[0]}}
    acked: dict[str, str] = {}
    for round_no in range(ROUNDS):
        # Even rounds: uplink cut, the endpoint queues. Odd rounds: uplink up, the forwarder
        # drains earlier rounds while new work is escalated online.
        proxy.set(mode="reset" if round_no % 2 == 0 else "pass")
        endpoint.start()
        stop = threading.Event()
        burst = threading.Thread(target=_burst, args=(endpoint.url, round_no, body, acked, stop))
        burst.start()
        # Kill at a random moment once work is flowing (the first answer of this round), so a
        # slow machine still kills mid-burst rather than before it.
        wait_for(lambda: any(k.startswith(f"k{round_no}-") for k in list(acked)), timeout_s=30,
                 what=f"round {round_no}: a first answer")
        time.sleep(rng.uniform(0.0, 0.4))
        endpoint.kill()
        stop.set()
        burst.join(20)
        (check,) = endpoint.query("PRAGMA integrity_check")
        assert check == ("ok",), f"round {round_no} (seed {seed}): {check}"
        stored = {row[0] for row in endpoint.query("SELECT id FROM cascade_results")}
        lost = [k for k in acked if k not in stored]
        assert lost == [], f"round {round_no} (seed {seed}): acknowledged but not stored: {lost[:5]}"
        queued = {row[0] for row in endpoint.query("SELECT id FROM cascade_outbox")}
        missing = [k for k, status in acked.items() if status == "provisional" and k not in queued]
        assert missing == [], f"round {round_no} (seed {seed}): provisional but not queued"

    assert sum(s == "provisional" for s in acked.values()) > 0, f"seed {seed}: nothing queued"
    proxy.set(mode="pass")
    endpoint.start()
    wait_for(lambda: endpoint.query(
        "SELECT count(*) FROM cascade_outbox WHERE state IN ('queued','forwarding')") == [(0,)],
        timeout_s=60, what="the backlog drained")
    states = endpoint.states()
    provisional = [k for k, s in acked.items() if s == "provisional"]
    assert [k for k in provisional if states.get(k) != "done"] == [], f"seed {seed}: not delivered"
    computed = dict(upstream.query("SELECT id, computations FROM cascade_results"))
    assert [k for k in acked if k not in computed] == [], f"seed {seed}: never reached upstream"
    duplicates = {k: n for k, n in computed.items() if n != 1}
    assert duplicates == {}, f"seed {seed}: computed more than once upstream"
    assert endpoint.query("PRAGMA integrity_check") == [("ok",)]
    print(f"crash test: seed {seed}, {ROUNDS} kills, {len(acked)} acknowledged "
          f"({len(provisional)} provisional), lost 0, duplicates 0")
