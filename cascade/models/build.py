"""``build_models``: train, export, quantize and validate both ladders; write the manifest.

Importing this module is cheap: scikit-learn, skl2onnx and onnx are imported only when a build
actually runs, so the up-to-date check takes well under a second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from cascade.errors import ModelError
from cascade.models.extra import ExtraData
from cascade.models.freshness import (
    compute_build_key,
    package_versions,
    registered_tasks,
    up_to_date_manifest,
)
from cascade.models.manifest import (
    DOCUMENTS_SPLIT_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    VISION_SPLIT_FILE,
    Manifest,
    QuantizationInfo,
    SplitInfo,
    TaskEntry,
    TierEntry,
    model_display_name,
    sha256_file,
)
from cascade.models.specs import (
    LADDERS,
    SPLIT_SEED,
    TASKS,
    TaskName,
    TierSpec,
)
from cascade.models.validate import (
    agreement,
    evaluate,
    quantization_warning,
    single_request_latency_ms,
)
from cascade.models.workspace import exclusive_build_lock, publish, staging_dir
from cascade.runners.onnx import OnnxRunner

if TYPE_CHECKING:
    from cascade.models.datasets import Dataset, Splits

# The ONNX graph must reproduce scikit-learn: same argmax almost everywhere, same probabilities
# up to float32 rounding. A silent tokenizer or formula difference fails the build.
_MIN_SKLEARN_AGREEMENT = 0.99
_MAX_SKLEARN_PROBA_DIFF = 1e-3

# Texts that stress the tokenizer beyond the (ASCII) corpus, checked like the test split.
_TEXT_PROBES = (
    "",
    "!!! ...",
    "Café naïve Über ÉCOLE straße ﬁnance ΣΟΦΙΑ 日本語 😀",
    "e-mail don't x_y 1,000 £5.8m 2004/05 O'Neill's",
    "SHARES   fell\tsharply\n\nin LONDON",
)

_INPUT_KIND = {"vision": "image8x8", "documents": "text"}
_SPLIT_FILE = {"vision": VISION_SPLIT_FILE, "documents": DOCUMENTS_SPLIT_FILE}


def build_models(
    out_dir: Path,
    *,
    force: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    extra_data: Sequence[Path] = (),
    extra_tiers: Sequence[str] | None = None,
) -> Manifest:
    """Build both model ladders into ``out_dir`` and return the written manifest.

    Skips the work (in well under a second) when ``out_dir`` already holds an intact build with
    the same build key, unless ``force``. Concurrent builds of one directory run one at a time
    (the later ones usually find it up to date), and readers keep loading the previous build
    until the new files are moved into place. Progress goes to ``console`` (stderr by default);
    quantization warnings are printed even when ``show_progress`` is off.

    ``extra_data``: datasets of labelled requests (``cascade examples export``) added to the
    training split of their task, for the ``extra_tiers`` (default: every tier); they are part
    of the build key, so the same files give an up-to-date build.
    """
    console = console or Console(stderr=True)
    out_dir = Path(out_dir).resolve()
    extra = _extra(extra_data, extra_tiers)
    build_key = compute_build_key()
    if extra.digest:
        build_key = f"{build_key[:12]}+{extra.digest[:11]}"

    def up_to_date() -> Manifest | None:
        existing = None if force else up_to_date_manifest(out_dir, build_key)
        if existing is not None and show_progress:
            console.print(
                f"[green]Models in {escape(str(out_dir))} are up to date[/] (build key "
                f"{build_key}); use --force to rebuild."
            )
        return existing

    def waiting() -> None:
        if show_progress:
            console.print(f"Another process is building {escape(str(out_dir))}; waiting...")

    if (existing := up_to_date()) is not None:
        return existing
    with exclusive_build_lock(out_dir, on_wait=waiting):
        # Another process may have finished the same build while we waited for the lock.
        if (existing := up_to_date()) is not None:
            return existing
        with staging_dir(out_dir) as stage:
            manifest = _build_into(stage, build_key, console, show_progress, extra)
            # Tasks registered into this directory stay registered across rebuilds.
            kept = registered_tasks(out_dir)
            manifest = manifest.model_copy(update={"tasks": {**manifest.tasks, **kept}})
            publish(stage, out_dir, manifest)
    if show_progress:
        console.print(
            f"[green]Built {sum(len(t.tiers) for t in manifest.tasks.values())} models in "
            f"{manifest.build_seconds:.0f} s[/] -> {out_dir / MANIFEST_FILE}"
        )
    return manifest


def _extra(paths: Sequence[Path], tiers: Sequence[str] | None) -> ExtraData:
    from cascade.models.extra import ExtraData, load_extra_data

    if not paths:
        return ExtraData()
    known = {spec.tier for ladder in LADDERS.values() for spec in ladder}
    if bad := sorted(set(tiers or ()) - known):
        raise ModelError(f"--extra-tier {bad[0]!r} is not a tier of the built-in ladders; "
                         f"allowed: {', '.join(sorted(known))}")
    return load_extra_data(paths, tiers=tiers)


def _build_into(stage: Path, build_key: str, console: Console, show_progress: bool,
                extra: ExtraData) -> Manifest:
    started = time.perf_counter()
    steps = sum(1 + len(LADDERS[task]) for task in TASKS)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<48}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=True,
    )
    with progress:
        step = progress.add_task("starting", total=steps)
        builder = _Builder(stage, progress, step, console, show_progress, extra)
        tasks: dict[str, TaskEntry] = {task: builder.build_task(task) for task in TASKS}
    return Manifest(
        schema_version=SCHEMA_VERSION,
        build_key=build_key,
        created_at=datetime.now(UTC),
        build_seconds=round(time.perf_counter() - started, 2),
        packages=package_versions(),
        tasks=tasks,
    )


@dataclass
class _Builder:
    out_dir: Path
    progress: Progress
    step: Any
    console: Console
    verbose: bool
    extra: ExtraData = field(default_factory=ExtraData)
    """Extra training rows (``--extra-data``); none by default."""

    def build_task(self, task: TaskName) -> TaskEntry:
        from cascade.models.datasets import load_dataset, split_dataset

        self._status(f"{task}: loading data and splitting")
        dataset = load_dataset(task)
        splits = split_dataset(dataset)
        self.extra.check_classes(task, dataset.classes)
        split_path = self._save_splits(dataset, splits)
        self.progress.advance(self.step)
        test_inputs = _runner_inputs(dataset, splits.test)
        test_labels = [str(label) for label in dataset.labels[splits.test]]
        tiers = {
            spec.tier: self.build_tier(dataset, splits, spec, test_inputs, test_labels)
            for spec in LADDERS[task]
        }
        return TaskEntry(
            classes=dataset.classes,
            input_kind=_INPUT_KIND[task],
            splits=SplitInfo(
                seed=SPLIT_SEED,
                train=len(splits.train),
                calibration=len(splits.calibration),
                test=len(splits.test),
                file=split_path.relative_to(self.out_dir).as_posix(),
                sha256=sha256_file(split_path),
                source=dataset.source,
                duplicates_dropped=dataset.duplicates_dropped,
            ),
            tiers=tiers,
        )

    def build_tier(
        self,
        dataset: Dataset,
        splits: Splits,
        spec: TierSpec,
        test_inputs: Any,
        test_labels: list[str],
    ) -> TierEntry:
        from cascade.models.augment import describe
        from cascade.models.export import export_onnx, save_onnx
        from cascade.models.train import train_tier

        task, name = dataset.task, f"{dataset.task}/{spec.tier}"
        self._status(f"{name}: training {spec.algorithm}")
        trained = train_tier(task, spec, *self.extra.stack(
            task, spec.tier, dataset.inputs[splits.train], dataset.labels[splits.train]))
        if trained.classes != dataset.classes:
            raise ModelError(
                f"{name} learned classes {trained.classes}, expected "
                f"{dataset.classes}: a class is missing from the training split"
            )

        self._status(f"{name}: exporting to ONNX")
        fp32_path = self.out_dir / task / f"{spec.tier}.fp32.onnx"
        save_onnx(export_onnx(trained, tier=spec.tier), fp32_path)
        fp32 = self._load(fp32_path, dataset, spec, quantized=False)
        fp32_eval = evaluate(fp32, test_inputs, test_labels)
        sklearn_agreement, sklearn_diff = _check_export(name, fp32, fp32_eval.probabilities,
                                                        trained, dataset, splits)

        deployed, deployed_path = fp32, fp32_path
        int8_accuracy, quantization, warning = None, None, None
        if spec.quantize:
            deployed_path = self.out_dir / task / f"{spec.tier}.int8.onnx"
            deployed, int8_accuracy, quantization, warning = self._quantize(
                name, fp32_path, deployed_path, dataset, spec, fp32_eval, test_inputs, test_labels)

        self._status(f"{name}: measuring single-request latency")
        p50, p95 = single_request_latency_ms(deployed, test_inputs)
        fp32_p50 = p50 if deployed is fp32 else single_request_latency_ms(fp32, test_inputs)[0]
        entry = TierEntry(
            file=deployed_path.relative_to(self.out_dir).as_posix(),
            sha256=sha256_file(deployed_path),
            bytes=deployed_path.stat().st_size,
            fp32_file=fp32_path.relative_to(self.out_dir).as_posix(),
            fp32_sha256=sha256_file(fp32_path),
            fp32_bytes=fp32_path.stat().st_size,
            algorithm=spec.algorithm,
            quantized=spec.quantize,
            quantization=quantization,
            accuracy=round(int8_accuracy if int8_accuracy is not None else fp32_eval.accuracy, 6),
            fp32_accuracy=round(fp32_eval.accuracy, 6),
            int8_accuracy=None if int8_accuracy is None else round(int8_accuracy, 6),
            sklearn_agreement=round(sklearn_agreement, 6),
            sklearn_max_abs_diff=float(f"{sklearn_diff:.3g}"),
            latency_ms_p50=p50,
            latency_ms_p95=p95,
            fp32_latency_ms_p50=fp32_p50,
            quantization_warning=warning,
            train_samples=trained.train_samples,
            augmentation=None if spec.augmentation is None else describe(spec.augmentation),
        )
        self._report(name, entry)
        self.progress.advance(self.step)
        return entry

    def _quantize(self, name: str, fp32_path: Path, int8_path: Path, dataset: Dataset,
                  spec: TierSpec, fp32_eval: Any, test_inputs: Any, test_labels: list[str],
                  ) -> tuple[Any, float, QuantizationInfo, str | None]:
        """The int8 twin of a tier's model, re-validated against fp32 on the test split:
        (loaded model, int8 accuracy, what quantization did, a warning if it cost accuracy)."""
        from cascade.models.quantize import METHOD, WEIGHT_TYPE, quantize_int8

        self._status(f"{name}: quantizing to int8")
        result = quantize_int8(fp32_path, int8_path)
        deployed = self._load(int8_path, dataset, spec, quantized=True)
        int8_eval = evaluate(deployed, test_inputs, test_labels)
        quantization = QuantizationInfo(
            method=METHOD,
            weight_type=str(WEIGHT_TYPE.name),
            ops_before=result.ops_before,
            ops_after=result.ops_after,
            quantized_matmuls=result.quantized_matmuls,
            graph_changed=result.graph_changed,
            size_ratio=result.size_ratio,
            prediction_agreement=agreement(int8_eval.probabilities, fp32_eval.probabilities),
        )
        warning = self._check_quantization(
            name, fp32_eval.accuracy, int8_eval.accuracy, result.graph_changed
        )
        return deployed, int8_eval.accuracy, quantization, warning

    def _save_splits(self, dataset: Dataset, splits: Splits) -> Path:
        from cascade.models.splits import save_documents_split, save_vision_split

        path = self.out_dir / _SPLIT_FILE[dataset.task]
        parts = [
            (dataset.inputs[rows], dataset.labels[rows].tolist())
            for rows in (splits.calibration, splits.test)
        ]
        if dataset.task == "vision":
            save_vision_split(path, parts[0], parts[1])
        else:
            (calib_texts, calib_labels), (test_texts, test_labels) = parts
            save_documents_split(
                path,
                dataset.classes,
                (calib_texts.tolist(), calib_labels),
                (test_texts.tolist(), test_labels),
            )
        return path

    def _check_quantization(
        self, name: str, fp32_accuracy: float, int8_accuracy: float, graph_changed: bool
    ) -> str | None:
        warning = quantization_warning(fp32_accuracy, int8_accuracy, graph_changed=graph_changed)
        if warning is not None:
            self.console.print(
                f"[bold red]WARNING {escape(name)}: {escape(warning)}[/]", highlight=False
            )
        return warning

    def _load(self, path: Path, dataset: Dataset, spec: TierSpec, *, quantized: bool) -> OnnxRunner:
        return OnnxRunner.from_bytes(
            path.read_bytes(),
            task=dataset.task,
            classes=dataset.classes,
            model_name=model_display_name(
                dataset.task, spec.tier, spec.algorithm, quantized=quantized
            ),
            input_kind=_INPUT_KIND[dataset.task],
            path=path,
        )

    def _status(self, description: str) -> None:
        self.progress.update(self.step, description=description)

    def _report(self, name: str, entry: TierEntry) -> None:
        if not self.verbose:
            return
        int8 = "" if entry.int8_accuracy is None else f" -> int8 {entry.int8_accuracy:.2%}"
        self.progress.console.print(
            f"  [green]✓[/] {name:<21} fp32 {entry.fp32_accuracy:.2%}{int8:<15}"
            f" {entry.bytes / 1024:7.1f} KB {entry.latency_ms_p50 * 1000:5.0f} µs",
            soft_wrap=True,
        )


def _runner_inputs(dataset: Dataset, rows: Any) -> Any:
    """Rows of ``dataset`` in the form runners take: float32 array, or list of texts."""
    selected = dataset.inputs[rows]
    return selected.tolist() if dataset.task == "documents" else selected


def _check_export(name: str, fp32: Any, onnx_proba: Any, trained: Any, dataset: Dataset,
                  splits: Splits) -> tuple[float, float]:
    """The ONNX export must reproduce scikit-learn on the test split (and, for texts, on probe
    strings): (argmax agreement, largest probability gap); a ModelError when it does not."""
    reference = trained.reference_proba(dataset.inputs[splits.test])
    if dataset.task == "documents":
        probes = list(_TEXT_PROBES)
        onnx_proba = np.vstack([onnx_proba, fp32.predict_proba(probes)])
        reference = np.vstack([reference, trained.reference_proba(np.array(probes, object))])
    sklearn_agreement = agreement(onnx_proba, reference)
    sklearn_diff = float(np.max(np.abs(onnx_proba - reference)))
    if sklearn_agreement < _MIN_SKLEARN_AGREEMENT or sklearn_diff > _MAX_SKLEARN_PROBA_DIFF:
        raise ModelError(
            f"the ONNX export of {name} does not reproduce scikit-learn on the test split"
            f" (argmax agreement {sklearn_agreement:.2%}, largest probability gap"
            f" {sklearn_diff:.4f}); a converter option is probably wrong"
        )
    return sklearn_agreement, sklearn_diff
