"""One tier's trust controls together: TLS, client keys, callback policy; what ``/readyz`` and
``/metrics`` show about them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cascade.trust.callbacks import CallbackGuard, CallbackSettings
from cascade.trust.keys import ClientAuthSettings, KeyGuard
from cascade.trust.tls import REFUSAL_REASONS, TierTls, TlsSettings

log = logging.getLogger("cascade.trust")

PLAIN_WARNING = ("PLAIN HTTP: no tls configured, so any process that reaches this port can "
                 "call it and read its traffic; for local development only (`cascade certs "
                 "init`, then a tls: block; see docs/security.md)")

__all__ = ["PLAIN_WARNING", "TierTrust"]


@dataclass
class TierTrust:
    """The trust controls of one tier (each built from its node config block)."""

    tier: str
    tls: TierTls | None
    keys: KeyGuard
    callbacks: CallbackGuard

    @classmethod
    def from_settings(cls, tier: str, tls: TlsSettings | None, clients: ClientAuthSettings,
                      callbacks: CallbackSettings) -> TierTrust:
        """Load certificates and keys now (a bad file fails the tier at start) and say loudly
        what is off."""
        trust = cls(tier, TierTls(tls) if tls is not None else None, KeyGuard(clients),
                    CallbackGuard(callbacks))
        if trust.tls is None:
            log.warning("tier %s: %s", tier, PLAIN_WARNING)
        if trust.callbacks.signing_key is None:
            log.warning("tier %s: callbacks are sent unsigned (no callbacks.signing_key_file); "
                        "receivers cannot tell them from forgeries", tier)
        return trust

    def readiness(self) -> dict[str, Any]:
        """``/readyz`` ``security``: what is on, what was refused (never a key or a secret)."""
        tls = (self.tls.readiness() if self.tls is not None
               else {"mode": "plain", "warning": PLAIN_WARNING})
        return {
            "tls": tls,
            "clients": {"keys": len(self.keys.settings.keys),
                        "protect": sorted(self.keys.protected),
                        "refused": dict(self.keys.refused)},
            "callbacks": {"schemes": list(self.callbacks.settings.schemes),
                          "hosts": list(self.callbacks.settings.hosts),
                          "allow_cidrs": list(self.callbacks.settings.allow_cidrs),
                          "signed": self.callbacks.signing_key is not None},
        }

    def collector(self) -> Collector:
        """Counters read at scrape time (nothing is recorded per request for them)."""
        return _TrustCollector(self)


class _TrustCollector(Collector):
    def __init__(self, trust: TierTrust) -> None:
        self.trust = trust

    def collect(self) -> Iterator[CounterMetricFamily]:
        tier, tls, keys = self.trust.tier, self.trust.tls, self.trust.keys
        refused = CounterMetricFamily(
            "cascade_tls_refusals", "Callers refused for their TLS client certificate, by "
            "reason (no_certificate, unknown_ca, expired, not_yet_valid, bad_certificate, "
            "handshake_failed).", labels=["tier", "reason"])
        reloads = CounterMetricFamily(
            "cascade_tls_reloads", "Certificate reloads by outcome (applied, rejected).",
            labels=["tier", "outcome"])
        if tls is not None:
            for reason in REFUSAL_REASONS:
                refused.add_metric([tier, reason], tls.refusals.get(reason, 0))
            for outcome in ("applied", "rejected"):
                reloads.add_metric([tier, outcome], tls.reloads.get(outcome, 0))
        accepted = CounterMetricFamily(
            "cascade_client_requests", "Requests accepted on protected routes, by API key name.",
            labels=["tier", "key"])
        for name, count in sorted(keys.accepted.items()):
            accepted.add_metric([tier, name], count)
        denied = CounterMetricFamily(
            "cascade_client_refusals", "Requests refused by the API key check, by error code "
            "(missing_api_key, invalid_api_key, api_key_disabled, api_key_not_allowed, "
            "rate_limited, quota_exceeded).", labels=["tier", "code"])
        for code, count in sorted(keys.refused.items()):
            denied.add_metric([tier, code], count)
        yield from (refused, reloads, accepted, denied)
