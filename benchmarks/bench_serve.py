"""What running a tier on Ray Serve costs and buys, against the same tier as a process and
against a bare Serve app.

The cloud tier (top: every request is answered locally, no escalation) with the same node
config, policy and models, driven by the same load generator (wrk when installed) with the
same bodies of the test split, at 1, 16 and 64 connections, one cell after the other in one
run (``--rounds`` interleaved rounds, medians):

  process              `cascade serve` (uvicorn, one process): the baseline
  serve-1r             cascade.deploy.ray_serve: Serve proxy -> ingress replica -> model
                       replica per task (DeploymentHandle), @serve.batch (max 8, wait 2 ms)
  serve-1r-unbatched   the same with max_batch_size 1 (each request its own model call)
  serve-2r, serve-2r-unbatched
                       2 ingress replicas and 2 replicas per task model
  serve-inline         ray_serve.model_deployments false: the models run in the ingress
                       replica (one Ray hop less per request, no batching)
  echo                 a bare Serve app that answers each POST with its body: Serve's own
                       floor (proxy -> one replica, no FastAPI, no model)
  heavy-batched, heavy-unbatched
                       documents requests only (the largest model in models/: TF-IDF over the
                       full vocabulary + logistic regression, 1.2 MB ONNX), 1 replica, batches of up to 32 (wait 5 ms) vs none

Every configuration's outbox is a fresh PostgreSQL database (two ingress replicas cannot share
a SQLite file; the same store for all keeps the rows comparable).

Derived: the tier on Serve over the bare echo (target >= 0.8), batching on over off with the
heavy bodies at 64 connections (target >= 2x throughput, p99 <= 1.5x), and per-request
overhead of Serve against uvicorn (1 connection: p50 and mean latency differences). The
1-minute load average is recorded for every cell (the machine is shared).

With ``--two-node`` (root: ip netns) the tier then runs with one ingress replica on each node
of a two-node cluster (tests/ray/cluster.py) and the answers per node are counted from each
replica's own /metrics; ``--skip-matrix --two-node`` adds that to an existing report.

Writes reports/serve.json and reports/serve.md. Run: python benchmarks/bench_serve.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from tests.contract.pgserver import PostgresServer

CONNECTIONS = (1, 16, 64)
BATCHED = {"max_batch_size": 8, "batch_wait_timeout_s": 0.002}
UNBATCHED = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
HEAVY_BATCHED = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}
TWO = {"ingress_replicas": 2, "model_min_replicas": 2, "model_max_replicas": 2}
CPUS = {"ingress_num_cpus": 0.2, "model_num_cpus": 0.2}
SERVE_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "serve-1r": (BATCHED, "mixed"), "serve-1r-unbatched": (UNBATCHED, "mixed"),
    "serve-2r": ({**BATCHED, **TWO}, "mixed"), "serve-2r-unbatched": ({**UNBATCHED, **TWO}, "mixed"),
    "serve-inline": ({"model_deployments": False}, "mixed"),
    "heavy-batched": (HEAVY_BATCHED, "documents"), "heavy-unbatched": (UNBATCHED, "documents"),
}
ECHO_TARGET = 0.8
BATCH_RPS_TARGET = 2.0
BATCH_P99_LIMIT = 1.5


def _bodies(models_dir: Path, tasks: tuple[str, ...] = ("vision", "documents"),
            n: int = 64) -> list[dict[str, Any]]:
    """Requests of the test split, ``n`` in all, alternating between ``tasks``."""
    per_task = []
    for task in tasks:
        inputs, _ = load_split(models_dir, task, "test")
        per_task.append([request_body(task, inputs[i]) for i in range(n // len(tasks))])
    return [body for group in zip(*per_task, strict=True) for body in group]


def _settings(outbox_url: str, port: int, models_dir: Path,
              knobs: dict[str, Any]) -> NodeSettings:
    return load_node_settings(ROOT / "cloud/cloud.yaml", port=port, models_dir=models_dir,
                              policy=ROOT / "policies/default.yaml", outbox_url=outbox_url,
                              ray_serve={**CPUS, **knobs})


def _model_stats(tier: str) -> dict[str, int]:
    """Requests and model calls (batches) summed over the tier's model replicas (one replica's
    counters per call: with 2 replicas this is a sample, enough for the ratio)."""
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
        result["load1"] = round(os.getloadavg()[0], 2)
        if serve_tier and before:
            after = _model_stats(serve_tier)
            calls = after["batches"] - before["batches"]
            result["requests_per_model_call"] = round(
                (after["requests"] - before["requests"]) / max(1, calls), 2)
        out[connections] = result
    return out


def _deploy_echo(port: int) -> str:
    """The bare Serve echo app at ``/echo`` on the running proxy; its base URL."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(name="echo", ray_actor_options={"num_cpus": CPUS["ingress_num_cpus"]},
                      max_ongoing_requests=64)
    class Echo:
        async def __call__(self, request: Request) -> Response:
            return Response(await request.body(), media_type="application/json")

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{port}/echo"


