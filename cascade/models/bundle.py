"""Signed model bundles: one file that carries one tier's model of one task to a tier in the field.

A bundle is an uncompressed tar whose members are, in this order::

    SIGNATURE      {"algorithm": "ed25519", "key_id", "signature": base64} over HASHES' bytes
    HASHES         "<sha256>  <member>" per line, one per member below, sorted by name
    bundle.json    :class:`BundleMeta`: task, tier, version, the manifest entry, the task's
                   classes and input, the probe set's file and size
    model.<ext>    the deployed model file (its sha256 is also the manifest entry's)
    probe.npz | probe.json   a small labelled probe set from the task's held-out test split

:func:`read_bundle` trusts nothing until the signature over HASHES verifies with a trusted key,
then checks every member against HASHES (none missing, none extra), then parses bundle.json.
Each refusal is a :class:`BundleRejected` whose ``code`` says which check failed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade.contract.input_spec import InputSpec
from cascade.errors import BundleRejected, ModelError
from cascade.models.manifest import TierEntry, load_manifest, load_split
from cascade.models.signing import sign, verify

__all__ = ["BUNDLE_SUFFIX", "BundleMeta", "OpenedBundle", "pack_bundle", "peek_bundle",
           "read_bundle"]

BUNDLE_SUFFIX = ".bundle"
SIGNATURE, HASHES, META = "SIGNATURE", "HASHES", "bundle.json"
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BUNDLE_BYTES = 1 << 30  # a classifier bundle is KBs to MBs; refuse to read a runaway file
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class BundleMeta(BaseModel):
    """``bundle.json``: what the bundle holds and what its model measured when it was built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    task: str
    tier: str = Field(description="the ladder tier whose model this is (a node's tasks: value)")
    version: str = Field(pattern=VERSION.pattern)
    created_at: datetime
    model_file: str = Field(description="the member holding the model file")
    entry: TierEntry = Field(description="the manifest entry of the model (accuracy, latency)")
    classes: tuple[str, ...]
    input_kind: str
    input: InputSpec | None = None
    probe_file: str
    probe_size: int = Field(ge=1)

    @property
    def file_name(self) -> str:
        """The bundle's file name: ``<task>--<tier>--<version>.bundle``."""
        return bundle_file_name(self.task, self.tier, self.version)


def bundle_file_name(task: str, tier: str, version: str) -> str:
    """How bundles are named in directories and URLs."""
    return f"{task}--{tier}--{version}{BUNDLE_SUFFIX}"


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle: its metadata, its members' bytes and who signed it."""

    meta: BundleMeta
    members: dict[str, bytes]
    signer: str

    @property
    def model_bytes(self) -> bytes:
        """The model file's bytes (already checked against HASHES and the manifest entry)."""
        return self.members[self.meta.model_file]

    def probe(self) -> tuple[Any, list[str]]:
        """The probe set as runners take it: (array [N, ...] or list of texts, class names)."""
        return decode_probe(self.meta.probe_file, self.members[self.meta.probe_file])


