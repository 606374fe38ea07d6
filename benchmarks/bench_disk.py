"""Disk used by each tier's local stores under steady load, per 1,000 requests and at steady state.

The four tiers run as real processes (``cascade up``'s layout: outbox/results database, decision
log, tier log, trace file per tier, all under one temporary ``var/``), driven by wrk (16
connections, a rotating mix of easy and hard vision frames and documents; about 300 requests/s
on a 2-core machine) for ``--minutes``. Every ``--sample-s`` the bytes of each store of each tier
are read from the files themselves (database + WAL + shared memory, rotated files included), so
the numbers are what ``du`` sees, not what the tiers believe.

Run it twice to compare: with ``--budget-mb 0`` (no disk budget: how things grow) and with a
small budget (``--budget-mb 20``: each store must level off within its share). Older trees
without the ``disk:`` block ignore the budget variables. Writes ``reports/bench_disk.json``
(one key per ``--label``, merged with what the file already holds).

Run: python benchmarks/bench_disk.py --label after-20mb --budget-mb 20 --minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("CASCADE_BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import DEFAULT_CHAIN, Chain
from cascade.lab.bench.load import run_load

STORES = ("results", "decisions", "logs", "traces")


def store_files(var: Path, tier: str) -> dict[str, list[Path]]:
    """The files of each store of ``tier`` under ``var`` (what may exist; rotated ones too)."""
    def family(base: Path) -> list[Path]:
        return sorted(base.parent.glob(base.name + "*")) if base.parent.is_dir() else []

    return {
        "results": family(var / f"{tier}.db"),
        "decisions": family(var / f"decisions-{tier}.db"),
        "logs": family(var / "logs" / f"{tier}.log"),
        "traces": family(var / "traces" / f"{tier}.jsonl"),
    }


def measure(var: Path, tiers: list[str]) -> dict[str, dict[str, int]]:
    """Bytes on disk per tier and store (plus the results store's WAL alone)."""
    out: dict[str, dict[str, int]] = {}
    for tier in tiers:
        sizes: dict[str, int] = {}
        for store, files in store_files(var, tier).items():
            sizes[store] = sum(_size(f) for f in files)
        sizes["results_wal"] = _size(var / f"{tier}.db-wal")
        out[tier] = sizes
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _readyz_disk(url: str) -> Any:
    """What the tier itself reports under ``disk`` on /readyz (None on older trees)."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=10).json().get("disk")
    except (httpx.HTTPError, ValueError):
        return None


def bodies(models_dir: Path, n: int = 96) -> list[dict[str, Any]]:
    """Vision frames (most easy, some hard) and documents, interleaved."""
    from cascade.models.manifest import load_split

    out = []
    for task in ("vision", "documents"):
        inputs, _ = load_split(models_dir, task, "test")
        for i in range(min(n, len(inputs))):
            out.append(request_body(task, inputs[i] if task == "vision" else inputs[i][:1500]))
    return out[::2] + out[1::2]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One measured run; returns its report section."""
    models_dir = Path(args.models_dir).resolve()
    var = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    env = {"CASCADE_MODELS_DIR": str(models_dir), "CASCADE_POLICY": str(ROOT / "policies/default.yaml"),
           "CASCADE_DECISION_LOG_PATH": str(var / "decisions-{tier}.db"),
           "CASCADE_TRACE_DIR": str(var / "traces"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.budget_mb:
        env["CASCADE_DISK__BUDGET_MB"] = str(args.budget_mb)
        env["CASCADE_DISK__IDEMPOTENCY_WINDOW_S"] = str(args.window_s)
    chain = Chain([ROOT / c for c in DEFAULT_CHAIN], base_port=args.base_port, env=env,
                  log_dir=var / "logs", state_dir=var, ready_timeout_s=120)
    tiers = [t for t, *_ in chain.plan]
    series: list[dict[str, Any]] = []
    load: dict[str, Any] = {}
    with chain:
        start = measure(var, tiers)
        t0 = time.monotonic()
        done = threading.Event()

        def drive() -> None:
            result = run_load(chain.entry_url + "/v1/infer", bodies(models_dir), connections=16,
                              duration_s=args.minutes * 60)
            load.update(result.as_dict())
            done.set()

        threading.Thread(target=drive, daemon=True).start()
        while not done.wait(args.sample_s):
            series.append({"t_s": round(time.monotonic() - t0, 1), "bytes": measure(var, tiers)})
        time.sleep(2.0)  # the tiers flush logs and decision rows
        end = measure(var, tiers)
        reported = {t.tier: _readyz_disk(t.url) for t in chain.tiers}
        peak_wal = max([s["bytes"][t]["results_wal"] for s in series for t in tiers] or [0])
    requests = int(load["requests"])
    per_1000 = {tier: {s: round((end[tier][s] - start[tier][s]) * 1000 / max(1, requests))
                       for s in STORES} for tier in tiers}
    totals = {s: sum(per_1000[t][s] for t in tiers) for s in STORES}
    # The second half alone: with a budget, the stores have levelled off by then.
    half = next((x for x in series if x["t_s"] >= args.minutes * 30), None)
    steady = None
    if half is not None:
        later = requests * (1 - half["t_s"] / (args.minutes * 60))
        steady = {s: round(sum(end[t][s] - half["bytes"][t][s] for t in tiers) * 1000
                           / max(1.0, later)) for s in STORES}
    return {
        "budget_mb": args.budget_mb or None, "idempotency_window_s": args.window_s,
        "budget_label": f"{args.budget_mb:g} MiB" if args.budget_mb else
        "default (1024 MiB; none before the disk block)",
        "minutes": args.minutes, "load": load, "requests": requests,
        "bytes_per_1000_requests": {"per_tier": per_1000, "all_tiers": totals},
        "second_half_bytes_per_1000_requests": steady,
        "end_bytes": end, "peak_results_wal_bytes": peak_wal, "tiers_report": reported,
        "peak_bytes": {tier: {s: max(x["bytes"][tier][s] for x in series) if series else 0
                              for s in (*STORES, "results_wal")} for tier in tiers},
        "series": series,
    }


def main() -> None:
    """Parse the options, run once, merge the section into ``reports/bench_disk.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--budget-mb", type=float, default=0.0,
                        help="0: the tiers' default (no CASCADE_DISK__* variables)")
    parser.add_argument("--window-s", type=float, default=30.0,
                        help="disk.idempotency_window_s with a budget")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--base-port", type=int, default=18_400)
    parser.add_argument("--models-dir", default=os.environ.get("CASCADE_TEST_MODELS_DIR", "models"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports/bench_disk.json"))
    args = parser.parse_args()
    section = run(args)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report[args.label] = section
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_markdown(report))
    print(json.dumps({k: v for k, v in section.items() if k != "series"}, indent=1))


def render_markdown(report: dict[str, Any]) -> str:
    """Per run: load, bytes per 1,000 requests and bytes at the end per store (all tiers)."""
    mib = 1024 * 1024
    lines = ["# Disk used by the four tiers under steady load (benchmarks/bench_disk.py)", "",
             ("| run | disk budget per tier | requests (req/s) | per 1,000 requests: results / decisions / "
              "logs / traces (KiB) | at the end, all tiers (MiB) | largest results WAL (MiB) |"),
             "|---|---|---|---|---|---|"]
    for label, run in report.items():
        per = run["bytes_per_1000_requests"]["all_tiers"]
        end = sum(v for tier in run["end_bytes"].values() for k, v in tier.items()
                  if k != "results_wal")
        lines.append(
            f"| {label} | {run.get('budget_label') or run['budget_mb'] or 'none'} | "
            f"{run['requests']} "
            f"({run['load']['rps']:.0f}) | " + " / ".join(f"{per[s] / 1024:.0f}" for s in STORES)
            + f" | {end / mib:.1f} | {run['peak_results_wal_bytes'] / mib:.2f} |")
    for label, run in report.items():
        if not run.get("budget_mb") or not run.get("tiers_report"):
            continue
        lines += ["", f"## {label}: largest size seen vs share, and evictions, per tier", "",
                  "| tier | " + " | ".join(STORES) + " |", "|---|" + "---|" * len(STORES)]
        for tier, view in run["tiers_report"].items():
            cells = []
            for store in STORES:
                info = view["stores"].get(store, {})
                evicted = ", ".join(f"{k} {v}" for k, v in sorted(info.get("evictions", {}).items()))
                cells.append(f"{run['peak_bytes'][tier][store] / mib:.2f} / "
                             f"{info.get('budget_bytes', 0) / mib:.2f} MiB"
                             + (f" ({evicted})" if evicted else ""))
            lines.append(f"| {tier} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
