"""The models directory (architecture §5, a contract): ``manifest.json`` and the held-out splits.

Layout::

    manifest.json             this module's :class:`Manifest`
    vision/<tier>.{fp32,int8}.onnx, documents/<tier>.{fp32,int8}.onnx
    data/vision.npz           X_calib, y_calib, X_test, y_test (float32 [N, 64], class names)
    data/documents.json       {"classes", "calibration": {"texts", "labels"}, "test": {...}}
    extraction/<tier>.gguf, data/extraction.json
                              the generative task (``cascade models build --generative``): GGUF
                              models, splits of documents and their true answers (canonical
                              JSON), ``data/extraction.predictions.json`` the recorded answers
    <task>/task.yaml, <task>/*.onnx, data/<task>.{npz,json}
                              a registered task (``cascade models register``): its declared
                              input is in the manifest, its splits hold decoded inputs

Serving code, calibration and benchmarks read it through this module, which needs only
pydantic and numpy (never scikit-learn).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, overload

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from cascade import TIERS
from cascade.contract.input_spec import InputSpec
from cascade.errors import ModelError

MANIFEST_FILE = "manifest.json"

SplitName = Literal["calibration", "test"]
SPLITS: tuple[SplitName, ...] = ("calibration", "test")
VISION_SPLIT_FILE = "data/vision.npz"
DOCUMENTS_SPLIT_FILE = "data/documents.json"
NPZ_SUFFIX = {"calibration": "calib", "test": "test"}
"""Array names in the vision split file: ``X_calib``, ``y_calib``, ``X_test``, ``y_test``."""
SCHEMA_VERSION: Literal[1] = 1

InputKind = Literal["image8x8", "text", "image", "tensor", "features"]
"""``image8x8`` is the built-in vision input; the others are declared (``TaskEntry.input``)."""
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_tier_names(tiers: Iterable[str]) -> None:
    """ValueError naming the first tier that is not one of :data:`cascade.TIERS`."""
    unknown = [name for name in tiers if name not in TIERS]
    if unknown:
        raise ValueError(f"unknown tier {unknown[0]!r}; allowed: {', '.join(TIERS)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizationInfo(_Strict):
    """What int8 quantization did to one graph."""

    method: str = Field(description="e.g. 'dynamic' (onnxruntime quantize_dynamic)")
    weight_type: str
    ops_before: dict[str, int] = Field(description="node count per op type, fp32 graph")
    ops_after: dict[str, int] = Field(description="node count per op type, int8 graph")
    quantized_matmuls: int = Field(description="MatMul/Gemm nodes replaced by integer kernels")
    graph_changed: bool
    size_ratio: float = Field(description="fp32 bytes / int8 bytes")
    prediction_agreement: float = Field(description="share of test argmaxes equal to fp32's")


class TierEntry(_Strict):
    """One tier's model: the deployed file (int8 on edge tiers, fp32 on the cloud) and its twin."""

    file: str = Field(description="deployed model, relative to the models directory")
    runtime: str = Field("onnx", description="runtime that serves the file (cascade.runners)")
    sha256: str
    bytes: int
    fp32_file: str
    fp32_sha256: str
    fp32_bytes: int
    algorithm: str
    quantized: bool
    quantization: QuantizationInfo | None = None
    accuracy: float = Field(description="test accuracy of the deployed file")
    fp32_accuracy: float
    int8_accuracy: float | None = None
    sklearn_agreement: float | None = Field(
        None, description="share of test argmaxes equal to scikit-learn's (built-in tasks)")
    sklearn_max_abs_diff: float | None = Field(
        None, description="largest probability gap to scikit-learn (built-in tasks)")
    latency_ms_p50: float = Field(description="deployed file, one sample per call, 1 thread")
    latency_ms_p95: float
    fp32_latency_ms_p50: float
    quantization_warning: str | None = None
    train_samples: int | None = Field(
        None, description="rows the estimator was fit on: the training split plus augmented copies"
    )
    augmentation: str | None = Field(
        None, description="how the training split was augmented (None: it was not)"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="runtime settings handed to the runner (ModelSpec.options), e.g. n_ctx, "
        "n_threads, workers for runtime gguf; base_url, model for runtime openai")

    @field_validator("sha256", "fp32_sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a lowercase hex sha256 digest (64 characters)")
        return value


