"""Offline store-and-forward, measured side by side in one run (issue 4).

A. Durable enqueue rate, in process: ``Outbox.enqueue`` from 256 concurrent tasks on a SQLite
   file (synchronous=FULL: every acknowledged escalation is fsynced), with group commit and with
   group commit off (one commit per escalation), and on PostgreSQL when its server binaries
   are installed. Each enqueue returns only after its batch committed.
B. End to end, real processes (endpoint → fault proxy → edge-node), default settings, the uplink
   blackholed: interleaved wrk rounds of (1) requests the endpoint answers locally and
   (2) requests it must escalate, which it answers provisionally after committing the
   escalation. Latency percentiles come from the same load generator in the same run; the
   escalating rounds' request rate is the durable enqueue rate over HTTP.
C. Drain: a fresh endpoint queues 10,000 escalations while the uplink is cut; the link comes
   back; time until the outbox is empty, while a live client keeps sending (are live requests
   starved by the backlog?).
D. Crash: ``--crash-rounds`` SIGKILLs of the endpoint at random moments (the same loop as
   tests/fault/test_crash.py), checking lost = 0 and duplicates = 0.

Writes reports/outbox.json and reports/outbox.md.
Run: python benchmarks/bench_outbox.py [--quick] [--crash-rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx

from cascade.contract.inputs import request_body
from cascade.lab.bench.load import run_load
from tests.fault.harness import Tier, crash_rounds, free_port, wait_for, write_policy
from tests.fault.proxy import FaultProxy

POLICY = """\
version: 1
name: bench-outbox
tasks:
  vision:
    deadline_ms: 2000
    tiers:
      endpoint: {threshold: %(threshold)s}
      edge-node: {threshold: 0.0}
"""


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (Linux; a no-op elsewhere)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
    except (OSError, AttributeError):
        pass


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- A. in-process enqueue rate ----------------------------------------------------------------

def enqueue_rate(url: str, n: int, concurrency: int, **settings: Any) -> dict[str, Any]:
    from cascade.contract.escalation import PendingEscalation
    from cascade.outbox import Outbox, OutboxSettings

    image = [[float((r * 8 + c) % 17) for c in range(8)] for r in range(8)]

    def item(i: int) -> PendingEscalation:
        rid = f"bench-{i}"
        return PendingEscalation(
            id=rid, task="vision", body={"task": "vision", "input": {"image": image}},
            provisional={"id": rid, "task": "vision", "label": "3", "confidence": 0.41,
                         "status": "provisional", "answered_by": "endpoint",
                         "hops": [{"tier": "endpoint", "model": "vision/endpoint",
                                   "confidence": 0.41, "decision": "escalate", "ms": 0.4}],
                         "trace_id": "0" * 32},
            reason="upstream unavailable", hop_count=1, ttl_s=86400, max_attempts=20,
            traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")

    async def run() -> dict[str, Any]:
        box = Outbox(url, tier="endpoint",
                     settings=OutboxSettings(max_rows=10 * n, **settings))
        await box.start(background=False)
        sem = asyncio.Semaphore(concurrency)
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                await box.enqueue(item(i))
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - started
        stats = dict(box.writer.stats)
        await box.aclose()
        return {"n": n, "concurrency": concurrency, "seconds": round(elapsed, 3),
                "per_s": round(n / elapsed), "commits": stats["batches"],
                "mean_batch": round(stats["jobs"] / max(1, stats["batches"]), 1),
                "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
                "p99_ms": round(pct(latencies, 0.99) * 1000, 2)}

    return asyncio.run(run())


def part_a(tmp: Path, n: int) -> dict[str, Any]:
    out = {
        "sqlite_group_commit": enqueue_rate(f"sqlite:///{tmp}/a1.db", n, 256),
        "sqlite_one_commit_each": enqueue_rate(f"sqlite:///{tmp}/a2.db", max(2000, n // 5), 256,
                                               commit_batch_max=1),
    }
    try:
        from tests.contract.pgserver import PostgresServer, find_bindir

        if find_bindir() is not None:
            server = PostgresServer.start()
            try:
                out["postgresql_group_commit"] = enqueue_rate(server.url, n, 256)
            finally:
                server.stop()
    except Exception as exc:  # noqa: BLE001 - PostgreSQL is a bonus row, not the benchmark
        out["postgresql_group_commit"] = {"error": str(exc)[:200]}
    return out


# -- B/C. real processes -------------------------------------------------------------------------

def images(models_dir: Path) -> tuple[list[Any], list[Any], float]:
    """(easy, hard, threshold): the 64 test images the endpoint is surest of, the 64 it is least
    sure of, and an endpoint threshold between them."""
    import numpy as np

    from cascade.lab.evaluation import predict_split
    from cascade.models.manifest import load_split

    inputs, _ = load_split(models_dir, "vision", "test")
    _, preds = predict_split(models_dir, "vision", ["endpoint"], "test")
    order = np.argsort(preds["endpoint"].confidences("max_prob"))
    hard = [request_body("vision", inputs[i]) for i in order[:64]]
    easy = [request_body("vision", inputs[i]) for i in order[-64:]]
    conf = preds["endpoint"].confidences("max_prob")
    threshold = round(float((conf[order[63]] + conf[order[-64]]) / 2), 4)
    return easy, hard, threshold


def outbox_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/outbox", timeout=5).json()


def breaker_state(url: str) -> float:
    """The endpoint's breaker state from /metrics (0 closed, 1 open, 2 half-open)."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("cascade_upstream_breaker_state"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def serial_latencies(url: str, easy: list, hard: list, n: int) -> dict[str, list[float]]:
    """One client, one request at a time, easy and hard interleaved: service latency with no
    queueing in front of it (what a camera waiting for its answer sees)."""
    out: dict[str, list[float]] = {"online_local": [], "offline_provisional": []}
    with httpx.Client(timeout=10) as client:
        for i in range(n):
            for name, bodies in (("online_local", easy), ("offline_provisional", hard)):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/infer", json=bodies[i % len(bodies)])
                out[name].append((time.perf_counter() - t0) * 1000)
                want = "final" if name == "online_local" else "provisional"
                assert r.status_code == 200 and r.json()["status"] == want, r.text
    return out


