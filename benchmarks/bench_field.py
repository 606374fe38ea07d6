"""Field operations under a distribution shift the tiers were not trained for.

The four-tier chain (real processes on 127.0.0.1, ``policies/default.yaml`` plus the audit and
hard-example blocks below) serves camera frames of the calibration split corrupted by the
``gain`` family of :func:`cascade.lab.bench.shift.corrupt_frames` (per frame, contrast down and
an offset: exposure drift; no tier trains on it). Per severity and seed:

1. **Shadow audits**: ``--requests`` frames (drawn with replacement, each with its own
   corruption) go through the chain; the endpoint audits ``--rate`` of the requests it answers
   itself. Its live agreement (``/readyz``) is compared with the true accuracy of those same
   answers (ground truth), after every request has been audited or dropped.
2. **Hard examples back into training** (first seed only): the endpoint's store is exported
   (``cascade examples export``), ``cascade models build --extra-data ... --extra-tier
   endpoint`` retrains into a copy of the models directory, and the endpoint's model alone is
   measured, old and new, on a fresh draw (the test split, never sent, its own corruption seed):
   recovered share = (new - old) / (clean - old).
   Then the loop is closed (``benchmarks/field_loop.py``): a fresh chain whose endpoint trusts
   a key from ``cascade models keygen`` pulls the retrained model, packed by ``cascade models
   pack``, on ``cascade models pull``; it runs as a canary (``--canary-share``,
   ``--canary-min-requests``, ``--canary-window``) under shifted live traffic until promoted or
   rolled back; the endpoint's accuracy and audit estimate on a fresh shifted draw (the test
   split under ``--loop-draws`` corruption seeds) are measured through the live chain before
   and after (``--phase loop`` runs only this, seed 0 of each severity, keeping the rest).

3. **Fallbacks under pressure** (``--phase fallback``): one endpoint process serving the
   vision ladder's big model (``--primary``, the cloud's SVC) answers everything locally; a
   twin has the pressure block (``--budget-ms`` on the model's p95, fallback to ``--fallback``,
   the endpoint's MLP). Each is loaded in turn (closed loop, ``--seconds`` per round,
   alternating, ``--rounds``) with and without a CPU hog (2 busy processes per core, started
   and stopped by this script): the endpoint's p99 side by side.

    python -m benchmarks.bench_field [--phase audits|fallback|loop|all] [--severity 1.3 ...]

Writes ``reports/field.json`` and ``reports/field.md`` (a phase run alone keeps the other
phase's section).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.field_loop import close_loop, loop_rows
from cascade.deploy.supervisor import Chain
from cascade.lab.bench.run import _send_all, bodies_for
from cascade.lab.bench.shift import corrupt_frames
from cascade.lab.evaluation import predict_inputs
from cascade.models.manifest import load_split

ROOT = Path(__file__).resolve().parents[1]
CHAIN = [ROOT / "edge_nodes/endpoint.yaml", ROOT / "edge_nodes/edge-node.yaml",
         ROOT / "edge_nodes/edge-server.yaml", ROOT / "cloud/cloud.yaml"]
FAMILY = ("gain",)


def field_policy(path: Path, rate: float, reference: str) -> Path:
    """The shipped policy with audits and hard examples on for vision."""
    policy = yaml.safe_load((ROOT / "policies/default.yaml").read_text())
    policy["decision_log"]["path"] = str(path.parent / "decisions-{tier}.db")
    policy["tasks"]["vision"]["audit"] = {"rate": rate, "per_second": 200, "queue_size": 512,
                                          "reference": reference, "concurrency": 2}
    policy["tasks"]["vision"]["hard_examples"] = {"enabled": True, "include_payloads": True,
                                                  "max_rows": 100_000}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def audits_settled(url: str) -> dict[str, Any] | None:
    """The endpoint's audit view once every sampled audit was answered, failed or dropped."""
    view = httpx.get(f"{url}/readyz", timeout=10).json()["audit"]["vision"]
    c = view["counts"]
    done = c["sent"] + c["failed"] + c["dropped_budget"] + c["dropped_queue_full"]
    return view if done >= c["sampled"] else None


