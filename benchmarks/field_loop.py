"""Closing the loop for ``bench_field``: the retrained endpoint model goes out as a signed bundle.

The endpoint of a fresh four-tier chain (real processes) trusts a key made by ``cascade models
keygen`` and pulls bundles from a directory (``bundles.source``). Then:

1. **before**: a fresh draw of the shifted traffic (the test split, never sent before and never
   exported, under ``--loop-draws`` corruption seeds) goes through the live chain; the endpoint's
   accuracy is that of its own model (the first hop's label) against ground truth, and its
   ``/readyz`` audit estimate is read next to it.
2. **ship**: ``cascade models pack vision --tier endpoint --models <retrained>`` writes the
   bundle into the source directory; ``cascade models pull --url <endpoint>`` makes the running
   endpoint pull it: verify, stage, probe, install as a canary.
3. **canary**: shifted live traffic (a new draw of the calibration split, its own corruption
   seed) flows until the canary is judged (promoted or rolled back by its guards).
4. **after**: the chain is stopped and started again (the endpoint resumes the promoted version
   from its store, and its audit windows start empty, so its estimate is about the new model
   alone); the same fresh draw goes through it: accuracy after, and the audit estimate after
   promotion against the true accuracy.

Recovered share = (after - before) / (clean - before), clean: the old model's accuracy on the
uncorrupted test split (``predict_inputs``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from cascade.deploy.supervisor import Chain
from cascade.lab.bench.run import _send_all, bodies_for
from cascade.lab.bench.shift import corrupt_frames
from cascade.lab.evaluation import predict_inputs
from cascade.models.manifest import load_split

ROOT = Path(__file__).resolve().parents[1]
UPPER = [ROOT / "edge_nodes/edge-node.yaml", ROOT / "edge_nodes/edge-server.yaml",
         ROOT / "cloud/cloud.yaml"]


def _cli(*argv: str) -> str:
    """``python -m cascade ...`` as an operator would type it; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "cascade", *argv], env=env, check=True,
                          capture_output=True, text=True)
    return done.stdout


