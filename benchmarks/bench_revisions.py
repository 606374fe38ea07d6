"""Side by side: the endpoint tier of two git revisions, answering locally, under the same load.

Used to show that a change to the core loses no performance: each revision serves the models
its own ``cascade models build`` makes from the same data and seed (the manifest format may
differ between revisions), the same requests reach both, in alternating rounds, so drift in the
machine's load hits both alike; the report gives each round's ratio and their median.

    python -m benchmarks.bench_revisions --baseline 2ce15e3 [--rounds 5] [--seconds 5]

Writes ``reports/bench_revisions.json`` and ``.md``. The baseline is checked out into a
temporary git worktree (removed afterwards); its tier runs with ``PYTHONPATH`` pointing there,
so nothing is installed. Load comes from ``wrk`` when installed (else client processes); only
127.0.0.1 is targeted, and every run stops after ``--seconds``.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from cascade.contract.inputs import request_body
from cascade.lab.bench.load import have_wrk, run_load
from cascade.models.manifest import load_split

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = (1, 16)

POLICY = {"version": 1, "name": "bench-local", "tasks": {
    task: {"deadline_ms": 2000, "tiers": {"endpoint": {"signal": "max_prob", "threshold": 0.0}}}
    for task in ("vision", "documents")}}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def worktree(revision: str):
    """A checkout of ``revision`` in a temporary directory."""
    path = Path(tempfile.mkdtemp(prefix="cascade-rev-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=False, capture_output=True)


def build_models(tree: Path) -> Path:
    """``tree``'s own build of the model ladders (seconds when up to date)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "cascade", "models", "build"], cwd=tree, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return tree / "models"


@contextmanager
def endpoint(tree: Path, work: Path, name: str):
    """The endpoint tier of the source ``tree`` on a free port, answering every request locally
    (no upstream, threshold 0), tracing at its defaults, logs to a file."""
    port = free_port()
    policy = work / f"{name}-policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "tier": "endpoint", "port": port, "tasks": {"vision": "endpoint", "documents": "endpoint"},
        "models_dir": str(build_models(tree)), "policy": str(policy),
        "outbox_url": f"sqlite:///{work / name}.db"}))
    serve = "cascade.deploy.process" if (tree / "cascade/deploy/process.py").exists() \
        else "cascade.serve"
    env = {**os.environ, "PYTHONPATH": str(tree), "OTEL_TRACES_EXPORTER": "none"}
    log = (work / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", serve, "--config", str(config)], cwd=tree,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} tier exited; see {work / name}.log")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} tier not ready within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def bodies(task: str, n: int = 64) -> list[dict[str, Any]]:
    inputs, _ = load_split(ROOT / "models", task, "test")
    return [request_body(task, inputs[i]) for i in range(min(n, len(inputs)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--current", default=None,
                        help="git revision to measure (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--task", default="vision", choices=("vision", "documents"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_revisions")
    args = parser.parse_args(argv)
    load = bodies(args.task)
    rows: dict[str, dict[int, list[dict[str, float]]]] = {
        "baseline": {c: [] for c in CONNECTIONS}, "current": {c: [] for c in CONNECTIONS}}
    with tempfile.TemporaryDirectory() as tmp, worktree(args.baseline) as base_tree, \
            (worktree(args.current) if args.current else _here()) as cur_tree:
        work = Path(tmp)
        with endpoint(base_tree, work, "baseline") as base_url, \
                endpoint(cur_tree, work, "current") as cur_url:
            for url in (base_url, cur_url):  # warm both up
                run_load(f"{url}/v1/infer", load, connections=4, duration_s=1.0)
            for r in range(args.rounds):
                order = [("baseline", base_url), ("current", cur_url)]
                if r % 2:
                    order.reverse()  # neither side always runs first
                for conns in CONNECTIONS:
                    for name, url in order:
                        res = run_load(f"{url}/v1/infer", load, connections=conns,
                                       duration_s=args.seconds)
                        if res.errors:
                            raise RuntimeError(f"{name}: {res.errors} errors under load")
                        rows[name][conns].append({"rps": res.rps, "p50_ms": res.p50_ms,
                                                  "p99_ms": res.p99_ms})
                        print(f"round {r + 1}/{args.rounds} {name:8s} c={conns:2d} "
                              f"{res.rps:8.0f} req/s p50 {res.p50_ms:6.2f} ms "
                              f"p99 {res.p99_ms:6.2f} ms", flush=True)
    report = summarise(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


@contextmanager
def _here():
    yield ROOT


def summarise(rows: dict[str, dict[int, list[dict[str, float]]]], args: Any) -> dict[str, Any]:
    """Medians per side and the median of the per-round ratios (current / baseline)."""
    out: dict[str, Any] = {"baseline": args.baseline, "current": args.current or "working tree",
                           "task": args.task, "rounds": args.rounds, "seconds": args.seconds,
                           "generator": "wrk" if have_wrk() else "httpx processes",
                           "connections": {}}
    for conns in CONNECTIONS:
        base, cur = rows["baseline"][conns], rows["current"][conns]
        entry: dict[str, Any] = {}
        for key in ("rps", "p50_ms", "p99_ms"):
            ratios = [c[key] / b[key] for b, c in zip(base, cur, strict=True) if b[key]]
            entry[key] = {
                "baseline_median": round(statistics.median(b[key] for b in base), 3),
                "current_median": round(statistics.median(c[key] for c in cur), 3),
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            }
        out["connections"][str(conns)] = entry
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Endpoint, {report['current']} vs {report['baseline']}", "",
             (f"Task `{report['task']}`, answering locally; {report['rounds']} alternating rounds "
              f"of {report['seconds']} s per side and client count; load: {report['generator']}. "
              "Ratio = current / baseline, paired per round (median, and min-max across rounds)."),
             "", "| clients | metric | baseline | current | ratio (min-max) |", "|---|---|---|---|---|"]
    for conns, entry in report["connections"].items():
        for key, label in (("rps", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            e = entry[key]
            lines.append(f"| {conns} | {label} | {e['baseline_median']} | {e['current_median']} "
                         f"| {e['ratio_median']} ({e['ratio_min']}-{e['ratio_max']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