def _one_round(raw: dict[str, list[Any]], chain_url: str, pg: PostgresServer, port: int,
               models_dir: Path, duration_s: float) -> None:
    from ray import serve

    from cascade.deploy.ray_serve import deploy_tier

    mixed = _bodies(models_dir)
    bodies = {"mixed": mixed, "documents": _bodies(models_dir, ("documents",))}
    raw["process"].append(_measure(chain_url, mixed, duration_s, None))
    for name, (knobs, kind) in SERVE_CONFIGS.items():
        outbox = pg.create_database(f"{name.replace('-', '_')}_{len(raw[name])}")
        deploy_tier(_settings(outbox, port, models_dir, knobs))
        counted = "cloud" if knobs.get("model_deployments", True) else None
        raw[name].append(_measure(f"http://127.0.0.1:{port}", bodies[kind], duration_s, counted))
    serve.delete("cloud")
    raw["echo"].append(_measure(_deploy_echo(port), mixed, duration_s, None))
    serve.delete("echo")


def run(models_dir: Path, rounds: int, duration_s: float) -> dict[str, list[Any]]:
    """Every configuration, ``rounds`` interleaved rounds; the raw rounds per configuration."""
    import ray

    from cascade.deploy.ray_serve import stop_ray
    from tests.conftest import free_port_block

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    pg = PostgresServer.start()
    base = free_port_block(2)
    raw: dict[str, list[Any]] = {name: [] for name in ("process", *SERVE_CONFIGS, "echo")}
    process_config = tmp / "cloud.yaml"
    process_config.write_text(json.dumps(
        _settings(pg.create_database("process"), base, models_dir, BATCHED).model_dump(mode="json", exclude={"ray_serve"})))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"), log_to_driver=False)
    try:
        with Chain([process_config], log_dir=tmp / "logs") as chain:
            for _ in range(rounds):
                _one_round(raw, chain.entry_url, pg, base + 1, models_dir, duration_s)
    finally:
        stop_ray()
        pg.stop()
    return raw


