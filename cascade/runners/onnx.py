"""ONNX models through onnxruntime: the runtime of every built-in tier.

Serving-side only: this module must never import scikit-learn, skl2onnx or onnx.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from cascade.contract.deadline import Deadline
from cascade.contract.input_spec import InputSpec
from cascade.contract.outputs import Classification, Output
from cascade.errors import InvalidInput, ModelError
from cascade.runners.execution import BlockingCalls, measure_ms
from cascade.runners.prepare import preparer_for, warmup_input

if TYPE_CHECKING:
    from cascade.runners.registry import ModelSpec

VISION_FEATURES = 64
_PROBABILITIES_OUTPUT = "probabilities"


def probabilities_output(names: Sequence[str]) -> str:
    """Which output holds the probabilities: ``probabilities`` if there is one, else the last."""
    return _PROBABILITIES_OUTPUT if _PROBABILITIES_OUTPUT in names else names[-1]


def _session_options() -> ort.SessionOptions:
    # One thread, sequential: requests are served inline, so parallelism comes from requests,
    # and single-sample latency is what the manifest reports.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRunner:
    """One ONNX classifier: raw task inputs in, class probabilities out.

    ``vision`` takes a float32 array [N, 64] of raw 0..16 pixel values; ``documents`` takes a
    sequence of texts; a task with a declared ``input_spec`` takes a batch of decoded inputs
    (:mod:`cascade.runners.prepare` turns them into the graph's tensor). Build one with
    :meth:`from_bytes`; serving loads it through the model repository
    (:func:`cascade.models.repository.load_runner`, which checks the sha256).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        task: str,
        classes: Sequence[str],
        model_name: str,
        input_kind: str,
        path: Path | None = None,
        sha256: str | None = None,
        calls: BlockingCalls | None = None,
        input_spec: InputSpec | None = None,
    ) -> None:
        self.task = task
        self.classes: tuple[str, ...] = tuple(classes)
        self.model_name = model_name
        self.input_kind = input_kind
        self.input_spec = input_spec
        self.path = path
        self.sha256 = sha256
        self._session = session
        self.calls = calls or BlockingCalls(name=model_name)
        """Where :meth:`run` computes: inline or on worker threads (see execution module)."""
        self.input_name: str = session.get_inputs()[0].name
        self._output_names = [probabilities_output([o.name for o in session.get_outputs()])]
        self._prepare: Callable[[Any], npt.NDArray[Any]]
        if input_spec is not None:
            self._prepare = preparer_for(input_spec)
        elif input_kind == "text":
            self._prepare = self._prepare_texts
        elif input_kind == "image8x8":
            self._prepare = self._prepare_images
        else:
            raise ModelError(f"unsupported input kind {input_kind!r} for {model_name}")

    @classmethod
    def from_bytes(
        cls,
        model: bytes,
        *,
        task: str,
        classes: Sequence[str],
        model_name: str,
        input_kind: str,
        path: Path | None = None,
        calls: BlockingCalls | None = None,
        input_spec: InputSpec | None = None,
    ) -> OnnxRunner:
        """Load a serialized ONNX model; raises :class:`ModelError` if onnxruntime refuses it."""
        try:
            session = ort.InferenceSession(
                model, sess_options=_session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            where = f" ({path})" if path else ""
            raise ModelError(f"onnxruntime cannot load {model_name}{where}: {exc}") from exc
        runner = cls(
            session,
            task=task,
            classes=classes,
            model_name=model_name,
            input_kind=input_kind,
            path=path,
            sha256=hashlib.sha256(model).hexdigest(),
            calls=calls,
            input_spec=input_spec,
        )
        width = runner.predict_proba(runner._sample_input()).shape[1]
        if width != len(runner.classes):
            raise ModelError(
                f"{model_name} outputs {width} probabilities but the manifest lists"
                f" {len(runner.classes)} classes"
            )
        return runner

    def predict_proba(self, inputs: Any) -> npt.NDArray[np.float32]:
        """Probabilities [N, len(classes)] in :attr:`classes` order (rows sum to ~1)."""
        result: npt.NDArray[np.float32] = self._session.run(
            self._output_names, {self.input_name: self._prepare(inputs)}
        )[0]
        return result

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """One :class:`Classification` per input row (inline or off the loop, see ``calls``)."""
        if self.calls.inline:  # the common case: no coroutine in between
            probabilities = self.predict_proba(inputs)
        else:
            probabilities = await self.calls.call(self.predict_proba, inputs, deadline=deadline)
        return [Classification(row, self.classes) for row in probabilities]

    def warmup(self) -> None:
        """Run inferences so lazy allocations happen before the first request, and measure
        one sample's latency so ``calls`` (auto mode) can choose inline or threads."""
        sample = self._sample_input()
        self.calls.calibrate(measure_ms(lambda: self.predict_proba(sample)))

    def close(self) -> None:
        """Stop this model's worker threads, if it has any."""
        self.calls.close()

    def _sample_input(self) -> Any:
        if self.input_spec is not None:
            return warmup_input(self.input_spec)
        if self.input_kind == "text":
            return ["warm up"]
        return np.zeros((1, VISION_FEATURES), dtype=np.float32)

    @staticmethod
    def _prepare_images(inputs: Any) -> npt.NDArray[np.float32]:
        images = np.asarray(inputs, dtype=np.float32)  # no copy when already float32
        if images.ndim != 2 or images.shape[1] != VISION_FEATURES or images.shape[0] == 0:
            raise InvalidInput(
                f"vision input must be a float32 array of shape [N, {VISION_FEATURES}]"
                f" (flattened 8x8 images, N >= 1), got shape {list(images.shape)}",
                field="input",
            )
        return images

    @staticmethod
    def _prepare_texts(inputs: Any) -> npt.NDArray[np.object_]:
        if isinstance(inputs, str) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise InvalidInput("documents input must be a non-empty list of strings", field="input")
        return np.array(inputs, dtype=object).reshape(-1, 1)

    def __repr__(self) -> str:
        return f"OnnxRunner({self.model_name!r}, classes={len(self.classes)})"


def load_onnx(spec: ModelSpec) -> OnnxRunner:
    """The registry's loader for ``runtime: onnx``."""
    return OnnxRunner.from_bytes(spec.data, task=spec.task, classes=spec.classes,
                                 model_name=spec.model_name, input_kind=spec.input_kind,
                                 path=spec.path, calls=spec.calls, input_spec=spec.input_spec)
