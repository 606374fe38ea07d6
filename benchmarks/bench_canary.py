"""Signed model bundles on real tiers: how long an install takes, and how many requests a
deliberately bad model (the endpoint's vision model trained on shuffled labels, built with the
project's training code) answers before its canary is rolled back, against its share.

An edge-node and an endpoint run as real processes. Install time: the same good model packed
as ``--installs`` new versions, each pushed (``POST /v1/models/pull``) with no canary, timed by
the client (whole request) and by the tier (verify, stage, load, probe, swap). Canary: for each
share in ``--shares``, the bad bundle is installed as a canary (probe check disabled, so the
canary is the only line of defence) and sequential traffic of test images is sent until the
verdict (the whole test split in a seeded order: easy and hard images, as in the field);
served-by-bad counts answers whose first hop names the bad version, against the
requests sent. Writes ``reports/bench_canary.json`` and ``.md``.

Run: python benchmarks/bench_canary.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("CASCADE_BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(ROOT))

import httpx

from tests.bundle_kit import bundle_knobs, keypair, pack, shuffled_label_models
from tests.fault.harness import Tier, default_policy_copy, hardest_images


def push(url: str, bundle: Path) -> tuple[dict[str, Any], float]:
    """Install ``bundle`` on the tier at ``url``: (its report, client-side seconds)."""
    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/models/pull", content=bundle.read_bytes(), timeout=300,
                          headers={"Content-Type": "application/octet-stream"})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json()["results"][0], elapsed


def install_times(tmp: Path, models: Path, key: Path, pub: Path, n: int) -> dict[str, Any]:
    """Install the same model as ``n`` new versions, one after the other."""
    tier = Tier(tmp / "installs", "endpoint", models, default_policy_copy(tmp / "p1.yaml"),
                tasks={"vision": "endpoint"}, fast=False,
                bundles=bundle_knobs([pub], tmp / "installs-store", canary={"share": 0}))
    tier.start()
    client_ms, tier_ms = [], []
    try:
        for i in range(n):
            report, seconds = push(tier.url, pack(models, key, tmp / "v", f"v{i + 2}"))
            assert report["outcome"] == "promoted", report
            client_ms.append(seconds * 1000)
            tier_ms.append(report["install_ms"])
    finally:
        tier.stop()
    return {"installs": n, "probe_samples": 100, "client_ms_median": statistics.median(client_ms),
            "client_ms_max": max(client_ms), "tier_ms_median": statistics.median(tier_ms),
            "tier_ms_max": max(tier_ms)}


def canary_round(url: str, bad: Path, images: list[Any], share: float) -> dict[str, Any]:
    """Install the bad bundle as a canary and send traffic until it is judged."""
    report, _ = push(url, bad)
    assert report["outcome"] == "canary", report
    sent = served_by_bad = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        verdict = None
        while verdict is None and sent < 5000:
            for _ in range(10):
                body = {"task": "vision", "input": {"image": images[sent % len(images)]}}
                answer = client.post("/v1/infer", json=body).json()
                sent += 1
                served_by_bad += answer["hops"][0]["model"].endswith(f"@{report['version']}")
            verdict = client.get("/readyz").json()["model_versions"]["vision"]["last_verdict"]
    assert verdict is not None and verdict["version"] == report["version"], verdict
    return {"share": share, "verdict": verdict["verdict"], "reason": verdict["reason"],
            "served_by_bad": served_by_bad, "requests_until_verdict": verdict["requests_seen"],
            "requests_sent": sent,
            "served_share": round(served_by_bad / verdict["requests_seen"], 4)}


def canary_rounds(tmp: Path, models: Path, bad_models: Path, key: Path, pub: Path,
                  shares: list[float], min_requests: int) -> list[dict[str, Any]]:
    """One endpoint per share (a version refused once stays refused)."""
    policy = default_policy_copy(tmp / "p2.yaml")
    edge = Tier(tmp / "edge", "edge-node", models, policy, tasks={"vision": "edge-node"},
                fast=False).start()
    images = hardest_images(models, 100_000)  # the whole test split, in a seeded order
    random.Random(0).shuffle(images)
    rounds = []
    try:
        for i, share in enumerate(shares):
            canary = {"share": share, "min_requests": min_requests, "window_requests": 100_000}
            tier = Tier(tmp / f"canary{i}", "endpoint", models, policy, upstream=edge.url,
                        tasks={"vision": "endpoint"}, fast=False,
                        bundles=bundle_knobs([pub], tmp / f"store{i}", probe_tolerance=1.0,
                                             canary=canary)).start()
            try:
                rounds.append(canary_round(tier.url, pack(bad_models, key, tmp / "bad",
                                                          f"bad{i}"), images, share))
            finally:
                tier.stop()
    finally:
        edge.stop()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installs", type=int, default=5)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--min-requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_canary.json")
    args = parser.parse_args()
    models = ROOT / "models"
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        key, pub = keypair(tmp / "keys")
        bad_models = shuffled_label_models(models, tmp / "bad-models")
        results = {"install": install_times(tmp, models, key, pub, args.installs),
                   "canary": canary_rounds(tmp, models, bad_models, key, pub, args.shares,
                                           args.min_requests)}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Signed bundles: install time and the canary against a bad model", "",
             (f"Install (vision/endpoint, {results['install']['probe_samples']} probe samples, "
             f"{args.installs} versions): client median "
             f"{results['install']['client_ms_median']:.0f} ms (max "
             f"{results['install']['client_ms_max']:.0f}), in the tier median "
             f"{results['install']['tier_ms_median']:.0f} ms (max "
             f"{results['install']['tier_ms_max']:.0f})."), "",
             ("| canary share | verdict | served by bad model | requests until verdict | "
             "served share |"), "|---|---|---|---|---|"]
    lines += [f"| {r['share']:.0%} | {r['verdict']} | {r['served_by_bad']} | "
              f"{r['requests_until_verdict']} | {r['served_share']:.1%} |"
              for r in results["canary"]]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
