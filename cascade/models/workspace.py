"""Safe writes into a models directory that tiers, tests and other builds may be reading.

A build holds an exclusive lock on the directory (concurrent builders wait, then find it up to
date), writes everything into a private staging folder, and only then moves the files into
place and writes the manifest last. The previous build stays loadable for the whole build.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cascade.models.manifest import MANIFEST_FILE, Manifest, write_manifest

LOCK_FILE = ".build.lock"
_STAGING_PREFIX = ".staging-"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: builds are not serialized there
    fcntl = None  # type: ignore[assignment]


@contextmanager
def exclusive_build_lock(
    out_dir: Path, *, on_wait: Callable[[], object] | None = None
) -> Iterator[None]:
    """Hold the directory's build lock; if another process holds it, call ``on_wait`` and block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / LOCK_FILE).open("a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh private folder inside ``out_dir``, removed afterwards (call under the lock).

    Leftovers of builds that were killed are removed first: under the lock nobody else stages.
    """
    for stale in out_dir.glob(f"{_STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out_dir / f"{_STAGING_PREFIX}{os.getpid()}"
    stage.mkdir()
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir: Path, manifest: Manifest) -> None:
    """Move every staged file into ``out_dir`` (same relative path), then write the manifest."""
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = out_dir / path.relative_to(stage)
        if target.name == MANIFEST_FILE and target.parent == out_dir:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    write_manifest(manifest, out_dir)
