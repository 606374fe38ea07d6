"""TLS of one tier: the context it serves with, the one its upstream client presents, and their
reload without a restart (architecture §10).

Serving: one *listening* context is given to the server once; its ``sni_callback`` (run on every
ClientHello, with or without a server name) swaps each new connection onto the freshest
*current* context, so a reload replaces the served certificate **and** the trusted CA for every
handshake after it, while connections already open carry on. A failed handshake is counted by
reason through the context's ``sslobject_class`` (the object the event loop drives), since the
server never sees such a connection otherwise.

Client certificates (``client_cert``):

    never   not requested (tier 1, called by products with API keys)
    api     requested and verified when sent; the tier's API (``/v1/...``) refuses a caller
            without one (401), probes, metrics and docs stay open (the default)
    always  the handshake itself requires one (nothing answers a caller without it)

A certificate that is sent is always verified against the site CA: a wrong CA, an expired or a
not-yet-valid certificate fails the handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cascade.errors import ConfigError

log = logging.getLogger("cascade.trust.tls")

ClientCertMode = Literal["never", "api", "always"]

# X509_V_ERR_* codes: what a failed verification means for an operator.
_VERIFY_REASONS: dict[int, str] = {
    10: "expired", 9: "not_yet_valid",
    2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",
}
REFUSAL_REASONS: tuple[str, ...] = (
    "no_certificate", "unknown_ca", "expired", "not_yet_valid", "bad_certificate",
    "handshake_failed",
)

__all__ = ["ClientCertMode", "TierTls", "TlsSettings", "peer_subject"]


class TlsSettings(BaseModel):
    """The ``tls:`` block of a node config (unset: plain HTTP, for local development only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path = Field(..., description="This tier's certificate (PEM): served to callers "
                            "and presented to its upstream.")
    key_file: Path = Field(..., description="The certificate's private key (PEM, mode 0600).")
    ca_file: Path = Field(..., description="The site CA (PEM): the only issuer trusted for "
                          "callers' and the upstream's certificates.")
    client_cert: ClientCertMode = Field(
        "api", description="never: not asked; api: required on /v1/... (401 without), probes "
        "open; always: required by the handshake itself.")


def refusal_reason(exc: ssl.SSLError) -> str:
    """The ``reason`` label of a failed server handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if exc.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no_certificate"
    return "handshake_failed"


def peer_subject(ssl_object: Any) -> str | None:
    """The verified client certificate's subject (RFC 4514, e.g. ``CN=endpoint,O=cascade
    site``), or None when the peer sent none."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    return str(x509.load_der_x509_certificate(der).subject.rfc4514_string())


def _fingerprint(paths: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class TierTls:
    """A tier's TLS material, loaded from its files and reloaded when they change.

    ``server_context()`` is what the HTTP server listens with; ``client_context()`` what the
    upstream client connects with (it re-reads it after each reload, see ``on_reload``).
    ``refusals`` counts refused callers by reason; ``reloads`` counts reloads by outcome.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.refusals: Counter[str] = Counter()
        self.reloads: Counter[str] = Counter()
        self._lock = threading.Lock()  # handshakes may run on any thread of the server
        self._listeners: list[Callable[[ssl.SSLContext], None]] = []
        self._server, self._client = self._build()
        self._fingerprint = _fingerprint(self.files)
        self._listening: ssl.SSLContext | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The certificate, key and CA files."""
        s = self.settings
        return (s.cert_file, s.key_file, s.ca_file)

    def _build(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        s = self.settings
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server.minimum_version = ssl.TLSVersion.TLSv1_2
            server.load_cert_chain(s.cert_file, s.key_file)
            server.verify_mode = {"never": ssl.CERT_NONE, "api": ssl.CERT_OPTIONAL,
                                  "always": ssl.CERT_REQUIRED}[s.client_cert]
            if s.client_cert != "never":
                server.load_verify_locations(cafile=s.ca_file)
            # Trusts the site CA only (not the system store): an upstream with any other
            # certificate is refused, as is one whose name is not in its certificate.
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.ca_file))
            client.minimum_version = ssl.TLSVersion.TLSv1_2
            client.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls: cannot load cert_file {s.cert_file}, key_file {s.key_file} or ca_file "
                f"{s.ca_file}: {exc} (`cascade certs init` makes them)", field="tls") from None
        return server, client

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with (one per process): every handshake moves to the current
        context, and a failed one is counted."""
        if self._listening is None:
            listening = self._build()[0]
            listening.sslobject_class = _counting_sslobject(self)
            listening.sni_callback = self._use_current
            self._listening = listening
        return self._listening

    def _use_current(self, ssl_object: Any, _server_name: str | None,
                     _ctx: ssl.SSLContext) -> None:
        with self._lock:
            current = self._server
        if ssl_object.context is not current:
            ssl_object.context = current

    def client_context(self) -> ssl.SSLContext:
        """The context the upstream client connects with (the current one)."""
        with self._lock:
            return self._client

    def on_reload(self, listener: Callable[[ssl.SSLContext], None]) -> None:
        """Call ``listener`` with the new client context after every successful reload."""
        self._listeners.append(listener)

    def reload(self, why: str = "files changed") -> bool:
        """Re-read the files; on success new handshakes use them. A bad or half-written set
        (a key that does not match its certificate) keeps the old one live and is logged."""
        try:
            fingerprint = _fingerprint(self.files)
            if fingerprint == self._fingerprint:
                return False
            server, client = self._build()
        except (OSError, ConfigError) as exc:
            self.reloads["rejected"] += 1
            log.error("tls reload (%s) refused, the previous certificates stay live: %s", why,
                      getattr(exc, "message", exc))
            return False
        with self._lock:
            self._server, self._client, self._fingerprint = server, client, fingerprint
        self.reloads["applied"] += 1
        log.warning("tls reloaded (%s): new handshakes use %s", why, self.settings.cert_file)
        for listener in self._listeners:
            listener(client)
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when a file changes (watchfiles follows their directories, so rename-over
        and symlink swaps count), until ``stop`` is set."""
        from watchfiles import awatch

        directories = {str(p.resolve().parent) for p in self.files}
        names = {p.name for p in self.files}
        async for _ in awatch(*directories, stop_event=stop, debounce=100,
                              watch_filter=lambda _c, path: Path(path).name in names):
            self.reload("files changed")

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` shows under ``security.tls``."""
        return {"mode": "tls", "client_cert": self.settings.client_cert,
                "cert_file": str(self.settings.cert_file), "refused": dict(self.refusals),
                "reloads": dict(self.reloads)}


def _counting_sslobject(tls: TierTls) -> type[ssl.SSLObject]:
    class CountingSSLObject(ssl.SSLObject):
        """Counts a failed server handshake by reason (then fails it as before)."""

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # the handshake is in progress, not failed
            except ssl.SSLError as exc:
                tls.refusals[refusal_reason(exc)] += 1
                raise

    return CountingSSLObject
