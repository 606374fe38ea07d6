"""OnnxRunner on tiny hand-made ONNX graphs: loading, checksums, input handling, output shape."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cascade.errors import InvalidInput, ModelError
from cascade.models.manifest import load_manifest
from cascade.models.repository import load_classifier
from cascade.runners import Runner
from tests.helpers import build_modules_imported_by
from tests.unit.test_manifest import TOPICS, write_models_dir

onnx = pytest.importorskip("onnx")
TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper

WEIGHTS = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)


def vision_model() -> bytes:
    """image float32 [N, 64] -> softmax(image @ W) as 'probabilities', argmax as 'label'."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["image", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "vision",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        ],
        [numpy_helper.from_array(WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def documents_model() -> bytes:
    """text string [N, 1] -> counts of exact texts 'business'/'sport' (+1, normalised)."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "TfIdfVectorizer",
                ["text"],
                ["counts"],
                mode="TF",
                min_gram_length=1,
                max_gram_length=1,
                max_skip_count=0,
                ngram_counts=[0],
                ngram_indexes=[0, 1],
                pool_strings=list(TOPICS),
            ),
            helper.make_node("Add", ["counts", "one"], ["smoothed"]),
            helper.make_node("ReduceSum", ["smoothed", "axis"], ["total"], keepdims=1),
            helper.make_node("Div", ["smoothed", "total"], ["probabilities"]),
        ],
        "documents",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [
            numpy_helper.from_array(np.ones(1, np.float32), "one"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_models_dir(
        tmp_path,
        {("vision", "endpoint"): vision_model(), ("documents", "cloud"): documents_model()},
    )
    return tmp_path


def test_vision_runner_predicts_softmax_of_the_graph(models_dir: Path) -> None:
    runner = load_classifier(models_dir, "vision", "endpoint")
    assert isinstance(runner, Runner)
    assert runner.model_name == "vision/endpoint:MLP(16)-int8"
    assert runner.task == "vision"
    assert runner.classes == tuple(str(d) for d in range(10))
    images = np.random.default_rng(1).integers(0, 17, size=(5, 64)).astype(np.float32)
    probabilities = runner.predict_proba(images)
    logits = images.astype(np.float64) @ WEIGHTS
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_vision_runner_reads_the_probabilities_output_by_name(models_dir: Path) -> None:
    runner = load_classifier(models_dir, "vision", "endpoint")
    assert runner._output_names == ["probabilities"]  # 'label' is the graph's last output


def test_documents_runner_takes_a_list_of_texts(models_dir: Path) -> None:
    runner = load_classifier(models_dir, "documents", "cloud")
    assert runner.model_name == "documents/cloud:MLP(16)-fp32"
    assert runner.classes == TOPICS
    probabilities = runner.predict_proba(["sport", "business", "weather"])
    np.testing.assert_allclose(
        probabilities, [[1 / 3, 2 / 3], [2 / 3, 1 / 3], [0.5, 0.5]], atol=1e-6
    )


@pytest.mark.parametrize(
    ("task", "tier", "bad_input", "message"),
    [
        (
            "vision",
            "endpoint",
            np.zeros((2, 63), np.float32),
            r"shape \[N, 64\].*got shape \[2, 63\]",
        ),
        ("vision", "endpoint", np.zeros(64, np.float32), r"got shape \[64\]"),
        ("vision", "endpoint", np.zeros((0, 64), np.float32), r"got shape \[0, 64\]"),
        ("documents", "cloud", "sport", "non-empty list of strings"),
        ("documents", "cloud", ["sport", 3], "non-empty list of strings"),
        ("documents", "cloud", [], "non-empty list of strings"),
    ],
)
def test_malformed_inputs_raise_invalid_input(
    models_dir: Path, task: str, tier: str, bad_input: object, message: str
) -> None:
    runner = load_classifier(models_dir, task, tier)
    with pytest.raises(InvalidInput, match=message) as caught:
        runner.predict_proba(bad_input)
    assert caught.value.status == 422 and caught.value.field == "input"


class RecordingSession:
    """Wraps an onnxruntime session; records the feeds of every run."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append(feeds)
        return self.inner.run(outputs, feeds)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("task", "tier", "name", "sample"), [
    ("vision", "endpoint", "image", np.zeros((1, 64), np.float32)),
    ("documents", "cloud", "text", np.array([["warm up"]], dtype=object)),
])
def test_warmup_runs_the_model_on_a_sample_input_and_measures_it(
    models_dir: Path, task: str, tier: str, name: str, sample: np.ndarray
) -> None:
    runner = load_classifier(models_dir, task, tier)
    session = RecordingSession(runner._session)
    runner._session = session  # type: ignore[assignment]
    assert runner.calls.measured_ms is None
    runner.warmup()
    assert session.feeds  # it ran the model...
    for feeds in session.feeds:  # ...on the sample input only
        assert list(feeds) == [name]
        assert feeds[name].shape == sample.shape and feeds[name].dtype == sample.dtype
        np.testing.assert_array_equal(feeds[name], sample)
    calls = runner.calls  # and its latency decides where calls run (auto mode)
    assert calls.measured_ms is not None and calls.measured_ms > 0
    assert calls.inline == (calls.measured_ms < calls.offload_above_ms)


def test_tampered_model_refuses_to_load(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    copy = tmp_path_factory.mktemp("tampered") / "models"
    shutil.copytree(models_dir, copy)
    path = load_manifest(copy).model_path("vision", "endpoint")
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    with pytest.raises(
        ModelError,
        match=r"vision/endpoint failed its checksum: .*corrupted or "
        r"was modified\. Refusing to load it",
    ):
        load_classifier(copy, "vision", "endpoint")
    # The original directory is untouched and still loads.
    load_classifier(models_dir, "vision", "endpoint")


def test_unverified_load_of_a_corrupt_file_is_still_a_model_error(models_dir: Path) -> None:
    load_manifest(models_dir).model_path("vision", "endpoint").write_bytes(b"not onnx at all")
    with pytest.raises(ModelError, match=r"onnxruntime cannot load vision/endpoint:MLP\(16\)-int8"):
        load_classifier(models_dir, "vision", "endpoint", verify_sha256=False)


def test_missing_model_file_names_the_path(models_dir: Path) -> None:
    load_manifest(models_dir).model_path("documents", "cloud").unlink()
    with pytest.raises(
        ModelError, match=r"documents/cloud\.onnx for documents/cloud cannot be read"
    ):
        load_classifier(models_dir, "documents", "cloud")


def test_class_count_mismatch_is_refused(tmp_path: Path) -> None:
    write_models_dir(
        tmp_path, {("vision", "endpoint"): vision_model()}, classes={"vision": ("a", "b", "c")}
    )
    with pytest.raises(ModelError, match="outputs 10 probabilities but the manifest lists 3"):
        load_classifier(tmp_path, "vision", "endpoint")


def test_serving_imports_neither_sklearn_nor_onnx(models_dir: Path) -> None:
    script = f"""
import numpy as np
from pathlib import Path
from cascade.models.repository import load_classifier
vision = load_classifier(Path({str(models_dir)!r}), "vision", "endpoint")
assert vision.predict_proba(np.zeros((1, 64), np.float32)).shape == (1, 10)
documents = load_classifier(Path({str(models_dir)!r}), "documents", "cloud")
assert documents.predict_proba(["sport"]).shape == (1, 2)
"""
    assert build_modules_imported_by(script, timeout_s=60) == []
