"""``cascade models register``: bring your own model into the model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
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
from rich.table import Table

from cascade.cli.common import print_json, print_table
from cascade.errors import ModelError
from cascade.models.manifest import TierEntry
from cascade.models.specs import INT8_MAX_ACCURACY_LOSS


def register(
    folder: Annotated[Path, typer.Argument(
        help="Task folder: task.yaml and the ONNX model of each tier.", show_default=False)],
    heldout: Annotated[Path, typer.Option(
        "--heldout", help="Labelled held-out data: .npz (arrays x, y) or .jsonl (lines "
        '{"input": {...}, "label": "..."}). Split in two halves (calibration, test) unless '
        "--calibration is given.", show_default=False)],
    quantize: Annotated[str, typer.Option(
        "--quantize", help="none, int8 (dynamic: weights int8, activations scaled per call) or "
        "int8-static (fixed activation scales measured on the calibration split). Tiers with "
        "'quantize: false' stay fp32.")] = "none",
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="A separate labelled calibration file (same formats); then all "
        "of --heldout is the test split.", show_default=False)] = None,
    models_dir: Annotated[Path, typer.Option(
        "--models-dir", help="The model repository to register into (tiers read it).",
        file_okay=False)] = Path("models"),
    max_accuracy_loss: Annotated[float, typer.Option(
        "--max-accuracy-loss", help="Refuse when int8 loses more test accuracy than this "
        "(a fraction: 0.005 is half a point).", min=0.0, max=1.0)] = INT8_MAX_ACCURACY_LOSS,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the registered task's manifest entry (one JSON document).")] = False,
) -> None:
    """Validate a task folder, re-validate its models on your held-out data, register them.

    Checks task.yaml (errors name the file and the key), checks each ONNX
    graph against the declared input (shape, dtype) and the classes (the
    output named 'probabilities', else the last, must be \\[N, classes]),
    measures fp32 accuracy on the test split, optionally quantizes to int8
    (refused if int8 loses more than --max-accuracy-loss), measures
    single-request latency, and writes into MODELS_DIR:

      <task>/            task.yaml, your models and their int8 twins
      data/<task>.npz    the calibration and test splits (or .json: texts)
      manifest.json      the task's entry: sha256, size, fp32 and int8
                         accuracy, p50 latency, runtime

    A task.yaml (input kinds: image, tensor, features, text):

      input: {kind: features, length: 13}
      classes: \\[class_0, class_1, class_2]
      tiers:
        endpoint: {file: endpoint.onnx}
        cloud:    {file: cloud.onnx, quantize: false}

    Example:

      cascade models register wine --heldout wine/heldout.npz --quantize int8

    Then fit its policy (cascade policy calibrate --task wine ...) and
    serve it: name it under 'tasks:' in the node configs, or set
    CASCADE_TASKS='\\["wine"]' for every tier (README: "Bring your own model").
    """
    from cascade.models.register import RegisterRequest, register_task, registration_steps
    from cascade.models.taskfile import load_task_file

    console = Console(stderr=True, soft_wrap=True)
    if quantize not in ("none", "int8", "int8-static"):
        console.print(f"[bold red]error:[/] --quantize {escape(quantize)!r}: allowed: none, "
                      "int8, int8-static", highlight=False)
        raise typer.Exit(2)
    request = RegisterRequest(folder=folder, heldout=heldout, models_dir=models_dir,
                              calibration=calibration, quantize=quantize,  # type: ignore[arg-type]
                              max_accuracy_loss=max_accuracy_loss)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<52}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True)
    try:
        loaded = load_task_file(folder)
        with progress:
            bar = progress.add_task("starting", total=registration_steps(loaded))
            started = [False]

            def step(description: str) -> None:
                if started[0]:
                    progress.advance(bar)
                started[0] = True
                progress.update(bar, description=description)

            entry = register_task(request, loaded=loaded, step=step)
    except ModelError as exc:
        console.print(f"[bold red]Registration refused:[/] {escape(exc.message)}",
                      highlight=False)
        raise typer.Exit(1) from None
    _report(loaded.name, entry, models_dir, as_json=as_json)


def _report(name: str, entry: Any, models_dir: Path, *, as_json: bool) -> None:
    """What was registered: its manifest entry as JSON, or a table of its tiers."""
    if as_json:
        print_json({"task": name, "manifest": str(models_dir / "manifest.json"),
                    "entry": entry.model_dump(mode="json")})
        return
    table = Table(title=f"{name}: {len(entry.classes)} classes, {entry.input_kind} "
                  f"input, {entry.splits.calibration} calibration + {entry.splits.test} test "
                  "samples", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for column in ("tier", "model", "fp32", "int8", "KB", "p50 µs"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("tier", "model")
                         else "right")
    for tier, model in entry.tiers.items():
        if not isinstance(model, TierEntry):  # registration makes classifiers only
            continue
        table.add_row(tier, model.algorithm, f"{model.fp32_accuracy:.2%}",
                      "-" if model.int8_accuracy is None else f"{model.int8_accuracy:.2%}",
                      f"{model.bytes / 1024:.1f}", f"{model.latency_ms_p50 * 1000:.0f}")
    out = Console(soft_wrap=True)
    print_table(table, out)
    out.print(f"Registered {name!r} in {models_dir / 'manifest.json'}.", highlight=False)
