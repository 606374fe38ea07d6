"""mTLS between real tier processes: a chain that talks TLS and names its caller, callers refused
(no certificate, another CA, expired, rotated away) and counted, certificates reloaded without a
restart, and no secret in logs or spans."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cascade.observability.export import read_span_records
from cascade.trust.certs import SiteCerts, issue_site, issue_tier_cert, write_private
from tests.fault.harness import Tier, metric, post, scrape, wait_for, write_policy

pytestmark = pytest.mark.integration
NODE_TLS = {"client_cert": "api"}  # the tier-to-tier API: client certificates required


def client_for(site: SiteCerts, tier: str | None = "endpoint", *,
               trust: SiteCerts | None = None) -> httpx.Client:
    """A fresh client (new connections) trusting ``trust``'s CA (default ``site``'s),
    presenting ``tier``'s certificate from ``site`` (None: none)."""
    context = ssl.create_default_context(cafile=str((trust or site).ca_file))
    if tier is not None:
        context.load_cert_chain(site.cert_file(tier), site.key_file(tier))
    return httpx.Client(verify=context, timeout=10)


def refusals(url: str, site: SiteCerts) -> dict[str, float]:
    """The edge-node's TLS refusal counters (its /metrics needs no client certificate)."""
    samples = scrape(url, verify=ssl.create_default_context(cafile=str(site.ca_file)))
    return {reason: metric(samples, "cascade_tls_refusals_total", tier="edge-node", reason=reason)
            for reason in ("no_certificate", "unknown_ca", "expired")}


