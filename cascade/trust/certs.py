"""A site's certificate authority and one certificate per tier (``cascade certs init``).

Layout of a certificate directory (``var/certs`` under ``cascade up``)::

    ca.pem   ca.key            the site CA (the key only issues tier certificates: keep it offline
                               once they are issued, if you can)
    <tier>.pem  <tier>.key     one per tier: served to callers and presented to its upstream

Every tier certificate carries both TLS usages (server and client), SANs for ``127.0.0.1``,
``::1``, ``localhost``, the tier's name and any extra names given, and the tier's name as
common name (the caller identity a SERVER span shows). Keys are EC P-256; every file is written
0600 through a temporary file and a rename, so a tier reloading it never reads half a file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cascade.errors import ConfigError

ORGANIZATION = "cascade site"
DEFAULT_TIERS: tuple[str, ...] = ("endpoint", "edge-node", "edge-server", "cloud")
DEFAULT_CERT_DAYS = 397  # what public CAs may issue at most: rotation stays a habit
DEFAULT_CA_DAYS = 3650
LOCAL_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

__all__ = ["DEFAULT_TIERS", "CertInfo", "SiteCerts", "describe", "issue_site", "write_private"]


@dataclass(frozen=True)
class SiteCerts:
    """Where a site's CA and tier certificates live."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        """The CA certificate every tier trusts."""
        return self.directory / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        """The CA's private key (issues tier certificates)."""
        return self.directory / "ca.key"

    def cert_file(self, tier: str) -> Path:
        """The certificate a tier serves and presents upstream."""
        return self.directory / f"{tier}.pem"

    def key_file(self, tier: str) -> Path:
        """The private key of :meth:`cert_file`."""
        return self.directory / f"{tier}.key"

    def has(self, tiers: Iterable[str]) -> bool:
        """True when the CA and every tier's certificate and key exist."""
        files = [self.ca_file, *(f for t in tiers for f in (self.cert_file(t), self.key_file(t)))]
        return all(f.is_file() for f in files)


@dataclass(frozen=True)
class CertInfo:
    """What ``cascade certs show`` prints about one certificate (nothing secret)."""

    file: str
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    names: tuple[str, ...]


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only (0600), atomically (temp file, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o600)  # an existing temp file keeps its mode through O_CREAT
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # ordered, without duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_ca(days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{ORGANIZATION} CA {now:%Y-%m-%d %H:%M:%S}")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_tier_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, tier: str,
                    names: Sequence[str], *, not_before: dt.datetime, not_after: dt.datetime,
                    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``tier`` signed by the CA, valid for server and client TLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(tier)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_san([*LOCAL_NAMES, tier, *names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(site: SiteCerts) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(site.ca_file.read_bytes())
        key = serialization.load_pem_private_key(site.ca_key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{site.directory}: cannot read the site CA (ca.pem, ca.key): {exc}; "
                          "`cascade certs init --new-ca` makes a new one") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{site.ca_key_file}: not an EC private key")
    return cert, key


def issue_site(site: SiteCerts, tiers: Sequence[str] = DEFAULT_TIERS, *,
               names: Sequence[str] = (), days: int = DEFAULT_CERT_DAYS,
               ca_days: int = DEFAULT_CA_DAYS, new_ca: bool = False, renew: bool = False,
               now: dt.datetime | None = None) -> list[Path]:
    """Create what is missing: the CA (or a new one with ``new_ca``), then each tier's
    certificate and key (every one again with ``renew`` or ``new_ca``). Returns the files
    written. ``now``: issue as of that time (tests make expired certificates with it)."""
    if days < 1 or ca_days < days:
        raise ConfigError(f"validity: days must be >= 1 and ca_days >= days; got {days}, {ca_days}",
                          field="days")
    now = now or dt.datetime.now(dt.UTC)
    written: list[Path] = []
    if new_ca or not site.ca_file.is_file():
        ca_cert, ca_key = _new_ca(ca_days, now)
        write_private(site.ca_key_file, _key_pem(ca_key))
        write_private(site.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [site.ca_key_file, site.ca_file]
        renew = True
    else:
        ca_cert, ca_key = _load_ca(site)
    for tier in tiers:
        if not renew and site.cert_file(tier).is_file() and site.key_file(tier).is_file():
            continue
        cert, key = issue_tier_cert(ca_cert, ca_key, tier, names,
                                    not_before=now - dt.timedelta(minutes=5),
                                    not_after=now + dt.timedelta(days=days))
        # Key first: a reload between the two writes sees the old pair fail to match and
        # keeps serving the old one until the certificate lands (see cascade.trust.tls).
        write_private(site.key_file(tier), _key_pem(key))
        write_private(site.cert_file(tier), cert.public_bytes(serialization.Encoding.PEM))
        written += [site.key_file(tier), site.cert_file(tier)]
    return written


def describe(path: Path) -> CertInfo:
    """Subject, issuer, serial, validity and names of a PEM certificate file."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(str(n.value) for n in san)
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(file=str(path), subject=cert.subject.rfc4514_string(),
                    issuer=cert.issuer.rfc4514_string(), serial=f"{cert.serial_number:x}",
                    not_before=cert.not_valid_before_utc.isoformat(),
                    not_after=cert.not_valid_after_utc.isoformat(), names=names)
