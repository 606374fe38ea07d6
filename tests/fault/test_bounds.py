"""Bounds between real tiers: TTL → expired, poison and max attempts → dead, caps → 503
queue_full, full disk / read-only database → 503 storage_unavailable. Never a 500."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cascade.cli import app
from tests.fault.harness import post, wait_for, write_policy

pytestmark = pytest.mark.integration
cli = CliRunner()


def queue_cli(*args: str) -> str:
    result = cli.invoke(app, ["queue", *args])
    assert result.exit_code == 0, result.output
    return result.output


def escalation(client: httpx.Client, url: str, rid: str) -> dict:
    r = client.get(f"{url}/v1/results/{rid}")
    assert r.status_code == 200, r.text
    return r.json()["escalation"]


def test_ttl_expires_and_an_operator_replays(tiers, proxy_to, tmp_path, hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    policy = write_policy(tmp_path / "short-ttl.yaml", ttl_s=1.0)
    endpoint = tiers("endpoint", upstream=proxy.url, policy_path=policy)
    proxy.set(mode="reset")
    with httpx.Client() as client:
        for i in range(3):
            r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[i]}},
                     key=f"ttl-{i}")
            assert r.json()["status"] == "provisional"
        wait_for(lambda: all(escalation(client, endpoint.url, f"ttl-{i}")["state"] == "expired"
                             for i in range(3)), timeout_s=15, what="TTL expiry")
        assert "expired" in escalation(client, endpoint.url, "ttl-0")["last_error"]
        listing = queue_cli("ls", "--state", "expired", "-c", str(endpoint.config))
        assert all(f"ttl-{i}" in listing for i in range(3))
        assert client.get(f"{endpoint.url}/v1/outbox").json()["expired"] == 3
        proxy.set(mode="pass")
        # Replayed with an hour to live: with their own 1 s TTL again, the rows would have to
        # pass the breaker's probe, the proxy and the upstream within a second, and on a busy
        # machine they sometimes expired a second time instead.
        assert "replayed 3" in queue_cli("replay", "--expired", "--ttl", "1h",
                                         "-c", str(endpoint.config))
        wait_for(lambda: all(escalation(client, endpoint.url, f"ttl-{i}")["state"] == "done"
                             for i in range(3)), timeout_s=15, what="replayed rows delivered")


def test_poison_is_dead_at_once_with_the_upstream_error(tiers, hard_images):
    # A misconfigured chain: the upstream does not serve `documents`, so it answers 422.
    upstream = tiers("edge-node", tasks={"vision": "edge-node"})
    endpoint = tiers("endpoint", upstream=upstream.url)
    with httpx.Client() as client:
        r = post(client, endpoint.url, {"task": "documents", "input": {"text": "rates rose"}},
                 key="poison-1")
        assert r.status_code == 200 and r.json()["status"] == "provisional"
        esc = wait_for(lambda: (e := escalation(client, endpoint.url, "poison-1"))["state"] == "dead"
                       and e, timeout_s=15, what="the poison request dead")
        assert esc["attempts"] == 1
        assert "HTTP 422" in esc["last_error"] and "unknown_task" in esc["last_error"]
        shown = queue_cli("show", "poison-1", "-c", str(endpoint.config))
        assert '"state": "dead"' in shown and "unknown_task" in shown
        assert "replayed 1" in queue_cli("replay", "poison-1", "-c", str(endpoint.config))
        wait_for(lambda: escalation(client, endpoint.url, "poison-1")["state"] == "dead",
                 timeout_s=15, what="dead again after replay")


def test_max_attempts_then_dead_then_replayed_and_delivered(tiers, proxy_to, tmp_path,
                                                           hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    policy = write_policy(tmp_path / "two-attempts.yaml", max_attempts=2)
    # A breaker that never opens makes every forwarder send a real, failing attempt.
    endpoint = tiers("endpoint", upstream=proxy.url, policy_path=policy,
                     breaker_failure_threshold=1000)
    proxy.set(mode="reset")
    with httpx.Client() as client:
        r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[0]}},
                 key="tries-1")
        assert r.json()["status"] == "provisional"
        esc = wait_for(lambda: (e := escalation(client, endpoint.url, "tries-1"))["state"] == "dead"
                       and e, timeout_s=20, what="dead after max attempts")
        assert esc["attempts"] == 2 and "gave up after 2 attempts" in esc["last_error"]
        assert client.get(f"{endpoint.url}/v1/outbox").json()["dead"] == 1
        proxy.set(mode="pass")
        queue_cli("replay", "--dead", "-c", str(endpoint.config))
        wait_for(lambda: escalation(client, endpoint.url, "tries-1")["state"] == "done",
                 timeout_s=15, what="delivered after replay")


def test_row_cap_refuses_new_work_with_503_queue_full(tiers, proxy_to, hard_images):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, outbox={"max_rows": 5})
    proxy.set(mode="reset")
    with httpx.Client() as client:
        codes = []
        for i in range(8):
            r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[i]}},
                     key=f"cap-{i}")
            codes.append(r.status_code)
            if r.status_code == 503:
                error = r.json()["error"]
                assert error["code"] == "queue_full"
                assert "max_rows 5" in error["message"] and "nothing was queued" in error["message"]
        assert codes == [200] * 5 + [503] * 3
        stats = client.get(f"{endpoint.url}/v1/outbox").json()
        assert stats["refused_queue_full"] == 3 and stats["depth"] == 5
        assert client.get(f"{endpoint.url}/v1/results/cap-6").status_code == 404  # not kept
        proxy.set(mode="pass")
        wait_for(lambda: client.get(f"{endpoint.url}/v1/outbox").json()["depth"] == 0,
                 timeout_s=20, what="the queue drained")
        r = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[6]}},
                 key="cap-6")
        assert r.status_code == 200


FULL_BODY = {"task": "documents",
             "input": {"text": "The central bank raised interest rates again. " * 400}}
"""About 18 KB per request: a few dozen fill a small outbox or disk."""


def fill_until_full(client: httpx.Client, endpoint: Any, prefix: str, *, limit: int) -> list[str]:
    """Send ``FULL_BODY`` (uplink cut: each answer provisional and queued) until the tier says
    503 ``storage_unavailable`` (full, nothing queued); returns the keys it accepted, which must
    all still be held, with the tier still alive."""
    acked, refused = [], None
    for i in range(limit):
        r = post(client, endpoint.url, FULL_BODY, key=f"{prefix}-{i}")
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            refused = r.json()["error"]
            break
        assert r.json()["status"] == "provisional"
        acked.append(f"{prefix}-{i}")
    assert refused is not None, f"the outbox never filled in {limit} requests"
    assert refused["code"] == "storage_unavailable"
    assert "full" in refused["message"] and "nothing was queued" in refused["message"]
    assert acked and all(endpoint.states()[k] in ("queued", "forwarding") for k in acked)
    assert client.get(f"{endpoint.url}/healthz").status_code == 200
    return acked


def test_a_full_outbox_is_503_not_500_and_what_was_accepted_is_kept(tiers, proxy_to):
    # A bounded SQLite file (outbox.sqlite_max_bytes, PRAGMA max_page_count) fails its writes
    # exactly as a full disk does, and needs no root or mount: this runs everywhere.
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, outbox={"sqlite_max_bytes": 1024 * 1024})
    proxy.set(mode="reset")
    with httpx.Client() as client:
        acked = fill_until_full(client, endpoint, "full", limit=200)
        stats = client.get(f"{endpoint.url}/v1/outbox").json()
        assert stats["storage_errors"] >= 1 and "full" in stats["last_storage_error"]
        assert client.get(f"{endpoint.url}/v1/results/full-{len(acked)}").status_code == 404

        # The operator lifts the bound and restarts the tier: every accepted request is still
        # there and is delivered; new work is accepted again.
        endpoint.stop()
        config = yaml.safe_load(endpoint.config.read_text())
        del config["outbox"]["sqlite_max_bytes"]
        endpoint.config.write_text(yaml.safe_dump(config))
        endpoint.start()
        proxy.set(mode="pass")
        wait_for(lambda: all(escalation(client, endpoint.url, k)["state"] == "done" for k in acked),
                 timeout_s=60, what="every accepted request delivered")
        r = post(client, endpoint.url, FULL_BODY, key="after-full")
        assert r.status_code == 200, r.text


def test_full_disk_and_read_only_database_are_503_not_500(tiers, proxy_to, small_disk):
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    endpoint = tiers("endpoint", upstream=proxy.url, db_dir=small_disk)
    proxy.set(mode="reset")
    # Leave ~400 KiB free on the 2 MiB disk; the outbox fills the rest.
    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - 400 * 1024))
    with httpx.Client() as client:
        fill_until_full(client, endpoint, "disk", limit=100)
        filler.unlink()  # the operator frees space: the same process recovers
        r = post(client, endpoint.url, FULL_BODY, key="after-full")
        assert r.status_code == 200 and r.json()["status"] == "provisional"

        # Read-only: the tier dies and the filesystem comes back read-only (what a failing SD
        # card often does); the tier still starts, and what needs the outbox is refused as such.
        # SIGKILL leaves the WAL and its index behind, so SQLite can open the database read-only
        # and the tier holds read-only connections, which stay read-only after the remount: the
        # recovery below must not reuse them. (A clean stop removes both files, and then every
        # open fails instead; a stop that left them made this test fail now and then.)
        endpoint.kill()
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        try:
            endpoint.start()
            assert client.get(f"{endpoint.url}/healthz").status_code == 200
            r = post(client, endpoint.url, {"task": "documents", "input": {"text": "short"}},
                     key="ro-1")
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "storage_unavailable" and "read-only" in error["message"]
            stats = client.get(f"{endpoint.url}/v1/outbox").json()
            assert stats["storage_errors"] >= 1 and "read-only" in stats["last_storage_error"]
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        r = post(client, endpoint.url, {"task": "documents", "input": {"text": "short"}},
                 key="rw-1")
        assert r.status_code == 200 and r.json()["status"] == "provisional"  # recovered
