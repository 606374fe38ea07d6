"""Ed25519 keys for model bundles (``cryptography``): make a key pair, load keys, sign, verify.

A key is named by its id: the first 16 hex digits of the sha256 of its 32 raw public bytes. A
bundle's signature names the id of the key that made it, so a tier that trusts several keys
(e.g. during a key rotation) knows which one to check, and an untrusted one is named in the
refusal. Private keys are written PKCS#8 PEM, readable by their owner only (0600); public keys
SubjectPublicKeyInfo PEM (what a tier's ``bundles.trusted_keys`` lists).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cascade.errors import BundleRejected, ConfigError

__all__ = ["generate_keypair", "key_id", "load_private_key", "load_public_keys", "sign",
           "verify"]


def key_id(public: Ed25519PublicKey) -> str:
    """The key's id: 16 hex digits of the sha256 of its raw public bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> str:
    """Write a new key pair (private file mode 0600, created so, never widened) and return its
    id. Refuses to replace an existing private key unless ``overwrite``."""
    if private_path.exists() and not overwrite:
        raise ConfigError(f"{private_path} exists: refusing to replace a signing key "
                          "(pass --force to do so; bundles it signed stay valid only where its "
                          "public key is still trusted)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = private.public_key()
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(public)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The ed25519 private key in ``path``; :class:`ConfigError` names what is wrong."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the signing key ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}; bundles are signed with ed25519 "
                          "keys (`cascade models keygen`)")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by id; :class:`ConfigError` names the file that is not one."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"bundles.trusted_keys: {path}: cannot read ({exc.strerror})"
                              ) from None
        except ValueError as exc:
            raise ConfigError(f"bundles.trusted_keys: {path}: not a PEM public key ({exc})"
                              ) from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"bundles.trusted_keys: {path}: a {type(key).__name__}; only "
                              "ed25519 keys are trusted")
        keys[key_id(key)] = key
    return keys


def sign(private: Ed25519PrivateKey, message: bytes) -> tuple[str, bytes]:
    """(key id, signature) of ``message``."""
    return key_id(private.public_key()), private.sign(message)


def verify(keys: dict[str, Ed25519PublicKey], signer: str, signature: bytes,
           message: bytes, *, what: str) -> None:
    """Raise :class:`BundleRejected` unless a trusted key ``signer`` signed ``message``."""
    if not keys:
        raise BundleRejected(f"{what}: this tier trusts no signing key; list the public key "
                             "files in the node config's bundles.trusted_keys",
                             code="bundle_untrusted_key", field="bundles.trusted_keys")
    key = keys.get(signer)
    if key is None:
        raise BundleRejected(f"{what}: signed by key {signer}, which this tier does not trust "
                             f"(trusted: {', '.join(sorted(keys))})", code="bundle_untrusted_key")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise BundleRejected(f"{what}: the signature does not match its hash list (key "
                             f"{signer}): the bundle was modified after it was signed",
                             code="bundle_bad_signature") from None
