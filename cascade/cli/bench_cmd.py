"""``cascade bench``."""

from __future__ import annotations

from pathlib import Path

import typer

from cascade.cli.common import console, fail


def bench(
    models_dir: Path = typer.Option(Path("models"), help="Built models (cascade models build)."),
    out: Path = typer.Option(Path("reports"), help="Where bench.json and bench.md go."),
    base_port: int = typer.Option(18101, help="The bench chain's first port (4 consecutive + echo at +50)."),
    duration: float = typer.Option(4.0, help="Seconds per load measurement."),
    rounds: int = typer.Option(3, help="Interleaved rounds per measurement (median is reported)."),
    policy: Path = typer.Option(Path("policies/default.yaml"), help="Policy the chain runs."),
) -> None:
    """Measure the chain: accuracy, routing, latency and throughput, side by side in one run.

    Starts its own four-tier chain on 127.0.0.1, sends every test-split sample of each task
    through it (and through each tier's model alone), then compares the endpoint answering
    locally against a bare FastAPI echo endpoint with the same load generator (wrk if
    installed, else client processes) and against a raw onnxruntime call of the same model.
    Writes reports/bench.json and reports/bench.md. Takes about 2 minutes with the defaults.

    Example: cascade bench --duration 5 --rounds 3
    """
    from cascade.lab.bench.report import render_markdown, write_reports
    from cascade.lab.bench.run import BenchConfig, run_bench

    if not (models_dir / "manifest.json").is_file():
        fail(f"no models in {models_dir}; run `cascade models build` first")
    cfg = BenchConfig(models_dir=models_dir, out_dir=out, base_port=base_port, duration_s=duration,
                      rounds=rounds, policy=policy, log=lambda m: console.print(m, highlight=False))
    results = run_bench(cfg)
    js, md = write_reports(results, out)
    console.print(render_markdown(results), highlight=False, markup=False)
    console.print(f"[green]wrote {js} and {md}[/]")
