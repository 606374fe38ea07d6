"""The generative bench's arithmetic over live answers and its report, on hand-made answers."""

from __future__ import annotations

import json

from cascade.lab.bench.generative import summarise_chain
from cascade.lab.bench.generative_report import generative_targets, render_generative
from cascade.models.extraction.fields import is_correct

TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]
TRUTH = {"amount": "1250.00", "company": "Northwind Traders Ltd", "date": "2026-03-14",
         "number": "INV-20417", "type": "invoice"}


def hop(tier: str, decision: str, ttft_ms: float) -> dict:
    return {"tier": tier, "decision": decision, "ttft_ms": ttft_ms, "tokens": 40}


def answers() -> list[dict]:
    wrong = {**TRUTH, "amount": "12.00"}
    return [
        {"_status_code": 200, "_client_ms": 900.0, "answered_by": "endpoint", "status": "final",
         "fields": TRUTH, "usage": {"input_tokens": 800, "output_tokens": 40},
         "hops": [hop("endpoint", "answer", 400.0)]},
        {"_status_code": 200, "_client_ms": 3000.0, "answered_by": "edge-server",
         "status": "final", "fields": wrong, "usage": {"input_tokens": 2700, "output_tokens": 120},
         "hops": [hop("endpoint", "escalate", 600.0), hop("edge-node", "escalate", 500.0),
                  hop("edge-server", "answer", 900.0)]},
        {"_status_code": 503, "_client_ms": 10.0, "error": {"code": "model_busy"}},
    ]


def test_live_answers_are_scored_routed_and_timed_per_tier() -> None:
    labels = [json.dumps(TRUTH)] * 3
    out = summarise_chain(TIERS, answers(), labels, is_correct)
    assert out["documents"] == 3 and out["errors"] == 1
    assert out["accuracy"] == 1 / 3  # the refused one counts as wrong
    assert out["answered_share"] == {"endpoint": 1 / 3, "edge-node": 0.0, "edge-server": 1 / 3,
                                     "cloud": 0.0}
    assert out["answered_below_top"] == 2 / 3
    assert out["escalations_per_request"] == 2 / 3  # 0 + 2 + 0 hops climbed
    assert out["ttft_ms"]["endpoint"] == {"n": 2, "p50": 500.0, "p95": 590.0}
    assert out["ttft_ms"]["cloud"] == {"n": 0, "p50": None, "p95": None}
    assert out["prompt_tokens_per_hop_mean"] == 850.0  # 800/1 and 2700/3


def test_the_report_checks_the_targets_honestly() -> None:
    chain = summarise_chain(TIERS, answers(), [json.dumps(TRUTH)] * 3, is_correct)
    results = {
        "task": "extraction", "started_at": "2026-11-30T10:00:00Z", "duration_s": 1.0,
        "machine": {"cpus": 2, "python": "3.11", "load_average_1m": 3.0},
        "config": {"policy": "policies/extraction.yaml"},
        "overhead": {"model": "m", "threads": 1, "prompts": 2, "raw_means": "raw",
                     "service": {"requests": 2, "tokens": 80, "tokens_per_s": 95.0,
                                 "ttft_ms_p50": 410.0, "ttft_ms_p95": 420.0, "path_ms_p50": 3.9},
                     "raw": {"requests": 2, "tokens": 80, "tokens_per_s": 100.0,
                             "ttft_ms_p50": 400.0, "ttft_ms_p95": 405.0},
                     "tokens_per_s_ratio": 0.95, "ttft_ms_p50_difference": 10.0,
                     "ttft_by_length": [{"chars": 100, "document_tokens_p50": 31.0, "requests": 3,
                                         "service_ttft_ms_p50": 120.4, "raw_ttft_ms_p50": 118.0}]},
        "chain": chain,
        "offline": {"samples": 3, "simulated_accuracy": 0.3, "simulated_escalations_per_request":
                    0.5, "simulated_cloud_share": 0.0, "oracle_escalations_per_request": 0.2,
                    "always_endpoint_accuracy": 0.1, "always_cloud_accuracy": 0.4,
                    "tier_alone_accuracy": dict.fromkeys(TIERS, 0.4),
                    "tier_alone_accuracy_live_documents": dict.fromkeys(TIERS, 1 / 3)},
    }
    rows = {target: (measured, met) for target, measured, met in generative_targets(results)}
    assert rows["service tokens/s >= 95% of raw llama-cpp-python"] == ("95.0%", True)
    assert rows["service TTFT p50 <= raw + 5 ms"] == ("+10.0 ms", False)
    assert rows["endpoint TTFT p50 < 500 ms"] == ("500 ms", False)
    assert rows["what HTTP, the node and SSE add to the tier's own TTFT, p50 <= 5 ms"] == (
        "+3.9 ms", True)
    assert rows["live cascade within 1 pt of cloud alone (recorded, same documents)"] == (
        "+0.0 pt below", True)
    assert rows[">= 50% answered below cloud (live)"] == ("67%", True)
    text = render_generative(results)
    assert "| endpoint | 33% | 2 | 500 | 590 | 33.3% |" in text
    assert "| cloud | 0% | 0 | - | - | 33.3% |" in text
    assert "| 100 | 31 | 3 | 120 | 118 |" in text  # time to first token by document length
