"""``cascade bench``."""

from __future__ import annotations

from pathlib import Path

import typer

from cascade.cli.common import console, fail, fail_on
from cascade.errors import CascadeError


def _bench_tasks(models_dir: Path, policy: Path, chosen: list[str]) -> tuple[str, ...]:
    """The tasks to measure: ``chosen``, else every task of the model repository that the
    policy covers; each must be in both (a clear error names what is missing)."""
    from cascade.lab.bench.run import BUILT_IN_TASKS
    from cascade.models.manifest import load_manifest
    from cascade.policy import load_policy

    try:
        manifest, loaded = load_manifest(models_dir), load_policy(policy)
    except CascadeError as exc:
        fail_on(exc)
    in_policy = set(loaded.policy.tasks)
    if not chosen:
        chosen = sorted((t for t in manifest.tasks if t in in_policy),
                        key=lambda t: (t not in BUILT_IN_TASKS, t))
    for task in chosen:
        if task not in manifest.tasks:
            fail(f"--task {task}: not in {models_dir}/manifest.json (tasks: "
                 f"{', '.join(manifest.tasks)}); register it first: cascade models register")
        if task not in in_policy:
            fail(f"--task {task}: {policy} has no section for it; fit one with `cascade policy "
                 f"calibrate --task {task} --out FILE` and pass --policy FILE")
    if not chosen:
        fail(f"no task of {models_dir}/manifest.json is in {policy}")
    return tuple(chosen)


def bench(
    models_dir: Path = typer.Option(Path("models"), help="The model repository (cascade models "
                                    "build / register)."),
    out: Path = typer.Option(Path("reports"), help="Where bench.json and bench.md go."),
    base_port: int = typer.Option(18101, help="The bench chain's first port (4 consecutive + echo at +50)."),
    duration: float = typer.Option(4.0, help="Seconds per load measurement."),
    rounds: int = typer.Option(3, help="Interleaved rounds per measurement (median is reported)."),
    policy: Path = typer.Option(Path("policies/default.yaml"), help="Policy the chain runs."),
    task: list[str] = typer.Option([], help="Measure only these tasks (repeat the option); "
                                   "default: every task of the model repository the policy "
                                   "covers, built-in or registered."),
) -> None:
    """Measure the chain: accuracy, routing, latency and throughput, side by side in one run.

    Starts its own four-tier chain on 127.0.0.1 serving the measured tasks, sends every
    test-split sample of each task through it (and through each tier's model alone), corrupts
    the test split as the field does (by input kind: noise and occlusion for images, typos and
    truncation for texts, sensor noise and stuck readings for features and tensors) and sends
    it again, watching each tier's drift alarm; then compares the endpoint answering locally
    against a bare FastAPI echo endpoint with the same load generator (wrk if installed, else
    client processes) and against a raw onnxruntime call of the same model. Writes
    reports/bench.json, reports/bench.md and figures. About 2 minutes per task with the
    defaults.

    Examples:
      cascade bench --duration 5 --rounds 3
      cascade bench --task cancer --policy policies/cancer.yaml   (a registered task)
    """
    from cascade.lab.bench.report import render_markdown, write_reports
    from cascade.lab.bench.run import BenchConfig, run_bench

    if not (models_dir / "manifest.json").is_file():
        fail(f"no models in {models_dir}; run `cascade models build` first")
    tasks = _bench_tasks(models_dir, policy, task)
    cfg = BenchConfig(models_dir=models_dir, out_dir=out, base_port=base_port, duration_s=duration,
                      rounds=rounds, policy=policy, tasks=tasks,
                      log=lambda m: console.print(m, highlight=False))
    results = run_bench(cfg)
    js, md = write_reports(results, out)
    console.print(render_markdown(results), highlight=False, markup=False)
    console.print(f"[green]wrote {js} and {md}[/]")