def part_b(args: argparse.Namespace, tmp: Path, easy: list, hard: list,
           endpoint: Tier, proxy: FaultProxy) -> dict[str, Any]:
    url = f"{endpoint.url}/v1/infer"
    run_load(url, easy, connections=args.connections, duration_s=1)  # warm up
    proxy.set(mode="blackhole")
    run_load(url, hard, connections=args.connections, duration_s=3)
    wait_for(lambda: breaker_state(endpoint.url) != 0.0, timeout_s=30, what="the breaker opened")
    summary: dict[str, Any] = {"serial": {}, "saturated": {}}
    lat: dict[str, list[float]] = {"online_local": [], "offline_provisional": []}
    rounds: dict[str, list[dict[str, Any]]] = {"online_local": [], "offline_provisional": []}
    for _ in range(args.rounds):
        for name, got in serial_latencies(endpoint.url, easy, hard, args.serial_n).items():
            lat[name] += got
        for name, bodies in (("online_local", easy), ("offline_provisional", hard)):
            r = run_load(url, bodies, connections=args.connections, duration_s=args.seconds)
            rounds[name].append(r.as_dict())
    for name, values in lat.items():
        summary["serial"][name] = {
            "n": len(values), "p50_ms": round(pct(values, 0.5), 3),
            "p99_ms": round(pct(values, 0.99), 3), "p999_ms": round(pct(values, 0.999), 3),
            "max_ms": round(max(values), 1)}
    for name, runs in rounds.items():
        summary["saturated"][name] = {
            "rps": round(statistics.median(r["rps"] for r in runs)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
            "errors": sum(r["errors"] for r in runs), "rounds": runs,
        }
    s, t = summary["serial"], summary["saturated"]
    summary["p99_ratio_offline_vs_online"] = round(
        s["offline_provisional"]["p99_ms"] / s["online_local"]["p99_ms"], 2)
    summary["p50_ratio_offline_vs_online"] = round(
        s["offline_provisional"]["p50_ms"] / s["online_local"]["p50_ms"], 2)
    summary["saturated_rps_ratio"] = round(
        t["offline_provisional"]["rps"] / max(1, t["online_local"]["rps"]), 2)
    summary["queued_during_part_b"] = outbox_stats(endpoint.url)["depth"]
    summary["connections"] = args.connections
    summary["generator"] = rounds["online_local"][0]["generator"]
    return summary


def part_c(args: argparse.Namespace, tmp: Path, models_dir: Path, policy: Path,
           hard: list) -> dict[str, Any]:
    """Queue ``drain_n`` escalations while the upstream is down, start it, time the drain.

    No proxy here: it would sit in the measured path. The link "returns" when the upstream
    process is up (before that, connections are refused and the breaker is open).
    """
    port = free_port()
    upstream = Tier(tmp / "c", "edge-node", models_dir, policy, tasks={"vision": "edge-node"},
                    fast=False, log_level="warning")
    endpoint = Tier(tmp / "c", "endpoint", models_dir, policy, upstream=f"http://127.0.0.1:{port}",
                    tasks={"vision": "endpoint"}, fast=False, log_level="warning").start()
    live: list[tuple[float, str]] = []
    done = threading.Event()
    try:
        url = f"{endpoint.url}/v1/infer"
        fill_s, runs = 0.0, 0
        while outbox_stats(endpoint.url)["depth"] < args.drain_n and runs < 100:
            fill_s += run_load(url, hard, connections=args.connections, duration_s=2).duration_s
            runs += 1
        depth = outbox_stats(endpoint.url)["depth"]

        def live_client() -> None:  # one request every 50 ms: field traffic keeps coming
            with httpx.Client(timeout=10) as client:
                i = 0
                while not done.is_set():
                    t0 = time.perf_counter()
                    r = client.post(url, json=hard[i % len(hard)],
                                    headers={"Idempotency-Key": f"live-{i}"})
                    live.append((time.perf_counter() - t0,
                                 r.json().get("status", str(r.status_code))))
                    i += 1
                    time.sleep(0.05)

        upstream.start(port)  # the link is back
        started = time.perf_counter()
        thread = threading.Thread(target=live_client)
        thread.start()
        wait_for(lambda: outbox_stats(endpoint.url)["depth"] == 0, timeout_s=900,
                 what="the backlog drained")
        drain_s = time.perf_counter() - started
        done.set()
        thread.join()
        stats = outbox_stats(endpoint.url)
    finally:
        done.set()
        endpoint.stop()
        upstream.stop()
    final_live = [ms for ms, status in live if status == "final"]
    return {
        "depth_before": depth, "fill_seconds": round(fill_s, 2),
        "fill_per_s": round(depth / fill_s) if fill_s else None,
        "drain_seconds": round(drain_s, 2), "drain_per_s": round(depth / drain_s),
        "delivered": stats["delivered"], "dead": stats["dead"],
        "live_requests_during_drain": len(live), "live_final": len(final_live),
        "live_p50_ms": round(pct(final_live, 0.5) * 1000, 2),
        "live_p99_ms": round(pct(final_live, 0.99) * 1000, 2),
        "includes_breaker_wait_s": 2.0,
    }


def real_processes(args: argparse.Namespace, tmp: Path, models_dir: Path) -> dict[str, Any]:
    easy, hard, threshold = images(models_dir)
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY % {"threshold": threshold})
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    upstream = Tier(tmp, "edge-node", models_dir, policy, tasks={"vision": "edge-node"},
                    fast=False, log_level="warning").start()
    proxy = FaultProxy(int(upstream.url.rsplit(":", 1)[1])).start()
    out: dict[str, Any] = {"endpoint_threshold": threshold}
    try:
        if "B" in args.parts:
            endpoint = _endpoint(tmp / "b", models_dir, policy, proxy)
            if len(cpus) >= 2:  # the endpoint on one core, the load generator on the other
                pin(endpoint.pid, {cpus[0]})
                os.sched_setaffinity(0, set(cpus[1:]))
            try:
                out["latency"] = part_b(args, tmp, easy, hard, endpoint, proxy)
            finally:
                endpoint.stop()
                if cpus:
                    os.sched_setaffinity(0, set(cpus))
    finally:
        proxy.stop()
        upstream.stop()
    return out


