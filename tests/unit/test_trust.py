"""The trust controls without servers: token buckets and key decisions over an injected clock,
the callback address rules and signatures, the guarded connection (DNS rebinding), certificate
files and a refused certificate reload."""

from __future__ import annotations

import asyncio
import ipaddress
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from pydantic import ValidationError

import cascade.trust.callbacks as callbacks_module
from cascade.errors import InvalidInput
from cascade.trust.callbacks import (
    CallbackGuard,
    CallbackSettings,
    sign_body,
    verify_signature,
)
from cascade.trust.certs import SiteCerts, describe, issue_site
from cascade.trust.keys import (
    ClientAuthSettings,
    ClientKey,
    KeyGuard,
    TokenBucket,
    hash_key,
    presented_key,
    route_group,
)
from cascade.trust.tls import TierTls, TlsSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate_per_s=2.0, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token in half a second
    assert bucket.take(0.5) == 0.0
    assert bucket.take(100.0) == 0.0  # refilled, but only to 3
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


def test_key_guard_decides_in_order_and_counts() -> None:
    keys = {"a": "ck_a-secret", "off": "ck_off-secret"}
    clock = Clock()
    guard = KeyGuard(ClientAuthSettings(keys=(
        ClientKey(name="a", sha256=hash_key(keys["a"]), rate_per_s=1, burst=1, quota=2,
                  quota_period_s=100),
        ClientKey(name="off", sha256=hash_key(keys["off"]), disabled=True),
    ), protect=("api",)), clock=clock)
    assert guard.check("healthz", None) == (None, None)  # not protected
    assert guard.check("api", None)[1].code == "missing_api_key"  # type: ignore[union-attr]
    assert guard.check("api", "ck_wrong")[1].code == "invalid_api_key"  # type: ignore[union-attr]
    assert guard.check("api", keys["off"])[1].code == "api_key_disabled"  # type: ignore[union-attr]
    assert guard.check("api", keys["a"]) == ("a", None)
    name, limited = guard.check("api", keys["a"])
    assert (name, limited.code, limited.retry_after_s) == ("a", "rate_limited", 1)  # type: ignore[union-attr]
    clock.now += 1.0
    assert guard.check("api", keys["a"]) == ("a", None)
    clock.now += 1.0
    _, over = guard.check("api", keys["a"])
    assert (over.status, over.code, over.retry_after_s) == (429, "quota_exceeded", 48)  # type: ignore[union-attr]
    assert guard.accepted == {"a": 2}
    assert dict(guard.refused) == {"missing_api_key": 1, "invalid_api_key": 1,
                                   "api_key_disabled": 1, "rate_limited": 1, "quota_exceeded": 1}
    for refusal in (over,):
        assert keys["a"] not in refusal.message  # type: ignore[union-attr]


def test_config_holds_hashes_only_and_headers_carry_keys() -> None:
    with pytest.raises(ValidationError, match="never the key itself"):
        ClientKey(name="x", sha256="ck_the-key-itself")
    with pytest.raises(ValidationError, match="name must be unique"):
        ClientAuthSettings(keys=(ClientKey(name="x", sha256=hash_key("1")),
                                 ClientKey(name="x", sha256=hash_key("2"))))
    assert presented_key({b"authorization": b"Bearer ck_1"}) == "ck_1"
    assert presented_key({b"x-api-key": b"ck_2"}) == "ck_2"
    assert presented_key({b"authorization": b"Basic abc"}) is None
    assert [route_group(p) for p in ("/v1/infer", "/v1/results/x", "/metrics", "/openapi.json")] \
        == ["api", "api", "metrics", "docs"]


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.100.100.200", False), ("fd00:ec2::254", False),
    ("::1", False), ("fe80::1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::ffff:127.0.0.1", False),
])
def test_only_public_addresses_pass_by_default(address: str, allowed: bool) -> None:
    assert CallbackGuard(CallbackSettings()).address_allowed(ipaddress.ip_address(address)) \
        is allowed