def summarise(raw: dict[str, list[dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    """Medians over rounds per configuration and connection count."""
    out: dict[str, Any] = {}
    for name, rounds in raw.items():
        out[name] = {}
        for connections in CONNECTIONS:
            runs = [r[connections] for r in rounds]
            keys = ["rps", "p50_ms", "p99_ms", "mean_ms", "errors", "load1"] + (
                ["requests_per_model_call"] if "requests_per_model_call" in runs[0] else [])
            out[name][connections] = {k: round(statistics.median(r[k] for r in runs), 2)
                                      for k in keys}
    return out


def derive(summary: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are about, and Serve's per-request overhead over uvicorn."""
    def ratio(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    best = {c: max(summary[n][c]["rps"] for n in ("serve-1r", "serve-1r-unbatched",
                                                  "serve-2r", "serve-2r-unbatched",
                                                  "serve-inline"))
            for c in CONNECTIONS}
    echo = {c: ratio(best[c], summary["echo"][c]["rps"]) for c in CONNECTIONS}
    on, off = summary["heavy-batched"][64], summary["heavy-unbatched"][64]
    batching = {"rps_ratio": ratio(on["rps"], off["rps"]),
                "p99_ratio": ratio(on["p99_ms"], off["p99_ms"])}
    one = {n: summary[n][1] for n in ("process", "serve-1r", "serve-1r-unbatched",
                                      "serve-inline", "echo")}
    overhead = {n: {"p50_ms": round(m["p50_ms"] - one["process"]["p50_ms"], 2),
                    "mean_ms": round(m["mean_ms"] - one["process"]["mean_ms"], 2)}
                for n, m in one.items() if n != "process"}
    return {
        "serve_over_echo": echo,
        "serve_over_echo_met": {c: r >= ECHO_TARGET for c, r in echo.items()},
        "batching_heavy_64": batching,
        "batching_met": (batching["rps_ratio"] >= BATCH_RPS_TARGET
                         and batching["p99_ratio"] <= BATCH_P99_LIMIT),
        "overhead_vs_uvicorn_1conn": overhead,
        "process_over_best_serve": {c: ratio(summary["process"][c]["rps"], best[c])
                                    for c in CONNECTIONS},
    }


def two_node(models_dir: Path, duration_s: float, connections: int = 16) -> dict[str, Any]:
    """The tier with 2 ingress replicas (models inside) on a two-node cluster
    (tests/ray/cluster.py), one replica per node; wrk through the head's proxy; answers per
    node from each replica's own /metrics, before and after."""
    from cascade.deploy.ray_serve import portable_settings
    from tests.conftest import free_port_block
    from tests.fault.harness import wait_for
    from tests.ray.cluster import (
        answered_per_node,
        netns_available,
        replica_nodes,
        two_node_cluster,
    )

    reason = netns_available()
    if reason is not None:
        return {"skipped": f"a second node in its own network namespace {reason}"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-nodes-"))
    with two_node_cluster(tmp / "ray-logs") as cluster:
        pg = PostgresServer.start(host=cluster.head_ip, trust_network=f"{cluster.head_ip}/24")
        try:
            settings = _settings(pg.create_database("nodes"), 8000, models_dir, {
                "ingress_replicas": 2, "model_deployments": False,
                "metrics_export_interval_s": 0})
            settings_file = tmp / "cloud-settings.json"
            settings_file.write_text(json.dumps(portable_settings(settings)))
            port = free_port_block(1)
            cluster.driver("deploy", str(settings_file), str(port))
            url = f"http://{cluster.head_ip}:{port}"
            seen: dict[str, str] = {}
            wait_for(lambda: len(replica_nodes(url, seen)) == 2, timeout_s=240,
                     what="ingress replicas answering from both nodes")
            before = answered_per_node(url)
            load = run_load(f"{url}/v1/infer", _bodies(models_dir), connections=connections,
                            duration_s=duration_s).as_dict()
            load["load1"] = round(os.getloadavg()[0], 2)
            after = answered_per_node(url)
        finally:
            pg.stop()
    names = {cluster.head_ip: "head", cluster.netns.ns_ip: "worker"}
    return {"load": load, "answered_per_node": {
        names.get(ip, ip): int(after[ip] - before.get(ip, 0)) for ip in after}}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _table(summary: dict[str, Any]) -> list[str]:
    lines = [("| configuration | connections | req/s | p50 ms | p99 ms | mean ms | errors | "
              "load 1m | requests per model call |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, per in summary.items():
        for connections, m in per.items():
            lines.append(f"| {name} | {connections} | {m['rps']} | {m['p50_ms']} | "
                         f"{m['p99_ms']} | {m['mean_ms']} | {m['errors']} | {m['load1']} | "
                         f"{m.get('requests_per_model_call', '-')} |")
    return lines


def _findings(derived: dict[str, Any]) -> list[str]:
    echo = derived["serve_over_echo"]
    batching = derived["batching_heavy_64"]
    overhead = derived["overhead_vs_uvicorn_1conn"]
    met = {True: "met", False: "NOT met"}
    return [
        "## Against the targets", "",
        (f"- Cascade tier on Serve (best of the five serve configurations) / bare Serve echo, "
         f"req/s: {', '.join(f'{c} conn {r}' for c, r in echo.items())} (target >= "
         f"{ECHO_TARGET}: {', '.join(met[v] for v in derived['serve_over_echo_met'].values())})."),
        (f"- Batching on / off, documents only, 64 connections: throughput x"
         f"{batching['rps_ratio']}, p99 x{batching['p99_ratio']} (target >= {BATCH_RPS_TARGET}x "
         f"with p99 <= {BATCH_P99_LIMIT}x: {met[derived['batching_met']]})."),
        ("- Per-request overhead against uvicorn at 1 connection (added latency, p50 / mean): "
         + "; ".join(f"{n} +{m['p50_ms']} / +{m['mean_ms']} ms" for n, m in overhead.items())
         + "."),
        ("- uvicorn process / best Serve configuration, req/s: "
         + ", ".join(f"{c} conn {r}" for c, r in derived["process_over_best_serve"].items())
         + "."),
    ]


def _nodes_section(nodes: dict[str, Any] | None) -> list[str]:
    if nodes is None:
        return ["## Two-node cluster", "", "Not measured in this run (`--two-node`)."]
    if "skipped" in nodes:
        return ["## Two-node cluster", "", f"Skipped: {nodes['skipped']}."]
    load = nodes["load"]
    return ["## Two-node cluster", "",
            (f"tests/ray/cluster.py (head here, worker node in its own network namespace, both "
             f"on these 2 cores): the tier with 2 ingress replicas (models in the replica), one "
             f"per node, {load['connections']} connections for {load['duration_s']:.1f} s through "
             f"the head's proxy: {load['rps']:.2f} req/s, p50 {load['p50_ms']:.1f} ms, p99 "
             f"{load['p99_ms']:.1f} ms, {load['errors']} errors, load 1m {load['load1']}. Answered "
             "per node (each replica's own /metrics, 200s on /v1/infer during the load): "
             + ", ".join(f"{n} {c}" for n, c in nodes["answered_per_node"].items())
             + ". A second node on the same machine adds no CPU: this shows spread, not speed."),
            "", (f"Machine load: before `{nodes['uptime_before']}`; "
                 f"after `{nodes['uptime_after']}`.")]


def write_report(report: dict[str, Any], reports: Path) -> None:
    """reports/serve.json and reports/serve.md from ``report`` (meta, summary, derived and,
    when measured, two_node)."""
    reports.mkdir(exist_ok=True)
    (reports / "serve.json").write_text(json.dumps(report, indent=2))
    meta, summary, derived = report["meta"], report["summary"], report["derived"]
    lines = ["# The cloud tier on Ray Serve vs as a process vs a bare Serve echo", "",
             (f"Generated by `python benchmarks/bench_serve.py` ({meta['generator']}, "
              f"{meta['rounds']} round(s) of {meta['duration_s']} s per cell, medians; the load "
              "generator, Ray and the tiers share 2 cores, and other work may have too: see the "
              "load averages, and compare within this table only)."), "",
             f"Machine load: before `{meta['uptime_before']}`; after `{meta['uptime_after']}`.",
             "", *_table(summary), "", *_findings(derived), "",
             *_nodes_section(report.get("two_node")), "", "## Configurations", "",
             ("- `process`: `cascade serve` (uvicorn, one process). `serve-1r`: Serve proxy -> "
              "ingress replica (the tier's FastAPI app) -> model replica per task through a "
              "DeploymentHandle, `@serve.batch` (max 8, 2 ms wait); batches are computed sample "
              "by sample so answers never depend on the batch (edge_nodes/README.md). "
              "`-unbatched`: max_batch_size 1. `serve-2r`: 2 ingress replicas and 2 replicas "
              "per task model. `serve-inline`: `model_deployments: false` (models in the "
              "ingress replica). `echo`: a bare Serve deployment returning the request body."),
             ("- `heavy-*`: documents requests only, 1 replica, batches of up to 32 (5 ms wait) "
              "vs unbatched. The cloud documents model (TF-IDF + logistic regression, 1.2 MB ONNX) "
              "is the largest classifier in models/; the generative model is served by "
              "llama.cpp, not by a Serve model deployment, so it is not measured here."),
             ("- `requests per model call`: requests over batched-method calls, from the model "
              "replicas' own counters (one replica's counters per task; 1.0: no two requests "
              "met). `load 1m`: the 1-minute load average right after the cell.")]
    (reports / "serve.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Command line: rounds and duration per cell."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--two-node", action="store_true",
                        help="then measure requests answered per node on a two-node cluster "
                        "(tests/ray/cluster.py; needs root for ip netns)")
    parser.add_argument("--skip-matrix", action="store_true",
                        help="keep the side-by-side table of the existing reports/serve.json "
                        "(e.g. to add --two-node to it)")
    args = parser.parse_args()
    if args.skip_matrix:
        report = json.loads((args.reports / "serve.json").read_text())
    else:
        before = _uptime()
        summary = summarise(run(args.models_dir, args.rounds, args.duration))
        report = {"meta": {"generator": "wrk" if have_wrk() else "httpx", "rounds": args.rounds,
                           "duration_s": args.duration, "uptime_before": before,
                           "uptime_after": _uptime()},
                  "summary": summary, "derived": derive(summary)}
    if args.two_node:
        before = _uptime()
        report["two_node"] = {**two_node(args.models_dir, args.duration),
                              "uptime_before": before, "uptime_after": _uptime()}
    write_report(report, args.reports)
    print((args.reports / "serve.md").read_text())


if __name__ == "__main__":
    main()
