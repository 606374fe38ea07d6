"""Model build pipeline and the models directory contract (``manifest.json``, held-out splits).

Reading a build (:func:`load_manifest`, :func:`load_split`) needs only pydantic and numpy.
:func:`build_models` imports scikit-learn, skl2onnx and onnx when it runs, never at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cascade.models.manifest import (
    Manifest,
    QuantizationInfo,
    SplitInfo,
    TaskEntry,
    TierEntry,
    load_manifest,
    load_split,
)

if TYPE_CHECKING:
    from cascade.models.build import build_models

__all__ = [
    "Manifest",
    "QuantizationInfo",
    "SplitInfo",
    "TaskEntry",
    "TierEntry",
    "build_models",
    "load_manifest",
    "load_split",
]


def __getattr__(name: str) -> Any:
    # Lazy: the build pulls in rich and onnxruntime, which readers of a build do not need.
    if name == "build_models":
        from cascade.models.build import build_models

        return build_models
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
