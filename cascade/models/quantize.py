"""int8 dynamic quantization of the edge tiers' graphs with onnxruntime's quantizer."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
METHOD = "dynamic"
WEIGHT_TYPE = QuantType.QInt8


@dataclass(frozen=True)
class QuantizationResult:
    """Graph-level facts about one quantization (accuracy is measured by the caller)."""

    ops_before: dict[str, int]
    ops_after: dict[str, int]
    quantized_matmuls: int
    graph_changed: bool
    size_ratio: float


def quantize_int8(fp32_path: Path, int8_path: Path) -> QuantizationResult:
    """Write an int8 twin of ``fp32_path`` to ``int8_path``: weights of MatMul/Gemm nodes
    become int8 and activations are quantized on the fly. Other nodes (tokenizer, TF-IDF,
    tree/SVM/linear classifiers) stay float, so graphs without MatMul come out unchanged."""
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        quantize_dynamic(
            model_input=fp32_path,
            model_output=int8_path,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            weight_type=WEIGHT_TYPE,
            per_channel=False,
            reduce_range=False,
        )
    before = _op_counts(fp32_path)
    after = _op_counts(int8_path)
    float_matmuls = sum(before.get(op, 0) for op in QUANTIZED_OP_TYPES)
    remaining = sum(after.get(op, 0) for op in QUANTIZED_OP_TYPES)
    return QuantizationResult(
        ops_before=before,
        ops_after=after,
        quantized_matmuls=float_matmuls - remaining,
        graph_changed=before != after,
        size_ratio=round(fp32_path.stat().st_size / int8_path.stat().st_size, 3),
    )


def _op_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(Counter(node.op_type for node in graph.node).items()))


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # The quantizer logs "Please consider to run pre-processing" on the root logger; that advice
    # is about static quantization of CNNs and does not apply to these graphs.
    def drop_advice(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop_advice)
    try:
        yield
    finally:
        root.removeFilter(drop_advice)