def pack_bundle(models_dir: Path, task: str, tier: str, *, key: Ed25519PrivateKey, out: Path,
                version: str | None = None, probe_size: int = 200, seed: int = 0) -> Path:
    """Write the bundle of ``task``'s model at ``tier`` from a built models directory into
    ``out`` (a directory: named by :func:`bundle_file_name`; else the file itself)."""
    manifest = load_manifest(models_dir)
    task_entry = manifest.task(task)
    entry = manifest.tier(task, tier)
    if not isinstance(entry, TierEntry) or task_entry.generative:
        raise ModelError(f"{task}/{tier}: only classifier models travel as bundles", field="task")
    model = manifest.model_path(task, tier).read_bytes()
    if hashlib.sha256(model).hexdigest() != entry.sha256:
        raise ModelError(f"{task}/{tier}: the model file does not match its manifest sha256; "
                         "rebuild before packing")
    version = version or (f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{entry.sha256[:8]}")
    if not VERSION.match(version):
        raise ModelError(f"version {version!r}: use 1-64 letters, digits and ._- ", field="version")
    inputs, labels = load_split(models_dir, task, "test")
    rows = np.random.default_rng(seed).permutation(len(labels))[:probe_size]
    probe_name, probe_bytes = encode_probe(inputs, labels, rows)
    model_name = "model" + Path(entry.file).suffix
    meta = BundleMeta(task=task, tier=tier, version=version, created_at=datetime.now(UTC),
                      model_file=model_name, entry=entry, classes=task_entry.classes,
                      input_kind=task_entry.input_kind, input=task_entry.input,
                      probe_file=probe_name, probe_size=len(rows))
    members = {META: meta.model_dump_json(indent=2).encode(), model_name: model,
               probe_name: probe_bytes}
    hashes = "".join(f"{hashlib.sha256(members[name]).hexdigest()}  {name}\n"
                     for name in sorted(members)).encode()
    signer, signature = sign(key, hashes)
    signed = json.dumps({"algorithm": "ed25519", "key_id": signer,
                         "signature": base64.b64encode(signature).decode()}).encode()
    path = out / meta.file_name if out.is_dir() else out
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((SIGNATURE, signed), (HASHES, hashes), *members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(meta.created_at.timestamp()), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # a directory a tier pulls from never shows a half-written bundle
    return path


def encode_probe(inputs: Any, labels: list[str], rows: Any) -> tuple[str, bytes]:
    """The probe member: ``probe.json`` (texts) or ``probe.npz`` (arrays ``x``, ``y``)."""
    chosen = [labels[i] for i in rows]
    if isinstance(inputs, list):
        texts = [inputs[i] for i in rows]
        return "probe.json", json.dumps({"texts": texts, "labels": chosen}).encode()
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ascontiguousarray(inputs[rows]), y=np.asarray(chosen, dtype=str))
    return "probe.npz", buffer.getvalue()


def decode_probe(name: str, data: bytes) -> tuple[Any, list[str]]:
    """Inverse of :func:`encode_probe`."""
    if name.endswith(".json"):
        payload = json.loads(data)
        return list(payload["texts"]), [str(v) for v in payload["labels"]]
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        x = arrays["x"]
        if x.dtype.kind == "f":
            x = x.astype(np.float32, copy=False)
        return x, [str(v) for v in arrays["y"]]


def _members(data: bytes, what: str) -> dict[str, bytes]:
    """Every regular member of the tar in ``data``; refuses links, folders, odd names."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile() or not _MEMBER.match(info.name) or info.name in members:
                    raise BundleRejected(f"{what}: member {info.name!r} is not allowed (plain "
                                         "files with simple names only)", code="bundle_invalid")
                handle = tar.extractfile(info)
                assert handle is not None  # a regular file
                members[info.name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleRejected(f"{what}: not a complete bundle (a tar archive): {exc}; the file "
                             f"is {len(data)} bytes, truncated or not a bundle",
                             code="bundle_truncated") from None
    return members


def read_bundle(source: Path | bytes, keys: dict[str, Ed25519PublicKey], *,
                what: str | None = None) -> OpenedBundle:
    """Verify a bundle (signature by a trusted key, then every member's sha256) and parse it."""
    what = what or (str(source) if isinstance(source, Path) else "bundle")
    data = source.read_bytes() if isinstance(source, Path) else source
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleRejected(f"{what}: {len(data)} bytes; bundles are at most "
                             f"{MAX_BUNDLE_BYTES} bytes", code="bundle_invalid")
    members = _members(data, what)
    if SIGNATURE not in members:
        raise BundleRejected(f"{what}: unsigned (no {SIGNATURE} member); sign it with "
                             "`cascade models pack --key`", code="bundle_unsigned")
    try:
        signed = json.loads(members.pop(SIGNATURE))
        signer, signature = str(signed["key_id"]), base64.b64decode(signed["signature"])
    except (ValueError, KeyError, TypeError):
        raise BundleRejected(f"{what}: the {SIGNATURE} member is not a signature record",
                             code="bundle_unsigned") from None
    if HASHES not in members:
        raise BundleRejected(f"{what}: no {HASHES} member: truncated", code="bundle_truncated")
    hashes = members.pop(HASHES)
    verify(keys, signer, signature, hashes, what=what)
    listed = _hash_list(hashes, what)
    _check_members(members, listed, what)
    try:
        meta = BundleMeta.model_validate_json(members[META])
    except ValidationError as exc:
        raise BundleRejected(f"{what}: {META} is invalid: {exc.errors()[0]['msg']}",
                             code="bundle_invalid") from None
    if hashlib.sha256(members[meta.model_file]).hexdigest() != meta.entry.sha256:
        raise BundleRejected(f"{what}: the model file's sha256 differs from its manifest entry",
                             code="bundle_hash_mismatch")
    return OpenedBundle(meta=meta, members=members, signer=signer)


def _hash_list(hashes: bytes, what: str) -> dict[str, str]:
    """HASHES as {member: sha256}."""
    listed: dict[str, str] = {}
    try:
        for line in hashes.decode().splitlines():
            digest, name = line.split("  ", 1)
            listed[name] = digest
    except ValueError:
        raise BundleRejected(f"{what}: the {HASHES} member is malformed",
                             code="bundle_invalid") from None
    return listed


def _check_members(members: dict[str, bytes], listed: dict[str, str], what: str) -> None:
    """Every member HASHES lists is present with that sha256, and nothing else is."""
    for name, digest in listed.items():
        if name not in members:
            raise BundleRejected(f"{what}: {HASHES} lists {name}, which the file does not "
                                 "contain: truncated", code="bundle_truncated")
        actual = hashlib.sha256(members[name]).hexdigest()
        if actual != digest:
            raise BundleRejected(f"{what}: member {name} has sha256 {actual[:16]}..., the signed "
                                 f"hash list says {digest[:16]}...: modified after signing",
                                 code="bundle_hash_mismatch")
    extra = sorted(set(members) - set(listed))
    if extra or META not in listed:
        raise BundleRejected(f"{what}: members not covered by the signature: "
                             f"{', '.join(extra) or META}", code="bundle_invalid")


def peek_bundle(path: Path) -> BundleMeta | None:
    """A bundle's metadata without verifying it (to list what a directory offers); None when
    it cannot be read. Installing always goes through :func:`read_bundle`."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            handle = tar.extractfile(META)
            return None if handle is None else BundleMeta.model_validate_json(handle.read())
    except (tarfile.TarError, OSError, KeyError, ValidationError, EOFError):
        return None