def chain_env(args: argparse.Namespace, models_dir: Path, work: Path) -> dict[str, str]:
    """Environment of a benchmark chain: its models, the field policy, its own databases."""
    return {"CASCADE_MODELS_DIR": str(models_dir),
            "CASCADE_POLICY": str(field_policy(work / "policy.yaml", args.rate, args.reference)),
            "CASCADE_DECISION_LOG_PATH": str(work / "decisions-{tier}.db"),
            "CASCADE_EXAMPLES_PATH": str(work / "examples-{tier}.db"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def ship(args: argparse.Namespace, models_dir: Path, severity: float,
         work: Path) -> dict[str, Any]:
    """The retrained endpoint model (``work/models-retrained``) out through a live endpoint's
    signed-bundle pull and canary; its accuracy on a fresh shifted draw before and after."""
    loop_work = work / "loop"
    loop_work.mkdir(parents=True, exist_ok=True)
    canary = {"share": args.canary_share, "window_requests": args.canary_window,
              "min_requests": args.canary_min_requests}
    return close_loop(models_dir, work / "models-retrained", severity, loop_work,
                      env=chain_env(args, models_dir, loop_work), draws=args.loop_draws,
                      canary=canary, canary_requests=args.canary_requests)


def run_traffic(args: argparse.Namespace, models_dir: Path, severity: float, seed: int,
                work: Path) -> dict[str, Any]:
    """One chain, one draw of shifted traffic; the audit estimate vs the truth."""
    inputs, labels = load_split(models_dir, "vision", "calibration")
    pick = np.random.default_rng(seed).integers(0, len(labels), args.requests)
    frames = corrupt_frames(inputs[pick], FAMILY, severity=severity, seed=1000 + seed)
    truth = [labels[i] for i in pick]
    env = chain_env(args, models_dir, work)
    from tests.conftest import free_port_block

    with Chain(CHAIN, base_port=free_port_block(4), env=env, log_dir=work / "logs",
               state_dir=work, ready_timeout_s=180) as chain:
        t0 = time.perf_counter()
        answers = asyncio.run(_send_all(chain.entry_url, bodies_for(models_dir, "vision", frames),
                                        concurrency=8))
        seconds = time.perf_counter() - t0
        deadline = time.monotonic() + 120
        view = None
        while view is None and time.monotonic() < deadline:
            view = audits_settled(chain.entry_url)
            if view is None:
                time.sleep(0.5)
    assert view is not None, "audits did not settle within 120 s"
    own = [(a.get("label"), y) for a, y in zip(answers, truth) if a.get("answered_by") == "endpoint"]
    true_acc = float(np.mean([label == y for label, y in own])) if own else float("nan")
    est = view["agreement"]
    model_true = float(np.mean([a["hops"][0]["label"] == y for a, y in zip(answers, truth)
                                if a.get("hops")]))
    model = view["model_accuracy"] or {"estimate": None, "interval": [0.0, 1.0]}
    return {
        "severity": severity, "seed": seed, "requests": len(answers), "seconds": round(seconds, 1),
        "errors": sum(a["_status_code"] != 200 for a in answers),
        "answered_by_endpoint": len(own),
        "chain_accuracy": float(np.mean([a.get("label") == y for a, y in zip(answers, truth)])),
        "endpoint_true_accuracy": true_acc,
        "audits": view["audits"], "audit_estimate": est, "interval": view["interval"],
        "error_points": None if est is None else round(100 * (est - true_acc), 2),
        "within_3_points": est is not None and abs(est - true_acc) <= 0.03,
        "covered": est is not None and view["interval"][0] <= true_acc <= view["interval"][1],
        "model_true_accuracy": model_true, "model_estimate": model["estimate"],
        "model_interval": model["interval"],
        "model_error_points": None if model["estimate"] is None
        else round(100 * (model["estimate"] - model_true), 2),
        "model_within_3_points": model["estimate"] is not None
        and abs(model["estimate"] - model_true) <= 0.03,
        "counts": view["counts"], "hard_examples": view["hard_examples"],
    }


def retrain(models_dir: Path, severity: float, work: Path) -> dict[str, Any]:
    """Export the endpoint's hard examples, retrain the endpoint on them, measure old and new
    on a fresh shifted draw (the test split)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dataset = work / "hard.jsonl"
    exported = subprocess.run(
        [sys.executable, "-m", "cascade", "examples", "export", str(work / "examples-endpoint.db"),
         "--out", str(dataset), "--task", "vision", "--json"],
        env=env, check=True, capture_output=True, text=True)
    new_dir = work / "models-retrained"
    shutil.copytree(models_dir, new_dir, ignore=shutil.ignore_patterns(".build.lock"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cascade", "models", "build", "--out", str(new_dir),
                    "--extra-data", str(dataset), "--extra-tier", "endpoint", "--quiet"],
                   env=env, check=True)
    build_s = time.perf_counter() - t0
    test_x, test_y = load_split(models_dir, "vision", "test")
    fresh = corrupt_frames(test_x, FAMILY, severity=severity, seed=424_242)
    old = predict_inputs(models_dir, "vision", ["endpoint"], fresh, test_y)["endpoint"].accuracy
    new = predict_inputs(new_dir, "vision", ["endpoint"], fresh, test_y)["endpoint"].accuracy
    clean_old = predict_inputs(models_dir, "vision", ["endpoint"], test_x,
                               test_y)["endpoint"].accuracy
    clean_new = predict_inputs(new_dir, "vision", ["endpoint"], test_x, test_y)["endpoint"].accuracy
    lost = clean_old - old
    return {
        "export": json.loads(exported.stdout), "build_seconds": round(build_s, 1),
        "fresh_samples": len(test_y), "clean_accuracy_old": clean_old,
        "clean_accuracy_new": clean_new, "shifted_accuracy_old": old, "shifted_accuracy_new": new,
        "lost_points": round(100 * lost, 2), "recovered_points": round(100 * (new - old), 2),
        "recovered_share": (new - old) / lost if lost > 0 else None,
    }


def _hog(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def fallback_phase(args: argparse.Namespace, models_dir: Path) -> dict[str, Any]:
    """p99 of an endpoint with and without the fallback, with and without a CPU hog."""
    import multiprocessing

    from cascade.lab.bench.load import run_load
    from tests.fault.harness import Tier, write_policy

    work = Path(tempfile.mkdtemp(prefix="bench-fallback-"))
    plain = write_policy(work / "plain.yaml", escalating=())
    policy = yaml.safe_load(plain.read_text())
    policy["tasks"]["vision"]["tiers"]["endpoint"]["pressure"] = {
        "latency_budget_ms": args.budget_ms, "window": 50, "min_runs": 20,
        "action": "fallback", "fallback_model": args.fallback, "probe_every": 10}
    guarded = work / "guarded.yaml"
    guarded.write_text(yaml.safe_dump(policy))
    inputs, _ = load_split(models_dir, "vision", "test")
    bodies = bodies_for(models_dir, "vision", inputs)
    tiers = {name: Tier(work / name, "endpoint", models_dir, path, tasks={"vision": args.primary},
                        fast=False).start()
             for name, path in (("without fallback", plain), ("with fallback", guarded))}
    rows: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            for hogged in (False, True):
                for name, tier in tiers.items():
                    hogs = []
                    if hogged:
                        stop_at = time.monotonic() + args.seconds + 5
                        hogs = [multiprocessing.Process(target=_hog, args=(stop_at,), daemon=True)
                                for _ in range(2 * (os.cpu_count() or 1))]
                        for hog in hogs:
                            hog.start()
                        time.sleep(1.0)
                    result = run_load(f"{tier.url}/v1/infer", bodies, connections=4,
                                      duration_s=args.seconds)
                    for hog in hogs:
                        hog.terminate()
                        hog.join(10)
                    view = httpx.get(f"{tier.url}/readyz", timeout=30).json()["pressure"]["vision"]
                    rows.append({"round": rnd, "hog": hogged, "config": name,
                                 **result.as_dict(), "pressure": view})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for tier in tiers.values():
            tier.stop()
    summary: dict[str, Any] = {}
    for hogged in (False, True):
        for name in tiers:
            mine = [r for r in rows if r["hog"] == hogged and r["config"] == name]
            summary[f"{'hog' if hogged else 'idle'}, {name}"] = {
                "p99_ms_median": float(np.median([r["p99_ms"] for r in mine])),
                "p50_ms_median": float(np.median([r["p50_ms"] for r in mine])),
                "rps_median": float(np.median([r["rps"] for r in mine]))}
    return {"primary": args.primary, "fallback": args.fallback, "budget_ms": args.budget_ms,
            "seconds": args.seconds, "rounds": args.rounds, "rows": rows, "summary": summary}


def report(results: dict[str, Any]) -> str:
    """reports/field.md."""
    lines = ["# Field accuracy and hard-example retraining under shift", "",
             (f"Run {results['when']} on {os.cpu_count()} cores; corruption family "
             f"{'+'.join(FAMILY)} (`cascade.lab.bench.shift.corrupt_frames`), audit rate "
             f"{results['rate']:.0%}, reference `{results['reference']}`, "
             f"{results['requests']} requests per run. Command: `{results['command']}`."), "",
             "## Live accuracy of the endpoint's model over all its traffic", "",
             ("Audited answers (5% sample of those it gave itself) and every escalation (its "
             "own label vs the answer from above), weighted by their shares "
             "(`model_accuracy` on /readyz). True: the endpoint hop's label vs ground truth."), "",
             "| severity | seed | estimate | interval | true | error (points) | within ±3 |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        est = r["model_estimate"]
        lines.append(
            f"| {r['severity']} | {r['seed']} | {'-' if est is None else f'{est:.3f}'} | "
            f"{r['model_interval'][0]:.3f}..{r['model_interval'][1]:.3f} | "
            f"{r['model_true_accuracy']:.3f} | {r['model_error_points']:+.1f} | "
            f"{'yes' if r['model_within_3_points'] else 'NO'} |")
    lines += ["",
             "## Accuracy of the answers the endpoint gave itself (audits alone)", "",
             ("| severity | seed | answered by endpoint | audits | estimate | interval | true | "
             "error (points) | within ±3 | chain accuracy | dropped |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        c = r["counts"]
        lines.append(
            f"| {r['severity']} | {r['seed']} | {r['answered_by_endpoint']} | {r['audits']} | "
            f"{r['audit_estimate']:.3f} | {r['interval'][0]:.3f}..{r['interval'][1]:.3f} | "
            f"{r['endpoint_true_accuracy']:.3f} | {r['error_points']:+.1f} | "
            f"{'yes' if r['within_3_points'] else 'NO'} | {r['chain_accuracy']:.3f} | "
            f"{c['dropped_budget'] + c['dropped_queue_full']} |")
    lines += ["", ("## One round of retraining on exported hard examples (endpoint alone, fresh "
              "shifted draw: the test split)"), "",
              ("| severity | examples | clean before → after | shifted before → after | lost | "
              "recovered | share | build s |"), "|---|---|---|---|---|---|---|---|"]
    for sev, r in results["retraining"].items():
        share = r["recovered_share"]
        lines.append(
            f"| {sev} | {r['export']['written']} | {r['clean_accuracy_old']:.3f} → "
            f"{r['clean_accuracy_new']:.3f} | {r['shifted_accuracy_old']:.3f} → "
            f"{r['shifted_accuracy_new']:.3f} | {r['lost_points']:.1f} | "
            f"{r['recovered_points']:.1f} | {'-' if share is None else f'{share:.0%}'} | "
            f"{r['build_seconds']} |")
    if results.get("loop"):
        lines += loop_rows(results["loop"], results.get("loop_run") or results)
    fallback = results.get("fallback")
    if fallback:
        lines += ["", "## Fallbacks under pressure: the endpoint's latency under a CPU hog", "",
                  (f"Primary model: vision `{fallback['primary']}`; fallback: `{fallback['fallback']}` "
                  f"when the model's p95 passes {fallback['budget_ms']} ms. {fallback['rounds']} "
                  f"alternating rounds of {fallback['seconds']} s, 4 connections; medians over "
                  "rounds. Hog: 2 busy processes per core."), "",
                  "| load | p50 ms | p99 ms | requests/s |", "|---|---|---|---|"]
        for name, row in fallback["summary"].items():
            lines.append(f"| {name} | {row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} | "
                         f"{row['rps_median']:.0f} |")
        lines += ["", ("Every round (pressure state and plan counters at its end; counters are "
                  "cumulative):"), "", ("| round | hog | config | p50 ms | p99 ms | requests | "
                  "pressure on | model p95 ms | own+probe / fallback |"), "|---|---|---|---|---|---|---|---|---|"]
        for r in fallback["rows"]:
            c = r["pressure"]["counts"]
            lines.append(
                f"| {r['round']} | {'yes' if r['hog'] else 'no'} | {r['config']} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['requests']} | "
                f"{'yes' if r['pressure']['on'] else 'no'} | {r['pressure'].get('p95_ms')} | "
                f"{c.get('own', 0) + c.get('probe', 0)} / {c.get('fallback', 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every severity and seed; write reports/field.json and .md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--severity", type=float, action="append",
                        help="gain severity (repeatable; default 1.3 and 1.0)")
    parser.add_argument("--seeds", type=int, default=3, help="traffic draws per severity")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.05, help="audit rate")
    parser.add_argument("--reference", default="top", choices=["top", "chain", "next_tier"])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/field.json")
    parser.add_argument("--phase", default="all",
                        choices=["audits", "fallback", "loop", "all", "render"],
                        help="loop: seed 0 of each severity only (traffic, retraining, the "
                        "retrained model shipped through the canary), keeping the other "
                        "sections; render: rewrite the .md from the .json only")
    parser.add_argument("--loop-draws", type=int, default=3,
                        help="loop: corruption seeds of the test split in the fresh draw")
    parser.add_argument("--canary-share", type=float, default=0.2,
                        help="loop: the endpoint's bundles.canary.share")
    parser.add_argument("--canary-min-requests", type=int, default=100,
                        help="loop: bundles.canary.min_requests (canary answers before its "
                        "guards judge it; 20, the default, let one slow call on a shared "
                        "2-core box trip the p99 guard)")
    parser.add_argument("--canary-window", type=int, default=200,
                        help="loop: bundles.canary.window_requests (canary answers to promote)")
    parser.add_argument("--canary-requests", type=int, default=3000,
                        help="loop: most shifted live requests sent while the canary runs")
    parser.add_argument("--primary", default="cloud", help="fallback phase: the big model")
    parser.add_argument("--fallback", default="endpoint", help="fallback phase: the small one")
    parser.add_argument("--budget-ms", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    severities = args.severity or [1.3, 1.0]
    models_dir = args.models_dir.resolve()
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "rate": args.rate, "reference": args.reference,
        "requests": args.requests, "command": " ".join(["python -m benchmarks.bench_field",
                                                        *sys.argv[1:]]),
        "runs": [], "retraining": {}, "loop": {}}
    if args.phase == "render":
        _write(args.out, previous)
        return
    if args.phase == "fallback":
        results = {**previous, "fallback": fallback_phase(args, models_dir)}
        _write(args.out, results)
        return
    if args.phase == "loop":
        results = {**previous, "loop": {}, "loop_run": {k: results[k] for k in ("when", "command")}}
    for severity in severities:
        for seed in range(1 if args.phase == "loop" else args.seeds):
            work = Path(tempfile.mkdtemp(prefix=f"bench-field-{severity}-{seed}-"))
            run = run_traffic(args, models_dir, severity, seed, work)
            print(json.dumps({k: v for k, v in run.items() if k != "counts"}), flush=True)
            if seed == 0:
                retrained = retrain(models_dir, severity, work)
                print(json.dumps(retrained), flush=True)
                results["loop"][str(severity)] = {**ship(args, models_dir, severity, work),
                                                  "offline": retrained}
                print(json.dumps(results["loop"][str(severity)]), flush=True)
                _write(args.out, results)  # a long run keeps what it measured so far
            if args.phase != "loop":
                results["runs"].append(run)
                if seed == 0:
                    results["retraining"][str(severity)] = retrained
    if args.phase == "all":
        results["fallback"] = fallback_phase(args, models_dir)
    elif "fallback" in previous:
        results["fallback"] = previous["fallback"]
    _write(args.out, results)


def _write(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
