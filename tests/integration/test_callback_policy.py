"""The callback policy on real tiers: URLs refused at request time (422 naming callback_url),
a signed callback a receiver can verify, and a redirecting receiver not followed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.trust.callbacks import SIGNATURE_HEADER, verify_signature
from tests.fault.harness import CallbackReceiver, Tier, wait_for
from tests.fault.test_callbacks import answered_offline_then_final, callback_row

pytestmark = pytest.mark.integration
DOCS = {"task": "documents", "input": {"text": "Shares rose after the central bank cut rates"}}


def refusal(url: str, callback_url: str) -> tuple[int, str | None, str]:
    r = httpx.post(f"{url}/v1/infer", json={**DOCS, "callback_url": callback_url}, timeout=10)
    error = r.json().get("error", {}) if r.status_code != 200 else {}
    return r.status_code, error.get("field"), error.get("message", "")


def test_the_default_policy_refuses_internal_addresses_at_request_time(
        tiers: Callable[..., Tier]) -> None:
    endpoint = tiers("endpoint")  # the default callbacks block: https, public addresses only
    for url, why in [
        ("http://203.0.113.9/cb", "scheme 'http' is not allowed"),
        ("https://127.0.0.1:9000/cb", "non-public address (127.0.0.1"),
        ("https://localhost:9000/cb", "localhost resolves to a non-public address"),
        ("https://169.254.169.254/latest/meta-data/", "non-public address (169.254.169.254"),
        ("https://10.1.2.3/cb", "non-public address (10.1.2.3"),
        ("https://[::1]/cb", "non-public address (::1"),
        ("https://[fd00:ec2::254]/cb", "non-public address (fd00:ec2::254"),
    ]:
        status, field, message = refusal(endpoint.url, url)
        assert (status, field) == (422, "callback_url"), (url, message)
        assert why in message, (url, message)
    # A public address is accepted (its delivery is tried later, at send time, checked again).
    assert refusal(endpoint.url, "https://93.184.215.14/cb")[0] == 200
    assert httpx.get(f"{endpoint.url}/readyz").json()["security"]["callbacks"] == {
        "schemes": ["https"], "hosts": [], "allow_cidrs": [], "signed": False}


def test_an_allowed_receiver_gets_a_signed_body_it_can_verify(
        tiers: Callable[..., Tier], proxy_to: Callable[..., Any], tmp_path: Path,
        hard_images: list[Any]) -> None:
    secret = tmp_path / "callback-signing.key"
    secret.write_text("f" * 64)
    policy = {"schemes": ["http"], "hosts": ["127.0.0.1"], "allow_cidrs": ["127.0.0.0/8"],
              "signing_key_file": str(secret)}
    receiver = CallbackReceiver()
    try:
        endpoint = answered_offline_then_final(tiers, proxy_to, hard_images[0], "signed-1",
                                               receiver.url, callbacks=policy)
        # The host allow-list: another name for the same address is refused.
        status, field, message = refusal(endpoint.url, receiver.url.replace("127.0.0.1",
                                                                            "localhost"))
        assert (status, field) == (422, "callback_url")
        assert "host 'localhost' is not in this tier's callbacks.hosts" in message
        wait_for(lambda: receiver.received, 30, "the callback")
        ((headers, body),) = receiver.raw
        signature = headers[SIGNATURE_HEADER]
        assert verify_signature(secret.read_bytes(), body, signature)
        assert not verify_signature(secret.read_bytes(), body.replace(b"final", b"FINAL"),
                                    signature)
        assert not verify_signature(b"another key of 16+ bytes", body, signature)
        assert httpx.get(f"{endpoint.url}/readyz").json()["security"]["callbacks"]["signed"]
        assert secret.read_text() not in endpoint.log()
    finally:
        receiver.close()


def test_a_redirecting_receiver_is_not_followed(tiers: Callable[..., Tier],
                                                proxy_to: Callable[..., Any],
                                                hard_images: list[Any]) -> None:
    target = CallbackReceiver()
    redirecting = CallbackReceiver(fail_first=10**6, fail_status=307,
                                   redirect_to=target.url)
    try:
        endpoint = answered_offline_then_final(
            tiers, proxy_to, hard_images[0], "redirect-1", redirecting.url,
            outbox={"callback_max_attempts": 2},
            callbacks={"schemes": ["http"], "allow_cidrs": ["127.0.0.0/8"]})
        wait_for(lambda: (callback_row(endpoint, "redirect-1") or ("",))[0] == "failed",
                 timeout_s=30, what="the callback failed for good")
        assert [status for _, _, status in redirecting.attempts] == [307, 307]
        assert target.attempts == []  # the Location was never visited
        assert "HTTP 307" in callback_row(endpoint, "redirect-1")[2]
    finally:
        target.close()
        redirecting.close()
