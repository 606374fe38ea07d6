"""What running a tier on Ray Serve costs and buys, against the same tier as a process.

The cloud tier (top: every request is answered locally, no escalation) with the same node
config, policy and models, driven by the same load generator (wrk when installed) with the
same vision and documents bodies of the test split, at 1 and 16 connections:

  process         `cascade serve` (uvicorn, one process): the baseline
  serve           cascade.deploy.ray_serve: Serve proxy -> ingress replica -> model replica
                  per task (DeploymentHandle), @serve.batch (max 8, wait 2 ms)
  serve-unbatched the same with max_batch_size 1 (each request its own model call)
  serve-inline    ray_serve.model_deployments false: the models run in the ingress replica
                  (one Ray hop less per request, no batching)

Configurations run in interleaved rounds; reported are the medians over rounds. For the Serve
runs, the model replicas' own counters give how many requests shared a model call. Ray is
started once, small (num_cpus=2, no dashboard, fractional replica CPUs), and stopped at the end.

Writes reports/serve.json and reports/serve.md. Run: python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import Chain
from cascade.lab.bench.load import have_wrk, run_load
from cascade.models.manifest import load_split
from cascade.tier.settings import NodeSettings, load_node_settings

CONNECTIONS = (1, 16)
BATCHED = {"max_batch_size": 8, "batch_wait_timeout_s": 0.002}
UNBATCHED = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
INLINE = {"model_deployments": False}
CPUS = {"ingress_num_cpus": 0.2, "model_num_cpus": 0.2}


def _bodies(models_dir: Path, n: int = 64) -> list[dict[str, Any]]:
    """Vision and documents requests of the test split, alternating."""
    bodies = []
    for task in ("vision", "documents"):
        inputs, _ = load_split(models_dir, task, "test")
        bodies += [request_body(task, inputs[i]) for i in range(n // 2)]
    return bodies[0::2] + bodies[1::2]


def _settings(tmp: Path, port: int, models_dir: Path, knobs: dict[str, Any]) -> NodeSettings:
    return load_node_settings(ROOT / "cloud/cloud.yaml", port=port, models_dir=models_dir,
                              policy=ROOT / "policies/default.yaml",
                              outbox_url=f"sqlite:///{tmp / f'cloud-{port}.db'}",
                              ray_serve={**knobs, **CPUS})


def _model_stats(tier: str) -> dict[str, int]:
    """Requests and model calls (batches) summed over the tier's model replicas."""
    from ray import serve

    total = {"requests": 0, "batches": 0}
    for task in ("vision", "documents"):
        stats = serve.get_deployment_handle(f"{tier}-model-{task}", app_name=tier) \
            .stats.remote().result(timeout_s=60)
        total["requests"] += stats["requests"]
        total["batches"] += stats["batches"]
    return total


def _measure(url: str, bodies: list[dict[str, Any]], duration_s: float,
             serve_tier: str | None) -> dict[int, dict[str, Any]]:
    out = {}
    for connections in CONNECTIONS:
        before = _model_stats(serve_tier) if serve_tier else None
        result = run_load(f"{url}/v1/infer", bodies, connections=connections,
                          duration_s=duration_s).as_dict()
        if serve_tier and before:
            after = _model_stats(serve_tier)
            calls = after["batches"] - before["batches"]
            result["requests_per_model_call"] = round(
                (after["requests"] - before["requests"]) / max(1, calls), 2)
        out[connections] = result
    return out


def run(models_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    """Every configuration, ``rounds`` interleaved rounds; the raw rounds per configuration."""
    import ray

    from cascade.deploy.ray_serve import deploy_tier, stop_ray
    from tests.conftest import free_port_block

    bodies = _bodies(models_dir)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = free_port_block(2)
    raw: dict[str, list[dict[int, dict[str, Any]]]] = {
        "process": [], "serve": [], "serve-unbatched": [], "serve-inline": []}
    process_config = tmp / "cloud.yaml"
    process_config.write_text(json.dumps(
        _settings(tmp, base, models_dir, BATCHED).model_dump(mode="json", exclude={"ray_serve"})))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"), log_to_driver=False)
    try:
        with Chain([process_config], log_dir=tmp / "logs") as chain:
            for _ in range(rounds):
                raw["process"].append(_measure(chain.entry_url, bodies, duration_s, None))
                for name, knobs in (("serve", BATCHED), ("serve-unbatched", UNBATCHED),
                                    ("serve-inline", INLINE)):
                    settings = _settings(tmp, base + 1, models_dir, knobs)
                    deploy_tier(settings)
                    url = f"http://127.0.0.1:{base + 1}"
                    counted = "cloud" if settings.ray_serve.model_deployments else None
                    raw[name].append(_measure(url, bodies, duration_s, counted))
    finally:
        stop_ray()
    return raw


def summarise(raw: dict[str, list[dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Medians over rounds per configuration and connection count."""
    out: dict[str, Any] = {}
    for name, rounds in raw.items():
        out[name] = {}
        for connections in CONNECTIONS:
            runs = [r[connections] for r in rounds]
            keys = ["rps", "p50_ms", "p99_ms", "errors"] + (
                ["requests_per_model_call"] if "requests_per_model_call" in runs[0] else [])
            out[name][connections] = {k: round(statistics.median(r[k] for r in runs), 2)
                                      for k in keys}
    return out


def write_report(summary: dict[str, Any], meta: dict[str, Any], reports: Path) -> None:
    """reports/serve.json and reports/serve.md."""
    reports.mkdir(exist_ok=True)
    (reports / "serve.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    lines = ["# The cloud tier on Ray Serve vs as a process", "",
             (f"Generated by `python benchmarks/bench_serve.py` ({meta['generator']}, "
             f"{meta['rounds']} interleaved rounds of {meta['duration_s']} s per point, "
             "medians; 2 cores shared with other work, so compare within this table only)."), "",
             ("| configuration | connections | req/s | p50 ms | p99 ms | errors | "
             "requests per model call |"), "|---|---|---|---|---|---|---|"]
    for name, per in summary.items():
        for connections, m in per.items():
            lines.append(f"| {name} | {connections} | {m['rps']} | {m['p50_ms']} | "
                         f"{m['p99_ms']} | {m['errors']} | "
                         f"{m.get('requests_per_model_call', '-')} |")
    lines += ["", ("- `serve`: Serve proxy -> ingress replica (the tier's FastAPI app) -> model "
              "replica per task through a DeploymentHandle, `@serve.batch` (max 8, 2 ms wait); "
              "batches are computed sample by sample so answers never depend on the batch "
              "(edge_nodes/README.md)."),
              ("- `requests per model call`: requests over batched-method calls, from the model "
              "replicas' own counters (1.0: no two requests met).")]
    (reports / "serve.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Command line: rounds and duration per point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    raw = run(args.models_dir, args.rounds, args.duration)
    summary = summarise(raw)
    meta = {"generator": "wrk" if have_wrk() else "httpx", "rounds": args.rounds,
            "duration_s": args.duration}
    write_report(summary, meta, args.reports)
    print((args.reports / "serve.md").read_text())


if __name__ == "__main__":
    main()
