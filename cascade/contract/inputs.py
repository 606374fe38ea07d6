"""Per-task input validation and decoding, before anything reaches a model.

Validators are plain functions over the decoded JSON ``input`` object; every failure raises
:class:`~cascade.errors.InvalidInput` naming the offending field (``input.image[3][7]``).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cascade.contract.decoders import decoder_for, only_keys, sample_input
from cascade.contract.input_spec import InputSpec
from cascade.errors import InvalidInput, ModelError

IMAGE_SIDE = 8
PIXEL_MAX = 16.0
MAX_PNG_BYTES = 512 * 1024
MAX_PNG_SIDE = 1024


def vision_input(value: dict[str, Any], **_: Any) -> np.ndarray:
    """An 8x8 grid of 0..16 (nested lists) or a base64 PNG → float32 array of shape (1, 64)."""
    hint = "vision takes {'image': 8x8 nested lists of 0..16} or {'png_base64': '...'}"
    only_keys(value, ("image", "png_base64"), hint)
    if ("image" in value) == ("png_base64" in value):
        raise InvalidInput(f"give exactly one of 'image' or 'png_base64'; {hint}", field="input")
    if "png_base64" in value:
        return _decode_png(value["png_base64"])
    grid = value["image"]
    fast = _fast_grid(grid)
    if fast is not None:
        return fast
    # Slow path: find and name the first offending row or pixel.
    if not isinstance(grid, list) or len(grid) != IMAGE_SIDE:
        got = f"{len(grid)} rows" if isinstance(grid, list) else type(grid).__name__
        raise InvalidInput(f"image must be {IMAGE_SIDE} rows of {IMAGE_SIDE}; got {got}", field="input.image")
    flat: list[float] = []
    for r, row in enumerate(grid):
        if not isinstance(row, list) or len(row) != IMAGE_SIDE:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise InvalidInput(
                f"row {r} must have {IMAGE_SIDE} values; got {got}", field=f"input.image[{r}]"
            )
        for c, px in enumerate(row):
            # bool is an int subclass in Python; a JSON true is not a pixel.
            if isinstance(px, bool) or not isinstance(px, (int, float)) or not math.isfinite(px):
                raise InvalidInput(
                    f"pixel must be a number; got {px!r}", field=f"input.image[{r}][{c}]"
                )
            if not 0.0 <= px <= PIXEL_MAX:
                raise InvalidInput(
                    f"pixel must be between 0 and {PIXEL_MAX:g}; got {px!r}",
                    field=f"input.image[{r}][{c}]",
                )
            flat.append(float(px))
    return np.asarray(flat, dtype=np.float32).reshape(1, IMAGE_SIDE * IMAGE_SIDE)


_NUMBER_TYPES = frozenset((int, float))


def _fast_grid(grid: Any) -> np.ndarray | None:
    """The common, valid case in a few C-level passes; ``None`` sends it to the slow path."""
    if type(grid) is not list or len(grid) != IMAGE_SIDE:
        return None
    for row in grid:
        if type(row) is not list or len(row) != IMAGE_SIDE:
            return None
    flat = list(itertools.chain.from_iterable(grid))
    # type() rather than isinstance(): bool is an int subclass and must be refused.
    if not set(map(type, flat)) <= _NUMBER_TYPES:
        return None
    # min/max skip NaN depending on order; the sum of finite pixels is finite.
    if not (math.isfinite(sum(flat)) and min(flat) >= 0.0 and max(flat) <= PIXEL_MAX):
        return None
    return np.array(flat, dtype=np.float32).reshape(1, IMAGE_SIDE * IMAGE_SIDE)


def _decode_png(data: Any) -> np.ndarray:
    field = "input.png_base64"
    if not isinstance(data, str) or not data:
        raise InvalidInput("png_base64 must be a non-empty base64 string", field=field)
    if len(data) > MAX_PNG_BYTES * 4 // 3 + 4:
        raise InvalidInput(f"PNG larger than {MAX_PNG_BYTES} bytes", field=field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("png_base64 is not valid base64", field=field) from None
    from PIL import Image, UnidentifiedImageError  # lazy: only PNG callers pay for Pillow

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise InvalidInput(f"expected a PNG image; got {img.format}", field=field)
            if max(img.size) > MAX_PNG_SIDE:
                raise InvalidInput(
                    f"PNG is {img.size[0]}x{img.size[1]}; at most {MAX_PNG_SIDE} per side", field=field
                )
            gray = img.convert("L")
            if gray.size != (IMAGE_SIDE, IMAGE_SIDE):
                gray = gray.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BOX)
            pixels = np.asarray(gray, dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise InvalidInput("png_base64 does not decode to an image", field=field) from None
    # 0..255 grey levels onto the 0..16 scale the models were trained on.
    return (pixels * (PIXEL_MAX / 255.0)).reshape(1, IMAGE_SIDE * IMAGE_SIDE)


def documents_input(value: dict[str, Any], *, max_text_chars: int = 100_000, **_: Any) -> list[str]:
    """``{'text': str}`` → a one-element list of the text."""
    only_keys(value, ("text",), "documents takes {'text': '...'}")
    if "text" not in value:
        raise InvalidInput("documents takes {'text': '...'}; 'text' is missing", field="input.text")
    text = value["text"]
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string; got {type(text).__name__}", field="input.text")
    if not text.strip():
        raise InvalidInput("text is empty", field="input.text")
    if len(text) > max_text_chars:
        raise InvalidInput(
            f"text has {len(text)} characters; at most {max_text_chars}", field="input.text"
        )
    return [text]


def image_grid(pixels: Any) -> list[list[float]]:
    """A flat 64-pixel image (a split's row) as the API's 8x8 nested-list ``image``."""
    flat = [float(v) for v in pixels]
    return [flat[r * IMAGE_SIDE : (r + 1) * IMAGE_SIDE] for r in range(IMAGE_SIDE)]


def request_body(task: str, sample: Any, spec: InputSpec | None = None) -> dict[str, Any]:
    """The ``POST /v1/infer`` body for one stored split sample: an image row or a text of the
    built-in tasks, or a decoded row of a task with a declared input ``spec``."""
    if spec is not None:
        return {"task": task, "input": sample_input(spec, sample)}
    if task == "vision":
        return {"task": task, "input": {"image": image_grid(sample)}}
    return {"task": task, "input": {"text": sample}}


InputDecoder = Callable[..., Any]

DECODERS: dict[str, InputDecoder] = {"image8x8": vision_input, "text": documents_input}
"""The built-in input kinds (no declaration needed) → their validator/decoder."""


def input_decoder(kind: str, spec: InputSpec | None = None) -> InputDecoder:
    """The decoder of a task: configured by its declared input when it has one (registered
    tasks), else the built-in decoder of ``kind``."""
    if spec is not None:
        return decoder_for(spec)
    try:
        return DECODERS[kind]
    except KeyError:
        raise ModelError(f"input kind {kind!r} needs a declared input (task.yaml 'input:')",
                         field="input_kind") from None
