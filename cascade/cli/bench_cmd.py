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
    if not chosen:  # generative tasks take minutes per document: only when named
        chosen = sorted((t for t, entry in manifest.tasks.items()
                         if t in in_policy and not entry.generative),
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
                                   "default: every classification task of the model repository "
                                   "the policy covers, built-in or registered. A generative "
                                   "task (extraction) is measured only when named."),
    documents: int | None = typer.Option(None, min=1, help="Generative tasks: test documents "
                                         "sent through the live chain (default: all)."),
    overhead_prompts: int = typer.Option(8, min=1, help="Generative tasks: prompts of the "
                                         "service vs raw llama-cpp-python comparison."),
    threads: int = typer.Option(1, min=1, help="Generative tasks: llama.cpp threads of both "
                                "sides of that comparison."),
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

    A generative task (--task extraction, built by `cascade models build --generative`) gets
    its own section instead (reports/bench-<task>.json and .md, tradeoff-<task>.png): the
    endpoint's model through a tier vs raw llama-cpp-python on the same prompts (tokens/s,
    time to first token), the test documents through the live chain with the cloud's
    llama_cpp.server (accuracy, share answered per tier, escalations, TTFT p50/p95 per tier),
    and each tier alone and the policy simulated on the build's recorded answers. Minutes per
    document on two cores: --documents bounds the live part.

    Examples:
      cascade bench --duration 5 --rounds 3
      cascade bench --task cancer --policy policies/cancer.yaml   (a registered task)
      cascade bench --task extraction --policy policies/extraction.yaml --documents 20
    """
    from cascade.lab.bench.report import render_markdown, write_reports
    from cascade.lab.bench.run import BenchConfig, run_bench

    if not (models_dir / "manifest.json").is_file():
        fail(f"no models in {models_dir}; run `cascade models build` first")
    chosen = _bench_tasks(models_dir, policy, task)
    generative = _generative_tasks(models_dir, chosen)
    for name in generative:
        _bench_generative(name, models_dir=models_dir, out=out, policy=policy,
                          base_port=base_port, documents=documents,
                          overhead_prompts=overhead_prompts, threads=threads)
    tasks = tuple(t for t in chosen if t not in generative)
    if not tasks:
        return
    cfg = BenchConfig(models_dir=models_dir, out_dir=out, base_port=base_port, duration_s=duration,
                      rounds=rounds, policy=policy, tasks=tasks,
                      log=lambda m: console.print(m, highlight=False))
    results = run_bench(cfg)
    js, md = write_reports(results, out)
    console.print(render_markdown(results), highlight=False, markup=False)
    console.print(f"[green]wrote {js} and {md}[/]")


def _generative_tasks(models_dir: Path, tasks: tuple[str, ...]) -> tuple[str, ...]:
    from cascade.models.manifest import load_manifest

    manifest = load_manifest(models_dir)
    return tuple(t for t in tasks if manifest.task(t).generative)


def _bench_generative(task: str, *, models_dir: Path, out: Path, policy: Path, base_port: int,
                      documents: int | None, overhead_prompts: int, threads: int) -> None:
    """The generative section of one task: run, write, print."""
    from cascade.lab.bench.generative import GenerativeBenchConfig, run_generative_bench
    from cascade.lab.bench.generative_report import render_generative, write_generative_reports

    cfg = GenerativeBenchConfig(task=task, models_dir=models_dir, out_dir=out, policy=policy,
                                base_port=base_port, documents=documents,
                                overhead_prompts=overhead_prompts, threads=threads,
                                log=lambda m: console.print(m, highlight=False))
    try:
        results = run_generative_bench(cfg)
    except (CascadeError, RuntimeError, TimeoutError) as exc:
        fail(f"{task}: {getattr(exc, 'message', exc)}", 1)
    js, md = write_generative_reports(results, out)
    console.print(render_generative(results), highlight=False, markup=False)
    console.print(f"[green]wrote {js} and {md}[/]")
