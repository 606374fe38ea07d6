"""JSON Schemas of what each task's ``input`` object accepts, for the OpenAPI document.

Each schema says what its decoder (:mod:`cascade.contract.inputs` for the built-in kinds,
:mod:`cascade.contract.decoders` for declared inputs) accepts, so a client (or schemathesis)
that sends a schema-valid ``input`` is never refused for its shape. Two facts about an encoded
picture are outside what JSON Schema can say: that a base64 string decodes to a PNG (or JPEG)
within the size limits, named by the formats :data:`PNG_BASE64` and :data:`PHOTO_BASE64`, and,
for declared images, that every row of a nested ``image`` has the same length and that
``raw_base64`` holds exactly ``shape``'s product of bytes (said in the descriptions).
"""

from __future__ import annotations

import sys
from typing import Any

from cascade.contract.decoders import DTYPE_RANGE, FLOAT32_MAX
from cascade.contract.input_spec import FeaturesInput, ImageInput, InputSpec, TensorInput
from cascade.contract.inputs import IMAGE_SIDE, MAX_PNG_BYTES, MAX_PNG_SIDE, PIXEL_MAX

__all__ = ["PHOTO_BASE64", "PNG_BASE64", "input_json_schema"]

PNG_BASE64 = "png-base64"
"""String format: base64 (standard alphabet, padded) of a PNG image."""
PHOTO_BASE64 = "photo-base64"
"""String format: base64 (standard alphabet, padded) of a PNG or JPEG image."""

JsonSchema = dict[str, Any]


def _whitespace_class() -> str:
    """A regex class of exactly the characters ``str.strip()`` removes (``\\s`` differs
    between Python and ECMA-262 regexes; explicit code points mean the same in both)."""
    spaces = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    ranges: list[tuple[int, int]] = []
    for c in spaces:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    return "".join(f"\\u{lo:04x}" if lo == hi else f"\\u{lo:04x}-\\u{hi:04x}"
                   for lo, hi in ranges)


NOT_BLANK = f"[^{_whitespace_class()}]"
"""Pattern of a text with at least one character that is not whitespace."""


def _object(properties: dict[str, JsonSchema], *, required: list[str],
            description: str) -> JsonSchema:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False, "description": description}


def _grid(shape: tuple[int, ...] | None, item: JsonSchema, *, max_side: int | None = None,
          depth: int = 0) -> JsonSchema:
    """Nested arrays: of exactly ``shape`` if given, else ``depth`` levels of 1..max_side."""
    sides = shape if shape is not None else (None,) * depth
    schema = item
    for side in reversed(sides):
        bounds = ({"minItems": side, "maxItems": side} if side is not None
                  else {"minItems": 1, **({"maxItems": max_side} if max_side else {})})
        schema = {"type": "array", "items": schema, **bounds}
    return schema


def _base64(fmt: str, max_bytes: int, what: str) -> JsonSchema:
    return {"type": "string", "format": fmt, "minLength": 1,
            "maxLength": max_bytes * 4 // 3 + 4, "contentEncoding": "base64",
            "description": f"{what}, at most {max_bytes} bytes before encoding"}


def _text(limit: int) -> JsonSchema:
    return _object({"text": {"type": "string", "minLength": 1, "maxLength": limit,
                             "pattern": NOT_BLANK}},
                   required=["text"], description="{'text': a non-blank string}")


def _vision_8x8() -> JsonSchema:
    pixel = {"type": "number", "minimum": 0, "maximum": PIXEL_MAX}
    grid = _grid((IMAGE_SIDE, IMAGE_SIDE), pixel)
    png = _base64(PNG_BASE64, MAX_PNG_BYTES,
                  f"a PNG image, at most {MAX_PNG_SIDE} pixels per side (scaled to 8x8 grey)")
    return {"oneOf": [
        _object({"image": grid}, required=["image"],
                description="8x8 nested lists of grey levels 0..16"),
        _object({"png_base64": png}, required=["png_base64"], description="a PNG image"),
    ]}


def _declared_image(spec: ImageInput) -> JsonSchema:
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    side = spec.max_side
    pixels = {"oneOf": [{"type": "array", "items": pixel, "minItems": c, "maxItems": c}
                        for c in (1, 3, 4)]}
    array = {"anyOf": [_grid(None, pixel, max_side=side, depth=2),
                       _grid(None, pixels, max_side=side, depth=2)],
             "description": "HxW or HxWxC (C 1, 3 or 4) nested lists of 0..255; every row as "
                            "long as the first"}
    photo = _base64(PHOTO_BASE64, spec.max_bytes, "a PNG or JPEG photo")
    raw = _base64("byte", spec.max_bytes, "H*W(*C) uint8 values, row-major, as many as "
                  "'shape' says")
    shape = {"type": "array", "minItems": 2, "maxItems": 3,
             "prefixItems": [{"type": "integer", "minimum": 1, "maximum": side}] * 2,
             "items": {"enum": [1, 3, 4]}}
    return {"oneOf": [
        _object({"image": array}, required=["image"], description="a camera array"),
        _object({"image_base64": photo}, required=["image_base64"], description="a photo"),
        _object({"raw_base64": raw, "shape": shape}, required=["raw_base64", "shape"],
                description="raw uint8 pixels and their shape"),
    ]}


def _tensor(spec: TensorInput) -> JsonSchema:
    item: JsonSchema = {"type": "number" if spec.dtype.startswith("float") else "integer"}
    if spec.dtype in DTYPE_RANGE:
        low, high = DTYPE_RANGE[spec.dtype]
        item |= {"minimum": low, "maximum": high}
    shape = "x".join(map(str, spec.shape))
    return _object({"tensor": _grid(spec.shape, item)}, required=["tensor"],
                   description=f"{{'tensor': {shape} nested lists of {spec.dtype}}}")


def _features(spec: FeaturesInput) -> JsonSchema:
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    listed: JsonSchema = {"type": "array", "items": number, "minItems": spec.length,
                          "maxItems": spec.length}
    features = listed
    if spec.names is not None:
        named = _object({name: number for name in spec.names}, required=list(spec.names),
                        description="feature name -> value")
        features = {"oneOf": [listed, named]}
    return _object({"features": features}, required=["features"],
                   description=f"{{'features': {spec.length} numbers}}")


def input_json_schema(kind: str, spec: InputSpec | None, *, max_text_chars: int) -> JsonSchema:
    """The JSON Schema of a task's ``input``: from its declared ``spec`` when it has one, else
    of the built-in ``kind`` (``image8x8``, ``text``). ``max_text_chars``: the tier's limit
    (a declared text's own ``max_chars`` can only lower it)."""
    if spec is None:
        return _vision_8x8() if kind == "image8x8" else _text(max_text_chars)
    if isinstance(spec, ImageInput):
        return _declared_image(spec)
    if isinstance(spec, TensorInput):
        return _tensor(spec)
    if isinstance(spec, FeaturesInput):
        return _features(spec)
    return _text(min(spec.max_chars or max_text_chars, max_text_chars))