class GenerativeTierEntry(_Strict):
    """One tier's generative model: a GGUF file served in process (``gguf``) or by an
    OpenAI-compatible server that loads the same file (``openai``), and what it measured."""

    file: str = Field(description="the GGUF file, relative to the models directory")
    runtime: Literal["gguf", "openai"] = Field(
        description="gguf: llama.cpp in the tier; openai: an OpenAI-compatible server")
    sha256: str
    bytes: int
    algorithm: str = Field(description="the model, e.g. SmolLM2-135M-Instruct")
    quantized: bool = True
    quantization: str = Field(description="GGUF quantization type, e.g. Q4_1, Q4_K_M")
    prompt: str = Field(description="prompt style (cascade.models.prompting)")
    licence: str
    source: str = Field(description="where the file comes from (package==version)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the runtime's options (ModelSpec.options), e.g. "
        "n_ctx for gguf")
    accuracy: float = Field(description="exact-match accuracy (every field) on the test split")
    calibration_accuracy: float | None = None
    field_accuracy: dict[str, float] = Field(
        default_factory=dict, description="per field, share of test answers it matched")
    valid_json: float = Field(1.0, description="share of test answers that parsed")
    latency_ms_p50: float = Field(description="one request, whole answer, this machine")
    latency_ms_p95: float
    ttft_ms_p50: float | None = None
    tokens_per_s: float | None = None

    @field_validator("sha256")
    @classmethod
    def _is_hex_digest(cls, value: str) -> str:
        return TierEntry._is_hex_digest(value)


GENERATIVE_RUNTIMES = ("gguf", "openai")
_TIER_TAGS = ("classifier", "generative")


def _tier_kind(value: Any) -> str:
    """Which tier schema an entry follows: a classifier's (it has an fp32 twin, whatever its
    runtime), else a generative one when its runtime runs GGUF files."""
    if isinstance(value, dict):
        runtime, twin = value.get("runtime", "onnx"), "fp32_file" in value
    else:
        runtime, twin = getattr(value, "runtime", "onnx"), isinstance(value, TierEntry)
    return "generative" if runtime in GENERATIVE_RUNTIMES and not twin else "classifier"


AnyTierEntry = Annotated[
    Annotated[TierEntry, Tag("classifier")] | Annotated[GenerativeTierEntry, Tag("generative")],
    Discriminator(_tier_kind),
]
"""A tier of either kind; errors name the fields of the kind its ``runtime`` picks."""


class SplitInfo(_Strict):
    """The fixed held-out splits, shared by build, calibration and benchmark."""

    seed: int
    train: int | None = Field(description="rows trained on (None: a registered model's)")
    calibration: int
    test: int
    file: str
    sha256: str
    source: str
    duplicates_dropped: int = 0


class TaskEntry(_Strict):
    """One task's ladder, bottom tier first.

    A classifier task lists its ``classes``; a generative task (``output: generation``) lists
    the ``fields`` of its structured (JSON) answer instead, and its tiers are
    :class:`GenerativeTierEntry`.
    """

    output: Literal["classification", "generation"] = "classification"
    classes: tuple[str, ...] = ()
    fields: tuple[str, ...] = Field(
        (), description="generation: the keys every answer must carry (its JSON schema's)")
    input_kind: InputKind
    input: InputSpec | None = Field(
        None, description="the declared input of a registered task (task.yaml 'input:')")
    splits: SplitInfo
    tiers: dict[str, AnyTierEntry] = Field(min_length=1)
    registered_from: str | None = Field(
        None, description="the task.yaml this entry was registered from (None: built in)")

    @model_validator(mode="after")
    def _output_kind(self) -> TaskEntry:
        generative = self.output == "generation"
        if not generative and len(self.classes) < 2:
            raise ValueError("classes: a classifier task needs at least 2 classes")
        if generative and (self.classes or not self.fields):
            raise ValueError("a generative task lists its answer's fields, not classes")
        if not generative and self.fields:
            raise ValueError("fields: only a generative task (output: generation) has fields")
        want = GenerativeTierEntry if generative else TierEntry
        for name, tier in self.tiers.items():
            if not isinstance(tier, want):
                raise ValueError(  # noqa: TRY004 - pydantic reports ValueErrors, not TypeErrors
                    f"tiers.{name}: a {self.output} task's tier must be a {want.__name__}")
        return self

    @property
    def generative(self) -> bool:
        """True for a task whose models generate text (``output: generation``)."""
        return self.output == "generation"

    @model_validator(mode="after")
    def _declared_input(self) -> TaskEntry:
        if self.input is not None and self.input.kind != self.input_kind:
            raise ValueError(f"input.kind {self.input.kind!r} differs from input_kind "
                             f"{self.input_kind!r}")
        if self.input is None and self.input_kind not in ("image8x8", "text"):
            raise ValueError(f"input_kind {self.input_kind!r} needs a declared 'input'")
        return self

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, tiers: dict[str, TierEntry]) -> dict[str, TierEntry]:
        check_tier_names(tiers)
        return tiers


