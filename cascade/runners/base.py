"""The one small interface every model runtime implements (ONNX today; GGUF, OpenAI later)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@runtime_checkable
class Runner(Protocol):
    """Turns a batch of task inputs into class probabilities.

    ``model_name`` identifies the model in traces and hops (e.g. ``vision/endpoint:MLP(16)-int8``);
    ``classes`` gives the column order of :meth:`predict_proba`.
    """

    model_name: str
    task: str
    classes: tuple[str, ...]

    def predict_proba(self, inputs: Any) -> npt.NDArray[np.floating[Any]]:
        """Probabilities [N, len(classes)], each row summing to ~1."""
        ...

    def warmup(self) -> None:
        """Run one throw-away inference so the first real request pays no setup cost."""
        ...
