"""Serving from a models directory: read the manifest, verify the file, load it by runtime.

The file's sha256 is checked against the manifest before any runtime sees it: a corrupted or
tampered file (ONNX or GGUF alike) raises :class:`ModelError` naming it and is never loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.errors import ModelError
from cascade.models.manifest import Manifest, load_manifest, sha256_file
from cascade.runners.base import BatchClassifier, Runner
from cascade.runners.execution import BlockingCalls
from cascade.runners.registry import ModelSpec, file_access
from cascade.runners.registry import load_runner as load_by_runtime

__all__ = ["load_classifier", "load_runner", "model_spec", "verified_model_file"]


def model_spec(manifest: Manifest, task: str, tier: str, *, verify_sha256: bool = True,
               calls: BlockingCalls | None = None,
               options: Mapping[str, Any] | None = None) -> ModelSpec:
    """The deployed model of ``task`` at ``tier``, read and (by default) checksum-verified;
    ``options`` (the node config's ``model_options``) are merged over the manifest's.

    A runtime that loads bytes (ONNX) gets the very bytes that were checked; one that opens
    the file itself (GGUF) gets the path of a file checked by streaming it (no 100 MB+ copy in
    memory); a remote model (``openai``) has no local file to check.
    """
    entry = manifest.tier(task, tier)
    path = manifest.model_path(task, tier)
    access = file_access(entry.runtime)
    data, actual = b"", entry.sha256
    try:
        if access == "bytes":
            data = path.read_bytes()
        if verify_sha256 and access != "none":
            actual = sha256_file(path) if access == "path" else hashlib.sha256(data).hexdigest()
    except OSError as exc:
        raise ModelError(
            f"model file {path} for {task}/{tier} cannot be read ({exc.strerror}):"
            f" {_rebuild_hint(manifest, task).replace(' --force', '')}"
        ) from exc
    if actual != entry.sha256:
        raise _checksum_failed(manifest, task, tier, actual)
    task_entry = manifest.task(task)
    return ModelSpec(task=task, tier=tier, runtime=entry.runtime,
                     model_name=manifest.model_name(task, tier), classes=task_entry.classes,
                     input_kind=task_entry.input_kind, path=path, data=data, calls=calls,
                     input_spec=task_entry.input,
                     options={**entry.options, **(options or {})})


def verified_model_file(manifest: Manifest, task: str, tier: str) -> Path:
    """The file of ``task`` at ``tier`` after its sha256 matched the manifest (streamed), for
    a process that loads it itself (a local model server of an ``openai`` tier)."""
    path = manifest.model_path(task, tier)
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise ModelError(f"model file {path} for {task}/{tier} cannot be read "
                         f"({exc.strerror}): {_rebuild_hint(manifest, task)}") from exc
    if actual != manifest.tier(task, tier).sha256:
        raise _checksum_failed(manifest, task, tier, actual)
    return path


def _checksum_failed(manifest: Manifest, task: str, tier: str, actual: str) -> ModelError:
    return ModelError(
        f"model file {manifest.model_path(task, tier)} for {task}/{tier} failed its checksum:"
        f" sha256 is {actual[:16]}..., the manifest expects"
        f" {manifest.tier(task, tier).sha256[:16]}...; the file is corrupted or was modified."
        f" Refusing to load it; {_rebuild_hint(manifest, task)}"
    )


def _rebuild_hint(manifest: Manifest, task: str) -> str:
    folder = manifest.task(task).registered_from
    if folder is None:
        return "rebuild with `cascade models build --force`"
    return f"register it again with `cascade models register {folder} ...`"


def load_runner(models_dir: Path, task: str, tier: str, *, verify_sha256: bool = True,
                calls: BlockingCalls | None = None) -> Runner:
    """Load the deployed model of ``task`` at ``tier`` from a built models directory."""
    manifest = load_manifest(models_dir)
    return load_by_runtime(model_spec(manifest, task, tier, verify_sha256=verify_sha256,
                                      calls=calls))


def load_classifier(models_dir: Path, task: str, tier: str, *,
                    verify_sha256: bool = True) -> BatchClassifier:
    """:func:`load_runner` for offline work that needs the synchronous batch API."""
    runner = load_runner(models_dir, task, tier, verify_sha256=verify_sha256)
    if not isinstance(runner, BatchClassifier):
        raise ModelError(f"{runner.model_name} ({task}/{tier}) is not a classifier with a batch "
                         "API (predict_proba): offline evaluation cannot use it", field="runtime")
    return runner
