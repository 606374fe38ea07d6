"""int8 quantization of the edge tiers' graphs with onnxruntime's quantizer: dynamic (the
built-in ladders, and ``register --quantize int8``) or static over a calibration set
(``register --quantize int8-static``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

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
    return _result(fp32_path, int8_path)


def quantize_int8_static(fp32_path: Path, int8_path: Path, input_name: str,
                         calibration: Iterable[npt.NDArray[np.generic]]) -> QuantizationResult:
    """Write an int8 twin whose MatMul/Gemm weights *and* activations use fixed scales,
    measured (min/max) on ``calibration`` (graph-ready tensors, one batch each): no run-time
    range computation, at the price of ranges the calibration set must cover."""
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        quantize_static(
            model_input=fp32_path,
            model_output=int8_path,
            calibration_data_reader=_Batches(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            activation_type=QuantType.QUInt8,
            weight_type=WEIGHT_TYPE,
            per_channel=False,
            reduce_range=False,
        )
    return _result(fp32_path, int8_path)


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    def __init__(self, input_name: str, batches: Iterable[npt.NDArray[np.generic]]) -> None:
        self._feeds = iter([{input_name: batch} for batch in batches])

    def get_next(self) -> dict[str, npt.NDArray[np.generic]] | None:
        return next(self._feeds, None)


def _result(fp32_path: Path, int8_path: Path) -> QuantizationResult:
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


def quantizable_ops(path: Path) -> int:
    """How many MatMul/Gemm nodes the graph has (0: int8 quantization would change nothing)."""
    counts = _op_counts(path)
    return sum(counts.get(op, 0) for op in QUANTIZED_OP_TYPES)


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
