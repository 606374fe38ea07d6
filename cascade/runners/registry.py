"""Runtimes by name: the manifest's ``runtime:`` picks the class that loads and runs a model.

``onnx`` is built in, and so are the generative ``gguf`` (llama.cpp in-process) and ``openai``
(any OpenAI-compatible server); the scale-out ``ray`` runtime registers here too. Each is a
module imported only when a manifest asks for it, so a tier that serves ONNX models never
imports llama.cpp, and one that serves GGUF models never imports onnxruntime.

A runtime takes the model file's bytes (``onnx``: read once, checksummed, handed over), or its
path (``gguf`` maps a 100 MB+ file itself; the repository checksums the file by streaming it
and hands over no bytes), or no file at all (``openai``: the model is remote).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cascade.contract.input_spec import InputSpec
from cascade.errors import ModelError
from cascade.runners.base import Runner
from cascade.runners.execution import BlockingCalls

__all__ = ["FileAccess", "Loader", "ModelSpec", "file_access", "load_runner", "register_runtime",
           "runtime_names"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runtime needs to load one tier's model of one task (checksum already
    verified by whoever read the file)."""

    task: str
    tier: str
    runtime: str
    model_name: str
    classes: tuple[str, ...]
    input_kind: str
    path: Path
    data: bytes
    """The file's bytes for a runtime that loads bytes; empty for one that loads its path."""
    calls: BlockingCalls | None = None
    input_spec: InputSpec | None = None
    """The task's declared input (registered tasks); None for the built-in kinds."""
    options: dict[str, Any] = field(default_factory=dict)
    """Runtime settings from the manifest's tier entry (e.g. ``n_ctx`` for ``gguf``)."""


Loader = Callable[[ModelSpec], Runner]

_RUNTIMES: dict[str, str | Loader] = {
    "onnx": "cascade.runners.onnx:load_onnx",
    "gguf": "cascade.runners.gguf:load_gguf",
    "openai": "cascade.runners.openai_compat:load_openai",
}
FileAccess = Literal["bytes", "path", "none"]
_FILE_ACCESS: dict[str, FileAccess] = {"gguf": "path", "openai": "none"}


def register_runtime(name: str, loader: str | Loader, *, file_access: FileAccess = "bytes") -> None:
    """Make ``runtime: name`` loadable: ``loader`` is a callable or ``"module:function"``;
    ``file_access`` is how it uses the deployed file (see :func:`file_access`)."""
    _RUNTIMES[name] = loader
    _FILE_ACCESS[name] = file_access


def file_access(runtime: str) -> FileAccess:
    """How ``runtime`` uses the manifest's file: ``bytes`` (handed the checked bytes), ``path``
    (opens the checked file itself; ``ModelSpec.data`` stays empty) or ``none`` (a remote model,
    e.g. ``openai``: there is no local file to read or check)."""
    return _FILE_ACCESS.get(runtime, "bytes")


def runtime_names() -> tuple[str, ...]:
    """The runtimes a manifest may name."""
    return tuple(sorted(_RUNTIMES))


def load_runner(spec: ModelSpec) -> Runner:
    """Load ``spec`` with its runtime; :class:`ModelError` names the runtimes there are."""
    loader = _RUNTIMES.get(spec.runtime)
    if loader is None:
        raise ModelError(
            f"{spec.task}/{spec.tier}: unknown runtime {spec.runtime!r}; "
            f"allowed: {', '.join(runtime_names())}", field="runtime")
    if isinstance(loader, str):
        module, _, name = loader.partition(":")
        loader = getattr(importlib.import_module(module), name)
        _RUNTIMES[spec.runtime] = loader
    runner: Runner = loader(spec)
    return runner
