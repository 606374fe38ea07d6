"""Callbacks that cannot be turned against the site: an allow-list checked when a request names
a ``callback_url`` and again on the address actually connected to, and signed bodies
(architecture §10, docs/security.md).

* **Where**: the URL's scheme must be in ``schemes``; its host must match ``hosts`` (exact
  names, ``*.example.com`` for subdomains; empty: any host); every address it resolves to must
  be public (``ipaddress.is_global``: not loopback, private, link-local, which includes cloud
  metadata services such as 169.254.169.254, CGNAT, multicast or reserved) unless inside one of
  ``allow_cidrs``. The check runs at request time (422 naming ``callback_url``) and at every
  send, on the address the socket then connects to (:class:`GuardedBackend`), so a name that
  re-resolves to an internal address later (DNS rebinding) is refused. Redirects are not
  followed and environment proxies are ignored.
* **Who**: with a ``signing_key_file``, each POST carries ``X-Cascade-Signature:
  t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>." + body)>`` (:func:`verify_signature` is
  what a receiver runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpcore
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cascade.errors import ConfigError, InvalidInput

SIGNATURE_HEADER = "X-Cascade-Signature"
RESOLVE_TIMEOUT_S = 2.0
"""Longest wait for a callback host's addresses (at request time: then left to the send)."""
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["SIGNATURE_HEADER", "CallbackGuard", "CallbackSettings", "GuardedBackend",
           "sign_body", "verify_signature"]


class CallbackSettings(BaseModel):
    """The ``callbacks:`` block of a node config: where this tier may POST final answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schemes: tuple[Literal["https", "http"], ...] = Field(
        ("https",), description="URL schemes allowed (http only for receivers on a trusted "
        "network).")
    hosts: tuple[str, ...] = Field(
        (), description="Host names allowed (exact, or *.example.com for its subdomains); "
        "empty: any host whose addresses pass the address rule.")
    allow_cidrs: tuple[str, ...] = Field(
        (), description="Non-public networks callbacks may reach anyway, e.g. 10.20.0.0/16 for "
        "an on-site receiver or 127.0.0.0/8 for a local one (refused otherwise: loopback, "
        "private, link-local and metadata addresses).")
    signing_key_file: Path | None = Field(
        None, description="A file holding the HMAC key that signs each callback body "
        "(X-Cascade-Signature); unset: callbacks are sent unsigned (logged at start).")

    @field_validator("allow_cidrs")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a network (e.g. 10.0.0.0/8, fd00::/8)") from None
        return value


def sign_body(key: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Cascade-Signature`` value of ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(key: bytes, body: bytes, header: str, *, tolerance_s: int = 300,
                     now: float | None = None) -> bool:
    """What a receiver runs: the signature matches the raw body and is recent (replays older
    than ``tolerance_s`` fail; a repeat inside it carries the same ``Idempotency-Key``)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign_body(key, body, timestamp).split(",v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class CallbackGuard:
    """The allow-list of one tier, its signing key, and the HTTP transport that enforces it."""

    def __init__(self, settings: CallbackSettings) -> None:
        self.settings = settings
        self.networks = [ipaddress.ip_network(c, strict=False) for c in settings.allow_cidrs]
        self.signing_key: bytes | None = None
        if settings.signing_key_file is not None:
            try:
                self.signing_key = settings.signing_key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"callbacks.signing_key_file: cannot read "
                                  f"{settings.signing_key_file}: {exc}", field="callbacks") from None
            if len(self.signing_key) < 16:
                raise ConfigError("callbacks.signing_key_file: the key must be at least 16 "
                                  "bytes", field="callbacks")

    def address_allowed(self, address: IPAddress) -> bool:
        """A public address, or one inside ``allow_cidrs``."""
        if any(address in net for net in self.networks):
            return True
        return address.is_global and not address.is_multicast

    def _host_allowed(self, host: str) -> bool:
        if not self.settings.hosts:
            return True
        for pattern in self.settings.hosts:
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
            if host == pattern.lower():
                return True
        return False

    def url_refusal(self, url: str) -> str | None:
        """Why ``url`` is refused without resolving it (scheme, host, a literal address)."""
        parts = urlsplit(url)
        if parts.scheme not in self.settings.schemes:
            return (f"scheme {parts.scheme or '(none)'!r} is not allowed; allowed: "
                    f"{', '.join(self.settings.schemes)}")
        host = (parts.hostname or "").lower()
        if not host:
            return "the URL has no host"
        if not self._host_allowed(host):
            return f"host {host!r} is not in this tier's callbacks.hosts"
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return None
        return self._address_refusal(host, [literal])

    def _address_refusal(self, host: str, addresses: Iterable[IPAddress]) -> str | None:
        refused = [str(a) for a in addresses if not self.address_allowed(a)]
        if not refused:
            return None
        return (f"{host} resolves to a non-public address ({', '.join(refused)}: loopback, "
                "private, link-local or metadata); list its network in callbacks.allow_cidrs "
                "to allow it")

    async def check_request(self, url: str) -> None:
        """422 naming ``callback_url`` when the policy refuses ``url`` now (its host resolved;
        a name that does not resolve now is left to the send-time check)."""
        why = self.url_refusal(url)
        if why is None:
            host = (urlsplit(url).hostname or "").lower()
            addresses = await _resolve(host, urlsplit(url).port or 443)
            why = self._address_refusal(host, addresses)
        if why is not None:
            raise InvalidInput(f"callback_url refused by this tier's callback policy: {why}",
                               field="callback_url")

    def headers(self, body: bytes) -> dict[str, str]:
        """The signature header of ``body`` (none without a signing key)."""
        if self.signing_key is None:
            return {}
        return {SIGNATURE_HEADER: sign_body(self.signing_key, body, int(time.time()))}

    def transport(self) -> httpx.AsyncHTTPTransport:
        """An httpx transport whose connections go only to addresses this guard allows."""
        transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False)
        # httpx takes no network backend; its pool does. Same pool settings, guarded connects.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=GuardedBackend(self))
        return transport


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [literal]
    try:
        # Bounded: an offline site's resolver may hang for many seconds on an outside name.
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        return []
    # An IPv6 scope id ("fe80::1%eth0") is not part of the address itself.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host itself and connects only to an address the guard allows (the very
    address checked: no second lookup a rebinding DNS server could answer differently)."""

    def __init__(self, guard: CallbackGuard) -> None:
        self.guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}")
        allowed = [a for a in addresses if self.guard.address_allowed(a)]
        if not allowed:
            raise httpcore.ConnectError(
                f"callback refused by policy: {self.guard._address_refusal(host, addresses)}")
        return await self._inner.connect_tcp(str(allowed[0]), port, timeout=timeout,
                                             local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("callbacks do not go to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
