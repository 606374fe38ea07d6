"""Decoders configured by a task's declared input (:mod:`cascade.contract.input_spec`).

:func:`decoder_for` turns a declaration into a plain function over the request's JSON ``input``
object, returning the *decoded* value a runner prepares for its graph:

* ``image``    float32 [1, H, W, C], pixels 0..255 at the declared size and channels (not yet
               normalised: scale, mean, std and layout are the runner's job)
* ``tensor``   [1, *shape] of the declared dtype
* ``features`` float32 [1, length]
* ``text``     a one-element list of the text

Every failure raises :class:`~cascade.errors.InvalidInput` (422) naming the field, e.g.
``input.image[3][7]``, ``input.features.alcohol``, ``input.shape``.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import math
from collections.abc import Callable
from functools import partial
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

__all__ = ["PIXEL_MAX", "decoder_for", "image_array", "sample_input"]

PIXEL_MAX = 255.0
PHOTO_FORMATS = ("PNG", "JPEG")
_NUMBER_TYPES = frozenset((int, float))

Decoded = npt.NDArray[Any] | list[str]


def decoder_for(spec: InputSpec) -> Callable[..., Decoded]:
    """The request decoder of a declared input (kwargs from the tier, e.g. ``max_text_chars``,
    are accepted by every decoder)."""
    if isinstance(spec, ImageInput):
        return partial(image_input, spec=spec)
    if isinstance(spec, TensorInput):
        return partial(tensor_input, spec=spec)
    if isinstance(spec, FeaturesInput):
        return partial(features_input, spec=spec)
    return partial(text_input, spec=spec)


def sample_input(spec: InputSpec, sample: Any) -> dict[str, Any]:
    """The JSON ``input`` object of one stored split sample (a decoded row), for clients,
    ``cascade infer --sample`` and the benchmark."""
    if isinstance(spec, ImageInput):
        return {"image": np.asarray(sample).tolist()}
    if isinstance(spec, TensorInput):
        return {"tensor": np.asarray(sample).tolist()}
    if isinstance(spec, FeaturesInput):
        return {"features": [float(v) for v in np.asarray(sample).ravel()]}
    return {"text": str(sample)}


def only_keys(value: Any, allowed: tuple[str, ...], hint: str) -> None:
    """:class:`InvalidInput` unless ``value`` is an object with no key outside ``allowed``."""
    if not isinstance(value, dict):
        raise InvalidInput(f"input must be an object; {hint}", field="input")
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise InvalidInput(f"unknown key {extra[0]!r}; {hint}", field=f"input.{extra[0]}")


def _one_of(value: dict[str, Any], keys: tuple[str, ...], hint: str) -> str:
    given = [key for key in keys if key in value]
    if len(given) != 1:
        raise InvalidInput(f"give exactly one of {', '.join(map(repr, keys))}; {hint}",
                           field="input")
    return given[0]


# -- image ------------------------------------------------------------------------------------

def image_input(value: Any, *, spec: ImageInput, **_: Any) -> npt.NDArray[np.float32]:
    """A photo or a camera array -> float32 [1, H, W, C] pixels at the declared size."""
    (height, width), channels = spec.size, spec.channels
    hint = (f"an image takes one of {{'image': HxW or HxWxC nested lists of 0..255}}, "
            f"{{'image_base64': PNG or JPEG}}, {{'raw_base64': uint8 bytes, 'shape': [H, W(, C)]}}"
            f"; the model sees {height}x{width}x{channels}")
    only_keys(value, ("image", "image_base64", "raw_base64", "shape"), hint)
    key = _one_of(value, ("image", "image_base64", "raw_base64"), hint)
    if "shape" in value and key != "raw_base64":
        raise InvalidInput(f"'shape' goes with 'raw_base64' only; {hint}", field="input.shape")
    if key == "image_base64":
        return _photo(value[key], spec)[np.newaxis]
    pixels: npt.NDArray[Any]
    if key == "raw_base64":
        pixels = _raw_bytes(value[key], value.get("shape"), spec)
    else:
        pixels = _nested_numbers(value[key], "input.image", ndims=(2, 3), low=0.0,
                                 high=PIXEL_MAX, max_side=spec.max_side)
    return image_array(pixels, spec, field=f"input.{key}")[np.newaxis]


def _photo(data: Any, spec: ImageInput) -> npt.NDArray[np.float32]:
    field = "input.image_base64"
    raw = _base64(data, field, spec.max_bytes)
    from PIL import Image, ImageOps, UnidentifiedImageError  # lazy: photo callers only

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in PHOTO_FORMATS:
                raise InvalidInput(f"expected a {' or '.join(PHOTO_FORMATS)} image; got "
                                   f"{img.format}", field=field)
            if max(img.size) > spec.max_side:
                raise InvalidInput(f"image is {img.size[0]}x{img.size[1]}; at most "
                                   f"{spec.max_side} per side", field=field)
            upright = ImageOps.exif_transpose(img)  # camera JPEGs store their rotation in EXIF
            converted = upright.convert("L" if spec.channels == 1 else "RGB")
            height, width = spec.size
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(converted, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput("image_base64 does not decode to an image", field=field) from None
    return pixels.reshape(spec.size[0], spec.size[1], spec.channels)


def _raw_bytes(data: Any, shape: Any, spec: ImageInput) -> npt.NDArray[np.float32]:
    if shape is None:
        raise InvalidInput("raw_base64 needs 'shape': [H, W] or [H, W, C]", field="input.shape")
    if isinstance(shape, list):  # 3.0 is the integer 3 in JSON
        shape = [int(v) if type(v) is float and v.is_integer() else v for v in shape]
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or any(type(v) is not int or v < 1 for v in shape)
            or shape[0] > spec.max_side or shape[1] > spec.max_side
            or (len(shape) == 3 and shape[2] not in (1, 3, 4))):
        raise InvalidInput(f"shape must be [H, W] or [H, W, C] of positive integers, sides at "
                           f"most {spec.max_side}, C 1, 3 or 4; got {shape!r}",
                           field="input.shape")
    raw = _base64(data, "input.raw_base64", spec.max_bytes)
    if len(raw) != math.prod(shape):
        raise InvalidInput(f"raw_base64 holds {len(raw)} bytes; shape {shape} needs "
                           f"{math.prod(shape)} (one uint8 per value)", field="input.raw_base64")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.float32)


def _base64(data: Any, field: str, max_bytes: int) -> bytes:
    name = field.rsplit(".", 1)[-1]
    if not isinstance(data, str) or not data:
        raise InvalidInput(f"{name} must be a non-empty base64 string", field=field)
    if len(data) > max_bytes * 4 // 3 + 4:
        raise InvalidInput(f"{name} is larger than {max_bytes} bytes", field=field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name} is not valid base64", field=field) from None


def image_array(pixels: npt.NDArray[Any], spec: ImageInput, *,
                field: str = "input.image") -> npt.NDArray[np.float32]:
    """An HxW or HxWxC array of 0..255 (C 1, 3 or 4) -> the declared HxWxchannels (resized if
    needed): what a camera array decodes to, also used for held-out files."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.shape[2] not in (1, 3, 4):
        raise InvalidInput(f"an image array has 1, 3 or 4 channels; got {pixels.shape[2]}",
                           field=field)
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]  # drop alpha
    if spec.channels == 1 and pixels.shape[2] == 3:
        # The same luma weights as Pillow's convert("L"), so arrays and photos agree.
        pixels = (pixels @ np.asarray([0.299, 0.587, 0.114], np.float32))[:, :, np.newaxis]
    elif spec.channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    height, width = spec.size
    if pixels.shape[:2] != (height, width):
        from PIL import Image  # lazy: only arrays of another size are resized

        pixels = np.stack([
            np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c], np.float32))
                       .resize((width, height), Image.Resampling.BILINEAR))
            for c in range(pixels.shape[2])], axis=2)
    return np.ascontiguousarray(pixels, dtype=np.float32)