def _endpoint(tmp: Path, models_dir: Path, policy: Path, proxy: FaultProxy) -> Tier:
    tmp.mkdir(parents=True, exist_ok=True)
    # Default outbox, breaker and retry settings: what a field endpoint runs with.
    return Tier(tmp, "endpoint", models_dir, policy, upstream=proxy.url,
                tasks={"vision": "endpoint"}, fast=False, log_level="warning").start()


# -- D. crash loop -------------------------------------------------------------------------------

def part_d(args: argparse.Namespace, tmp: Path, models_dir: Path, hard: list) -> dict[str, Any]:
    policy = write_policy(tmp / "crash-policy.yaml")
    upstream = Tier(tmp / "d", "edge-node", models_dir, policy).start()
    proxy = FaultProxy(int(upstream.url.rsplit(":", 1)[1])).start()
    endpoint = Tier(tmp / "d", "endpoint", models_dir, policy, upstream=proxy.url,
                    outbox={"forward_concurrency": 8})
    try:
        return crash_rounds(endpoint, upstream, proxy, hard[0], rounds=args.crash_rounds,
                            seed=args.seed)
    finally:
        endpoint.stop()
        proxy.stop()
        upstream.stop()


# -- report --------------------------------------------------------------------------------------

def _markdown_a(a: dict[str, Any]) -> list[str]:
    lines = ["## A. Durable enqueue rate (in process, SQLite synchronous=FULL)", "",
             "| variant | escalations | per second | commits | mean batch | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in a.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {name} | {r['n']} | **{r['per_s']}** | {r['commits']} | "
                     f"{r['mean_batch']} | {r['p50_ms']} | {r['p99_ms']} |")
    ratio = a["sqlite_group_commit"]["per_s"] / max(1, a["sqlite_one_commit_each"]["per_s"])
    return [*lines, "", (f"Group commit: {ratio:.1f}x the rate of one commit per escalation "
                         "(target ≥ 2,000/s)."), ""]


