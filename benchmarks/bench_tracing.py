"""What tracing costs the endpoint's locally-answered path, measured side by side in one run.

Part A (end to end): one real endpoint tier process per configuration, all started up front and
driven in interleaved rounds by the same load generator (wrk when installed) with the same test
bodies; medians over rounds. Configurations:

  off            OTEL_SDK_DISABLED=true (trace ids still flow; no spans); the baseline
  off, no access log   the same at CASCADE_LOG_LEVEL=warning: what the per-request log line costs
  otlp           tracing on as shipped: OTLP/HTTP batch exporter to a local receiver process,
                 default sampler (every escalation, unknown answer and server error, plus 1% of
                 the routine local answers, at most 10 per second: all this load is routine
                 local answers)
  otlp-1%-uncapped   the same without the per-second cap (CASCADE_TRACE_ROUTINE_PER_S=none)
  otlp-10%       10% of the routine answers, no cap (OTEL_TRACES_SAMPLER_ARG=0.1)
  otlp-all       every request traced (OTEL_TRACES_SAMPLER_ARG=1, no cap)
  file           JSON-lines trace file only, default sampler (what `cascade up` does)

Part B (in process, no network): the per-request cost of the SERVER span mechanism alone on a
minimal FastAPI route, one subprocess per variant: bare, our pure-ASGI middleware (tracing off;
on, recorded under a sampled caller), FastAPI's native telemetry (lean: SERVER span only;
default: plus operation spans) and opentelemetry-instrumentation-fastapi (lean: no send/receive
spans; default). This is why the tiers make their SERVER span in their own middleware. Then the
routine path of a tier: the middleware with the route reporting a confident answer to
TierTelemetry as a tier's gate does (metrics included), with tracing off, with the default
sampler declining it (what 99% of routine answers cost) and keeping it (SERVER, inference and
gate spans: what the other 1% cost).

Part C (in process, the real endpoint app): the tier's own ASGI app (node, ONNX model, gate,
metrics, access log) called directly, one subprocess per configuration, with the real OTLP/HTTP
batch exporter sending to the local receiver. CPU per request is the process's CPU time (all
threads, so the exporter's encoding counts) over rounds of requests. Each repeat runs every
configuration back to back; reported are the best round overall and the median of the ratios
paired within a repeat. No network stack and no load generator: the least noisy figure on a
shared machine, where Part A's throughput moves by +-20% between rounds.

Writes reports/tracing.json and reports/tracing.md. Run: python benchmarks/bench_tracing.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import Chain
from cascade.lab.bench.load import have_wrk, run_load

POLICY = """\
version: 1
name: bench-local
tasks:
  vision: {deadline_ms: 2000, tiers: {endpoint: {threshold: 0.0}}}
  documents: {deadline_ms: 2000, tiers: {endpoint: {threshold: 0.0}}}
