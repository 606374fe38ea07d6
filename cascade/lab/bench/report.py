"""Write ``reports/bench.json`` and a readable ``reports/bench.md`` with the targets checked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cascade.lab.bench.plots import policy_report_lines, policy_targets


def _f(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows: the issue's targets, checked against this run."""
    rows: list[tuple[str, str, bool]] = []
    for task, a in results["accuracy"].items():
        top = list(a["tier_alone_accuracy"])[-1]
        gap = (a["tier_alone_accuracy"][top] - a["cascade_accuracy"]) * 100
        rows.append((f"{task}: cascade within 0.5 pt of {top} alone",
                     f"{gap:+.2f} pt below", gap <= 0.5))
        rows.append((f"{task}: >= 80% answered below {top}",
                     f"{a['answered_below_top']:.1%}", a["answered_below_top"] >= 0.8))
    for task, o in results["overhead"].items():
        if not isinstance(o, dict) or "c1" not in o:
            continue
        rows.append((f"{task}: endpoint p50 <= 1.5x echo p50 (1 client)",
                     f"{o['c1']['p50_ratio']:.2f}x", o["c1"]["p50_ratio"] <= 1.5))
        for key in [k for k in o if k.startswith("c")]:
            rows.append((f"{task}: endpoint throughput >= 50% of echo ({key[1:]} clients)",
                         f"{o[key]['throughput_ratio']:.0%}", o[key]["throughput_ratio"] >= 0.5))
    rows += policy_targets(results)
    for tier, f in results["tiers"].items():
        rows.append((f"{tier}: ready <= 2 s", f"{f['ready_s']:.2f} s", f["ready_s"] <= 2.0))
        rss = max(f["rss_mb"], f["rss_mb_after"])
        rows.append((f"{tier}: RSS <= 200 MB", f"{rss:.0f} MB", rss <= 200))
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    lines = [
        "# cascade bench",
        "",
        (f"Run {results['started_at']}, {results['duration_s']} s, {results['machine']['cpus']} CPUs, "
         f"Python {results['machine']['python']}. Load generator: {results['overhead'].get('generator')}; "
         f"each load figure is the median of {results['config']['rounds']} interleaved rounds of "
         f"{results['config']['duration_s']} s."),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(results)]
    for task, a in results["accuracy"].items():
        tiers = list(a["tier_alone_accuracy"])
        lines += ["", (f"## {task}: accuracy and routing ({a['samples']} test samples, "
                       f"{a['errors']} errors)"), "",
                  ("| tier | accuracy alone | answered here | escalated (of those reaching) | "
                   "model+gate ms p50 | client ms p50 / p99 when answered here |"),
                  "|---|---|---|---|---|---|"]
        for t in tiers:
            c = a["client_latency_ms_by_answering_tier"][t]
            lines.append(
                f"| {t} | {a['tier_alone_accuracy'][t]:.4f} | {a['answered_share'][t]:.1%} | "
                f"{a['escalation_rate_per_tier'][t]:.1%} | {_f(a['tier_model_ms_p50'][t], 3)} | "
                f"{_f(c['p50'])} / {_f(c['p99'])} |")
        lines += ["", (f"Cascade accuracy **{a['cascade_accuracy']:.4f}**; answered below the top "
                       f"{a['answered_below_top']:.1%}; requests escalated at least once "
                       f"{a['escalation_rate']:.1%}; statuses {a['statuses']}.")]
    lines += policy_report_lines(results)
    lines += ["", "## Endpoint answering locally vs a bare FastAPI echo", "",
              ("| task | clients | endpoint rps | echo rps | ratio | endpoint p50 / p99 ms | "
               "echo p50 / p99 ms | p50 ratio |"), "|---|---|---|---|---|---|---|---|"]
    for task, o in results["overhead"].items():
        if not isinstance(o, dict):
            continue
        for key in [k for k in o if k.startswith("c")]:
            e, x = o[key]["endpoint"], o[key]["echo"]
            lines.append(f"| {task} | {key[1:]} | {e['rps']:.0f} | {x['rps']:.0f} | "
                         f"{o[key]['throughput_ratio']:.2f} | {_f(e['p50_ms'])} / {_f(e['p99_ms'])} | "
                         f"{_f(x['p50_ms'])} / {_f(x['p99_ms'])} | {o[key]['p50_ratio']:.2f} |")
        raw = o.get("raw_onnxruntime")
        if raw:
            lines.append(f"| {task} | raw onnxruntime call | | | | {raw['p50_ms']:.4f} / "
                         f"{raw['p99_ms']:.4f} | | |")
    lines += ["", "Service overhead (endpoint p50 at 1 client minus the raw model call): " + ", ".join(
        f"{task} {o['service_overhead_p50_ms']:.3f} ms" for task, o in results["overhead"].items()
        if isinstance(o, dict) and "service_overhead_p50_ms" in o), "",
        "## Tier processes", "", "| tier | ready in | RSS after start / after load |",
        "|---|---|---|"]
    for tier, f in results["tiers"].items():
        lines.append(f"| {tier} | {f['ready_s']:.2f} s | {f['rss_mb']:.0f} / {f['rss_mb_after']:.0f} MB |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "bench.json", out_dir / "bench.md"
    js.write_text(json.dumps(results, indent=2, sort_keys=False))
    md.write_text(render_markdown(results))
    return js, md
