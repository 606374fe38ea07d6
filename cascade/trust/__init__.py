"""Trust controls of a tier (architecture §10, docs/security.md): mTLS between tiers
(:mod:`~cascade.trust.tls`, certificates from :mod:`~cascade.trust.certs`), API keys with rate
limits and quotas for tier 1's clients (:mod:`~cascade.trust.keys`), and callbacks that only go
where the site allows, signed (:mod:`~cascade.trust.callbacks`)."""

from cascade.trust.callbacks import CallbackGuard, CallbackSettings
from cascade.trust.keys import ClientAuthSettings, KeyGuard
from cascade.trust.tier import PLAIN_WARNING, TierTrust
from cascade.trust.tls import TierTls, TlsSettings

__all__ = ["PLAIN_WARNING", "CallbackGuard", "CallbackSettings", "ClientAuthSettings",
           "KeyGuard", "TierTls", "TierTrust", "TlsSettings"]
