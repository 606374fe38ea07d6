"""The policy part of ``cascade bench``: trade-off analysis, plots and their report section.

Offline, on the test split and under the live policy file (same gate code as serving):

- per task, cascade accuracy against escalations per request while one tier's threshold
  sweeps from "answer nothing" to "answer everything" (the others as in the policy), with the
  policy's operating point (simulated, and as measured live), an oracle router (escalates
  exactly what the lower tier gets wrong, cheapest fixes first), always-endpoint and
  always-cloud;
- calibration error of every tier before and after the policy's calibration (reliability);
- latency distribution per tier, from the live accuracy phase;
- the distribution-shift scenario (from :mod:`cascade.lab.bench.shift`) and the drift alarm in it
  (:mod:`cascade.lab.bench.drift`);
- whether any confidence threshold could meet the oracle target (:mod:`cascade.lab.bench.oracle`).

Figures are PNGs beside ``reports/bench.md`` (matplotlib, the ``bench`` extra); without
matplotlib the numbers are still reported and the report says how to get the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade.gating.gate import GateRule
from cascade.policy.calibrate import oracle_escalations_at


@dataclass
class TaskAnalysis:
    """What the figures of one task are drawn from (arrays stay out of bench.json)."""

    task: str
    tiers: list[str]
    summary: dict[str, Any]
    sweeps: dict[str, tuple[np.ndarray, np.ndarray]]
    oracle: tuple[np.ndarray, np.ndarray]
    reliability: dict[str, dict[str, Any]]


def analyse_task(models_dir: Path, policy: Any, task: str, split: str = "test") -> TaskAnalysis:
    """Simulate ``policy`` on ``split``, sweep each tier's threshold, and compare to the oracle."""
    from cascade.lab.evaluation import predict_split
    from cascade.policy.calibrate import (
        oracle_curve,
        oracle_escalations_for,
        simulate_cascade,
        sweep_tier,
    )
    from cascade.policy.calibration import expected_calibration_error, reliability_bins
    from cascade.policy.search import per_sample_thresholds

    tiers = list(policy.task(task).tiers)
    _, preds = predict_split(models_dir, task, tiers, split)
    rules = [policy.rule(task, t) for t in tiers]
    conf = [preds[t].confidences(r) for t, r in zip(tiers, rules)]
    correct = [preds[t].correct for t in tiers]
    thresholds = [per_sample_thresholds(r.threshold, dict(r.class_thresholds), preds[t].predicted)
                  for t, r in zip(tiers, rules)]
    thresholds[-1] = 0.0  # the top tier answers (or says unknown) whatever its confidence
    out = simulate_cascade(tiers, conf, correct, thresholds)
    oracle_esc = oracle_escalations_for(correct, out.accuracy)
    sweeps = {}
    for i, t in enumerate(tiers[:-1]):
        _, esc, acc = sweep_tier(tiers, conf, correct, thresholds, i)
        sweeps[t] = (esc, acc)
    reliability = {}
    for t, r, c in zip(tiers, rules, conf):
        raw = preds[t].confidences(GateRule(r.signal, r.threshold))
        ok = preds[t].correct
        reliability[t] = {
            "ece_before": expected_calibration_error(raw, ok),
            "ece_after": expected_calibration_error(c, ok),
            "bins_before": reliability_bins(raw, ok),
            "bins_after": reliability_bins(c, ok),
            "signal": r.signal,
            "method": "none" if r.calibration is None else
                      "isotonic" if r.calibration.curve else "temperature",
        }
    summary = {
        "split": split,
        "samples": len(correct[0]),
        "simulated_accuracy": out.accuracy,
        "simulated_escalations_per_request": out.escalations_per_request,
        "simulated_cloud_share": out.top_share,
        "answered_share": out.answered_share,
        "oracle_escalations_per_request": oracle_esc,
        "always_endpoint_accuracy": preds[tiers[0]].accuracy,
        "always_cloud_accuracy": preds[tiers[-1]].accuracy,
        "ece": {t: {"before": v["ece_before"], "after": v["ece_after"], "method": v["method"],
                    "signal": v["signal"]} for t, v in reliability.items()},
    }
    return TaskAnalysis(task, tiers, summary, sweeps, oracle_curve(correct), reliability)


def escalations_per_request(answered_share: dict[str, float]) -> float:
    """Tier-to-tier escalations per request from the share answered at each tier (in order)."""
    return float(sum(i * s for i, s in enumerate(answered_share.values())))