def _markdown_b(b: dict[str, Any]) -> list[str]:
    s, t = b["serial"], b["saturated"]
    lines = ["## B. Provisional answer during an outage vs online local answer", "",
             ("Same endpoint process (default settings, SQLite synchronous=FULL), uplink "
              "blackholed behind the fault proxy. Latency: one client, one request at a time, "
              f"answered-locally and escalating requests interleaved ({s['online_local']['n']} "
              "each)."), "",
             "| requests | p50 ms | p99 ms | p99.9 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name in ("online_local", "offline_provisional"):
        r = s[name]
        lines.append(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r['p999_ms']} | {r['max_ms']} |")
    lines += ["", (f"Offline p99 / online p99 = **{b['p99_ratio_offline_vs_online']}** (target ≤ 2); "
                   f"p50 ratio {b['p50_ratio_offline_vs_online']}."), "",
              (f"Saturated ({t['online_local']['rounds'][0]['generator']}, {b['connections']} "
               "connections, medians of interleaved rounds): the offline rate is the durable "
               "enqueue rate over HTTP."), "",
              "| requests | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|"]
    for name in ("online_local", "offline_provisional"):
        r = t[name]
        lines.append(f"| {name} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    return [*lines, "", (f"{b['queued_during_part_b']} escalations queued in this part; offline "
                         f"throughput is {b['saturated_rps_ratio']}x the local one.")
            , ""]


def _markdown_c(c: dict[str, Any]) -> list[str]:
    return ["## C. Drain of a backlog once the link returns", "",
            (f"{c['depth_before']} escalations queued over HTTP (wrk) while the upstream was "
             f"down, in {c['fill_seconds']} s ({c['fill_per_s']}/s); upstream started: outbox "
             f"empty after **{c['drain_seconds']} s** ({c['drain_per_s']}/s, including up to "
             f"{c['includes_breaker_wait_s']:.0f} s until the breaker's first probe); "
             f"{c['delivered']} delivered, {c['dead']} dead."), "",
            (f"Live requests during the drain: {c['live_requests_during_drain']}, of which "
             f"{c['live_final']} answered final online (p50 {c['live_p50_ms']} ms, p99 "
             f"{c['live_p99_ms']} ms): new work is not queued behind the backlog."), ""]