def endpoint_config(work: Path, canary: dict[str, Any]) -> Path:
    """The shipped endpoint config plus a ``bundles:`` block: trust work/keys/fleet.pub, pull
    from work/bundles, store under work/store, the given canary."""
    config = yaml.safe_load((ROOT / "edge_nodes/endpoint.yaml").read_text())
    config["bundles"] = {"trusted_keys": [str(work / "keys/fleet.pub")],
                         "source": str(work / "bundles"), "store_dir": str(work / "store"),
                         "canary": canary}
    path = work / "endpoint.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait_settled(url: str, timeout_s: float = 120) -> dict[str, Any]:
    """The endpoint's /readyz once every sampled audit was answered, failed or dropped."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        c = ready["audit"]["vision"]["counts"]
        if c["sent"] + c["failed"] + c["dropped_budget"] + c["dropped_queue_full"] >= c["sampled"]:
            return dict(ready)
        time.sleep(0.5)
    raise AssertionError(f"audits did not settle within {timeout_s} s")


def measure(url: str, bodies: list[dict[str, Any]], truth: list[str]) -> dict[str, Any]:
    """Send ``bodies`` through the live chain: the endpoint model's accuracy (first hop's label
    vs ground truth), the versions that answered, and its audit view once settled."""
    answers = asyncio.run(_send_all(url, bodies, concurrency=8))
    hops = [(a["hops"][0], y) for a, y in zip(answers, truth) if a.get("hops")]
    ready = _wait_settled(url)
    view = ready["audit"]["vision"]
    model = view["model_accuracy"] or {"estimate": None, "interval": [0.0, 1.0]}
    true = float(np.mean([hop["label"] == y for hop, y in hops]))
    return {"requests": len(answers), "errors": sum(a["_status_code"] != 200 for a in answers),
            "endpoint_accuracy": true,
            "chain_accuracy": float(np.mean([a.get("label") == y
                                             for a, y in zip(answers, truth)])),
            "models": sorted({hop["model"] for hop, _ in hops}),
            "audit_estimate": model["estimate"], "audit_interval": model["interval"],
            "audit_error_points": None if model["estimate"] is None
            else round(100 * (model["estimate"] - true), 2),
            "audits": view["audits"], "version": ready["model_versions"]["vision"]["version"]}


def run_canary(url: str, bodies: list[dict[str, Any]], version: str,
               batch: int = 100) -> dict[str, Any]:
    """Shifted live traffic in batches until the canary of ``version`` is judged."""
    sent = served = 0
    verdict = None
    while verdict is None and sent < len(bodies):
        answers = asyncio.run(_send_all(url, bodies[sent:sent + batch], concurrency=8))
        sent += len(answers)
        served += sum(bool(a.get("hops")) and a["hops"][0]["model"].endswith(f"@{version}")
                      for a in answers)
        last = httpx.get(f"{url}/readyz", timeout=10).json()["model_versions"]["vision"]
        if last["last_verdict"] and last["last_verdict"]["version"] == version:
            verdict = last["last_verdict"]
    return {"verdict": verdict, "requests_sent": sent, "served_by_new": served}


def close_loop(models_dir: Path, new_dir: Path, severity: float, work: Path, *,
               env: dict[str, str], draws: int, canary: dict[str, Any],
               canary_requests: int) -> dict[str, Any]:
    """Ship the retrained endpoint model through the live tier; before/after on a fresh draw."""
    test_x, test_y = load_split(models_dir, "vision", "test")
    fresh = np.concatenate([corrupt_frames(test_x, ("gain",), severity=severity,
                                           seed=424_242 + d) for d in range(draws)])
    truth = list(test_y) * draws
    bodies = bodies_for(models_dir, "vision", fresh)
    cal_x, _ = load_split(models_dir, "vision", "calibration")
    pick = np.random.default_rng(99).integers(0, len(cal_x), canary_requests)
    live = bodies_for(models_dir, "vision", corrupt_frames(cal_x[pick], ("gain",),
                                                           severity=severity, seed=7_777))
    clean = predict_inputs(models_dir, "vision", ["endpoint"], test_x, test_y)["endpoint"].accuracy
    _cli("models", "keygen", "--out", str(work / "keys"), "--name", "fleet")
    chain_list = [endpoint_config(work, canary), *UPPER]
    from tests.conftest import free_port_block

    def chain() -> Chain:
        return Chain(chain_list, base_port=free_port_block(4), env=env, log_dir=work / "logs",
                     state_dir=work, ready_timeout_s=180)

    version = f"retrained-{severity}"
    with chain() as running:
        url = running.entry_url
        before = measure(url, bodies, truth)
        t0 = time.perf_counter()
        _cli("models", "pack", "vision", "--tier", "endpoint", "--key",
             str(work / "keys/fleet.key"), "--models", str(new_dir), "--out",
             str(work / "bundles"), "--version", version)
        pulled = _cli("models", "pull", "--url", url, "--json")
        ship_s = time.perf_counter() - t0
        rollout = run_canary(url, live, version)
    with chain() as running:
        after = measure(running.entry_url, bodies, truth)
    lost = clean - before["endpoint_accuracy"]
    gained = after["endpoint_accuracy"] - before["endpoint_accuracy"]
    return {"severity": severity, "fresh_requests": len(bodies), "draws": draws,
            "clean_accuracy": clean, "before": before, "after": after,
            "pull": pulled.strip(), "ship_seconds": round(ship_s, 1), "canary": canary,
            "rollout": rollout, "lost_points": round(100 * lost, 2),
            "recovered_points": round(100 * gained, 2),
            "recovered_share": gained / lost if lost > 0 else None}


def loop_rows(loop: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """reports/field.md's section for the closed loop (``run``: its when and command)."""
    lines = ["", ("## The loop closed: the retrained endpoint model shipped as a signed bundle "
             "through the canary"), "",
             f"Run {run['when']}; command: `{run['command']}`.", "",
             ("A fresh chain; its endpoint trusts a key from `cascade models keygen` and pulls "
              "from a directory. `cascade models pack` (from the retrained models directory) "
              "writes the bundle there, `cascade models pull --url` makes the running endpoint "
              "install it as a canary, shifted live traffic (a new draw of the calibration "
              "split) flows until its verdict. Before: the fresh shifted draw (test split, "
              "never sent before, each frame under several corruption seeds) through the live "
              "chain with the old model; after: the same draw through the chain restarted on "
              "the promoted version (the store keeps it; audit windows start empty). Endpoint "
              "accuracy: its own model's label (first hop) vs ground truth; audit estimate: "
              "`model_accuracy` on /readyz after that draw."), "",
             ("| severity | fresh requests | clean | before | after | lost | recovered | share | "
              "verdict | canary requests / sent | audit est. after (true) | audit est. before "
              "(true) |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sev, r in loop.items():
        b, a, v = r["before"], r["after"], r["rollout"]["verdict"] or {}
        share = r["recovered_share"]

        def est(m: dict[str, Any]) -> str:
            e = m["audit_estimate"]
            if e is None:
                return f"- ({m['endpoint_accuracy']:.3f})"
            return (f"{e:.3f} ({m['endpoint_accuracy']:.3f}, {m['audit_error_points']:+.1f} "
                    f"pts, {m['audits']} audits)")

        lines.append(
            f"| {sev} | {r['fresh_requests']} | {r['clean_accuracy']:.3f} | "
            f"{b['endpoint_accuracy']:.3f} | {a['endpoint_accuracy']:.3f} | "
            f"{r['lost_points']:.1f} | {r['recovered_points']:.1f} | "
            f"{'-' if share is None else f'{share:.0%}'} | {v.get('verdict', 'none')} "
            f"({v.get('reason', '')}) | {v.get('canary_requests', '-')} / "
            f"{r['rollout']['requests_sent']} | {est(a)} | {est(b)} |")
    lines += ["", ("The same retrained model measured offline (endpoint alone, `predict_inputs`, "
              "the test split under one corruption seed, 360 samples): " + "; ".join(
                  f"{sev}: {r['offline']['shifted_accuracy_old']:.3f} → "
                  f"{r['offline']['shifted_accuracy_new']:.3f}, "
                  f"{r['offline']['recovered_share']:.0%} recovered, clean "
                  f"{r['offline']['clean_accuracy_new']:.3f}, {r['offline']['export']['written']} "
                  f"hard examples, build {r['offline']['build_seconds']} s"
                  for sev, r in loop.items() if r.get("offline")) + ".")]
    lines += ["", "Models that answered at the endpoint: " + "; ".join(
        f"{sev}: before {r['before']['models']}, after {r['after']['models']}"
        for sev, r in loop.items())]
    return lines
