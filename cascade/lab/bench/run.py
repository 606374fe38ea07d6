"""The benchmark behind ``cascade bench`` (issue 3): accuracy, routing, latency, throughput.

Everything is measured in one run, side by side, so ratios hold on a noisy machine:
- accuracy of each tier's model alone and of the running chain on every test-split sample;
- share answered at each tier and escalation rates;
- the endpoint answering locally vs a bare FastAPI echo (same client, same bodies, interleaved
  rounds) and vs a raw onnxruntime call of the same model (the service overhead);
- requests/second at 1 and 16 concurrent clients; tier ready time and RSS;
- the drift alarm of every tier after the clean and after the shifted test split.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascade.contract.inputs import request_body
from cascade.deploy.supervisor import DEFAULT_CHAIN, Chain, wait_ready
from cascade.lab.bench.drift import live_drift
from cascade.lab.bench.load import LoadResult, have_wrk, run_load
from cascade.lab.bench.plots import policy_phase
from cascade.lab.bench.shift import shift_phase

BUILT_IN_TASKS = ("vision", "documents")


@dataclass
class BenchConfig:
    """Knobs of one benchmark run."""

    models_dir: Path = Path("models")
    out_dir: Path = Path("reports")
    base_port: int = 18101
    duration_s: float = 4.0
    rounds: int = 3
    concurrency: tuple[int, ...] = (1, 16)
    configs: tuple[str, ...] = DEFAULT_CHAIN
    policy: Path = Path("policies/default.yaml")
    log: Callable[[str], None] = print
    tasks: tuple[str, ...] = ()
    """The tasks measured (and served by the bench's chain); empty: every task in the model
    repository."""
    extra: dict[str, Any] = field(default_factory=dict)

    def chosen_tasks(self) -> tuple[str, ...]:
        """``tasks``, or every task of the manifest (the built-in two first)."""
        from cascade.models.manifest import load_manifest

        if self.tasks:
            return self.tasks
        names = list(load_manifest(self.models_dir).tasks)
        return tuple(sorted(names, key=lambda t: (t not in BUILT_IN_TASKS, t)))


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _send_all(url: str, bodies: list[dict[str, Any]], concurrency: int = 8) -> list[dict[str, Any]]:
    import httpx

    results: list[dict[str, Any]] = [{}] * len(bodies)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/infer", json=bodies[i])
                data = r.json()
                data["_client_ms"] = (time.perf_counter() - t0) * 1000
                data["_status_code"] = r.status_code
                results[i] = data

        await asyncio.gather(*(one(i) for i in range(len(bodies))))
    return results


def bodies_for(models_dir: Path, task: str, inputs: Any) -> list[dict[str, Any]]:
    """The ``POST /v1/infer`` bodies of stored split samples (a registered task's by its
    declared input)."""
    from cascade.models.manifest import load_manifest

    spec = load_manifest(models_dir).task(task).input
    return [request_body(task, x, spec) for x in inputs]


def accuracy_phase(cfg: BenchConfig, chain: Chain) -> dict[str, Any]:
    """Every test sample through the chain, and through each tier's model alone."""
    from cascade.lab.evaluation import predict_split
    from cascade.models.manifest import load_split

    out: dict[str, Any] = {}
    tiers = [t.tier for t in chain.tiers]
    for task in cfg.chosen_tasks():
        inputs, labels = load_split(cfg.models_dir, task, "test")
        _, alone = predict_split(cfg.models_dir, task, tiers, "test")
        cfg.log(f"  {task}: {len(labels)} test samples through the chain")
        bodies = bodies_for(cfg.models_dir, task, inputs)
        answers = asyncio.run(_send_all(chain.entry_url, bodies))
        bad = [a for a in answers if a["_status_code"] != 200]
        correct = [a.get("label") == y for a, y in zip(answers, labels)]
        answered = {t: sum(a.get("answered_by") == t for a in answers) / len(answers) for t in tiers}
        reaching = {t: sum(any(h["tier"] == t for h in a.get("hops", [])) for a in answers) for t in tiers}
        escalated = {t: sum(any(h["tier"] == t and h["decision"] == "escalate" for h in a.get("hops", []))
                            for a in answers) for t in tiers}
        per_tier_ms: dict[str, list[float]] = {t: [] for t in tiers}
        for a in answers:
            for h in a.get("hops", []):
                per_tier_ms[h["tier"]].append(h["ms"])
        client_ms: dict[str, list[float]] = {t: [] for t in tiers}
        for a in answers:
            if a.get("answered_by") in client_ms:
                client_ms[a["answered_by"]].append(a["_client_ms"])
        out[task] = {
            "samples": len(labels),
            "errors": len(bad),
            "tier_alone_accuracy": {t: alone[t].accuracy for t in tiers},
            "cascade_accuracy": float(np.mean(correct)),
            "answered_share": answered,
            "answered_below_top": float(sum(answered[t] for t in tiers[:-1])),
            "escalation_rate": float(np.mean([len(a.get("hops", [])) > 1 for a in answers])),
            "escalation_rate_per_tier": {t: escalated[t] / reaching[t] if reaching[t] else 0.0
                                         for t in tiers},
            "statuses": {s: sum(a.get("status") == s for a in answers)
                         for s in ("final", "provisional", "unknown")},
            "tier_model_ms_p50": {t: _pct(v, 50) for t, v in per_tier_ms.items()},
            "client_latency_ms_by_answering_tier": {
                t: {"n": len(v), "p50": _pct(v, 50), "p99": _pct(v, 99)} for t, v in client_ms.items()
            },
            "latency_samples_ms": client_ms,  # for the latency figure; not kept in bench.json
            "local_bodies": [bodies[i] for i, a in enumerate(answers)
                             if a.get("answered_by") == tiers[0]][:64],
            "local_indices": [i for i, a in enumerate(answers) if a.get("answered_by") == tiers[0]][:64],
        }
    return out


def raw_model_latency(cfg: BenchConfig, task: str, tier: str, indices: list[int],
                      repeats: int = 2000) -> dict[str, float]:
    """p50/p99 of a bare onnxruntime call (single sample, same inputs) in this process."""
    from cascade.contract.inputs import input_decoder
    from cascade.models.manifest import load_manifest, load_split
    from cascade.models.repository import load_classifier

    runner = load_classifier(cfg.models_dir, task, tier)
    inputs, _ = load_split(cfg.models_dir, task, "test")
    entry = load_manifest(cfg.models_dir).task(task)
    decode = input_decoder(entry.input_kind, entry.input)
    decoded = [decode(request_body(task, inputs[i], entry.input)["input"]) for i in indices]
    for x in decoded[:50]:
        runner.predict_proba(x)
    times = []
    for k in range(repeats):
        x = decoded[k % len(decoded)]
        t0 = time.perf_counter()
        runner.predict_proba(x)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99)}


