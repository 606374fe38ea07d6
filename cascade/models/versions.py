"""A tier's installed model versions on disk, crash-safe (architecture §5, signed bundles).

Layout of ``bundles.store_dir``::

    state.json                      per task: the active version, the canary, previous versions,
                                    versions refused (so a scheduled pull does not retry them)
    versions/<task>/<version>/      an installed version: bundle.json and the model file
    staging/<task>-<version>-<pid>/ an install in progress (removed on start: never served)
    received/<name>.bundle          verified bundles this tier pulled (served to tiers below)

Every change becomes visible in one ``os.replace``: a version directory is renamed out of
staging complete, and ``state.json`` is replaced whole (written to a temporary file and
fsynced first). A crash or SIGKILL at any moment leaves either the old state or the new one,
and the old model is served until the new state names the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cascade.errors import ModelError
from cascade.models.bundle import META, BundleMeta, OpenedBundle
from cascade.models.manifest import model_display_name
from cascade.runners.execution import BlockingCalls
from cascade.runners.registry import ModelSpec

__all__ = ["InstalledVersion", "TaskState", "VersionStore"]

STATE_FILE = "state.json"


class TaskState(BaseModel):
    """One task's versions at this tier (None: the models directory's own model)."""

    model_config = ConfigDict(extra="forbid")

    active: str | None = None
    canary: str | None = None
    previous: list[str] = Field(default_factory=list, description="newest first")
    refused: list[str] = Field(default_factory=list, description="rolled back or failed")


@dataclass(frozen=True)
class InstalledVersion:
    """An installed version: where it lives and what its bundle said."""

    path: Path
    meta: BundleMeta

    @property
    def model_path(self) -> Path:
        """The model file."""
        return self.path / self.meta.model_file

    def spec(self, task: str, *, calls: BlockingCalls | None = None) -> ModelSpec:
        """A runner spec for this version; the file is read and checked against its sha256."""
        import hashlib

        data = self.model_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.meta.entry.sha256:
            raise ModelError(f"installed model {self.model_path} failed its checksum; "
                             "roll back or install it again", field="model")
        entry = self.meta.entry
        name = model_display_name(task, self.meta.tier, entry.algorithm, quantized=entry.quantized)
        return ModelSpec(task=task, tier=self.meta.tier, runtime=entry.runtime,
                         model_name=f"{name}@{self.meta.version}", classes=self.meta.classes,
                         input_kind=self.meta.input_kind, path=self.model_path, data=data,
                         calls=calls, input_spec=self.meta.input, options=dict(entry.options))


@dataclass
class VersionStore:
    """The store directory of one tier (see the module docstring)."""

    root: Path
    states: dict[str, TaskState] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path) -> VersionStore:
        """Open (creating) the store, read the state file, drop unfinished installs and
        versions the state does not name."""
        root = Path(root)
        for sub in ("versions", "staging", "received"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (root / "staging").iterdir():  # an install a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        store = cls(root)
        path = root / STATE_FILE
        if path.exists():
            try:
                raw: dict[str, Any] = json.loads(path.read_text())
                store.states = {task: TaskState.model_validate(value)
                                for task, value in raw.get("tasks", {}).items()}
            except (ValueError, ValidationError) as exc:
                raise ModelError(f"{path}: unreadable model state ({exc}); move it away to serve "
                                 "the models directory's models") from None
        for folder in (root / "versions").iterdir():  # moved in, but a crash came before the
            store.prune(folder.name)                   # state named it: never served, removed
        return store

    def state(self, task: str) -> TaskState:
        """The task's state (a default one if it has none yet)."""
        return self.states.setdefault(task, TaskState())

    def installed(self, task: str, version: str) -> InstalledVersion:
        """An installed version; :class:`ModelError` if it is not there."""
        path = self.root / "versions" / task / version
        try:
            meta = BundleMeta.model_validate_json((path / META).read_bytes())
        except (OSError, ValidationError) as exc:
            raise ModelError(f"{task}: version {version} is not installed here ({exc})",
                             field="version") from None
        return InstalledVersion(path, meta)

    def stage(self, bundle: OpenedBundle) -> Path:
        """Write a verified bundle's files, fsynced, into a staging folder (nothing serves or
        names it; a crash leaves it to be wiped at the next start)."""
        meta = bundle.meta
        staging = self.root / "staging" / f"{meta.task}-{meta.version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in (META, meta.model_file, meta.probe_file):
            _write_synced(staging / name, bundle.members[name])
        return staging

    def publish(self, staging: Path, meta: BundleMeta) -> InstalledVersion:
        """Move a staged version into ``versions/`` in one rename. Nothing refers to it until
        :meth:`commit` names it in the state."""
        final = self.root / "versions" / meta.task / meta.version
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # left by an install that crashed before naming it: replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        return InstalledVersion(final, meta)

    def commit(self) -> None:
        """Write the state file whole and atomically (fsynced before and after the rename)."""
        path = self.root / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        payload = {"tasks": {t: s.model_dump() for t, s in sorted(self.states.items())}}
        _write_synced(tmp, (json.dumps(payload, indent=2) + "\n").encode())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    def prune(self, task: str) -> list[str]:
        """Remove the installed versions of ``task`` its state no longer names (call it after
        :meth:`commit`, so a crash never leaves a state naming a removed version)."""
        state = self.state(task)
        wanted = {v for v in (state.active, state.canary, *state.previous) if v}
        removed = []
        folder = self.root / "versions" / task
        for path in folder.iterdir() if folder.exists() else ():
            if path.name not in wanted:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
