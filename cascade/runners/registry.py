"""Runtimes by name: the manifest's ``runtime:`` picks the class that loads and runs a model.

``onnx`` is built in. The generative (``gguf``, ``openai``) and scale-out (``ray``) runtimes
register here too, each a module imported only when a manifest asks for it, so a tier that
serves ONNX models never imports llama.cpp or Ray.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.contract.input_spec import InputSpec
from cascade.errors import ModelError
from cascade.runners.base import Runner
from cascade.runners.execution import BlockingCalls

__all__ = ["ModelSpec", "load_runner", "register_runtime", "runtime_names"]


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
    calls: BlockingCalls | None = None
    input_spec: InputSpec | None = None
    """The task's declared input (registered tasks); None for the built-in kinds."""
    options: dict[str, Any] = field(default_factory=dict)


Loader = Callable[[ModelSpec], Runner]

_RUNTIMES: dict[str, str | Loader] = {
    "onnx": "cascade.runners.onnx:load_onnx",
}


def register_runtime(name: str, loader: str | Loader) -> None:
    """Make ``runtime: name`` loadable: ``loader`` is a callable or ``"module:function"``."""
    _RUNTIMES[name] = loader


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