def expired_cert(site: SiteCerts, out: SiteCerts, tier: str) -> None:
    """A certificate for ``tier`` from ``site``'s CA whose validity ended yesterday, in ``out``."""
    ca_cert = x509.load_pem_x509_certificate(site.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(site.ca_key_file.read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    cert, key = issue_tier_cert(ca_cert, ca_key, tier, (),  # type: ignore[arg-type]
                                not_before=now - dt.timedelta(days=30),
                                not_after=now - dt.timedelta(days=1))
    write_private(out.cert_file(tier), cert.public_bytes(serialization.Encoding.PEM))
    write_private(out.key_file(tier), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_private(out.ca_file, site.ca_file.read_bytes())


@pytest.fixture
def site(tmp_path: Path) -> SiteCerts:
    certs = SiteCerts(tmp_path / "certs")
    issue_site(certs)
    return certs


def test_chain_over_mtls_names_the_caller_on_the_server_span(
        tiers: Callable[..., Tier], site: SiteCerts, tmp_path: Path,
        hard_images: list[Any]) -> None:
    traces = tmp_path / "traces"
    node = tiers("edge-node", tls=site, trace_dir=str(traces), **NODE_TLS)
    endpoint = tiers("endpoint", upstream=node.url, tls=site, trace_dir=str(traces))
    assert node.url.startswith("https://") and endpoint.url.startswith("https://")
    with client_for(site, None) as client:  # tier 1 asks its clients for no certificate
        answer = post(client, endpoint.url, {"task": "vision", "input": {"image": hard_images[0]}})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["answered_by"], answer.json()["status"]) == ("edge-node", "final")
        ready = client.get(f"{node.url}/readyz").json()["security"]["tls"]
    assert (ready["mode"], ready["client_cert"]) == ("tls", "api")
    trace_id = answer.json()["trace_id"]

    def node_server_span() -> dict[str, Any] | None:
        if not (traces / "edge-node.jsonl").exists():
            return None
        records, _ = read_span_records(traces / "edge-node.jsonl")
        return next((r for r in records if r["trace_id"] == trace_id and r["kind"] == "SERVER"),
                    None)

    span = wait_for(node_server_span, 60, "the edge-node's SERVER span")
    assert span["attrs"]["tls.client.subject"] == "CN=endpoint,O=cascade site"
    assert span["attrs"]["url.scheme"] == "https"
    # Nothing secret in what the tiers wrote: no key material in logs or spans.
    written = node.log() + endpoint.log() + "".join(
        p.read_text() for p in traces.glob("*.jsonl"))
    for tier in ("endpoint", "edge-node"):
        key_body = site.key_file(tier).read_text().splitlines()[1]
        assert key_body not in written
    assert "PRIVATE KEY" not in written


def test_callers_without_a_good_certificate_are_refused_and_counted(
        tiers: Callable[..., Tier], site: SiteCerts, tmp_path: Path) -> None:
    node = tiers("edge-node", tls=site, **NODE_TLS)
    other = SiteCerts(tmp_path / "other-site")
    issue_site(other, ["endpoint"])
    expired = SiteCerts(tmp_path / "expired")
    expired_cert(site, expired, "endpoint")
    body = {"task": "documents", "input": {"text": "Shares rose after the rate cut"}}

    with client_for(site, None) as anonymous:  # no certificate: the API says 401, probes open
        refused = post(anonymous, node.url, body)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "client_certificate_required"
        assert anonymous.get(f"{node.url}/healthz").status_code == 200
    for wrong in (client_for(other, trust=site), client_for(expired, trust=site)):
        with wrong, pytest.raises(httpx.TransportError):  # the handshake fails
            post(wrong, node.url, body)
    with client_for(site) as endpoint:
        assert post(endpoint, node.url, body).status_code == 200
    assert refusals(node.url, site) == {"no_certificate": 1, "unknown_ca": 1, "expired": 1}


def test_an_upstream_whose_certificate_is_not_from_the_site_ca_is_refused(
        tiers: Callable[..., Tier], site: SiteCerts, tmp_path: Path,
        hard_images: list[Any]) -> None:
    impostor_site = SiteCerts(tmp_path / "impostor")
    issue_site(impostor_site, ["edge-node"])
    impostor = tiers("edge-node", tls=impostor_site, **NODE_TLS)
    endpoint = tiers("endpoint", upstream=impostor.url, tls=site)
    with client_for(site, None) as client:
        answer = post(client, endpoint.url, {"task": "vision",
                                             "input": {"image": hard_images[0]}}, key="imp-1")
    assert answer.status_code == 200, answer.text
    # Never answered by the impostor: the endpoint's own answer, the escalation kept.
    assert (answer.json()["answered_by"], answer.json()["status"]) == ("endpoint", "provisional")
    error = wait_for(lambda: (endpoint.query(
        "SELECT last_error FROM cascade_outbox WHERE id = 'imp-1'") or [(None,)])[0][0], 60,
        "the queued escalation's first failed delivery")
    assert "CERTIFICATE_VERIFY_FAILED" in error  # kept for when the real upstream is back


def test_rotation_reloads_without_restart_and_refuses_the_old_ca(
        tiers: Callable[..., Tier], site: SiteCerts, tmp_path: Path) -> None:
    node = tiers("edge-node", tls=site, **NODE_TLS, policy_path=write_policy(
        tmp_path / "answer-all.yaml", escalating=()))
    pid = node.pid
    old = SiteCerts(tmp_path / "old")  # what a client holding the old certificates has
    old.directory.mkdir()
    for name in ("ca.pem", "endpoint.pem", "endpoint.key"):
        write_private(old.directory / name, (site.directory / name).read_bytes())
    body = {"task": "documents", "input": {"text": "The striker scored twice in the cup final"}}

    issue_site(site, new_ca=True)  # a new CA, every tier certificate re-issued

    def reloaded() -> bool:
        with client_for(site, None) as probe:
            try:
                tls = probe.get(f"{node.url}/readyz").json()["security"]["tls"]
            except httpx.TransportError:  # still serving the old certificate
                return False
        return bool(tls["reloads"].get("applied"))

    wait_for(reloaded, 60, "the tier to load the rotated certificates")
    assert node.pid == pid  # no restart
    with client_for(old, trust=site) as stale, pytest.raises(httpx.TransportError):
        post(stale, node.url, body)  # a certificate of the old CA: refused
    with client_for(old, None) as trusts_old, pytest.raises(httpx.TransportError):
        trusts_old.get(f"{node.url}/healthz")  # the tier now shows the new CA's certificate
    with client_for(site) as fresh:
        assert post(fresh, node.url, body).status_code == 200
    assert refusals(node.url, site)["unknown_ca"] == 1
