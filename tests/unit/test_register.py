"""`cascade models register`: every refusal names the file and the key; a valid folder is
registered, served and split like a built-in task. Models are small hand-made ONNX graphs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cascade.cli.models_cmd import models_app
from cascade.errors import RegistrationError
from cascade.models.manifest import MANIFEST_FILE, load_manifest, load_split
from cascade.models.register import RegisterRequest, register_task
from cascade.models.repository import load_classifier

CLASSES = ["a", "b", "c"]


def linear_softmax(path: Path, weights: np.ndarray, *,
                   input_shape: list[Any] | None = None) -> None:
    """X [N, d] -> MatMul(weights [d, k]) -> Softmax -> ``probabilities`` [N, k]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, k = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, input_shape or [None, d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, k])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def heldout(path: Path, n: int = 30, labels: list[str] | None = None) -> Path:
    """Samples whose argmax under the identity-like weights below is their label."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    x = rng.normal(0, 0.1, (n, 4)).astype(np.float32)
    x[np.arange(n), y] += 2.0
    np.savez(path, x=x, y=np.asarray(labels or [CLASSES[i] for i in y]))
    return path


WEIGHTS = np.eye(4, 3) * 3.0


def task_folder(root: Path, yaml_text: str | None = None, *, models: bool = True) -> Path:
    folder = root / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    if yaml_text is None:
        yaml_text = ("input: {kind: features, length: 4}\nclasses: [a, b, c]\ntiers:\n"
                     "  endpoint: {file: small.onnx}\n  cloud: {file: big.onnx, quantize: false}\n")
    (folder / "task.yaml").write_text(yaml_text)
    if models:
        linear_softmax(folder / "small.onnx", WEIGHTS)
        linear_softmax(folder / "big.onnx", WEIGHTS * 2)
    return folder


def register(tmp_path: Path, folder: Path, data: Path | None = None, **options: Any) -> Any:
    request = RegisterRequest(folder=folder, heldout=data or heldout(tmp_path / "h.npz"),
                              models_dir=tmp_path / "models", **options)
    return register_task(request)


def refusal(tmp_path: Path, folder: Path, data: Path | None = None,
            **options: Any) -> RegistrationError:
    with pytest.raises(RegistrationError) as info:
        register(tmp_path, folder, data, **options)
    assert not (tmp_path / "models" / MANIFEST_FILE).exists(), "a refusal writes nothing"
    return info.value


def test_a_valid_folder_is_registered_served_and_split(tmp_path: Path) -> None:
    entry = register(tmp_path, task_folder(tmp_path), quantize="int8")
    models = tmp_path / "models"
    manifest = load_manifest(models)
    assert manifest.tasks["toy"] == entry
    assert entry.input_kind == "features" and entry.registered_from == str(tmp_path / "toy")
    assert (entry.splits.calibration, entry.splits.test) == (15, 15)
    endpoint, cloud = entry.tiers["endpoint"], entry.tiers["cloud"]
    assert endpoint.file == "toy/small.int8.onnx" and endpoint.quantized
    assert endpoint.quantization is not None and endpoint.quantization.method == "dynamic"
    assert endpoint.quantization.quantized_matmuls == 1
    assert (endpoint.fp32_accuracy, endpoint.int8_accuracy) == (1.0, 1.0)
    assert cloud.file == "toy/big.onnx" and not cloud.quantized and cloud.int8_accuracy is None
    assert endpoint.latency_ms_p50 > 0 and endpoint.runtime == "onnx"
    assert (models / "toy" / "task.yaml").is_file()
    inputs, labels = load_split(models, "toy", "test")
    assert inputs.shape == (15, 4) and set(labels) == set(CLASSES)
    runner = load_classifier(models, "toy", "endpoint")
    assert runner.model_name == "toy/endpoint:small-int8"
    assert runner.predict_proba(inputs[:1]).shape == (1, 3)


def test_static_quantization_uses_the_calibration_split(tmp_path: Path) -> None:
    entry = register(tmp_path, task_folder(tmp_path), quantize="int8-static")
    quantization = entry.tiers["endpoint"].quantization
    assert quantization is not None and quantization.method == "static"
    assert "QuantizeLinear" in quantization.ops_after
    assert entry.tiers["endpoint"].int8_accuracy == 1.0


def test_registering_again_replaces_the_entry_and_keeps_other_tasks(tmp_path: Path) -> None:
    register(tmp_path, task_folder(tmp_path))
    (tmp_path / "other").mkdir()
    other = task_folder(tmp_path / "other")
    register(tmp_path, other)  # also named "toy": the folder's name
    register(tmp_path, task_folder(tmp_path, "name: second\n" + (tmp_path / "toy/task.yaml")
                                   .read_text(), models=False))
    assert sorted(load_manifest(tmp_path / "models").tasks) == ["second", "toy"]


def test_missing_task_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    error = refusal(tmp_path, folder)
    assert error.file == str(folder / "task.yaml")
    assert error.message.startswith(f"{folder / 'task.yaml'}: missing; a task folder needs")


def test_bad_kind_names_the_key_and_the_allowed_kinds(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: picture}\nclasses: [a, b, c]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n")
    error = refusal(tmp_path, folder)
    assert error.key == "input"
    assert error.message == (f"{folder / 'task.yaml'}: input: got 'picture'; allowed: 'image',"
                             " 'tensor', 'features', 'text'")


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: features, lenght: 4}\nclasses: [a, b, c]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n")
    error = refusal(tmp_path, folder)
    assert error.key == "input.lenght"
    assert "input.lenght: unknown key (did you mean 'length'?); allowed keys here: kind, " \
           "length, names" in error.message


def test_classes_mismatch_with_the_graph_output_width(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: features, length: 4}\nclasses: [a, b]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n")
    error = refusal(tmp_path, folder, heldout(tmp_path / "h.npz", labels=["a", "b"] * 15))
    assert error.key == "classes"
    assert error.message == (
        f"{folder / 'task.yaml'}: classes: 2 classes are declared, but small.onnx output "
        "'probabilities' is [N, 3]: it must be [N, 2], one probability per class in the "
        "declared order")


def test_input_shape_mismatch(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: features, length: 5}\nclasses: [a, b, c]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n")
    np.savez(tmp_path / "h5.npz", x=np.zeros((8, 5), np.float32), y=np.asarray(["a"] * 8))
    error = refusal(tmp_path, folder, tmp_path / "h5.npz")
    assert error.key == "input.length"
    assert error.message == (f"{folder / 'task.yaml'}: input.length: the declared input gives "
                             "the graph [N, 5], but small.onnx input 'X' is [N, 4]")


def test_input_dtype_mismatch(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: tensor, shape: [4], dtype: int64}\n"
                         "classes: [a, b, c]\ntiers: {endpoint: {file: small.onnx}}\n")
    np.savez(tmp_path / "hi.npz", x=np.zeros((8, 4), np.int64), y=np.asarray(["a"] * 8))
    error = refusal(tmp_path, folder, tmp_path / "hi.npz")
    assert error.key == "input.dtype"
    assert error.message == (f"{folder / 'task.yaml'}: input.dtype: a tensor input feeds the "
                             "graph tensor(int64), but small.onnx input 'X' is tensor(float)")


def test_missing_model_file(tmp_path: Path) -> None:
    folder = task_folder(tmp_path)
    (folder / "big.onnx").unlink()
    error = refusal(tmp_path, folder)
    assert error.key == "tiers.cloud.file"
    assert error.message == (f"{folder / 'task.yaml'}: tiers.cloud.file: model file 'big.onnx'"
                             f" not found in {folder}")


@pytest.mark.parametrize(
    ("write", "key", "message"),
    [
        (lambda p: np.savez(p, x=np.zeros((8, 4), np.float32)), "y",
         "array 'y' is missing; a held-out .npz holds x (inputs) and y (class names); it has x"),
        (lambda p: np.savez(p, x=np.zeros((8, 4), np.float32),
                            y=np.asarray(["a", "b", "c", "d"] * 2)), "y[3]",
         "y[3]: 'd' is not a class of the task; allowed: a, b, c"),
        (lambda p: np.savez(p, x=np.zeros((8, 3), np.float32), y=np.asarray(["a"] * 8)), "x",
         "x: rows must have shape [4] (the declared input); got [3]"),
    ],
    ids=["no-y", "unknown-label", "wrong-width"],
)
def test_bad_npz_heldout(tmp_path: Path, write: Any, key: str, message: str) -> None:
    path = tmp_path / "bad.npz"
    write(path)
    error = refusal(tmp_path, task_folder(tmp_path), path)
    assert (error.file, error.key) == (str(path), key)
    assert error.message == f"{path}: {message}"


def test_bad_jsonl_heldout_names_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"input": {"features": [1, 0, 0, 0]}, "label": "a"}
    bad = {"input": {"features": [1, 0, "x", 0]}, "label": "a"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    error = refusal(tmp_path, task_folder(tmp_path), path)
    assert error.key == "line 2: input.features[2]"
    assert error.message == f"{path}: line 2: input.features[2]: must be a finite number; got 'x'"


def test_jsonl_heldout_is_decoded_like_requests(tmp_path: Path) -> None:
    x = np.load(heldout(tmp_path / "h.npz"))
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps({"input": {"features": row.tolist()}, "label": str(y)})
                            + "\n" for row, y in zip(x["x"], x["y"])))
    entry = register(tmp_path, task_folder(tmp_path), path)
    assert entry.tiers["cloud"].fp32_accuracy == 1.0


def test_int8_loss_above_the_tolerance_is_refused(tmp_path: Path) -> None:
    # One huge weight sets the per-tensor int8 scale; the small one that decides class "b"
    # rounds to zero, so int8 answers "a" where fp32 answers "b".
    folder = task_folder(tmp_path, "input: {kind: features, length: 2}\nclasses: [a, b]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n", models=False)
    linear_softmax(folder / "small.onnx", np.array([[100.0, 0.0], [0.0, 0.3]]))
    x = np.tile(np.array([[0.001, 10.0], [1.0, 0.0]], np.float32), (10, 1))
    np.savez(tmp_path / "h2.npz", x=x, y=np.asarray(["b", "a"] * 10))
    error = refusal(tmp_path, folder, tmp_path / "h2.npz", quantize="int8")
    assert error.key == "tiers.endpoint"
    assert error.message.startswith(
        f"{folder / 'task.yaml'}: tiers.endpoint: int8 quantization of small.onnx costs 50.00 "
        "points of accuracy on the 10 test samples (100.00% -> 50.00%), more than the 0.50 "
        "allowed; nothing was registered.")


def test_classes_in_another_order_than_the_columns_are_refused(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "input: {kind: features, length: 4}\nclasses: [b, a, c]\n"
                         "tiers: {endpoint: {file: small.onnx}}\n")
    error = refusal(tmp_path, folder)
    assert error.key == "classes"
    assert "column 0 -> 'a', column 1 -> 'b', column 2 -> 'c'" in error.message


def test_builtin_task_names_are_reserved(tmp_path: Path) -> None:
    folder = task_folder(tmp_path, "name: vision\n" + "input: {kind: features, length: 4}\n"
                         "classes: [a, b, c]\ntiers: {endpoint: {file: small.onnx}}\n")
    assert refusal(tmp_path, folder).key == "name"


def test_cli_exits_1_with_the_message(tmp_path: Path) -> None:
    folder = task_folder(tmp_path)
    (folder / "big.onnx").unlink()
    result = CliRunner().invoke(models_app, [
        "register", str(folder), "--heldout", str(heldout(tmp_path / "h.npz")),
        "--models-dir", str(tmp_path / "models")])
    assert result.exit_code == 1
    assert "Registration refused:" in result.output
    assert "tiers.cloud.file: model file 'big.onnx' not found" in " ".join(result.output.split())


def test_cli_registers_and_prints_the_table(tmp_path: Path) -> None:
    result = CliRunner().invoke(models_app, [
        "register", str(task_folder(tmp_path)), "--heldout", str(heldout(tmp_path / "h.npz")),
        "--quantize", "int8", "--models-dir", str(tmp_path / "models")])
    assert result.exit_code == 0, result.output
    assert "toy: 3 classes, features input, 15 calibration + 15 test samples" in result.output
    assert re.search(r"endpoint\s+small\s+100\.00%\s+100\.00%", result.output)
