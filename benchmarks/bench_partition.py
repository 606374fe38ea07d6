"""Network partition soak (issue 15): cycles of a cut link under steady load, real kernel faults.

The edge-node runs in its own network namespace behind a veth pair (tests/fault/netns.py); the
endpoint, on the host, escalates every request to it. A client sends keyed requests at a steady
rate while the link goes through ``--cycles`` of ``--down-s`` seconds faulted and ``--up-s``
healthy, for each fault of ``--faults``: ``down`` (ip link set down), ``blackhole`` (replies
dropped in silence), ``slow`` (tbf: 64 kbit/s), ``lossy`` (tc netem delay 200 ms, loss 20 %; where the kernel has
no sch_netem, nftables drops 20 % of the packets each way, without the delay: the report names
which, with the packets dropped). Default timers everywhere (no test shortcuts).

Targets: the endpoint answers 100 % of requests, lost 0, computed twice upstream 0, and each
outage's backlog delivered within 2x the outage once the link is back.

Writes reports/partition.json and reports/partition.md (needs root: network namespaces).
Run: python benchmarks/bench_partition.py [--cycles 5 --down-s 30 --up-s 30 --faults down,blackhole]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault.cycles import CycleReport, partition_cycles
from tests.fault.harness import Tier, write_policy
from tests.fault.netns import (
    Partition,
    loss_method,
    loss_unavailable,
    namespaces_unavailable,
    sweep_stale,
)


def soak(fault: str, args: argparse.Namespace, tmp: Path) -> tuple[CycleReport, int]:
    """One fault's cycles on a fresh pair of tiers and a fresh namespace; with the packets
    nftables dropped (the ``lossy`` fault without netem; else 0)."""
    policy = write_policy(tmp / f"policy-{fault}.yaml")
    with Partition() as link:
        upstream = Tier(tmp / fault, "edge-node", args.models_dir, policy, fast=False,
                        host=link.ns_ip, launcher=link.launcher).start()
        endpoint = Tier(tmp / fault, "endpoint", args.models_dir, policy, fast=False,
                        upstream=upstream.url).start()
        try:
            report = partition_cycles(endpoint, upstream, link, fault=fault,
                                      cycles=args.cycles, down_s=args.down_s, up_s=args.up_s)
            return report, link.dropped_packets
        finally:
            endpoint.stop()
            upstream.stop()


def verdict(r: CycleReport) -> dict[str, bool]:
    """Each target of the issue, met or not."""
    return {"answered_100pct": not r.failures and r.answered == r.requests,
            "lost_0": r.lost == 0 and r.never_upstream == 0 and r.not_final == 0,
            "computed_twice_0": r.computed_twice == 0,
            "drain_within_2x_outage": r.worst_drain_ratio <= 2.0}


def markdown(report: dict[str, Any]) -> str:
    """reports/partition.md."""
    lines = ["# Network partition soak (issue 15)", "",
             (f"Run {report['when']} on {os.cpu_count()} cores (load average at start "
              f"{report['load']}), {report['seconds']:.0f} s. Each fault: {report['cycles']} "
              f"cycles of {report['down_s']:g} s faulted / {report['up_s']:g} s healthy, steady "
              "load of keyed requests (one client, one every 50 ms) to the endpoint, which "
              "escalates each to the edge-node in a network namespace. Default timers."), "",
             ("| fault | requests | answered | provisional | lost | computed twice | not final "
              "| queued per outage | drain s per outage | worst drain / outage | targets |"),
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for fault, r in report["faults"].items():
        if "skipped" in r:
            lines.append(f"| {fault} | skipped: {r['skipped']} |||||||||")
            continue
        met = r["verdict"]
        if fault == "lossy":
            fault += (" (netem: 200 ms, 20 % loss)" if r["loss_method"] == "netem" else
                      f" (nftables: 20 % loss each way, no delay; {r['dropped_packets']} "
                      "packets dropped)")
        lines.append(
            f"| {fault} | {r['requests']} | {r['answered']} | {r['provisional']} | {r['lost']} "
            f"| {r['computed_twice']} | {r['not_final']} | {r['queued_per_cycle']} | "
            f"{r['drain_s']} | {r['worst_drain_ratio']} | "
            f"{'all met' if all(met.values()) else 'MISSED: ' + ', '.join(k for k, v in met.items() if not v)} |")
    lines += ["", ("`lost`: answered 200 but not in the endpoint's store, never computed "
                   "upstream, or not final at the end; drain: from the link's return until "
                   "every escalation queued during that outage was delivered."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--down-s", type=float, default=30.0, help="Seconds faulted per cycle.")
    parser.add_argument("--up-s", type=float, default=30.0, help="Seconds healthy per cycle.")
    parser.add_argument("--faults", default="down,blackhole",
                        help="Comma-separated: down, blackhole, slow, lossy.")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    if reason := namespaces_unavailable():
        sys.exit(f"network namespaces are not available here: {reason}")
    sweep_stale()
    from cascade.models.build import build_models

    build_models(args.models_dir, show_progress=False)
    started = time.time()
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                              "cycles": args.cycles, "down_s": args.down_s, "up_s": args.up_s,
                              "faults": {}}
    with tempfile.TemporaryDirectory(prefix="bench-partition-") as tmp:
        for fault in args.faults.split(","):
            if fault == "lossy" and (reason := loss_unavailable()):
                report["faults"][fault] = {"skipped": reason}
                continue
            print(f"{fault}: {args.cycles} x ({args.down_s:g} s down, {args.up_s:g} s up)...",
                  flush=True)
            result, dropped = soak(fault, args, Path(tmp))
            report["faults"][fault] = {**result.as_dict(), "verdict": verdict(result)}
            if fault == "lossy":
                report["faults"][fault].update(loss_method=loss_method(), dropped_packets=dropped)
    report["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "partition.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (args.out / "partition.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
