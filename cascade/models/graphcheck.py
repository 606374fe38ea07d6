"""Does an ONNX graph fit its task's declaration? Checked before anything is registered.

The graph must take one input of the declared dtype and shape (batch dimension first, any
size), and give class probabilities: the output named ``probabilities``, else the last one, a
tensor [N, number of classes]. Errors name task.yaml's key and the model file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from cascade.contract.input_spec import (
    TENSOR_DTYPES,
    FeaturesInput,
    ImageInput,
    InputSpec,
    TensorInput,
    graph_input_shape,
)
from cascade.errors import RegistrationError
from cascade.runners.onnx import probabilities_output

__all__ = ["check_graph"]

def _declared_key(spec: InputSpec) -> str:
    if isinstance(spec, ImageInput):
        return "input.size"
    if isinstance(spec, TensorInput):
        return "input.shape"
    if isinstance(spec, FeaturesInput):
        return "input.length"
    return "input.kind"


def _expected_type(spec: InputSpec) -> str:
    if isinstance(spec, TensorInput):
        return TENSOR_DTYPES[spec.dtype]
    if isinstance(spec, ImageInput | FeaturesInput):
        return "tensor(float)"
    return "tensor(string)"


def _shape_text(shape: Sequence[object]) -> str:
    return "[" + ", ".join("N" if not isinstance(d, int) else str(d) for d in shape) + "]"


def check_graph(model: Path, spec: InputSpec, classes: Sequence[str], *, source: str,
                tier: str) -> None:
    """Raise :class:`RegistrationError` if ``model`` does not take the declared input or does
    not output one probability per class. ``source`` is the task.yaml it was declared in."""
    where = f"{source}: tiers.{tier}.file"
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise RegistrationError(f"{where}: onnxruntime cannot load {model}: {exc}",
                                file=source, key=f"tiers.{tier}.file") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RegistrationError(
            f"{where}: {model.name} takes {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)}); a task's model takes one", file=source,
            key=f"tiers.{tier}.file")
    graph_input = inputs[0]
    expected_type = _expected_type(spec)
    if graph_input.type != expected_type:
        key = "input.dtype" if isinstance(spec, TensorInput) else "input.kind"
        raise RegistrationError(
            f"{source}: {key}: a {spec.kind} input feeds the graph {expected_type}, but "
            f"{model.name} input {graph_input.name!r} is {graph_input.type}", file=source, key=key)
    declared = graph_input_shape(spec)
    graph_shape = list(graph_input.shape)
    sample_dims = graph_shape[1:]
    fits = len(sample_dims) == len(declared) and all(
        not isinstance(got, int) or got == want for got, want in zip(sample_dims, declared))
    if not fits:
        key = _declared_key(spec)
        layout = f" ({spec.layout} layout)" if isinstance(spec, ImageInput) else ""
        raise RegistrationError(
            f"{source}: {key}: the declared input gives the graph {_shape_text(['N', *declared])}"
            f"{layout}, but {model.name} input {graph_input.name!r} is "
            f"{_shape_text(graph_shape)}", file=source, key=key)
    outputs = session.get_outputs()
    output = next(o for o in outputs if o.name == probabilities_output([o.name for o in outputs]))
    if not output.type.startswith("tensor("):
        hint = (" (skl2onnx: convert with options={id(model): {'zipmap': False}} or "
                "options={'zipmap': False})" if output.type.startswith("seq(map") else "")
        raise RegistrationError(
            f"{where}: {model.name} output {output.name!r} is {output.type}; the probabilities "
            f"must be a float tensor [N, classes]{hint}", file=source, key=f"tiers.{tier}.file")
    width = output.shape[-1] if output.shape else None
    if len(output.shape) != 2 or (isinstance(width, int) and width != len(classes)):
        raise RegistrationError(
            f"{source}: classes: {len(classes)} classes are declared, but {model.name} output "
            f"{output.name!r} is {_shape_text(output.shape)}: it must be [N, {len(classes)}], "
            "one probability per class in the declared order", file=source, key="classes")