def test_allow_cidrs_open_exactly_their_networks() -> None:
    guard = CallbackGuard(CallbackSettings(allow_cidrs=("10.20.0.0/16",)))
    assert guard.address_allowed(ipaddress.ip_address("10.20.3.4"))
    assert not guard.address_allowed(ipaddress.ip_address("10.21.3.4"))
    with pytest.raises(ValidationError, match="is not a network"):
        CallbackSettings(allow_cidrs=("10.0.0.0/33",))


def test_url_rules_scheme_host_and_literal_address() -> None:
    guard = CallbackGuard(CallbackSettings(hosts=("hooks.example.com", "*.corp.example")))
    assert guard.url_refusal("https://hooks.example.com/x") is None
    assert guard.url_refusal("https://a.b.corp.example/x") is None
    assert "not in this tier's callbacks.hosts" in (guard.url_refusal("https://evil.example/x")
                                                    or "")
    assert "scheme 'http'" in (guard.url_refusal("http://hooks.example.com/x") or "")
    with pytest.raises(InvalidInput) as refused:
        asyncio.run(CallbackGuard(CallbackSettings()).check_request("https://127.0.0.1/x"))
    assert refused.value.field == "callback_url"


def test_signatures_verify_only_the_same_body_key_and_recent_time() -> None:
    key, body = b"k" * 32, b'{"id": "r1", "status": "final"}'
    header = sign_body(key, body, 1_000_000)
    assert verify_signature(key, body, header, now=1_000_100)
    assert not verify_signature(key, body + b" ", header, now=1_000_100)
    assert not verify_signature(b"x" * 32, body, header, now=1_000_100)
    assert not verify_signature(key, body, header, now=1_000_000 + 301)  # a stale replay
    assert not verify_signature(key, body, "garbage", now=1_000_000)


class _Receiver:
    """A real HTTP server on 127.0.0.1 counting POSTs."""

    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.hits += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def _post(guard: CallbackGuard, url: str) -> int:
    async with httpx.AsyncClient(transport=guard.transport(), trust_env=False) as client:
        return (await client.post(url, content=b"{}")).status_code


def test_the_address_connected_to_is_the_one_checked() -> None:
    """A real local receiver; "localhost" really resolves to loopback (refused), unless its
    network is allowed."""
    receiver = _Receiver()
    try:
        url = f"http://localhost:{receiver.port}/cb"
        with pytest.raises(httpx.ConnectError, match="refused by policy"):
            asyncio.run(_post(CallbackGuard(CallbackSettings(schemes=("http",))), url))
        assert receiver.hits == 0
        allowed = CallbackGuard(CallbackSettings(schemes=("http",), allow_cidrs=("127.0.0.0/8",)))
        assert asyncio.run(_post(allowed, url)) == 200
        assert receiver.hits == 1
    finally:
        receiver.close()