"""

# A trace sink in its own process: accepts OTLP/HTTP, counts requests and bytes, answers 200.
SINK = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
stats = {"requests": 0, "bytes": 0}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers["Content-Length"]); self.rfile.read(n)
        stats["requests"] += 1; stats["bytes"] += n
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        body = ("%(requests)d %(bytes)d" % stats).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

CONFIGS: dict[str, dict[str, str]] = {
    "off": {"OTEL_SDK_DISABLED": "true"},
    "off, no access log": {"OTEL_SDK_DISABLED": "true", "CASCADE_LOG_LEVEL": "warning"},
    "otlp": {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    "otlp-1%-uncapped": {"CASCADE_TRACE_ROUTINE_PER_S": "none"},
    "otlp-10%": {"OTEL_TRACES_SAMPLER_ARG": "0.1", "CASCADE_TRACE_ROUTINE_PER_S": "none"},
    "otlp-all": {"OTEL_TRACES_SAMPLER_ARG": "1", "CASCADE_TRACE_ROUTINE_PER_S": "none"},
    "file": {},
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (Linux; a no-op elsewhere)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
    except (OSError, AttributeError):
        pass


def bodies(models_dir: Path, task: str, n: int = 64) -> list[dict[str, Any]]:
    from cascade.models.manifest import load_split

    inputs, _ = load_split(models_dir, task, "test")
    out = []
    for i in range(min(n, len(inputs))):
        sample = inputs[i] if task == "vision" else inputs[i][:2000]
        out.append(request_body(task, sample))
    return out


def exported_spans(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "cascade_telemetry_spans_exported" for s in f.samples)


def quartiles(values: Any) -> list[float]:
    """First and third quartile of the paired ratios: how far the rounds spread."""
    xs = list(values)
    if len(xs) < 2:
        return [round(xs[0], 3)] * 2 if xs else []
    q = statistics.quantiles(xs, n=4)
    return [round(q[0], 3), round(q[2], 3)]


def end_to_end(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    models_dir = ROOT / "models"
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    server_cpus, client_cpus = ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else (set(cpus), set(cpus))
    sink_port = args.base_port + 90
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])
    chains: dict[str, Chain] = {}
    try:
        base_env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(policy)}
        configs = {n: e for n, e in CONFIGS.items() if n == "off" or n in args.configs}
        for i, (name, extra) in enumerate(configs.items()):
            env = {**base_env, **extra}
            if name.startswith("otlp"):
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
            if name == "file":
                env["CASCADE_TRACE_DIR"] = str(tmp / "traces")
            slug = name.replace(",", "").replace(" ", "-").replace("%", "pct")
            chain = Chain([ROOT / "edge_nodes/endpoint.yaml"], base_port=args.base_port + i,
                          env=env, state_dir=tmp / slug, log_dir=tmp / "logs" / slug)
            chains[name] = chain.start()
            pin(chain.tiers[0].pid, server_cpus)
        pin(sink.pid, client_cpus)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)  # wrk inherits it
        results: dict[str, dict[str, list[Any]]] = {}
        for task in args.tasks:
            load_bodies = bodies(models_dir, task)
            runs: dict[str, list[Any]] = {name: [] for name in chains}
            names = list(chains)
            for rnd in range(args.rounds):
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    print(f"  {task} round {rnd + 1}/{args.rounds}: {name}", flush=True)
                    pid = chains[name].tiers[0].pid
                    cpu_before = cpu_seconds(pid)
                    result = run_load(f"{chains[name].entry_url}/v1/infer", load_bodies,
                                      connections=args.connections, duration_s=args.duration)
                    cpu_us = (cpu_seconds(pid) - cpu_before) / max(1, result.requests) * 1e6
                    runs[name].append((result, cpu_us))
            results[task] = runs
        spans = {name: exported_spans(c.entry_url) for name, c in chains.items()}
    finally:
        for chain in chains.values():
            chain.stop()
        sink.terminate()
        sink.wait(5)
    out: dict[str, Any] = {"generator": "wrk" if have_wrk() else "httpx", "spans_exported": spans}
    for task, runs in results.items():
        off_runs = runs["off"]
        med: dict[str, Any] = {}
        for name, rs in runs.items():
            # Paired with the "off" run of the same round: slow drift on a shared machine
            # cancels out; medians over rounds discard the rounds a neighbour disturbed.
            med[name] = {
                "rps": statistics.median(r.rps for r, _ in rs),
                "p50_ms": statistics.median(r.p50_ms for r, _ in rs),
                "p99_ms": statistics.median(r.p99_ms for r, _ in rs),
                "cpu_us_per_request": round(statistics.median(c for _, c in rs), 1),
                "throughput_ratio": round(statistics.median(
                    r.rps / o.rps for (r, _), (o, _) in zip(rs, off_runs, strict=True)), 3),
                "throughput_ratio_iqr": quartiles(
                    r.rps / o.rps for (r, _), (o, _) in zip(rs, off_runs, strict=True)),
                "p99_ratio": round(statistics.median(
                    r.p99_ms / o.p99_ms for (r, _), (o, _) in zip(rs, off_runs, strict=True)), 3),
                "p99_ratio_iqr": quartiles(
                    r.p99_ms / o.p99_ms for (r, _), (o, _) in zip(rs, off_runs, strict=True)),
                "cpu_ratio": round(statistics.median(
                    c / oc for (_, c), (_, oc) in zip(rs, off_runs, strict=True)), 3),
                "errors": sum(r.errors for r, _ in rs), "rounds": len(rs),
                "rps_each": [round(r.rps) for r, _ in rs],
            }
        out[task] = med
    return out


# -- part B: the SERVER span mechanism alone, in process ----------------------------------------

PROBE = r"""
import asyncio, logging, os, sys, time
variant = sys.argv[1]
from fastapi import FastAPI, Request
from starlette.responses import Response
logging.getLogger("cascade.access").setLevel(logging.WARNING)
if variant not in ("bare", "cascade-middleware-off", "routine-off"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from cascade.observability.tracing import cascade_sampler
    class Null(SpanExporter):
        def export(self, spans): return SpanExportResult.SUCCESS
    # routine-*: the default sampler declining (ratio 0) or keeping (ratio 1) a routine answer
    sampler = {"routine-sampled-out": cascade_sampler(0.0),
               "routine-sampled": cascade_sampler(1.0, per_second=None)}.get(variant)
    provider = TracerProvider(sampler=sampler); provider.add_span_processor(BatchSpanProcessor(Null()))
    trace.set_tracer_provider(provider)
native = {"fastapi-native": None,
          "fastapi-native-lean": {"operation_spans": False, "metrics": False, "logs": False}}
kw = {"telemetry": native[variant]} if variant in native and native[variant] else {}
if variant not in native:
    from cascade.observability.telemetry import fastapi_options
    kw = fastapi_options()
app = FastAPI(**kw)
tel = None  # routine-*: the route reports a confident answer to TierTelemetry as a tier's gate does
if variant.startswith(("cascade-middleware", "routine")):
    from cascade.contract.answer import Answer
    from cascade.observability.telemetry import RequestTelemetryMiddleware, TierTelemetry
    tel = TierTelemetry("endpoint") if variant.startswith("routine") else None
    app.add_middleware(RequestTelemetryMiddleware, telemetry=lambda: tel)
@app.post("/v1/infer")
async def infer(request: Request):
    await request.body()
    if tel is not None:
        t = time.time_ns()
        ids = tel.record_local(task="vision", model="m", started_ns=t, inferred_ns=t, gated_ns=t,
                                 confidence=0.99, decision="answer", signal="max_prob")
        tel.record_answer(Answer(id="r", task="vision", label="1", confidence=0.99,
                                 status="final", answered_by="endpoint", trace_id=ids.trace_id),
                          escalated=False)
    return Response(b'{"ok": true}', media_type="application/json")
if variant.startswith("contrib"):
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    FastAPIInstrumentor.instrument_app(app, exclude_spans=["receive", "send"] if variant == "contrib-lean" else None)
body = b'{"task": "vision", "input": {}}'
caller = ([] if variant.startswith("routine") else  # a sampled caller: the span is recorded
          [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])
from benchmarks.asgi_request import infer_scope
scope = infer_scope(body, caller)
async def receive(): return {"type": "http.request", "body": body, "more_body": False}
async def send(m): pass
async def main():
    for _ in range(500): await app(dict(scope), receive, send)
    rounds = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        for _ in range(2000): await app(dict(scope), receive, send)
        rounds.append((time.perf_counter() - t) / 2000 * 1e6)
    print(min(rounds))
asyncio.run(main())
"""

VARIANTS = ("bare", "cascade-middleware-off", "cascade-middleware", "fastapi-native-lean",
            "fastapi-native", "contrib-lean", "contrib",
            "routine-off", "routine-sampled-out", "routine-sampled")


def server_span_mechanisms(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import opentelemetry.instrumentation.fastapi  # noqa: F401 - only this benchmark uses it
        variants = VARIANTS
    except ImportError:
        variants = tuple(v for v in VARIANTS if not v.startswith("contrib"))
    best: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.probe_repeats):  # interleaved: drift hits every variant alike
        for variant in variants:
            out = subprocess.run([sys.executable, "-c", PROBE, variant, "5"], capture_output=True,
                                 text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            best[variant].append(float(out.stdout.strip()))
    us = {v: round(min(xs), 1) for v, xs in best.items()}
    # the routine rows compare with the routine path with tracing off; the others with bare
    base = {v: "routine-off" if v.startswith("routine") else "bare" for v in variants}
    return {v: {"us_per_request": us[v], "vs": base[v], "overhead_us": round(us[v] - us[base[v]], 1),
                "ratio": round(us[v] / us[base[v]], 2)} for v in variants}


APP_PROBE = r"""
import asyncio, json, logging, os, sys, time
config, task, n_rounds, per_round = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bodies = [json.dumps(b).encode() for b in json.loads(sys.stdin.read())]
from cascade.http.app import create_app
from cascade.observability.logs import configure_logging
from cascade.tier.compose import build_node
from cascade.tier.settings import load_node_settings
from cascade.observability.telemetry import setup_tracing
settings = load_node_settings(config)
configure_logging(settings.tier, settings.log_level, fmt=settings.log_format,
                  stream=open(os.devnull, "w"))
tracing = setup_tracing(settings.tier, trace_dir=settings.trace_dir)
app = create_app(build_node(settings), max_body_bytes=settings.max_body_bytes)
from benchmarks.asgi_request import infer_scope
def scope(body):
    return infer_scope(body, app=app)
codes = []
async def call(body):
    async def receive(): return {"type": "http.request", "body": body, "more_body": False}
    async def send(m):
        if m["type"] == "http.response.start": codes.append(m["status"])
    await app(scope(body), receive, send)
async def main():
    async def lifespan_receive():
        await asyncio.sleep(3600)
    startup = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    msgs = asyncio.Queue(); await msgs.put({"type": "lifespan.startup"})
    done = asyncio.Event()
    async def send(m):
        if m["type"] == "lifespan.startup.complete": done.set()
    life = asyncio.create_task(app(startup, msgs.get, send))
    await done.wait()
    for i in range(500): await call(bodies[i % len(bodies)])
    rounds = []
    for _ in range(n_rounds):
        c = time.process_time()
        for i in range(per_round): await call(bodies[i % len(bodies)])
        tracing.provider and tracing.provider.force_flush()  # the export of this round counts
        rounds.append((time.process_time() - c) / per_round * 1e6)
    await msgs.put({"type": "lifespan.shutdown"})
    print(json.dumps({"cpu_us": rounds, "errors": sum(c != 200 for c in codes)}))
    os._exit(0)
asyncio.run(main())
"""


def real_app(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part C: the endpoint's real app in process, CPU µs per request per configuration."""
    models_dir = ROOT / "models"
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    sink_port = args.base_port + 91
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])
    configs = {name: extra for name, extra in CONFIGS.items() if name != "off, no access log"}
    cpu: dict[str, dict[str, list[float]]] = {t: {n: [] for n in configs} for t in args.tasks}
    try:
        for task in args.tasks:
            payload = json.dumps(bodies(models_dir, task))
            for rep in range(args.probe_repeats):  # interleaved: drift hits every config alike
                for name, extra in configs.items():
                    env = {**os.environ, "PYTHONPATH": str(ROOT), "CASCADE_MODELS_DIR": str(models_dir),
                           "CASCADE_POLICY": str(policy), **extra}
                    env.pop("CASCADE_TRACE_DIR", None)
                    if name.startswith("otlp"):
                        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
                    if name == "file":
                        env["CASCADE_TRACE_DIR"] = str(tmp / f"traces-{rep}")
                    print(f"  part C {task} {rep + 1}/{args.probe_repeats}: {name}", flush=True)
                    out = subprocess.run(
                        [sys.executable, "-c", APP_PROBE, str(ROOT / "edge_nodes/endpoint.yaml"),
                         task, "4", str(args.app_requests)],
                        input=payload, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    if result["errors"]:
                        raise SystemExit(f"part C {name}: {result['errors']} requests failed")
                    cpu[task][name].append(min(result["cpu_us"]))
    finally:
        sink.terminate()
        sink.wait(5)
    out_: dict[str, Any] = {}
    for task, by_name in cpu.items():
        best = {n: min(v) for n, v in by_name.items()}
        # each repeat ran every config back to back: its ratios to that repeat's `off` are paired
        paired = {n: sorted(v / o for v, o in zip(by_name[n], by_name["off"], strict=True))
                  for n in by_name}
        out_[task] = {n: {"cpu_us_per_request": round(b, 1), "overhead_us": round(b - best["off"], 1),
                          "ratio": round(b / best["off"], 3),
                          "paired_ratio_median": round(statistics.median(paired[n]), 3),
                          "paired_ratio_range": [round(paired[n][0], 3), round(paired[n][-1], 3)]}
                      for n, b in best.items()}
    return out_


def render(results: dict[str, Any]) -> str:
    e2e = results["e2e"]
    summary = (f"Measured {results['when']} on {results['cpus']} CPU(s); load generator "
               f"{e2e.get('generator', '-')}, {results['connections']} connections, "
               f"{results['rounds']} interleaved rounds of {results['duration_s']} s; medians, and "
               "ratios paired with the `off` run of the same round. CPU µs/request is the tier "
               "process's own CPU time (all threads, export included) per request: the figure "
               "least disturbed by other load on a shared machine.")
    lines = ["# Tracing overhead on the endpoint's locally-answered path", "", summary, ""]
    for task in results["tasks"] if e2e else ():
        header = ("| config | req/s | p50 ms | p99 ms | CPU µs/request | throughput vs off "
                  "(quartiles) | p99 vs off (quartiles) | CPU/request vs off |")
        lines += [f"## {task}", "", header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in results["e2e"][task].items():
            t_lo, t_hi = m.get("throughput_ratio_iqr") or [m["throughput_ratio"]] * 2
            p_lo, p_hi = m.get("p99_ratio_iqr") or [m["p99_ratio"]] * 2
            lines.append(f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
                         f"{m['cpu_us_per_request']:.0f} | {m['throughput_ratio']:.3f} "
                         f"({t_lo:.2f}–{t_hi:.2f}) | {m['p99_ratio']:.2f} ({p_lo:.2f}–{p_hi:.2f}) | "
                         f"{m['cpu_ratio']:.3f} |")
        lines.append("")
    if results["server_span"]:
        lines += [("## SERVER span mechanism alone, and a tier's routine path (in process, "
                   "minimal route, µs per request)"), "",
                  ("The `routine-*` rows add what a tier's gate reports per confident answer "
                   "(metrics, and with tracing on the sample draw or the three spans); they "
                   "compare with `routine-off`, the others with `bare`."), "",
                  "| variant | µs/request | compared with | overhead µs | ratio |",
                  "|---|---:|---|---:|---:|"]
    for v, m in results["server_span"].items():
        lines.append(f"| {v} | {m['us_per_request']} | {m.get('vs', 'bare')} | {m['overhead_us']} | "
                     f"{m['ratio']} |")
    if results.get("app"):
        lines += ["", ("## The endpoint's real app in process (CPU µs per request, min over "
                  f"interleaved rounds of {results['app_requests']} requests)"), "",
                  (f"Each of the {results['probe_repeats']} repeats runs every config back to back "
                  "(4 rounds each, the best counts); *paired* divides by the `off` of the same repeat."),
                  "", ("| task | config | CPU µs/request (best) | overhead µs | best vs best off | "
                  "paired vs off, median | paired, range |"), "|---|---|---:|---:|---:|---:|---|"]
        for task, rows in results["app"].items():
            for name, m in rows.items():
                lo, hi = m["paired_ratio_range"]
                lines.append(f"| {task} | {name} | {m['cpu_us_per_request']} | {m['overhead_us']} | "
                             f"{m['ratio']:.3f} | {m['paired_ratio_median']:.3f} | {lo:.3f}–{hi:.3f} |")
    if e2e:
        lines += ["", "Spans exported per configuration: " + ", ".join(
            f"{k} {v:.0f}" for k, v in e2e["spans_exported"].items())]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0, help="Seconds per load run.")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per configuration.")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=["vision", "documents"])
    p.add_argument("--base-port", type=int, default=18700)
    p.add_argument("--probe-repeats", type=int, default=3)
    p.add_argument("--app-requests", type=int, default=3000,
                   help="Requests per round in part C (4 rounds per run).")
    p.add_argument("--skip-e2e", action="store_true", help="Only the in-process parts B and C.")
    p.add_argument("--skip-in-process", action="store_true", help="Only part A (end to end).")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="Part A configurations to run (`off` always runs: it is the baseline).")
    p.add_argument("--out", type=Path, default=ROOT / "reports")
    args = p.parse_args()
    if not (ROOT / "models" / "manifest.json").is_file():
        sys.exit("no models/manifest.json: run `cascade models build` first")
    started = time.time()
    server_span: dict[str, Any] = {}
    app: dict[str, Any] = {}
    if not args.skip_in_process:
        print("part B: SERVER span mechanisms (in process)", flush=True)
        server_span = server_span_mechanisms(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_in_process:
            print("part C: the endpoint's real app (in process)", flush=True)
            app = real_app(args, Path(tmp))
        if args.skip_e2e:
            e2e = {}
        else:
            print("part A: endpoint end to end", flush=True)
            e2e = end_to_end(args, Path(tmp))
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
               "duration_s": args.duration, "rounds": args.rounds, "connections": args.connections,
               "tasks": args.tasks, "e2e": e2e, "server_span": server_span, "app": app,
               "app_requests": args.app_requests, "probe_repeats": args.probe_repeats,
               "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps(results, indent=2))
    (args.out / "tracing.md").write_text(render(results))
    print(render(results))
    for task in args.tasks if e2e else ():
        for name in [n for n in e2e[task] if n.startswith(("otlp", "file"))]:
            m = e2e[task][name]
            print(f"{task}: tracing {name} vs off (paired medians): throughput "
                  f"{m['throughput_ratio']:.3f}x, p99 {m['p99_ratio']:.2f}x, "
                  f"CPU per request {m['cpu_ratio']:.3f}x")


if __name__ == "__main__":
    main()
