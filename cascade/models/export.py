"""scikit-learn pipeline -> ONNX graph taking raw inputs and returning a probabilities tensor."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType

from cascade.models.train import TrainedModel

TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
INPUT_NAMES = {"vision": "image", "documents": "text"}

# The ONNX tokenizer must split exactly like train.TOKEN_PATTERN (RE2's \w is ASCII-only).
# Without an explicit locale the exported StringNormalizer fails to load.
_TEXT_OPTIONS = {"locale": "C.utf8", "tokenexp": r"\b\w\w+\b"}


def export_onnx(trained: TrainedModel, *, tier: str) -> onnx.ModelProto:
    """Convert ``trained`` to ONNX: input ``image`` float32 [N, 64] or ``text`` string [N, 1];
    outputs ``label`` and ``probabilities`` [N, K] (no ZipMap)."""
    pipeline = trained.pipeline
    first, classifier = pipeline.steps[0][1], pipeline.steps[-1][1]
    options: dict[int, dict[str, object]] = {id(classifier): {"zipmap": False}}
    if trained.task == "vision":
        width = int(first.n_features_in_)
        initial_types = [(INPUT_NAMES["vision"], FloatTensorType([None, width]))]
    else:
        initial_types = [(INPUT_NAMES["documents"], StringTensorType([None, 1]))]
        options[id(first)] = dict(_TEXT_OPTIONS)
    with warnings.catch_warnings():
        # skl2onnx reads SVC.probA_/probB_, deprecated (and unused here) since scikit-learn 1.9.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*prob[AB]_")
        model: onnx.ModelProto = convert_sklearn(
            pipeline, initial_types=initial_types, options=options, target_opset=TARGET_OPSET
        )
    _dedupe_opset_imports(model)
    model.doc_string = f"cascade {trained.task}/{tier}: {trained.spec.algorithm}"
    onnx.helper.set_model_props(
        model,
        {
            "cascade.task": trained.task,
            "cascade.tier": tier,
            "cascade.algorithm": trained.spec.algorithm,
            "cascade.classes": json.dumps(list(trained.classes)),
        },
    )
    onnx.checker.check_model(model)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _dedupe_opset_imports(model: onnx.ModelProto) -> None:
    # Some converters (logistic regression) declare the default domain twice; onnxruntime's
    # quantizer rejects such models. Keep the highest version per domain.
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(opset.version, versions.get(opset.domain, 0))
    if len(versions) == len(model.opset_import):
        return
    del model.opset_import[:]
    for domain, version in versions.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