def _median_result(results: list[LoadResult]) -> dict[str, Any]:
    return {
        "generator": results[0].generator,
        "connections": results[0].connections,
        "rounds": len(results),
        "rps": statistics.median(r.rps for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "errors": sum(r.errors for r in results),
        "requests": sum(r.requests for r in results),
    }


def overhead_phase(cfg: BenchConfig, chain: Chain, acc: dict[str, Any]) -> dict[str, Any]:
    """Endpoint answering locally vs a bare FastAPI echo, interleaved, same client and bodies."""
    echo_port = cfg.base_port + 50
    echo = subprocess.Popen([sys.executable, "-m", "cascade.lab.bench.echo", "--port", str(echo_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {"generator": "wrk" if have_wrk() else "httpx (2 client processes)"}
    try:
        echo_url = f"http://127.0.0.1:{echo_port}"
        wait_ready(echo_url, echo, 30)
        for task in cfg.chosen_tasks():
            bodies = acc[task]["local_bodies"]
            if not bodies:
                continue
            entry: dict[str, Any] = {}
            for conns in cfg.concurrency:
                tier_runs, echo_runs = [], []
                for rnd in range(cfg.rounds):
                    cfg.log(f"  {task}: {conns} client(s), round {rnd + 1}/{cfg.rounds}")
                    tier_runs.append(run_load(f"{chain.entry_url}/v1/infer", bodies,
                                              connections=conns, duration_s=cfg.duration_s))
                    echo_runs.append(run_load(f"{echo_url}/echo", bodies, connections=conns,
                                              duration_s=cfg.duration_s))
                t, e = _median_result(tier_runs), _median_result(echo_runs)
                entry[f"c{conns}"] = {
                    "endpoint": t, "echo": e,
                    "p50_ratio": t["p50_ms"] / e["p50_ms"], "p99_ratio": t["p99_ms"] / e["p99_ms"],
                    "throughput_ratio": t["rps"] / e["rps"],
                }
            entry["raw_onnxruntime"] = raw_model_latency(cfg, task, chain.tiers[0].tier,
                                                         acc[task]["local_indices"])
            c1 = entry.get("c1")
            if c1:
                entry["service_overhead_p50_ms"] = c1["endpoint"]["p50_ms"] - entry["raw_onnxruntime"]["p50_ms"]
            out[task] = entry
    finally:
        echo.terminate()
        echo.wait(10)
    return out


def process_facts(chain: Chain) -> dict[str, Any]:
    facts = {}
    for t in chain.tiers:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{t.pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        facts[t.tier] = {"ready_s": chain.ready_s[t.tier], "rss_mb": rss / 1024}
    return facts


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Start the chain, measure everything, return the results (the caller writes reports)."""
    import os

    started = time.time()
    state = cfg.out_dir / "bench-state"
    state.mkdir(parents=True, exist_ok=True)
    for old_log in state.glob("decisions-*.db*"):
        old_log.unlink()  # the policy phase replays this run's decision logs only
    served = served_policy(cfg, state)
    cfg.log(f"starting the chain on 127.0.0.1:{cfg.base_port}..")
    tasks = cfg.chosen_tasks()
    env = {"CASCADE_MODELS_DIR": str(cfg.models_dir.resolve()),
           "CASCADE_POLICY": str(served.resolve()),
           "CASCADE_TASKS": json.dumps(list(tasks)),
           "CASCADE_DECISION_LOG_PATH": str((state / "decisions-{tier}.db").resolve())}
    with Chain(list(cfg.configs), base_port=cfg.base_port, env=env, log_dir=state / "logs",
               state_dir=state) as chain:
        facts = process_facts(chain)
        cfg.log("accuracy phase: every test sample through the chain")
        acc = accuracy_phase(cfg, chain)
        drift_live = {"after_clean": live_drift(chain)}
        # Before the latency phase: its thousands of repeated easy requests are a shift too.
        cfg.log("shift phase: corrupted test inputs through the chain")
        shifted = shift_phase(cfg, chain, tasks)
        drift_live["after_shift"] = live_drift(chain)
        # Fresh tiers for the latency phase: the shift phase leaves drift alarms on (and, with
        # `action: tighten`, stricter thresholds) that would turn its local answers into climbs.
        cfg.log("restarting the chain: fresh drift windows for the latency phase")
        chain.stop()
        chain.start()
        cfg.log("latency phase: endpoint (local answers) vs bare FastAPI echo")
        over = overhead_phase(cfg, chain, acc)
        facts_after = process_facts(chain)
    cfg.log("policy phase: threshold sweeps, oracle, calibration, drift alarm, figures")
    policy = policy_phase(cfg, acc, shifted, tasks)
    for task in tasks:
        acc[task].pop("local_bodies", None)
        acc[task].pop("local_indices", None)
        acc[task].pop("latency_samples_ms", None)
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "config": {"duration_s": cfg.duration_s, "rounds": cfg.rounds,
                   "concurrency": list(cfg.concurrency), "policy": str(cfg.policy),
                   "tasks": list(tasks)},
        "tiers": {k: {**v, "rss_mb_after": facts_after[k]["rss_mb"]} for k, v in facts.items()},
        "accuracy": acc,
        "overhead": over,
        "shift": shifted,
        "drift_live": drift_live,
        "policy": policy,
    }


def served_policy(cfg: BenchConfig, state: Path) -> Path:
    """The policy file the chain serves: ``cfg.policy``, or (when it predates the drift alarm and
    has no drift references) a copy with references fitted on the calibration split, so the
    alarm can be measured; the policy phase then analyses that same file."""
    from cascade.lab.bench.drift import policy_with_references
    from cascade.policy import load_policy

    _, fitted, text = policy_with_references(load_policy(cfg.policy), cfg.models_dir,
                                             cfg.chosen_tasks())
    if not fitted:
        return cfg.policy
    path = state / "policy-with-drift-references.yaml"
    path.write_text(text)
    cfg.extra["served_policy"] = path
    cfg.extra["drift_references_fitted"] = fitted
    cfg.log(f"{cfg.policy} has no drift references for {', '.join(fitted)}: serving {path} "
            "(references fitted on the calibration split)")
    return path
