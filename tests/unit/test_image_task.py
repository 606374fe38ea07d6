"""A registered image task served by a tier built from settings (compose.build_node): the
decoder comes from the task's declaration. Photos and camera arrays are answered; bad input
is a 422 naming the field."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cascade.http.app import create_app
from cascade.models.register import RegisterRequest, register_task
from cascade.tier.compose import build_node
from cascade.tier.settings import NodeSettings
from tests.unit.otel_fixtures import serving

TASK_YAML = """\
input: {kind: image, size: [8, 8], channels: 3, layout: nchw, scale: 0.00392156862745098}
classes: [dark, bright]
tiers:
  endpoint: {file: brightness.onnx}
"""
POLICY = """\
version: 1
name: test
tasks:
  pics:
    tiers:
      endpoint: {signal: max_prob, threshold: 0.0}
"""


def brightness_model(path: Path) -> None:
    """[N, 3, 8, 8] in 0..1 -> softmax over (dark, bright) of the mean brightness."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.stack([-np.ones(192), np.ones(192)], axis=1) * (40 / 192)
    bias = np.array([10.0, -10.0])
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["X"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["scores"]),
         helper.make_node("Add", ["scores", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "brightness",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(weights.astype(np.float32), "W"),
         numpy_helper.from_array(bias.astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def photo(value: int, size: tuple[int, int], fmt: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image-task")
    folder = root / "pics"
    folder.mkdir()
    (folder / "task.yaml").write_text(TASK_YAML)
    brightness_model(folder / "brightness.onnx")
    rng = np.random.default_rng(0)
    levels = np.concatenate([rng.integers(0, 80, 10), rng.integers(180, 256, 10)])
    x = np.repeat(levels[:, None, None], 64, axis=1).reshape(20, 8, 8).astype(np.uint8)
    np.savez(root / "heldout.npz", x=x, y=np.asarray(["dark"] * 10 + ["bright"] * 10))
    register_task(RegisterRequest(folder=folder, heldout=root / "heldout.npz",
                                  models_dir=root / "models"))
    return root


def post_all(models: Path, inputs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    (models / "policy.yaml").write_text(POLICY)
    settings = NodeSettings(tier="endpoint", tasks=["pics"], models_dir=models / "models",
                            policy=models / "policy.yaml",
                            outbox_url=f"sqlite:///{models / 'endpoint.db'}")
    assert settings.tasks == {"pics": "endpoint"}

    async def run() -> list[tuple[int, dict[str, Any]]]:
        async with serving(create_app(build_node(settings))) as client:
            out = []
            for value in inputs:
                response = await client.post("/v1/infer", json={"task": "pics", "input": value})
                out.append((response.status_code, response.json()))
            return out

    return asyncio.run(run())


def test_photos_and_camera_arrays_are_answered(models: Path) -> None:
    frame = np.full((30, 40, 3), 230, np.uint8)
    answers = post_all(models, [
        {"image_base64": photo(20, (64, 48), "PNG")},
        {"image_base64": photo(240, (640, 480), "JPEG")},
        {"image": np.full((16, 16), 10).tolist()},
        {"raw_base64": base64.b64encode(frame.tobytes()).decode(), "shape": [30, 40, 3]},
    ])
    assert [(code, body["label"]) for code, body in answers] == [
        (200, "dark"), (200, "bright"), (200, "dark"), (200, "bright")]
    assert answers[0][1]["hops"][0]["model"] == "pics/endpoint:brightness-fp32"


def test_bad_images_are_422_naming_the_field(models: Path) -> None:
    answers = post_all(models, [
        {"image": [[0, 0], [0]]},
        {"image": [[0, 300]]},
        {"image_base64": "not base64!"},
        {"photo": "x"},
        {"raw_base64": "AAAA", "shape": [3, 3]},
    ])
    assert [(code, body["error"]["code"], body["error"]["field"]) for code, body in answers] == [
        (422, "invalid_input", "input.image[1]"),
        (422, "invalid_input", "input.image[0][1]"),
        (422, "invalid_input", "input.image_base64"),
        (422, "invalid_input", "input.photo"),
        (422, "invalid_input", "input.raw_base64"),
    ]
