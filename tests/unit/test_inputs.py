"""Input validation happens before the model; every failure names the field."""

import base64
import io

import numpy as np
import pytest

from cascade.contract.inputs import documents_input, vision_input
from cascade.errors import InvalidInput


def png_b64(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_grid_becomes_float32_row():
    grid = [[float(r * 8 + c) % 17 for c in range(8)] for r in range(8)]
    x = vision_input({"image": grid})
    assert x.shape == (1, 64) and x.dtype == np.float32
    assert x[0, 9] == grid[1][1]


def test_png_is_scaled_to_the_training_range():
    pixels = np.full((8, 8), 255)
    pixels[0, 0] = 0
    x = vision_input({"png_base64": png_b64(pixels)})
    assert x.shape == (1, 64)
    assert x[0, 0] == 0.0 and x[0, 1] == pytest.approx(16.0)


def test_larger_png_is_downsampled_to_8x8():
    x = vision_input({"png_base64": png_b64(np.full((32, 32), 255))})
    assert x.shape == (1, 64) and np.allclose(x, 16.0)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({}, "input"),
        ({"image": "no"}, "input.image"),
        ({"image": [[0] * 8] * 8, "extra": 1}, "input.extra"),
        ({"image": [[0] * 8] * 7 + [[0] * 8 + [1]]}, "input.image[7]"),
        ({"image": [[0] * 8] * 7 + [[0] * 7 + [float("nan")]]}, "input.image[7][7]"),
        ({"image": [[0] * 8] * 7 + [[0] * 7 + [None]]}, "input.image[7][7]"),
    ],
)
def test_bad_vision_inputs(value, field):
    with pytest.raises(InvalidInput) as info:
        vision_input(value)
    assert info.value.field == field
    assert info.value.status == 422


def test_documents():
    assert documents_input({"text": "hello world"}) == ["hello world"]
    with pytest.raises(InvalidInput, match="at most 5") as info:
        documents_input({"text": "x" * 6}, max_text_chars=5)
    assert info.value.field == "input.text"
    with pytest.raises(InvalidInput, match="empty"):
        documents_input({"text": "\n\t "})
