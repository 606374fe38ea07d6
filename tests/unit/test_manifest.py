"""The models-directory contract: manifest schema, its errors, and the held-out split files."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.errors import ModelError
from cascade.models.manifest import (
    MANIFEST_FILE,
    Manifest,
    SplitInfo,
    TaskEntry,
    TierEntry,
    load_manifest,
    load_split,
    sha256_file,
    write_manifest,
)
from cascade.models.splits import (
    DOCUMENTS_SPLIT_FILE,
    VISION_SPLIT_FILE,
    save_documents_split,
    save_vision_split,
)

VISION_CLASSES = tuple(str(d) for d in range(10))
TOPICS = ("business", "sport")


def tier_entry(file: str, content: bytes, *, quantized: bool = True, **overrides: Any) -> TierEntry:
    """A plausible tier entry whose checksum matches ``content``."""
    digest = hashlib.sha256(content).hexdigest()
    fields: dict[str, Any] = {
        "file": file,
        "sha256": digest,
        "bytes": len(content),
        "fp32_file": file,
        "fp32_sha256": digest,
        "fp32_bytes": len(content),
        "algorithm": "MLP(16)",
        "quantized": quantized,
        "accuracy": 0.97,
        "fp32_accuracy": 0.97,
        "int8_accuracy": 0.97 if quantized else None,
        "sklearn_agreement": 1.0,
        "sklearn_max_abs_diff": 1e-7,
        "latency_ms_p50": 0.02,
        "latency_ms_p95": 0.04,
        "fp32_latency_ms_p50": 0.02,
    }
    fields.update(overrides)
    return TierEntry(**fields)


def write_models_dir(
    root: Path,
    models: dict[tuple[str, str], bytes],
    *,
    classes: dict[str, tuple[str, ...]] | None = None,
) -> Manifest:
    """Write ``models`` ((task, tier) -> file bytes) and a matching manifest under ``root``.

    Also writes small calibration/test split files for each task.
    """
    classes = {"vision": VISION_CLASSES, "documents": TOPICS, **(classes or {})}
    tasks: dict[str, TaskEntry] = {}
    for task in sorted({task for task, _ in models}):
        split_file = _write_splits(root, task, classes[task])
        tiers = {}
        for (model_task, tier), content in models.items():
            if model_task != task:
                continue
            path = root / task / f"{tier}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            tiers[tier] = tier_entry(f"{task}/{tier}.onnx", content, quantized=tier != "cloud")
        tasks[task] = TaskEntry(
            classes=classes[task],
            input_kind="image8x8" if task == "vision" else "text",
            splits=SplitInfo(
                seed=0,
                train=6,
                calibration=2,
                test=2,
                file=split_file,
                sha256=sha256_file(root / split_file),
                source="test",
            ),
            tiers=tiers,
        )
    manifest = Manifest(
        schema_version=1,
        build_key="k" * 24,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        build_seconds=1.0,
        packages={"numpy": np.__version__},
        tasks=tasks,
    )
    write_manifest(manifest, root)
    return manifest


def _write_splits(root: Path, task: str, classes: tuple[str, ...]) -> str:
    if task == "vision":
        images = np.arange(4 * 64, dtype=np.float32).reshape(4, 64) % 17
        save_vision_split(
            root / VISION_SPLIT_FILE, (images[:2], ["1", "2"]), (images[2:], ["3", "4"])
        )
        return VISION_SPLIT_FILE
    save_documents_split(
        root / DOCUMENTS_SPLIT_FILE,
        classes,
        (["Shares fell £2m", "Goal!"], ["business", "sport"]),
        (["Rates rose", "A late winner"], ["business", "sport"]),
    )
    return DOCUMENTS_SPLIT_FILE


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_models_dir(
        tmp_path,
        {
            ("vision", "endpoint"): b"model-a",
            ("vision", "cloud"): b"b",
            ("documents", "edge-node"): b"model-c",
        },
    )
    return tmp_path


def _edit_manifest(root: Path, edit: Any) -> None:
    path = root / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_round_trip_preserves_every_field(tmp_path: Path) -> None:
    written = write_models_dir(tmp_path, {("vision", "endpoint"): b"abc"})
    loaded = load_manifest(tmp_path)
    assert loaded == written
    assert loaded.root == tmp_path.resolve()
    assert loaded.model_dump() == written.model_dump()


def test_training_rows_and_augmentation_are_optional_and_round_trip(tmp_path: Path) -> None:
    written = write_models_dir(tmp_path, {("documents", "cloud"): b"abc"})
    path = tmp_path / MANIFEST_FILE
    data = json.loads(path.read_text())
    tier = data["tasks"]["documents"]["tiers"]["cloud"]
    assert tier["train_samples"] is None and tier["augmentation"] is None
    del tier["train_samples"], tier["augmentation"]  # a manifest written before they existed
    path.write_text(json.dumps(data))
    assert load_manifest(tmp_path) == written
    tier.update(train_samples=30, augmentation="4 copies (seed 1): typos")
    path.write_text(json.dumps(data))
    loaded = load_manifest(tmp_path).tier("documents", "cloud")
    assert (loaded.train_samples, loaded.augmentation) == (30, "4 copies (seed 1): typos")


def test_helpers_resolve_paths_and_names(models_dir: Path) -> None:
    manifest = load_manifest(models_dir)
    assert (
        manifest.model_path("vision", "endpoint") == models_dir.resolve() / "vision/endpoint.onnx"
    )
    assert manifest.model_path("vision", "endpoint").read_bytes() == b"model-a"
    assert manifest.model_name("vision", "endpoint") == "vision/endpoint:MLP(16)-int8"
    assert manifest.model_name("vision", "cloud") == "vision/cloud:MLP(16)-fp32"
    assert list(manifest.task("vision").tiers) == ["endpoint", "cloud"]


def test_unknown_task_and_tier_name_what_exists(models_dir: Path) -> None:
    manifest = load_manifest(models_dir)
    with pytest.raises(
        ModelError,
        match=r"task 'audio' is not in the manifest; available: "
        r"documents, vision",
    ):
        manifest.tier("audio", "endpoint")
    with pytest.raises(
        ModelError,
        match=r"tier 'edge-server' has no 'vision' model in the "
        r"manifest; available: endpoint, cloud",
    ):
        manifest.model_path("vision", "edge-server")


def test_missing_manifest_tells_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError,
        match=r"no model manifest at .*manifest\.json: build the "
        r"models first with `cascade models build`",
    ):
        load_manifest(tmp_path)


def test_invalid_json_is_reported_with_the_file(models_dir: Path) -> None:
    (models_dir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelError, match=r"manifest\.json is not valid JSON"):
        load_manifest(models_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(schema_version=2), r"schema_version: Input should be 1"),
        (
            lambda d: d["tasks"]["vision"]["tiers"].update(
                fog=d["tasks"]["vision"]["tiers"]["cloud"]
            ),
            r"tasks\.vision\.tiers: Value error, unknown tier 'fog'; allowed: endpoint, edge-node, "
            + r"edge-server, cloud",
        ),
        (
            lambda d: d["tasks"].update({"Audio Clips": d["tasks"]["vision"]}),
            r"tasks: Value error, task name 'Audio Clips' is not allowed: lowercase letters",
        ),
        (
            lambda d: d["tasks"]["vision"].update(input_kind="image"),
            r"tasks\.vision: Value error, input_kind 'image' needs a declared 'input'",
        ),
        (
            lambda d: d["tasks"]["vision"]["tiers"]["endpoint"].update(sha256="XYZ"),
            r"tasks\.vision\.tiers\.endpoint\.sha256: Value error, must be a lowercase hex sha256",
        ),
        (
            lambda d: d["tasks"]["vision"]["tiers"]["endpoint"].pop("file"),
            r"tasks\.vision\.tiers\.endpoint\.file: Field required",
        ),
        (
            lambda d: d["tasks"]["vision"]["tiers"]["endpoint"].update(colour="red"),
            r"tasks\.vision\.tiers\.endpoint\.colour: Extra inputs are not permitted",
        ),
        (
            lambda d: d["tasks"]["documents"].update(tiers={}),
            r"tasks\.documents\.tiers: Dictionary should have at least 1 item",
        ),
    ],
    ids=[
        "schema-version",
        "unknown-tier",
        "bad-task-name",
        "undeclared-input",
        "bad-sha",
        "missing-field",
        "extra-field",
        "no-tiers",
    ],
)
def test_schema_errors_name_the_field(models_dir: Path, edit: Any, message: str) -> None:
    _edit_manifest(models_dir, edit)
    with pytest.raises(ModelError, match=r"model manifest .*manifest\.json is invalid: " + message):
        load_manifest(models_dir)


def test_unloaded_manifest_has_no_root(models_dir: Path) -> None:
    detached = Manifest.model_validate_json((models_dir / MANIFEST_FILE).read_text())
    with pytest.raises(ModelError, match="not loaded from a directory"):
        detached.model_path("vision", "endpoint")


def test_write_is_atomic_and_leaves_no_temp_files(models_dir: Path) -> None:
    manifest = load_manifest(models_dir)
    write_manifest(manifest, models_dir)
    assert sorted(p.name for p in models_dir.iterdir()) == [
        "data",
        "documents",
        MANIFEST_FILE,
        "vision",
    ]


def test_load_split_vision_returns_float32_pixels_and_string_labels(models_dir: Path) -> None:
    images, labels = load_split(models_dir, "vision", "test")
    assert images.dtype == np.float32 and images.shape == (2, 64)
    expected = np.arange(4 * 64, dtype=np.float32).reshape(4, 64)[2:] % 17
    np.testing.assert_array_equal(images, expected)
    assert labels == ["3", "4"]
    calib_images, calib_labels = load_split(models_dir, "vision", "calibration")
    assert calib_images.shape == (2, 64) and calib_labels == ["1", "2"]


def test_load_split_documents_returns_texts(models_dir: Path) -> None:
    assert load_split(models_dir, "documents", "calibration") == (
        ["Shares fell £2m", "Goal!"],
        ["business", "sport"],
    )
    assert load_split(models_dir, "documents", "test") == (
        ["Rates rose", "A late winner"],
        ["business", "sport"],
    )


def test_load_split_refuses_training_split_and_modified_files(models_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"unknown split 'train'; allowed: calibration, test"):
        load_split(models_dir, "vision", "train")
    path = models_dir / DOCUMENTS_SPLIT_FILE
    path.write_text(path.read_text().replace("Goal!", "Gaol!"))
    with pytest.raises(ModelError, match=r"does not match the sha256 in the manifest"):
        load_split(models_dir, "documents", "test")
