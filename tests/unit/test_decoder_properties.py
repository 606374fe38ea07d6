"""Property-based tests of the input decoders against the JSON Schemas the OpenAPI document
publishes for them (``cascade.contract.input_schemas``).

* Every value the schema allows, the decoder accepts (drawn from the schema itself).
* Any JSON value at all: the decoder accepts it or raises :class:`InvalidInput` naming an
  ``input`` field, never anything else; and what it accepts, the schema allows. Where the
  schema can say everything (no picture formats), what the schema allows, it accepts.

Hypothesis runs derandomized (a fixed sequence of examples), so a failure replays.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.jsonschema.builder import build

from cascade.contract.input_schemas import PHOTO_BASE64, PNG_BASE64, input_json_schema
from cascade.contract.input_spec import FeaturesInput, ImageInput, TensorInput, TextInput
from cascade.contract.inputs import input_decoder
from cascade.errors import InvalidInput
from tests.helpers import picture_base64

MAX_TEXT_CHARS = 300

KINDS: dict[str, tuple[str, Any]] = {
    "image8x8": ("image8x8", None),
    "text": ("text", None),
    "declared-text": ("text", TextInput(kind="text", max_chars=50)),
    "tensor-float": ("tensor", TensorInput(kind="tensor", shape=(2, 3), dtype="float32")),
    "tensor-uint8": ("tensor", TensorInput(kind="tensor", shape=(4,), dtype="uint8")),
    "tensor-int64": ("tensor", TensorInput(kind="tensor", shape=(3,), dtype="int64")),
    "features": ("features", FeaturesInput(kind="features", length=3)),
    "named-features": ("features", FeaturesInput(kind="features", length=2,
                                                 names=("alcohol", "ash"))),
    "image": ("image", ImageInput(kind="image", size=(4, 4), channels=1, max_side=30,
                                  max_bytes=4096)),
}
"""Every decoder: the built-in kinds and one or two declarations of each declared kind."""

PICTURES = {PNG_BASE64: picture_base64(("PNG",)), PHOTO_BASE64: picture_base64(("PNG", "JPEG"))}
EXACT = [name for name in KINDS if name not in ("image8x8", "image")]
"""Kinds whose schema says everything: no picture format, no rows of equal length."""

PROPERTY = settings(derandomize=True, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=90)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values ``schema`` (JSON Schema 2020-12) allows, by schemathesis' own generator (the one
    that tests the live tier), pictures for the picture formats."""
    return build(schema, draft=20, formats=PICTURES)


def decoder_and_schema(name: str) -> tuple[Any, dict[str, Any]]:
    kind, spec = KINDS[name]
    return (input_decoder(kind, spec),
            input_json_schema(kind, spec, max_text_chars=MAX_TEXT_CHARS))


def decodes(decode: Any, value: Any) -> bool:
    """True if accepted; False if refused with an :class:`InvalidInput` naming an input field."""
    try:
        decode(value, max_text_chars=MAX_TEXT_CHARS)
    except InvalidInput as exc:
        assert exc.field and exc.field.startswith("input"), exc.field
        return False
    return True


def schema_allows(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_value_the_schema_allows_is_accepted(name: str) -> None:
    decode, schema = decoder_and_schema(name)

    @PROPERTY
    @given(from_schema(schema).filter(said_only_in_words))
    def check(value: Any) -> None:
        assert decodes(decode, value), value

    check()


@pytest.mark.parametrize("name", list(KINDS))
def test_any_json_is_accepted_or_refused_by_name_and_accepted_only_if_schema_valid(
        name: str) -> None:
    decode, schema = decoder_and_schema(name)
    near = from_schema(schema)

    @PROPERTY
    @given(st.one_of(json_values, st.dictionaries(st.sampled_from(_keys(schema)), json_values,
                                                  max_size=3), near))
    def check(value: Any) -> None:
        accepted = decodes(decode, value)
        if accepted:
            assert schema_allows(schema, value), value
        elif name in EXACT:
            assert not schema_allows(schema, value), value

    check()


def said_only_in_words(value: Any) -> bool:
    """False for the two facts about a declared image the schema says in its descriptions
    only: rows of one length, and as many raw bytes as ``shape`` says."""
    if not isinstance(value, dict) or "raw_base64" in value:
        return "raw_base64" not in value if isinstance(value, dict) else True
    try:
        np.asarray(value.get("image", []), dtype=np.float64)
    except ValueError:  # ragged
        return False
    return True


def _keys(schema: dict[str, Any]) -> list[str]:
    """The property names of an input schema (its variants'), to aim random values at them."""
    variants = schema.get("oneOf", [schema])
    return sorted({key for variant in variants for key in variant.get("properties", {})})