def test_dns_rebinding_is_refused_at_send_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake resolver (a rebinding DNS server cannot run here): the name is public when the
    request is accepted and loopback when the callback is sent; the send is refused and never
    reaches the (real) receiver on 127.0.0.1."""
    receiver = _Receiver()
    answers = [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("127.0.0.1")]

    async def rebinding(host: str, port: int) -> list[Any]:
        return [answers.pop(0)]

    monkeypatch.setattr(callbacks_module, "_resolve", rebinding)
    guard = CallbackGuard(CallbackSettings(schemes=("http",)))
    url = f"http://rebind.example:{receiver.port}/cb"
    try:
        asyncio.run(guard.check_request(url))  # accepted: the name looked public then
        with pytest.raises(httpx.ConnectError, match=r"non-public address \(127\.0\.0\.1"):
            asyncio.run(_post(guard, url))
        assert receiver.hits == 0
    finally:
        receiver.close()


def test_certificate_files_are_private_and_name_the_tier(tmp_path: Path) -> None:
    site = SiteCerts(tmp_path / "certs")
    written = issue_site(site, ["edge-node"], names=["edge-node.site.lan", "10.0.4.2"], days=30)
    assert len(written) == 4 and site.has(["edge-node"])
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o600}
    info = describe(site.cert_file("edge-node"))
    assert info.subject == "CN=edge-node,O=cascade site"
    assert set(info.names) == {"localhost", "127.0.0.1", "::1", "edge-node",
                               "edge-node.site.lan", "10.0.4.2"}
    cert = x509.load_pem_x509_certificate(site.cert_file("edge-node").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert issue_site(site, ["edge-node"]) == []  # nothing missing: nothing written


def test_a_bad_new_certificate_keeps_the_old_one_live(tmp_path: Path) -> None:
    site = SiteCerts(tmp_path / "certs")
    issue_site(site, ["edge-node"])
    tls = TierTls(TlsSettings(cert_file=site.cert_file("edge-node"),
                              key_file=site.key_file("edge-node"), ca_file=site.ca_file))
    seen: list[object] = []
    tls.on_reload(seen.append)
    before = tls.client_context()
    assert tls.reload() is False  # unchanged files: nothing to do
    key = site.key_file("edge-node").read_bytes()
    issue_site(site, ["edge-node"], renew=True)
    site.key_file("edge-node").write_bytes(key)  # a certificate with a key not its own
    assert tls.reload() is False
    assert tls.client_context() is before and tls.reloads == {"rejected": 1}
    issue_site(site, ["edge-node"], renew=True)  # a consistent pair
    assert tls.reload() is True
    assert tls.client_context() is not before and seen == [tls.client_context()]
    assert tls.reloads == {"rejected": 1, "applied": 1}


async def test_sighup_reloads_the_certificates_too(tmp_path: Path) -> None:
    """The tier's one SIGHUP handler (the policy reloader's) also reloads TLS (a real signal
    to this process; the node is a stand-in whose policy came from elsewhere)."""
    import os
    import signal
    from types import SimpleNamespace

    from cascade.policy.reload import PolicyReloader

    site = SiteCerts(tmp_path / "certs")
    issue_site(site, ["edge-node"])
    tls = TierTls(TlsSettings(cert_file=site.cert_file("edge-node"),
                              key_file=site.key_file("edge-node"), ca_file=site.ca_file))
    node = SimpleNamespace(policy=SimpleNamespace(path="not-this-file"),
                           telemetry=SimpleNamespace(metrics=None))
    reloader = PolicyReloader(node, tmp_path / "policy.yaml")
    reloaded = asyncio.Event()
    await reloader.start(watch=False, also_on_sighup=lambda: tls.reload("SIGHUP")
                         and reloaded.set())
    try:
        issue_site(site, ["edge-node"], renew=True)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), 30)
        assert tls.reloads == {"applied": 1}
    finally:
        await reloader.stop()


def test_a_tls_tier_must_call_its_upstream_over_https(tmp_path: Path) -> None:
    from cascade.errors import ConfigError
    from cascade.tier.settings import load_node_settings

    site = SiteCerts(tmp_path / "certs")
    config = tmp_path / "node.yaml"
    config.write_text(
        f"tier: endpoint\ntasks: [vision]\nupstream_url: http://10.0.0.2:8102\n"
        f"tls: {{cert_file: {site.cert_file('endpoint')}, key_file: {site.key_file('endpoint')},"
        f" ca_file: {site.ca_file}}}\n")
    with pytest.raises(ConfigError, match="upstream_url http://10.0.0.2:8102 is plain http "
                                          "while this tier has tls: use https://"):
        load_node_settings(config)
    settings = load_node_settings(config, upstream_url="https://10.0.0.2:8102")
    assert settings.tls is not None and settings.tls.client_cert == "api"