class Manifest(_Strict):
    """The parsed ``manifest.json``. Use :func:`load_manifest` to read one from disk."""

    schema_version: Literal[1]
    build_key: str
    created_at: datetime
    build_seconds: float
    packages: dict[str, str]
    tasks: dict[str, TaskEntry] = Field(min_length=1)

    _root: Path | None = PrivateAttr(default=None)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskEntry]) -> dict[str, TaskEntry]:
        bad = [name for name in tasks if not TASK_NAME.match(name)]
        if bad:
            raise ValueError(f"task name {bad[0]!r} is not allowed: lowercase letters, digits,"
                             f" '-' and '_', starting with a letter or digit")
        return tasks

    @property
    def root(self) -> Path:
        """The models directory this manifest was loaded from."""
        if self._root is None:
            raise ModelError("this manifest was not loaded from a directory (use load_manifest)")
        return self._root

    def task(self, task: str) -> TaskEntry:
        """The entry of ``task``; :class:`ModelError` names the tasks that exist."""
        entry = self.tasks.get(task)
        if entry is None:
            raise ModelError(
                f"task {task!r} is not in the manifest; available: {', '.join(self.tasks)}",
                field="task",
            )
        return entry

    def tier(self, task: str, tier: str) -> AnyTierEntry:
        """The entry of one tier of ``task``; :class:`ModelError` names the tiers that exist."""
        entry = self.task(task).tiers.get(tier)
        if entry is None:
            available = ", ".join(self.task(task).tiers)
            raise ModelError(
                f"tier {tier!r} has no {task!r} model in the manifest; available: {available}",
                field="tier",
            )
        return entry

    def model_path(self, task: str, tier: str) -> Path:
        """Absolute path of the deployed model file of ``task`` at ``tier``."""
        return self.root / self.tier(task, tier).file

    def model_name(self, task: str, tier: str) -> str:
        """Display name such as ``vision/endpoint:MLP(16)-int8``."""
        entry = self.tier(task, tier)
        if isinstance(entry, GenerativeTierEntry):
            return f"{task}/{tier}:{entry.algorithm}-{entry.quantization}"
        return model_display_name(task, tier, entry.algorithm, quantized=entry.quantized)


def model_display_name(task: str, tier: str, algorithm: str, *, quantized: bool) -> str:
    """How traces and hops name a model: ``<task>/<tier>:<algorithm>-<int8|fp32>``."""
    return f"{task}/{tier}:{algorithm}-{'int8' if quantized else 'fp32'}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(models_dir: Path) -> Manifest:
    """Read and validate ``<models_dir>/manifest.json``.

    Raises :class:`ModelError` naming the file and the offending field when it is missing,
    not JSON, or does not match the schema.
    """
    path = Path(models_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(
            f"no model manifest at {path}: build the models first with `cascade models build`"
            f" (or point the models directory at an existing build)"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read model manifest {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"model manifest {path} is not valid JSON: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelError(
            f"model manifest {path} is invalid: {_describe(exc)}; rebuild it with"
            f" `cascade models build --force`"
        ) from None
    manifest._root = path.parent.resolve()
    return manifest


def write_manifest(manifest: Manifest, models_dir: Path) -> Path:
    """Write ``manifest.json`` atomically (a reader never sees a half-written file)."""
    path = Path(models_dir) / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.{os.getpid()}.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    manifest._root = path.parent.resolve()
    return path


def _describe(exc: ValidationError) -> str:
    """First few pydantic errors as ``key.path: message`` (the full list is rarely useful)."""
    parts = []
    for error in exc.errors()[:3]:
        # a tier's schema tag (classifier, generative) is pydantic's, not a key of the file
        where = ".".join(str(part) for part in error["loc"] if part not in _TIER_TAGS) or "(root)"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@overload
def load_split(
    models_dir: Path, task: Literal["vision"], split: SplitName
) -> tuple[npt.NDArray[np.float32], list[str]]: ...
@overload
def load_split(
    models_dir: Path, task: Literal["documents"], split: SplitName
) -> tuple[list[str], list[str]]: ...
@overload
def load_split(
    models_dir: Path, task: str, split: str
) -> tuple[npt.NDArray[Any] | list[str], list[str]]: ...
def load_split(
    models_dir: Path, task: str, split: str
) -> tuple[npt.NDArray[Any] | list[str], list[str]]:
    """Inputs and true class names of a held-out split, as the models expect them.

    ``vision`` inputs are a float32 array [N, 64] of raw pixel values; ``documents`` inputs are
    a list of texts; a registered task's are its decoded inputs (an array [N, ...] from an
    ``.npz`` split file, or texts from a ``.json`` one). The split file is checked against the
    manifest's sha256.
    """
    if split not in SPLITS:
        raise ModelError(
            f"unknown split {split!r}; allowed: {', '.join(SPLITS)} (the training split is not"
            f" saved)",
            field="split",
        )
    manifest = load_manifest(models_dir)
    entry = manifest.task(task)
    info = entry.splits
    path = manifest.root / info.file
    again = ("rebuild with `cascade models build --force`" if entry.registered_from is None
             else f"register it again: `cascade models register {entry.registered_from}`")
    if not path.is_file():
        raise ModelError(f"split file {path} is missing: {again}")
    if sha256_file(path) != info.sha256:
        raise ModelError(
            f"split file {path} does not match the sha256 in the manifest: it was modified"
            f" after it was written; {again}"
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            suffix = NPZ_SUFFIX[split]
            inputs = arrays[f"X_{suffix}"]
            if inputs.dtype.kind == "f":
                inputs = inputs.astype(np.float32, copy=False)
            return inputs, [str(label) for label in arrays[f"y_{suffix}"]]
    payload = json.loads(path.read_text(encoding="utf-8"))
    part = payload[split]
    return list(part["texts"]), list(part["labels"])
