"""From a decoded input to the tensor a graph takes, as the task's input declaration says.

Decoders (:mod:`cascade.contract.decoders`) validate requests and return pixels at the declared
size, vectors or texts; this module applies what belongs to the model: scale, mean and std,
layout, dtype. Offline tools feed stored splits (batches of decoded rows) through the same
functions, so calibration sees exactly what serving computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.contract.input_spec import (
    FeaturesInput,
    ImageInput,
    InputSpec,
    TensorInput,
    TextInput,
)
from cascade.errors import InvalidInput

__all__ = ["decoded_shape", "preparer_for", "warmup_input"]

Preparer = Callable[[Any], npt.NDArray[Any]]


def decoded_shape(spec: InputSpec) -> tuple[int, ...]:
    """Shape of one decoded sample (what decoders return, without the batch dimension)."""
    if isinstance(spec, ImageInput):
        return (*spec.size, spec.channels)
    if isinstance(spec, TensorInput):
        return spec.shape
    if isinstance(spec, FeaturesInput):
        return (spec.length,)
    return ()


def warmup_input(spec: InputSpec) -> Any:
    """A one-sample batch of zeros (or a short text) for warm-up and signature checks."""
    if isinstance(spec, TextInput):
        return ["warm up"]
    dtype = spec.dtype if isinstance(spec, TensorInput) else np.float32
    return np.zeros((1, *decoded_shape(spec)), dtype=dtype)


def preparer_for(spec: InputSpec) -> Preparer:
    """The function that turns a batch of decoded inputs into the graph's input tensor."""
    if isinstance(spec, ImageInput):
        return lambda batch: _prepare_images(batch, spec)
    if isinstance(spec, TensorInput):
        return lambda batch: _batch(batch, spec.dtype, spec.shape)
    if isinstance(spec, FeaturesInput):
        return lambda batch: _batch(batch, "float32", (spec.length,))
    return _prepare_texts


def _batch(batch: Any, dtype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.asarray(batch, dtype=dtype)  # no copy when it already is
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape or array.shape[0] == 0:
        raise InvalidInput(f"input must be an array of shape [N, {', '.join(map(str, shape))}]"
                           f" (N >= 1), got shape {list(array.shape)}", field="input")
    return array


def _prepare_images(batch: Any, spec: ImageInput) -> npt.NDArray[np.float32]:
    pixels = _batch(batch, "float32", (*spec.size, spec.channels))
    if spec.scale != 1.0:
        pixels = pixels * np.float32(spec.scale)
    if spec.mean is not None:
        pixels = pixels - np.asarray(spec.mean, dtype=np.float32)  # broadcasts over channels
    if spec.std is not None:
        pixels = pixels / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "nchw":
        pixels = pixels.transpose(0, 3, 1, 2)
    elif spec.layout == "flat":
        pixels = pixels.reshape(pixels.shape[0], -1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _prepare_texts(batch: Any) -> npt.NDArray[np.object_]:
    if isinstance(batch, str) or not batch or not all(isinstance(t, str) for t in batch):
        raise InvalidInput("text input must be a non-empty list of strings", field="input")
    return np.array(batch, dtype=object).reshape(-1, 1)
