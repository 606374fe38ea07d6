"""What a real tier reports about its outbox and itself: /metrics queue gauges, /v1/outbox and
/readyz against the rows in its database after a known sequence; /readyz's policy hash and drift
section against the policy file."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from tests.fault.harness import (
    default_policy_copy,
    metric,
    post,
    scrape,
    wait_for,
    write_policy,
)

pytestmark = pytest.mark.integration

QUEUED, POISON = 5, 2


def held_bytes_in_db(tier) -> int:
    ((size,),) = tier.query("SELECT coalesce(sum(size_bytes), 0) FROM cascade_outbox "
                            "WHERE state IN ('queued', 'forwarding', 'dead', 'expired')")
    return size


def timed_scrape(url: str, fresh: Callable[[dict], bool]) -> tuple[float, dict, float] | None:
    """(time before, samples, time after) of one scrape of ``url``, if ``fresh`` accepts it."""
    started = time.time()
    samples = scrape(url)
    return (started, samples, time.time()) if fresh(samples) else None


def test_queue_gauges_match_the_database_after_a_known_sequence(tiers, proxy_to, tmp_path,
                                                                hard_images):
    # The upstream serves vision only: a documents escalation is refused (422) and dead at once.
    upstream = tiers("edge-node", tasks={"vision": "edge-node"})
    proxy = proxy_to(upstream.url)
    # Plenty of attempts: the cut-off rows stay queued however long the test takes.
    policy = write_policy(tmp_path / "patient.yaml", max_attempts=1000)
    endpoint = tiers("endpoint", upstream=proxy.url, policy_path=policy)
    ep = {"tier": "endpoint"}
    with httpx.Client() as client:
        before = scrape(endpoint.url)
        assert (metric(before, "cascade_queue_depth", **ep),
                metric(before, "cascade_queue_oldest_age_seconds", **ep),
                metric(before, "cascade_queue_dead_letters", **ep),
                metric(before, "cascade_queue_held_bytes", **ep)) == (0, 0, 0, 0)

        for i in range(POISON):
            r = post(client, endpoint.url, {"task": "documents", "input": {"text": f"rates {i}"}},
                     key=f"poison-{i}")
            assert r.json()["status"] == "provisional"
        wait_for(lambda: [s for k, s in endpoint.states().items() if k.startswith("poison")]
                 == ["dead"] * POISON, timeout_s=30, what="the poison rows dead")

        proxy.set(mode="reset")  # the uplink is cut: these stay in the outbox
        for i in range(QUEUED):
            r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[i]}},
                     key=f"cut-{i}")
            assert r.json()["escalation"]["state"] == "queued"
            if i == 0:
                # The forwarder tries the first one twice before the others come: the oldest age
                # counts from when it was queued, not from its last attempt, and stands apart from
                # the newer rows' ages.
                wait_for(lambda: endpoint.query(
                    "SELECT attempts FROM cascade_outbox WHERE id = 'cut-0'")[0][0] >= 2,
                    timeout_s=30, what="two failed sends of cut-0")

        ((oldest_created,),) = endpoint.query(
            "SELECT min(created_at) FROM cascade_outbox WHERE state IN ('queued', 'forwarding')")
        held = held_bytes_in_db(endpoint)
        assert held > 0
        # A scrape reads the database within 1 s or keeps its previous values (all zero here):
        # wait for one that read it.
        scraped_from, cut, scraped_to = wait_for(lambda: timed_scrape(
            endpoint.url, lambda s: metric(s, "cascade_queue_dead_letters", **ep) == POISON),
            timeout_s=30, what="a scrape that read the outbox")
        assert metric(cut, "cascade_queue_depth", **ep) == QUEUED
        assert metric(cut, "cascade_queue_dead_letters", **ep) == POISON
        assert metric(cut, "cascade_queue_held_bytes", **ep) == held
        assert (metric(cut, "cascade_queue_rows", **ep, state="queued")
                + metric(cut, "cascade_queue_rows", **ep, state="forwarding")) == QUEUED
        assert metric(cut, "cascade_queue_rows", **ep, state="done") == 0
        assert metric(cut, "cascade_queue_events_total", **ep, event="enqueued") == QUEUED + POISON
        assert metric(cut, "cascade_queue_events_total", **ep, event="dead") == POISON
        # The age of the oldest live row at the moment of the scrape (the tier rounds to 1 ms).
        age = metric(cut, "cascade_queue_oldest_age_seconds", **ep)
        assert scraped_from - oldest_created - 0.001 <= age <= scraped_to - oldest_created + 0.001

        outbox = client.get(f"{endpoint.url}/v1/outbox").json()
        assert (outbox["depth"], outbox["dead"], outbox["held_rows"], outbox["held_bytes"]) == (
            QUEUED, POISON, QUEUED + POISON, held)
        live_rows = endpoint.query(
            "SELECT count(*) FROM cascade_outbox WHERE state IN ('queued', 'forwarding')")
        assert live_rows == [(QUEUED,)]
        assert client.get(f"{endpoint.url}/readyz").json()["queue_depth"] == QUEUED

        proxy.set(mode="pass")
        wait_for(lambda: client.get(f"{endpoint.url}/v1/outbox").json()["depth"] == 0,
                 timeout_s=30, what="the queue drained")
        _, drained, _ = wait_for(lambda: timed_scrape(
            endpoint.url, lambda s: metric(s, "cascade_queue_rows", **ep, state="done") == QUEUED),
            timeout_s=30, what="a scrape after the drain")
        assert metric(drained, "cascade_queue_depth", **ep) == 0
        assert metric(drained, "cascade_queue_oldest_age_seconds", **ep) == 0
        assert metric(drained, "cascade_queue_dead_letters", **ep) == POISON  # kept, replayable
        assert metric(drained, "cascade_queue_rows", **ep, state="done") == QUEUED
        assert metric(drained, "cascade_queue_events_total", **ep, event="delivered") == QUEUED
        assert metric(drained, "cascade_queue_held_bytes", **ep) == held_bytes_in_db(endpoint)
        ((dead_bytes,),) = endpoint.query(
            "SELECT sum(size_bytes) FROM cascade_outbox WHERE state = 'dead'")
        assert held_bytes_in_db(endpoint) == dead_bytes
        assert client.get(f"{endpoint.url}/readyz").json()["queue_depth"] == 0


def test_readyz_reports_the_policy_file_models_queue_and_drift_per_task(tiers, tmp_path,
                                                                        models_dir):
    from cascade.models.manifest import load_manifest

    policy = default_policy_copy(tmp_path / "default-copy.yaml")
    raw = policy.read_bytes()
    endpoint = tiers("endpoint", policy_path=policy)
    ready = httpx.get(f"{endpoint.url}/readyz").json()
    assert (ready["tier"], ready["ready"], ready["upstream"]) == ("endpoint", True, None)
    assert ready["policy"]["path"] == str(policy)
    assert ready["policy"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert ready["policy"]["version"] == hashlib.sha256(raw).hexdigest()[:12]
    assert ready["policy"]["name"] == "default"
    manifest = load_manifest(models_dir)
    assert ready["models"] == {task: manifest.model_name(task, "endpoint")
                               for task in ("vision", "documents")}
    assert ready["queue_depth"] == 0
    assert endpoint.query("SELECT count(*) FROM cascade_outbox") == [(0,)]

    spec = yaml.safe_load(raw)["tasks"]
    assert set(ready["drift"]) == {"vision", "documents"}
    for task, drift in ready["drift"].items():
        reference = spec[task]["tiers"]["endpoint"]["drift_reference"]
        assert drift["state"] == "warming_up" and drift["window"] == 0
        assert drift["reference_samples"] == sum(reference["counts"])
        assert drift["reference_escalation_rate"] == reference["escalation_rate"]
        assert drift["action"] == spec[task].get("drift", {}).get("action", "alert")
    assert ready["drift"]["documents"]["action"] == "tighten"  # as shipped
