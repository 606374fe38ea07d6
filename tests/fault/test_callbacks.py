"""Callbacks to real receivers: one that answers 5xx for a while (retried, then delivered once),
one that cannot be reached (``failed`` after its attempts), and an operator re-arming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from tests.fault.harness import (
    LOOPBACK_CALLBACKS,
    CallbackReceiver,
    Tier,
    free_port,
    post,
    wait_for,
)

pytestmark = pytest.mark.integration


def answered_offline_then_final(tiers: Callable[..., Tier], proxy_to: Callable[..., Any],
                                image: list[list[float]], key: str, callback_url: str,
                                **endpoint_knobs: Any) -> Tier:
    """An escalation queued while the uplink is cut, with ``callback_url``; delivered once the
    link is back (so its callback is armed). Returns the endpoint."""
    upstream = tiers("edge-node")
    proxy = proxy_to(upstream.url)
    # The receiver listens on 127.0.0.1: loopback must be allowed explicitly.
    endpoint = tiers("endpoint", upstream=proxy.url,
                     **{"callbacks": LOOPBACK_CALLBACKS, **endpoint_knobs})
    proxy.set(mode="reset")
    with httpx.Client() as client:
        r = post(client, endpoint.url, {"task": "vision", "input": {"image": image},
                                        "callback_url": callback_url}, key=key)
    assert r.status_code == 200 and r.json()["status"] == "provisional", r.text
    proxy.set(mode="pass")
    wait_for(lambda: endpoint.states().get(key) == "done", timeout_s=30,
             what="the escalation delivered")
    return endpoint


def callback_row(endpoint: Tier, key: str) -> tuple[Any, ...] | None:
    rows = endpoint.query("SELECT state, attempts, last_error FROM cascade_callbacks WHERE id = ?",
                          key)
    return rows[0] if rows else None


def test_a_receiver_failing_for_a_while_gets_the_answer_once_after_retries(tiers, proxy_to,
                                                                          hard_images):
    receiver = CallbackReceiver(fail_first=3, fail_status=503)
    try:
        endpoint = answered_offline_then_final(tiers, proxy_to, hard_images[0], "cb-retry",
                                               receiver.url)
        wait_for(lambda: (callback_row(endpoint, "cb-retry") or ("",))[0] == "delivered",
                 timeout_s=30, what="the callback delivered")
        assert callback_row(endpoint, "cb-retry") == ("delivered", 4, None)
        # Three 503s, each retried (the attempt number in the header), then one 200.
        assert receiver.attempts == [("cb-retry", 1, 503), ("cb-retry", 2, 503),
                                     ("cb-retry", 3, 503), ("cb-retry", 4, 200)]
        ((key, body),) = receiver.received
        final = httpx.get(f"{endpoint.url}/v1/results/cb-retry").json()
        assert key == "cb-retry"
        assert (body["id"], body["status"], body["answered_by"]) == ("cb-retry", "final",
                                                                      "edge-node")
        assert body["escalation"]["state"] == "done"
        assert body["label"] == final["label"]
        assert final["callback"]["state"] == "delivered" and final["callback"]["attempts"] == 4
        stats = httpx.get(f"{endpoint.url}/v1/outbox").json()
        assert (stats["callbacks_delivered"], stats["callbacks_failed"]) == (1, 0)
    finally:
        receiver.close()


def test_an_unreachable_receiver_fails_then_an_operator_rearms_it(tiers, proxy_to, hard_images):
    port = free_port()  # nothing listens there: every POST is refused
    url = f"http://127.0.0.1:{port}/callback"
    endpoint = answered_offline_then_final(tiers, proxy_to, hard_images[0], "cb-lost", url,
                                           outbox={"callback_max_attempts": 3})
    wait_for(lambda: (callback_row(endpoint, "cb-lost") or ("",))[0] == "failed",
             timeout_s=30, what="the callback failed for good")
    state, attempts, last_error = callback_row(endpoint, "cb-lost")
    assert (state, attempts) == ("failed", 3)
    assert last_error.startswith(f"gave up after 3 attempts; last error: ConnectError posting "
                                 f"to {url}")
    shown = httpx.get(f"{endpoint.url}/v1/results/cb-lost").json()
    assert shown["callback"]["state"] == "failed" and shown["escalation"]["state"] == "done"
    assert httpx.get(f"{endpoint.url}/v1/outbox").json()["callbacks_failed"] == 1

    receiver = CallbackReceiver(port=port)  # the receiver is back
    try:
        cli = CliRunner()
        replay = cli.invoke(app, ["queue", "replay", "cb-lost", "-c", str(endpoint.config)])
        assert replay.exit_code == 0, replay.output
        assert "replayed 1 escalation(s)" in replay.output
        wait_for(lambda: (callback_row(endpoint, "cb-lost") or ("",))[0] == "delivered",
                 timeout_s=30, what="the re-armed callback delivered")
        assert callback_row(endpoint, "cb-lost") == ("delivered", 1, None)  # a fresh budget
        assert receiver.attempts == [("cb-lost", 1, 200)]
        assert [(k, b["status"]) for k, b in receiver.received] == [("cb-lost", "final")]
        # A delivered callback is not re-armed (nothing to replay).
        again = cli.invoke(app, ["queue", "replay", "cb-lost", "-c", str(endpoint.config)])
        assert again.exit_code == 1 and "is not dead or expired" in again.output
        stats = httpx.get(f"{endpoint.url}/v1/outbox").json()
        assert (stats["callbacks_delivered"], stats["callbacks_failed"]) == (1, 1)
    finally:
        receiver.close()