# -- nested lists -------------------------------------------------------------------------------

def _nested_numbers(value: Any, field: str, *, ndims: tuple[int, ...],
                    shape: tuple[int, ...] | None = None, low: float | None = None,
                    high: float | None = None, max_side: int | None = None,
                    integers: bool = False) -> npt.NDArray[np.float64]:
    """Nested lists of numbers -> an array, or :class:`InvalidInput` naming the first bad
    row or value (``input.image[3][7]``). ``shape`` fixes every side; otherwise every row
    must be as long as the first."""
    fast = _fast_nested(value, ndims, shape, low, high, integers)
    if fast is not None:
        if max_side is not None and max(fast.shape[:2]) > max_side:
            raise InvalidInput(f"array is {fast.shape[0]}x{fast.shape[1]}; at most {max_side} "
                               f"per side", field=field)
        return fast
    if not isinstance(value, list):
        raise InvalidInput(f"must be nested lists; got {type(value).__name__}", field=field)
    ndim = ndims[0] if len(ndims) == 1 else max(min(ndims), min(max(ndims), _depth(value)))
    _walk(value, field, depth=0, ndim=ndim, expected=list(shape or ()), low=low, high=high,
          integers=integers)
    # _walk raises for everything _fast_nested refuses; this is a safety net.
    raise InvalidInput("must be nested lists of numbers", field=field)  # pragma: no cover


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    return depth