def _markdown_d(d: dict[str, Any]) -> list[str]:
    when = f" (run {d['when']})" if "when" in d else ""
    return [f"## D. SIGKILL at random moments{when}", "",
            (f"{d['kills']} kills of the endpoint mid-burst (seed {d['seed']}; even rounds with "
             "the uplink cut, odd rounds with it back), then one restart to drain."), "",
            ("| acknowledged | provisional | lost | provisional not queued | undelivered | "
             "never upstream | computed twice | integrity_check ok |"),
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            (f"| {d['acknowledged']} | {d['provisional']} | **{d['lost']}** | "
             f"{d.get('not_queued', 0)} | {d.get('undelivered', 0)} | "
             f"{d.get('never_upstream', 0)} | **{d['duplicates']}** | "
             f"{d.get('integrity_ok', '-')} of {d.get('integrity_checks', '-')} |"), "",
            ("`lost`: acknowledged (200) but not in the results store after the kill; "
             "`integrity_check`: `PRAGMA integrity_check` after every kill and at the end."), ""]


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report (reports/outbox.md)."""
    lines = ["# Outbox benchmark (issue 4)", "",
             (f"Machine: {os.cpu_count()} cores, load average at start {report['load']}; run "
              f"{report['when']}; {report['seconds']:.0f} s total."), ""]
    for key, part in (("enqueue_in_process", _markdown_a), ("latency", _markdown_b),
                      ("drain", _markdown_c), ("crash", _markdown_d)):
        if key in report:
            lines += part(report[key])
    return "\n".join(lines)


def _keep_parts_not_run(report: dict[str, Any], previous: Path) -> None:
    """A run of some parts (``--parts D``) keeps the other parts' last results in the report
    (each part says when it ran where it can: see D's heading)."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    for key in ("enqueue_in_process", "latency", "drain", "crash"):
        if key not in report and key in old:
            report[key] = old[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smaller runs (a smoke test).")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--serial-n", type=int, default=1500,
                        help="Serial requests of each kind per round (latency).")
    parser.add_argument("--enqueue-n", type=int, default=20_000)
    parser.add_argument("--drain-n", type=int, default=10_000)
    parser.add_argument("--crash-rounds", type=int, default=50,
                        help="SIGKILLs of part D (each: a burst, a kill, a restart).")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    parser.add_argument("--parts", default="ABCD", help="Which parts to run, e.g. AB.")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.enqueue_n, args.drain_n = 1, 2, 4000, 1000
        args.serial_n = 300
        args.crash_rounds = min(args.crash_rounds, 3)
    from cascade.models.build import build_models

    build_models(args.models_dir, show_progress=False)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "args": {
        k: str(v) for k, v in vars(args).items()},
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    try:
        if "A" in args.parts:
            print("A. in-process enqueue rate...", flush=True)
            report["enqueue_in_process"] = part_a(tmp, args.enqueue_n)
        if "B" in args.parts:
            print("B. latency during an outage...", flush=True)
            report.update(real_processes(args, tmp, args.models_dir))
        if "C" in args.parts:
            print("C. drain of a backlog...", flush=True)
            _, hard, threshold = images(args.models_dir)
            policy = tmp / "policy-c.yaml"
            policy.write_text(POLICY % {"threshold": threshold})
            report["drain"] = part_c(args, tmp, args.models_dir, policy, hard)
        if "D" in args.parts and args.crash_rounds:
            print(f"D. {args.crash_rounds} SIGKILLs...", flush=True)
            _, hard, _ = images(args.models_dir)
            report["crash"] = {**part_d(args, tmp, args.models_dir, hard),
                               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    except BaseException:
        print(f"failed; tier logs kept in {tmp}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    _keep_parts_not_run(report, args.out / "outbox.json")
    (args.out / "outbox.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "outbox.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
