"""``reports/bench-<task>.json`` and ``.md`` of the generative section, targets checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["generative_targets", "render_generative", "write_generative_reports"]


def _n(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def generative_targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows of the issue's generative targets."""
    rows: list[tuple[str, str, bool]] = []
    o, c, off = r["overhead"], r["chain"], r["offline"]
    if "tokens_per_s_ratio_vs_grammar_chain" in o:
        rows.append((("(not a target) service tokens/s against raw llama-cpp-python with "
                      "grammar= (the whole vocabulary checked per token)"),
                     f"{o['tokens_per_s_ratio_vs_grammar_chain']:.2f}x", True))
    if "tokens_per_s_ratio" in o:
        rows.append(("service tokens/s >= 95% of raw llama-cpp-python",
                     f"{o['tokens_per_s_ratio']:.1%}", o["tokens_per_s_ratio"] >= 0.95))
    if "ttft_ms_p50_difference" in o:
        rows.append(("service TTFT p50 <= raw + 5 ms", f"{o['ttft_ms_p50_difference']:+.1f} ms",
                     o["ttft_ms_p50_difference"] <= 5.0))
    path = o["service"].get("path_ms_p50")
    if path is not None:
        rows.append(("what HTTP, the node and SSE add to the tier's own TTFT, p50 <= 5 ms",
                     f"{path:+.1f} ms", path <= 5.0))
    first = next(iter(c["ttft_ms"]))
    p50 = c["ttft_ms"][first]["p50"]
    rows.append((f"{first} TTFT p50 < 500 ms", f"{_n(p50)} ms", p50 is not None and p50 < 500))
    alone = off.get("tier_alone_accuracy_live_documents") or off["tier_alone_accuracy"]
    tiers = list(alone)
    gap = (alone[tiers[-1]] - c["accuracy"]) * 100
    rows.append((f"live cascade within 1 pt of {tiers[-1]} alone (recorded, same documents)",
                 f"{gap:+.1f} pt below", gap <= 1.0))
    rows.append((f">= 50% answered below {tiers[-1]} (live)", f"{c['answered_below_top']:.0%}",
                 c["answered_below_top"] >= 0.5))
    return rows


def _ttft_by_length(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", ("Time to first token by document length (one token asked for; the prompt's "
                  "few-shot prefix is cached after the first call, so the document is what the "
                  "first token waits for):"), "",
             ("| document chars | document tokens (p50) | requests | service TTFT p50 ms | raw "
              "TTFT p50 ms |"), "|---|---|---|---|---|"]
    return lines + [f"| {row['chars']} | {_n(row['document_tokens_p50'])} | {row['requests']} | "
                    f"{_n(row['service_ttft_ms_p50'])} | {_n(row['raw_ttft_ms_p50'])} |"
                    for row in rows]


def render_generative(r: dict[str, Any]) -> str:
    """The section as Markdown."""
    o, c, off = r["overhead"], r["chain"], r["offline"]
    task = r["task"]
    lines = [f"# cascade bench: {task} (generative)", "",
             (f"Run {r['started_at']}, {r['duration_s']} s, {r['machine']['cpus']} CPUs "
             f"(1-minute load average at the end: {r['machine']['load_average_1m']:.1f}), "
             f"Python {r['machine']['python']}; {c['documents']} test documents through the "
             f"live chain, policy {r['config']['policy']}."), "",
             "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in
              generative_targets(r)]
    lines += ["", (f"## Service vs raw llama-cpp-python ({o['model']}, {o['threads']} thread(s), "
              f"{o['prompts']} prompts, alternating order)"), "",
              "| side | requests | tokens | tokens/s | TTFT p50 ms | TTFT p95 ms |",
              "|---|---|---|---|---|---|"]
    for side in ("service", "raw", "raw_grammar_chain"):
        if side not in o:  # reports written before the grammar-chain side existed
            continue
        s = o[side]
        lines.append(f"| {side} | {s['requests']} | {s['tokens']} | "
                     f"{_n(s['tokens_per_s'], '.1f')} | {_n(s['ttft_ms_p50'])} | "
                     f"{_n(s['ttft_ms_p95'])} |")
    lines += ["", (f"Raw: {o['raw_means']}. Service: the tier's HTTP endpoint, streamed (SSE), "
              "read by the bench process; tokens/s is the generated tokens over the whole call.")]
    lines += _ttft_by_length(o.get("ttft_by_length") or [])
    lines += ["", f"## Live chain ({c['documents']} documents, one at a time)", "",
              (f"Cascade accuracy {c['accuracy']:.1%}; answered below the top "
              f"{c['answered_below_top']:.0%}; {c['escalations_per_request']:.2f} escalations "
              f"per request; {c['errors']} errors; statuses {c['statuses']}; client p50 "
              f"{_n(c['client_ms_p50'])} ms; mean prompt "
              f"{_n(c['prompt_tokens_per_hop_mean'])} tokens per hop."),
              "", ("| tier | answered | TTFT n | TTFT p50 ms | TTFT p95 ms | alone, same "
                   "documents (recorded) |"),
              "|---|---|---|---|---|---|"]
    for tier, t in c["ttft_ms"].items():
        alone = (off.get("tier_alone_accuracy_live_documents")
                 or off["tier_alone_accuracy"]).get(tier)
        lines.append(f"| {tier} | {c['answered_share'][tier]:.0%} | {t['n']} | {_n(t['p50'])} | "
                     f"{_n(t['p95'])} | {_n(None if alone is None else alone * 100, '.1f')}% |")
    lines += ["", (f"## Recorded answers ({off['samples']} test documents, the policy simulated "
              "by the serving gate)"), "",
              (f"Simulated cascade {off['simulated_accuracy']:.1%} at "
              f"{off['simulated_escalations_per_request']:.2f} escalations per request (cloud "
              f"share {off['simulated_cloud_share']:.0%}); oracle "
              f"{off['oracle_escalations_per_request']:.2f} escalations per request; always "
              f"endpoint {off['always_endpoint_accuracy']:.1%}, always cloud "
              f"{off['always_cloud_accuracy']:.1%}.")]
    if off.get("figure"):
        lines += ["", f"![accuracy vs escalation]({off['figure']})"]
    elif off.get("figure_missing"):
        lines += ["", f"Figure not drawn: {off['figure_missing']}"]
    return "\n".join(lines) + "\n"


def write_generative_reports(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``bench-<task>.json`` and ``bench-<task>.md``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"bench-{results['task']}.json"
    md = out_dir / f"bench-{results['task']}.md"
    js.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md.write_text(render_generative(results))
    return js, md