def _fast_nested(value: Any, ndims: tuple[int, ...], shape: tuple[int, ...] | None,
                 low: float | None, high: float | None,
                 integers: bool) -> npt.NDArray[np.float64] | None:
    """The common, valid case in a few C-level passes; ``None`` sends it to the slow path."""
    if type(value) is not list or not value:
        return None
    try:
        array = np.array(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim not in ndims or array.size == 0 or (shape is not None and array.shape != shape):
        return None
    flat: Any = value
    for _ in range(array.ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    # type() rather than isinstance(): bool is an int subclass and must be refused.
    kinds = set(map(type, flat))
    if not kinds <= _NUMBER_TYPES:
        return None
    # JSON has one number type: 3.0 is an integer (as JSON Schema says), 3.5 is not.
    if integers and kinds != {int} and not bool(np.all(array == np.floor(array))):
        return None
    if not np.isfinite(array).all():
        return None
    if (low is not None and array.min() < low) or (high is not None and array.max() > high):
        return None
    return array


def _walk(value: Any, field: str, *, depth: int, ndim: int, expected: list[int],
          low: float | None, high: float | None, integers: bool) -> None:
    """Find and name the first bad row or value (the slow path, for errors only)."""
    if depth < ndim:
        if not isinstance(value, list):
            raise InvalidInput(f"must be a list (dimension {depth + 1} of {ndim}); got "
                               f"{type(value).__name__}", field=field)
        if depth < len(expected) and len(value) != expected[depth]:
            raise InvalidInput(f"must have {expected[depth]} entries; got {len(value)}",
                               field=field)
        if not value:
            raise InvalidInput("must not be empty", field=field)
        if depth == len(expected):
            expected.append(len(value))  # the first row fixes the length of the others
        for i, item in enumerate(value):
            _walk(item, f"{field}[{i}]", depth=depth + 1, ndim=ndim, expected=expected,
                  low=low, high=high, integers=integers)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"must be a finite number; got {value!r}", field=field)
    if integers and not (isinstance(value, int) or float(value).is_integer()):
        raise InvalidInput(f"must be an integer; got {value!r}", field=field)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidInput(f"must be between {low:g} and {high:g}; got {value!r}", field=field)


# -- tensor, features, text ----------------------------------------------------------------

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest float32: a bigger number would reach the model as infinity."""
DTYPE_RANGE: dict[str, tuple[float, float]] = {
    "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
    "float32": (-FLOAT32_MAX, FLOAT32_MAX)}
"""The values each declared tensor dtype holds (float64: every finite number)."""


def tensor_input(value: Any, *, spec: TensorInput, **_: Any) -> npt.NDArray[Any]:
    """``{'tensor': nested lists of exactly shape}`` -> [1, *shape] of the declared dtype."""
    shape_text = "x".join(map(str, spec.shape))
    hint = f"this task takes {{'tensor': {shape_text} nested lists of {spec.dtype}}}"
    only_keys(value, ("tensor",), hint)
    if "tensor" not in value:
        raise InvalidInput(f"'tensor' is missing; {hint}", field="input.tensor")
    low, high = DTYPE_RANGE.get(spec.dtype, (None, None))
    integers = not spec.dtype.startswith("float")
    array = _nested_numbers(value["tensor"], "input.tensor", ndims=(len(spec.shape),), shape=spec.shape,
                            low=low, high=high, integers=integers)
    if integers:  # exactly, from the JSON integers (float64 would round big int64 values)
        try:
            return np.array(value["tensor"], dtype=object).astype(spec.dtype)[np.newaxis]
        except OverflowError:  # within float64's rounding of the bounds, past the exact ones
            raise InvalidInput(f"values must fit {spec.dtype}; {hint}",
                               field="input.tensor") from None
    return array.astype(spec.dtype)[np.newaxis]


def features_input(value: Any, *, spec: FeaturesInput, **_: Any) -> npt.NDArray[np.float32]:
    """``{'features': [v, ...]}`` or, with declared names, ``{'features': {name: v}}``."""
    named = " or an object of " + ", ".join(spec.names) if spec.names else ""
    hint = f"this task takes {{'features': a list of {spec.length} numbers{named}}}"
    only_keys(value, ("features",), hint)
    if "features" not in value:
        raise InvalidInput(f"'features' is missing; {hint}", field="input.features")
    data = value["features"]
    if isinstance(data, dict):
        if spec.names is None:
            raise InvalidInput(f"this task declares no feature names; {hint}",
                               field="input.features")
        unknown = sorted(set(data) - set(spec.names))
        if unknown:
            raise InvalidInput(f"unknown feature {unknown[0]!r}; {hint}",
                               field=f"input.features.{unknown[0]}")
        missing = [name for name in spec.names if name not in data]
        if missing:
            raise InvalidInput(f"feature {missing[0]!r} is missing; {hint}",
                               field=f"input.features.{missing[0]}")
        items = [(f"input.features.{name}", data[name]) for name in spec.names]
    elif isinstance(data, list):
        if len(data) != spec.length:
            raise InvalidInput(f"must have {spec.length} values; got {len(data)}",
                               field="input.features")
        items = [(f"input.features[{i}]", v) for i, v in enumerate(data)]
    else:
        raise InvalidInput(f"features must be a list or an object; got {type(data).__name__}",
                           field="input.features")
    for field, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidInput(f"must be a finite number; got {v!r}", field=field)
        if abs(v) > FLOAT32_MAX:
            raise InvalidInput(f"must be within the float32 range (±{FLOAT32_MAX:.7g}); got "
                               f"{v!r}", field=field)
    return np.asarray([[v for _, v in items]], dtype=np.float32)


def text_input(value: Any, *, spec: TextInput, max_text_chars: int = 100_000,
               **_: Any) -> list[str]:
    """``{'text': str}`` -> a one-element list; the graph tokenizes it."""
    only_keys(value, ("text",), "this task takes {'text': '...'}")
    if "text" not in value:
        raise InvalidInput("this task takes {'text': '...'}; 'text' is missing",
                           field="input.text")
    text = value["text"]
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string; got {type(text).__name__}", field="input.text")
    if not text.strip():
        raise InvalidInput("text is empty", field="input.text")
    limit = min(spec.max_chars or max_text_chars, max_text_chars)
    if len(text) > limit:
        raise InvalidInput(f"text has {len(text)} characters; at most {limit}",
                           field="input.text")
    return [text]
