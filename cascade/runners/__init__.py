"""Model runtimes behind one small interface, :class:`Runner`.

``OnnxRunner`` is imported lazily so that ``import cascade.runners`` does not load onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cascade.runners.base import Runner

if TYPE_CHECKING:
    from cascade.runners.onnx import OnnxRunner

__all__ = ["OnnxRunner", "Runner"]


def __getattr__(name: str) -> Any:
    if name == "OnnxRunner":
        from cascade.runners.onnx import OnnxRunner

        return OnnxRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
