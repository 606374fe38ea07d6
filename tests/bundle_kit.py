"""Building blocks for signed-bundle tests and the canary benchmark: key pairs, a deliberately
bad model directory (the endpoint's vision model trained on shuffled labels with the project's
own training, export and quantization code), bundles, tampering, tier configs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.models.bundle import pack_bundle
from cascade.models.signing import generate_keypair, load_private_key


def keypair(folder: Path, name: str = "fleet") -> tuple[Path, Path]:
    """(private, public) key files made by the project's keygen."""
    generate_keypair(folder / f"{name}.key", folder / f"{name}.pub")
    return folder / f"{name}.key", folder / f"{name}.pub"


def pack(models: Path, key: Path, out: Path, version: str, *, task: str = "vision",
         tier: str = "endpoint", probe_size: int = 100) -> Path:
    """A signed bundle of ``task``'s ``tier`` model from ``models``."""
    out.mkdir(parents=True, exist_ok=True)
    return pack_bundle(models, task, tier, key=load_private_key(key), out=out, version=version,
                       probe_size=probe_size)


def shuffled_label_models(models_dir: Path, out: Path, *, seed: int = 7) -> Path:
    """A copy of ``models_dir`` whose vision/endpoint model was trained on shuffled labels
    (same architecture, export and int8 quantization as the build); its manifest entry records
    its true (bad) accuracy and checksum, so the bundle is honest and well-formed."""
    from cascade.models.datasets import load_dataset, split_dataset
    from cascade.models.export import export_onnx, save_onnx
    from cascade.models.manifest import load_manifest, write_manifest
    from cascade.models.quantize import quantize_int8
    from cascade.models.repository import load_classifier
    from cascade.models.specs import LADDERS
    from cascade.models.train import train_tier
    from cascade.models.validate import evaluate

    if (out / "manifest.json").exists():
        return out
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(models_dir, stage, ignore=shutil.ignore_patterns(".*"))
    dataset = load_dataset("vision")
    splits = split_dataset(dataset)
    labels = np.random.default_rng(seed).permutation(dataset.labels[splits.train])
    spec = next(s for s in LADDERS["vision"] if s.tier == "endpoint")
    trained = train_tier("vision", spec, dataset.inputs[splits.train], labels)
    save_onnx(export_onnx(trained, tier="endpoint"), stage / "vision/endpoint.fp32.onnx")
    quantize_int8(stage / "vision/endpoint.fp32.onnx", stage / "vision/endpoint.int8.onnx")
    manifest = load_manifest(stage)
    import hashlib

    int8 = (stage / "vision/endpoint.int8.onnx").read_bytes()
    fp32 = (stage / "vision/endpoint.fp32.onnx").read_bytes()
    entry = manifest.tier("vision", "endpoint").model_copy(update={
        "sha256": hashlib.sha256(int8).hexdigest(), "bytes": len(int8),
        "fp32_sha256": hashlib.sha256(fp32).hexdigest(), "fp32_bytes": len(fp32)})
    task = manifest.task("vision")
    tiers = {**task.tiers, "endpoint": entry}
    manifest = manifest.model_copy(update={"tasks": {
        **manifest.tasks, "vision": task.model_copy(update={"tiers": tiers})}})
    write_manifest(manifest, stage)
    inputs, truth = _test_split(stage)
    accuracy = evaluate(load_classifier(stage, "vision", "endpoint"), inputs, truth).accuracy
    entry = entry.model_copy(update={"accuracy": round(accuracy, 6)})
    tiers = {**task.tiers, "endpoint": entry}
    write_manifest(manifest.model_copy(update={"tasks": {
        **manifest.tasks, "vision": task.model_copy(update={"tiers": tiers})}}), stage)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return out


def _test_split(models: Path) -> tuple[Any, list[str]]:
    from cascade.models.manifest import load_split

    return load_split(models, "vision", "test")


def rewrite_member(bundle: Path, out: Path, member: str, change: Any) -> Path:
    """A copy of ``bundle`` whose ``member`` is ``change(bytes)`` (None: left out)."""
    members: list[tuple[str, bytes]] = []
    with tarfile.open(bundle) as tar:
        for info in tar:
            handle = tar.extractfile(info)
            assert handle is not None
            members.append((info.name, handle.read()))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            if name == member:
                data = change(data)
                if data is None:
                    continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out.write_bytes(buffer.getvalue())
    return out


def bundle_knobs(public_keys: list[Path], store: Path, **extra: Any) -> dict[str, Any]:
    """A node config's ``bundles:`` section for tests (JSON-able)."""
    return {"trusted_keys": [str(p) for p in public_keys], "store_dir": str(store), **extra}


def read_state(store: Path) -> dict[str, Any]:
    """A tier's state.json."""
    return dict(json.loads((store / "state.json").read_text()))


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Path]:
    """Trusted and untrusted key pairs, a good vision/endpoint bundle (v2, the built model
    packed again) and a bad one (shuffled labels), shared by a test session."""
    root = tmp_path_factory.mktemp("fleet")
    private, public = keypair(root / "keys", "fleet")
    other, other_public = keypair(root / "keys", "stranger")
    bad_models = shuffled_label_models(models_dir, root / "bad-models")
    return {"root": root, "key": private, "pub": public, "other_key": other,
            "other_pub": other_public, "bad_models": bad_models,
            "good": pack(models_dir, private, root / "bundles", "v2"),
            "bad": pack(bad_models, private, root / "bundles", "bad")}
