"""Decoders configured by a declared input: photos, camera arrays, tensors, features, texts.
Every refusal is a 422 naming the field."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from cascade.contract.decoders import decoder_for, sample_input
from cascade.contract.input_spec import InputSpec
from cascade.errors import InvalidInput
from cascade.runners.prepare import preparer_for

SPEC: TypeAdapter[Any] = TypeAdapter(InputSpec)
RGB = SPEC.validate_python({"kind": "image", "size": [4, 6], "channels": 3, "layout": "nchw",
                            "scale": 1 / 255, "mean": [0.5], "std": [0.25]})
GREY = SPEC.validate_python({"kind": "image", "size": [4, 4], "channels": 1, "layout": "flat"})


def photo(array: np.ndarray, fmt: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_png_is_resized_to_the_declared_size_and_channels() -> None:
    pixels = np.zeros((40, 60, 3))
    pixels[:, :, 0] = 255  # pure red
    decoded = decoder_for(RGB)({"image_base64": photo(pixels, "PNG")})
    assert decoded.shape == (1, 4, 6, 3) and decoded.dtype == np.float32
    assert np.all(decoded[..., 0] == 255) and np.all(decoded[..., 1:] == 0)


def test_jpeg_grey_photo_for_a_colour_model() -> None:
    decoded = decoder_for(RGB)({"image_base64": photo(np.full((8, 12), 200), "JPEG")})
    assert decoded.shape == (1, 4, 6, 3)
    assert np.allclose(decoded, 200, atol=2)  # JPEG is lossy; grey stays grey in every channel


def test_camera_array_hxwxc_becomes_grey_with_pillows_luma() -> None:
    frame = np.zeros((4, 4, 3))
    frame[..., 1] = 100.0  # green
    decoded = decoder_for(GREY)({"image": frame.tolist()})
    assert decoded.shape == (1, 4, 4, 1)
    assert np.allclose(decoded, 58.7)


def test_camera_array_of_another_size_is_resized() -> None:
    decoded = decoder_for(GREY)({"image": np.full((16, 8), 10.0).tolist()})
    assert decoded.shape == (1, 4, 4, 1) and np.allclose(decoded, 10.0)


def test_raw_bytes_with_declared_shape() -> None:
    raw = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    decoded = decoder_for(RGB)({"raw_base64": base64.b64encode(raw.tobytes()).decode(),
                                "shape": [4, 6, 3]})
    assert np.array_equal(decoded[0], raw.astype(np.float32))


def test_runner_preparation_scales_normalises_and_lays_out() -> None:
    decoded = np.full((1, 4, 6, 3), 255.0, np.float32)
    tensor = preparer_for(RGB)(decoded)
    assert tensor.shape == (1, 3, 4, 6) and np.allclose(tensor, (1.0 - 0.5) / 0.25)
    flat = preparer_for(GREY)(np.ones((2, 4, 4, 1), np.float32))
    assert flat.shape == (2, 16)


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ({}, "input", "give exactly one of 'image', 'image_base64', 'raw_base64'"),
        ({"image": [[0] * 4] * 4, "colour": 1}, "input.colour", "unknown key 'colour'"),
        ({"image": [[0] * 4] * 3 + [[0] * 3]}, "input.image[3]", "must have 4 entries; got 3"),
        ({"image": [[0] * 4] * 3 + [[0, 0, 0, 256]]}, "input.image[3][3]",
         "must be between 0 and 255; got 256"),
        ({"image": [[0] * 4] * 3 + [[0, True, 0, 0]]}, "input.image[3][1]",
         "must be a finite number; got True"),
        ({"image": "abc"}, "input.image", "must be nested lists; got str"),
        ({"image": [[[0, 0]] * 4] * 4}, "input.image",
         "an image array has 1, 3 or 4 channels; got 2"),
        ({"image": np.zeros((5000, 1)).tolist()}, "input.image",
         "array is 5000x1; at most 4096 per side"),
        ({"image_base64": "%%%"}, "input.image_base64", "image_base64 is not valid base64"),
        ({"image_base64": base64.b64encode(b"GIF89a....").decode()}, "input.image_base64",
         "image_base64 does not decode to an image"),
        ({"raw_base64": "AAAA", "shape": [2, 2]}, "input.raw_base64",
         "raw_base64 holds 3 bytes; shape [2, 2] needs 4"),
        ({"raw_base64": "AAAA"}, "input.shape", "raw_base64 needs 'shape'"),
        ({"raw_base64": "AAAA", "shape": [1, "3"]}, "input.shape", "shape must be [H, W]"),
        ({"image": [[0]], "shape": [1, 1]}, "input.shape", "'shape' goes with 'raw_base64' only"),
    ],
)
def test_bad_images_name_the_field(value: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decoder_for(GREY)(value)
    assert (info.value.status, info.value.field) == (422, field)
    assert message in info.value.message


def test_a_gif_is_refused_as_a_format() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="GIF")
    with pytest.raises(InvalidInput) as info:
        decoder_for(GREY)({"image_base64": base64.b64encode(buffer.getvalue()).decode()})
    assert info.value.field == "input.image_base64"
    assert info.value.message == "expected a PNG or JPEG image; got GIF"


NAMED = SPEC.validate_python({"kind": "features", "length": 3, "names": ["a", "b", "c"]})


def test_features_as_a_list_or_by_name() -> None:
    decode = decoder_for(NAMED)
    assert decode({"features": [1, 2, 3.5]}).tolist() == [[1.0, 2.0, 3.5]]
    assert decode({"features": {"c": 3, "a": 1, "b": 2}}).tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"features": [1, 2]}, "input.features"),
        ({"features": [1, 2, None]}, "input.features[2]"),
        ({"features": {"a": 1, "b": 2}}, "input.features.c"),
        ({"features": {"a": 1, "b": 2, "c": 3, "d": 4}}, "input.features.d"),
        ({"features": {"a": 1, "b": float("inf"), "c": 3}}, "input.features.b"),
        ({"features": "1,2,3"}, "input.features"),
        ({"vector": [1, 2, 3]}, "input.vector"),
    ],
)
def test_bad_features_name_the_field(value: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decoder_for(NAMED)(value)
    assert info.value.field == field


TENSOR = SPEC.validate_python({"kind": "tensor", "shape": [2, 3], "dtype": "int64"})


def test_tensor_exact_shape_and_dtype() -> None:
    decoded = decoder_for(TENSOR)({"tensor": [[1, 2, 3], [4, 5, 6]]})
    assert decoded.dtype == np.int64 and decoded.shape == (1, 2, 3)
    with pytest.raises(InvalidInput) as info:
        decoder_for(TENSOR)({"tensor": [[1, 2, 3], [4, 5.5, 6]]})
    assert (info.value.field, info.value.message) == ("input.tensor[1][1]",
                                                      "must be an integer; got 5.5")
    with pytest.raises(InvalidInput) as info:
        decoder_for(TENSOR)({"tensor": [[1, 2, 3]]})
    assert (info.value.field, info.value.message) == ("input.tensor", "must have 2 entries; got 1")


def test_text_uses_the_smaller_limit() -> None:
    spec = SPEC.validate_python({"kind": "text", "max_chars": 5})
    assert decoder_for(spec)({"text": "hello"}) == ["hello"]
    with pytest.raises(InvalidInput) as info:
        decoder_for(spec)({"text": "hello!"}, max_text_chars=100)
    assert (info.value.field, info.value.message) == ("input.text",
                                                      "text has 6 characters; at most 5")


def test_a_stored_sample_round_trips_through_its_request_input() -> None:
    for spec, sample in ((GREY, np.full((4, 4, 1), 7.0)), (NAMED, np.array([1.0, 2.0, 3.0])),
                         (TENSOR, np.array([[1, 2, 3], [4, 5, 6]]))):
        decoded = decoder_for(spec)(sample_input(spec, sample))
        assert np.array_equal(decoded[0], sample)
