"""``cascade models register``: put a user's task folder into the model repository.

Steps, each of which may refuse with a :class:`~cascade.errors.RegistrationError` naming the
file and key, before anything is written:

1. read ``task.yaml`` (:mod:`cascade.models.taskfile`) and the labelled held-out file
   (:mod:`cascade.models.heldout`), split into calibration and test halves unless a separate
   calibration file is given;
2. per tier: check the graph against the declared input and classes
   (:mod:`cascade.models.graphcheck`), measure fp32 accuracy on the test split, optionally
   quantize to int8 (dynamic, or static calibrated on the calibration split) and refuse when
   int8 loses more than the tolerance, then measure single-request latency;
3. write the task folder, its int8 twins and its split file into the models directory and
   merge the task's entry into ``manifest.json`` (under the directory's build lock).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from cascade.contract.input_spec import TextInput
from cascade.errors import ModelError, RegistrationError
from cascade.models.freshness import package_versions
from cascade.models.graphcheck import check_graph
from cascade.models.heldout import HeldOut, read_heldout, split_heldout
from cascade.models.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    QuantizationInfo,
    SplitInfo,
    TaskEntry,
    TierEntry,
    load_manifest,
    model_display_name,
    sha256_file,
)
from cascade.models.specs import INT8_MAX_ACCURACY_LOSS, SPLIT_SEED, TASKS
from cascade.models.splits import save_array_split, save_documents_split
from cascade.models.taskfile import TASK_FILE, LoadedTaskFile, load_task_file
from cascade.models.validate import Evaluation, agreement, single_request_latency_ms
from cascade.models.workspace import exclusive_build_lock, publish, staging_dir
from cascade.runners.onnx import OnnxRunner

if TYPE_CHECKING:
    from cascade.models.quantize import QuantizationResult
from cascade.runners.prepare import preparer_for

__all__ = ["Quantize", "RegisterRequest", "register_task", "registration_steps"]

Quantize = Literal["none", "int8", "int8-static"]
REGISTERED_BUILD_KEY = "registered"
"""The build key of a manifest that only registrations wrote (``models build`` adds to it)."""


@dataclass(frozen=True)
class RegisterRequest:
    """What to register and how (the CLI's arguments, validated)."""

    folder: Path
    heldout: Path
    models_dir: Path = Path("models")
    calibration: Path | None = None
    quantize: Quantize = "none"
    max_accuracy_loss: float = INT8_MAX_ACCURACY_LOSS


Step = Callable[[str], None]
"""Called with a description as each long step starts (the CLI's progress display)."""


def registration_steps(loaded: LoadedTaskFile) -> int:
    """How many times :func:`register_task` calls ``step`` (for a progress bar)."""
    return 2 + 3 * len(loaded.spec.tiers)


def register_task(request: RegisterRequest, *, loaded: LoadedTaskFile | None = None,
                  step: Step | None = None) -> TaskEntry:
    """Validate, measure, optionally quantize, and register a task folder; the written entry."""
    step = step or (lambda _description: None)
    started = time.perf_counter()
    loaded = loaded or load_task_file(request.folder)
    name, spec = loaded.name, loaded.spec
    if name in TASKS:
        raise RegistrationError(f"{loaded.path}: name: {name!r} is a built-in task (built by "
                                f"`cascade models build`); choose another name",
                                file=str(loaded.path), key="name")
    step(f"{name}: reading held-out data")
    heldout = read_heldout(request.heldout, spec.input, spec.classes)
    if request.calibration is not None:
        calibration, test = read_heldout(request.calibration, spec.input, spec.classes), heldout
    else:
        calibration, test = split_heldout(heldout, seed=SPLIT_SEED)
    models_dir = Path(request.models_dir).resolve()
    with exclusive_build_lock(models_dir), staging_dir(models_dir) as stage:
        task_dir = stage / name
        tiers = {tier: _Tier(loaded, tier, request, task_dir, step).register(calibration, test)
                 for tier in spec.tiers}
        step(f"{name}: writing the model repository")
        _copy_task_folder(loaded, task_dir)
        split_file = _save_split(stage, name, spec.input, calibration, test)
        entry = TaskEntry(
            classes=spec.classes, input_kind=spec.input.kind, input=spec.input,
            splits=SplitInfo(seed=SPLIT_SEED, train=None, calibration=len(calibration),
                             test=len(test), file=split_file,
                             sha256=sha256_file(stage / split_file),
                             source=f"held-out {request.heldout.name}"
                             + (f" + calibration {request.calibration.name}"
                                if request.calibration else " (halves, stratified)")),
            tiers=tiers, registered_from=str(loaded.folder))
        manifest = _merged_manifest(models_dir, name, entry, time.perf_counter() - started)
        publish(stage, models_dir, manifest)
    return entry


@dataclass
class _Tier:
    loaded: LoadedTaskFile
    tier: str
    request: RegisterRequest
    task_dir: Path
    step: Step

    def register(self, calibration: HeldOut, test: HeldOut) -> TierEntry:
        spec, model = self.loaded.spec, self.loaded.spec.tiers[self.tier]
        source, name = str(self.loaded.path), f"{self.loaded.name}/{self.tier}"
        fp32_path = self.loaded.model_path(self.tier)
        self.step(f"{name}: checking the graph and fp32 accuracy")
        check_graph(fp32_path, spec.input, spec.classes, source=source, tier=self.tier)
        algorithm = model.algorithm or Path(model.file).stem
        fp32 = self._runner(fp32_path, algorithm, quantized=False)
        fp32_eval = _evaluate_one_by_one(fp32, test)
        self._check_probabilities(fp32_eval.probabilities, fp32_path)
        self._check_class_order(fp32_eval, test, model.file)
        deployed, deployed_path, quantization, int8_accuracy = fp32, fp32_path, None, None
        warning = None
        quantize = self._quantize
        if quantize and _quantizable_ops(fp32_path) == 0:
            quantize = False
            warning = "not quantized: the graph has no MatMul/Gemm (served fp32)"
        self.step(f"{name}: quantizing" if quantize else f"{name}: fp32 (not quantized)")
        if quantize:
            int8_path = self.task_dir / Path(model.file).with_suffix(".int8.onnx")
            result = self._quantized(fp32_path, int8_path, fp32, calibration)
            deployed, deployed_path = self._runner(int8_path, algorithm, quantized=True), int8_path
            int8_eval = _evaluate_one_by_one(deployed, test)
            int8_accuracy = int8_eval.accuracy
            loss = round(fp32_eval.accuracy - int8_accuracy, 9)
            if loss > self.request.max_accuracy_loss:
                raise RegistrationError(
                    f"{source}: tiers.{self.tier}: int8 quantization of {model.file} costs "
                    f"{loss * 100:.2f} points of accuracy on the {len(test)} test samples "
                    f"({fp32_eval.accuracy:.2%} -> {int8_accuracy:.2%}), more than the "
                    f"{self.request.max_accuracy_loss * 100:.2f} allowed; nothing was "
                    f"registered. Keep this tier fp32 (quantize: false), try --quantize "
                    f"{'int8' if self.request.quantize == 'int8-static' else 'int8-static'}, "
                    f"or allow more with --max-accuracy-loss",
                    file=source, key=f"tiers.{self.tier}")
            if not result.graph_changed:
                warning = "int8 quantization left the graph unchanged (no MatMul/Gemm)"
            quantization = QuantizationInfo(
                method="static" if self.request.quantize == "int8-static" else "dynamic",
                weight_type="QInt8", ops_before=result.ops_before, ops_after=result.ops_after,
                quantized_matmuls=result.quantized_matmuls, graph_changed=result.graph_changed,
                size_ratio=result.size_ratio,
                prediction_agreement=agreement(int8_eval.probabilities, fp32_eval.probabilities))
        self.step(f"{name}: measuring single-request latency")
        p50, p95 = single_request_latency_ms(deployed, test.inputs)
        fp32_p50 = p50 if deployed is fp32 else single_request_latency_ms(fp32, test.inputs)[0]
        fp32_rel = (Path(self.loaded.name) / model.file).as_posix()
        accuracy = int8_accuracy if int8_accuracy is not None else fp32_eval.accuracy
        return TierEntry(
            file=(Path(self.loaded.name) / deployed_path.relative_to(self.task_dir)).as_posix()
            if deployed is not fp32 else fp32_rel,
            runtime=model.runtime, sha256=sha256_file(deployed_path),
            bytes=deployed_path.stat().st_size, fp32_file=fp32_rel,
            fp32_sha256=sha256_file(fp32_path), fp32_bytes=fp32_path.stat().st_size,
            algorithm=algorithm, quantized=deployed is not fp32, quantization=quantization,
            accuracy=round(accuracy, 6), fp32_accuracy=round(fp32_eval.accuracy, 6),
            int8_accuracy=None if int8_accuracy is None else round(int8_accuracy, 6),
            latency_ms_p50=p50, latency_ms_p95=p95, fp32_latency_ms_p50=fp32_p50,
            quantization_warning=warning)

    @property
    def _quantize(self) -> bool:
        return self.request.quantize != "none" and self.loaded.spec.tiers[self.tier].quantize

    def _runner(self, path: Path, algorithm: str, *, quantized: bool) -> OnnxRunner:
        spec = self.loaded.spec
        try:
            return OnnxRunner.from_bytes(
                path.read_bytes(), task=self.loaded.name, classes=spec.classes,
                model_name=model_display_name(self.loaded.name, self.tier, algorithm,
                                              quantized=quantized),
                input_kind=spec.input.kind, path=path, input_spec=spec.input)
        except ModelError as exc:
            raise RegistrationError(f"{self.loaded.path}: classes: {exc.message}",
                                    file=str(self.loaded.path), key="classes") from None

    def _quantized(self, fp32_path: Path, int8_path: Path, fp32: OnnxRunner,
                   calibration: HeldOut) -> QuantizationResult:
        from cascade.models.quantize import quantize_int8, quantize_int8_static

        try:
            if self.request.quantize == "int8-static":
                prepare = preparer_for(self.loaded.spec.input)
                batches = (prepare(calibration.inputs[i:i + 1]) for i in range(len(calibration)))
                return quantize_int8_static(fp32_path, int8_path, fp32.input_name, batches)
            return quantize_int8(fp32_path, int8_path)
        except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its graph walk hits
            raise RegistrationError(
                f"{self.loaded.path}: tiers.{self.tier}: onnxruntime could not quantize "
                f"{fp32_path.name} ({type(exc).__name__}: {exc}); set quantize: false for this "
                "tier or register without --quantize", file=str(self.loaded.path),
                key=f"tiers.{self.tier}") from None

    def _check_class_order(self, evaluation: Evaluation, test: HeldOut, file: str) -> None:
        """Refuse classes listed in another order than the graph's columns: each column's
        majority true label would be a different class, and far more accurate."""
        classes = self.loaded.spec.classes
        predicted = evaluation.predictions
        labels = np.asarray(test.labels)
        mapping: dict[int, str] = {}
        for column in set(predicted.tolist()):
            names, counts = np.unique(labels[predicted == column], return_counts=True)
            mapping[column] = str(names[np.argmax(counts)])
        remapped = float(np.mean([mapping[c] == y for c, y in zip(predicted.tolist(), labels)]))
        if (len(set(mapping.values())) == len(mapping) and remapped > evaluation.accuracy + 0.25
                and any(classes[c] != name for c, name in mapping.items())):
            seen = ", ".join(f"column {c} -> {name!r}" for c, name in sorted(mapping.items()))
            raise RegistrationError(
                f"{self.loaded.path}: classes: {file} is {evaluation.accuracy:.1%} accurate with "
                f"the classes in the declared order, {remapped:.1%} with {seen}: list the "
                "classes in the order of the graph's output columns (scikit-learn: sorted, "
                "as in model.classes_)", file=str(self.loaded.path), key="classes")

    def _check_probabilities(self, probabilities: npt.NDArray[Any], path: Path) -> None:
        sums = probabilities.sum(axis=1)
        if np.any(probabilities < -1e-6) or not np.allclose(sums, 1.0, atol=1e-3):
            raise RegistrationError(
                f"{self.loaded.path}: tiers.{self.tier}.file: {path.name} outputs scores that "
                f"are not probabilities (row sums {sums.min():.3f}..{sums.max():.3f}); the gate "
                "needs probabilities: end the graph with a Softmax",
                file=str(self.loaded.path), key=f"tiers.{self.tier}.file")


def _quantizable_ops(path: Path) -> int:
    from cascade.models.quantize import quantizable_ops

    return quantizable_ops(path)


def _evaluate_one_by_one(runner: OnnxRunner, data: HeldOut) -> Evaluation:
    """Accuracy as serving sees it: one sample per call (int8 activations are quantized per
    call, and some graphs take a batch of one only)."""
    rows = [runner.predict_proba(data.inputs[i:i + 1]) for i in range(len(data))]
    probabilities = np.concatenate(rows).astype(np.float64)
    predicted = np.asarray(runner.classes)[np.argmax(probabilities, axis=1)]
    return Evaluation(probabilities=probabilities,
                      accuracy=float(np.mean(predicted == np.asarray(data.labels))))


def _copy_task_folder(loaded: LoadedTaskFile, task_dir: Path) -> None:
    """task.yaml and the fp32 models into the staged ``<models>/<task>/`` (int8 twins are
    already there)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loaded.path, task_dir / TASK_FILE)
    for model in loaded.spec.tiers.values():
        target = task_dir / model.file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(loaded.folder / model.file, target)


def _save_split(stage: Path, name: str, spec: object, calibration: HeldOut,
                test: HeldOut) -> str:
    if isinstance(spec, TextInput):
        relative = f"data/{name}.json"
        save_documents_split(stage / relative, sorted(set(test.labels)),
                             (list(calibration.inputs), calibration.labels),
                             (list(test.inputs), test.labels))
        return relative
    relative = f"data/{name}.npz"
    save_array_split(stage / relative, (np.asarray(calibration.inputs), calibration.labels),
                     (np.asarray(test.inputs), test.labels))
    return relative


def _merged_manifest(models_dir: Path, name: str, entry: TaskEntry, seconds: float) -> Manifest:
    if (models_dir / MANIFEST_FILE).is_file():
        existing = load_manifest(models_dir)
        return existing.model_copy(update={"tasks": {**existing.tasks, name: entry}})
    return Manifest(schema_version=SCHEMA_VERSION, build_key=REGISTERED_BUILD_KEY,
                    created_at=datetime.now(UTC), build_seconds=round(seconds, 2),
                    packages=package_versions(), tasks={name: entry})