# -- figures ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(a: TaskAnalysis, live: dict[str, Any] | None, path: Path) -> Path:
    """Accuracy against escalations per request: sweeps, oracle, baselines, operating point."""
    plt = _pyplot()
    s = a.summary
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for tier, (esc, acc) in a.sweeps.items():
        order = np.argsort(esc, kind="stable")
        ax.plot(esc[order], acc[order] * 100, lw=1.5, label=f"sweep {tier} threshold")
    oe, oa = a.oracle
    ax.step(oe, oa * 100, where="post", color="black", lw=1.2, ls="--", label="oracle router")
    ax.axhline(s["always_endpoint_accuracy"] * 100, color="tab:gray", ls=":",
               label=f"always {a.tiers[0]} (0 escalations)")
    ax.axhline(s["always_cloud_accuracy"] * 100, color="tab:red", ls=":",
               label=f"always {a.tiers[-1]} ({len(a.tiers) - 1} escalations/request)")
    ax.plot([s["simulated_escalations_per_request"]], [s["simulated_accuracy"] * 100], "*",
            ms=16, color="gold", mec="black", label="policy (simulated)", zorder=5)
    if live:
        ax.plot([live["escalations_per_request"]], [live["accuracy"] * 100], "X", ms=11,
                color="tab:purple", mec="black", label="policy (measured live)", zorder=6)
    hi = max(1.0, 2.5 * s["simulated_escalations_per_request"])
    ax.set_xlim(-0.02, hi)
    lo = min(s["always_endpoint_accuracy"], *(acc.min() for _, acc in a.sweeps.values())) * 100
    ax.set_ylim(max(lo - 0.5, 0), 100.2)
    ax.set_xlabel("escalations per request (tier-to-tier hops)")
    ax.set_ylabel("cascade accuracy (%)")
    ax.set_title(f"{a.task}: accuracy vs escalation ({s['split']} split, {s['samples']} samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(a: TaskAnalysis, path: Path) -> Path:
    """Reliability diagrams per tier: raw vs calibrated confidence against accuracy."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(a.tiers), figsize=(3.2 * len(a.tiers), 3.4), sharey=True)
    for ax, tier in zip(np.atleast_1d(axes), a.tiers):
        r = a.reliability[tier]
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        for key, marker, name in (("bins_before", "o", "raw"), ("bins_after", "s", r["method"])):
            b = r[key]
            ece = r["ece_before" if key == "bins_before" else "ece_after"]
            line, = ax.plot(b.confidence, b.accuracy, lw=0.8, alpha=0.6)
            # Marker area ~ samples in the bin: most samples sit in the top bin.
            ax.scatter(b.confidence, b.accuracy, s=8 + 150 * b.count / max(1, b.count.max()),
                       marker=marker, color=line.get_color(), alpha=0.8,
                       label=f"{name} ECE {ece:.3f}")
        ax.set_title(tier, fontsize=10)
        ax.set_xlabel(f"confidence ({r['signal']})")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    fig.suptitle(f"{a.task}: calibration on the {a.summary['split']} split", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(samples: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Per task, client latency of requests answered at each tier (box + points, log scale)."""
    plt = _pyplot()
    tasks = list(samples)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_tier = {t: v for t, v in samples[task].items() if v}
        data = [by_tier[t] for t in by_tier]
        if data:
            ax.boxplot(data, whis=(1, 99), showfliers=False)
            ax.set_xticks(range(1, len(by_tier) + 1), list(by_tier))
            rng = np.random.default_rng(0)
            for i, v in enumerate(data, start=1):
                ax.plot(i + rng.uniform(-0.15, 0.15, len(v)), v, ".", ms=2, alpha=0.4)
            ax.set_yscale("log")
        ax.set_ylabel("client latency (ms), answered at this tier")
        ax.set_title(f"{task}: latency by answering tier (box: p1-p99)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shift(clean: dict[str, Any], shifted: dict[str, Any], path: Path) -> Path:
    """Per task, accuracy of each tier alone and of the cascade, clean vs shifted."""
    plt = _pyplot()
    tasks = list(shifted)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        c, s = clean[task], shifted[task]
        names = [*c["tier_alone_accuracy"], "cascade"]
        before = [*c["tier_alone_accuracy"].values(), c["cascade_accuracy"]]
        after = [*s["tier_alone_accuracy"].values(), s["cascade_accuracy"]]
        x = np.arange(len(names))
        ax.bar(x - 0.2, np.asarray(before) * 100, 0.4, label="clean")
        ax.bar(x + 0.2, np.asarray(after) * 100, 0.4, label="shifted")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(max(0, min(after) * 100 - 5), 100)
        ax.set_ylabel("accuracy (%)")
        esc_c = escalations_per_request(c["answered_share"])
        ax.set_title(f"{task}: escalations/request {esc_c:.2f} -> "
                     f"{s['escalations_per_request']:.2f}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def policy_phase(cfg: Any, accuracy: dict[str, Any], shifted: dict[str, Any] | None,
                 tasks: Sequence[str]) -> dict[str, Any]:
    """Analyse the live policy on the test split and draw every figure into ``cfg.out_dir``."""
    from cascade.lab.bench.drift import drift_phase
    from cascade.lab.bench.oracle import oracle_analysis
    from cascade.lab.bench.shift import shift_summary
    from cascade.policy import load_policy

    extra = getattr(cfg, "extra", {}) or {}
    policy = load_policy(extra.get("served_policy", cfg.policy))  # what the chain served
    analyses = {t: analyse_task(cfg.models_dir, policy, t) for t in tasks}
    out: dict[str, Any] = {"policy": str(cfg.policy), "version": policy.version,
                           "tasks": {t: a.summary for t, a in analyses.items()}, "figures": []}
    if extra.get("drift_references_fitted"):
        out["drift_references_fitted"] = list(extra["drift_references_fitted"])
    out["oracle_analysis"] = {t: oracle_analysis(cfg.models_dir, policy, t) for t in tasks}
    out["drift"] = drift_phase(cfg, policy, tasks)
    for task, a in analyses.items():
        live = accuracy[task]
        out["tasks"][task]["live"] = {
            "accuracy": live["cascade_accuracy"],
            "escalations_per_request": escalations_per_request(live["answered_share"]),
            "cloud_share": live["answered_share"][a.tiers[-1]],
            "oracle_escalations_per_request": oracle_escalations_at(a.oracle, live["cascade_accuracy"]),
        }
    if shifted:
        out["shift"] = shift_summary(accuracy, shifted)
    out["decision_log"] = replay_check(cfg.out_dir / "bench-state", policy)
    try:
        _pyplot()
    except ImportError:
        out["figures_missing"] = "matplotlib is not installed: pip install -e '.[bench]'"
        return out
    figures = cfg.out_dir
    figures.mkdir(parents=True, exist_ok=True)
    for task, a in analyses.items():
        live = out["tasks"][task]["live"]
        out["figures"].append(plot_tradeoff(a, live, figures / f"tradeoff-{task}.png").name)
        out["figures"].append(plot_calibration(a, figures / f"calibration-{task}.png").name)
    latency = {t: accuracy[t].get("latency_samples_ms", {}) for t in tasks}
    out["figures"].append(plot_latency(latency, figures / "latency.png").name)
    if shifted:
        out["figures"].append(plot_shift(accuracy, shifted, figures / "shift.png").name)
    return out


def replay_check(state_dir: Path, policy: Any) -> dict[str, Any]:
    """Replay the run's sampled decision logs under the live policy: every decision must match."""
    from cascade.lab.replay import replay_task, traffic_from_logs

    logs = sorted(state_dir.glob("decisions-*.db"))
    if not logs:
        return {"logs": 0}
    traffic = traffic_from_logs(logs, policy)
    results = [replay_task(t, policy) for t in traffic.values()]
    return {"logs": len(logs), "sample_rate": policy.policy.decision_log.sample_rate,
            "requests": sum(r.requests for r in results),
            "decisions": sum(r.compared for r in results),
            "mismatched": sum(r.mismatched for r in results)}


# -- report -------------------------------------------------------------------------------------


def policy_targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 6's targets, checked against the live run: (target, measured, met) rows."""
    policy = results.get("policy")
    if not policy:
        return []
    rows: list[tuple[str, str, bool]] = []
    for task, p in policy["tasks"].items():
        a, live = results["accuracy"][task], p["live"]
        top = list(a["tier_alone_accuracy"])[-1]
        gap = (a["tier_alone_accuracy"][top] - live["accuracy"]) * 100
        rows.append((f"{task}: cascade within 0.3 pt of {top} alone", f"{gap:+.2f} pt below", gap <= 0.3))
        rows.append((f"{task}: at most 10% of requests reach {top}", f"{live['cloud_share']:.1%}",
                     live["cloud_share"] <= 0.10))
        oracle = live["oracle_escalations_per_request"]
        ratio = live["escalations_per_request"] / oracle if oracle else float("inf")
        rows.append((f"{task}: escalations <= 1.3x the oracle router's at the same accuracy",
                     (f"{live['escalations_per_request']:.3f} vs {oracle if oracle is not None else float('nan'):.3f}"
                      f" = {ratio:.1f}x"), ratio <= 1.3))
    for task, s in (policy.get("shift") or {}).items():
        rows.append((f"{task} under shift: cascade loses <= half of what the endpoint loses",
                     (f"{s['cascade_drop'] * 100:.1f} vs {s['endpoint_drop'] * 100:.1f} pt "
                      f"({s['drop_ratio']:.2f})"), s["drop_ratio"] <= 0.5))
    return rows


def policy_report_lines(results: dict[str, Any]) -> list[str]:
    """The report's policy section: operating point vs oracle (and whether any threshold could
    meet it), calibration, shift and the drift alarm, figures."""
    from cascade.lab.bench.drift import drift_report_lines
    from cascade.lab.bench.oracle import oracle_report_lines

    policy = results.get("policy")
    if not policy:
        return []
    fitted = policy.get("drift_references_fitted")
    served = f", plus drift references fitted by the bench for {', '.join(fitted)}" if fitted else ""
    lines = ["", f"## Policy trade-off ({policy['policy']}{served}, version {policy['version']})", "",
             ("Offline numbers replay the test split under the policy file with the serving gate "
              "code; live numbers are the chain's answers above. Escalations are tier-to-tier "
              "hops per request; the oracle router escalates exactly what the lower tier gets "
              "wrong, cheapest fixes first, to reach the same accuracy."), "",
             ("| task | accuracy sim / live | escalations/request sim / live | oracle at live acc. "
              "| ratio | cloud share sim / live |"), "|---|---|---|---|---|---|"]
    for task, p in policy["tasks"].items():
        live = p["live"]
        oracle = live["oracle_escalations_per_request"]
        ratio = f"{live['escalations_per_request'] / oracle:.1f}x" if oracle else "-"
        lines.append(
            f"| {task} | {p['simulated_accuracy']:.4f} / {live['accuracy']:.4f} | "
            f"{p['simulated_escalations_per_request']:.3f} / {live['escalations_per_request']:.3f} | "
            f"{oracle if oracle is not None else float('nan'):.3f} | {ratio} | "
            f"{p['simulated_cloud_share']:.1%} / {live['cloud_share']:.1%} |")
    dl = policy.get("decision_log") or {}
    if dl.get("logs"):
        lines += ["", (f"Decision log: {dl['requests']} requests sampled at "
                   f"{dl['sample_rate']:.0%} across {dl['logs']} tiers; replayed under the policy, "
                   f"{dl['decisions'] - dl['mismatched']} of {dl['decisions']} decisions reproduced.")]
    lines += oracle_report_lines(results)
    lines += ["", ("Calibration error (ECE, 15 bins) of each tier's gate confidence on the test "
               "split, raw vs as the policy calibrates it:"), "",
              "| task | tier | signal | calibration | ECE raw | ECE calibrated |", "|---|---|---|---|---|---|"]
    for task, p in policy["tasks"].items():
        for tier, e in p["ece"].items():
            lines.append(f"| {task} | {tier} | {e['signal']} | {e['method']} | {e['before']:.4f} | "
                         f"{e['after']:.4f} |")
    shifted = results.get("shift") or {}
    if shifted:
        lines += ["", "## Distribution shift", "",
                  ("| task | corruption | accuracy alone clean -> shifted | cascade clean -> shifted "
                   "| escalations/request | cloud share | cascade drop / endpoint drop |"),
                  "|---|---|---|---|---|---|---|"]
        for task, s in shifted.items():
            c = results["accuracy"][task]
            alone = ", ".join(f"{t} {c['tier_alone_accuracy'][t]:.3f}->{v:.3f}"
                              for t, v in s["tier_alone_accuracy"].items())
            summ = policy["shift"][task]
            lines.append(
                f"| {task} | {s['corruption']} | {alone} | {c['cascade_accuracy']:.4f} -> "
                f"{s['cascade_accuracy']:.4f} | {summ['escalations_per_request_clean']:.3f} -> "
                f"{summ['escalations_per_request_shifted']:.3f} | {summ['cloud_share_clean']:.1%} -> "
                f"{summ['cloud_share_shifted']:.1%} | {summ['cascade_drop'] * 100:.2f} / "
                f"{summ['endpoint_drop'] * 100:.2f} pt |")
    lines += drift_report_lines(results)
    if policy.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({name})" for name in policy["figures"]]
    elif policy.get("figures_missing"):
        lines += ["", f"Figures not drawn: {policy['figures_missing']}"]
    return lines
