"""The ``--json`` documents of ``cascade policy calibrate`` and ``replay``: plain data built from
what the tables show, so a script reads the same numbers a person does."""

from __future__ import annotations

import math
from typing import Any


def _num(x: float | None) -> float | None:
    """A float for JSON (NaN, which JSON lacks, becomes null)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def fit_summary(f: Any) -> dict[str, Any]:
    """One task of ``calibrate``: goals, each tier's calibration and threshold, the outcome."""
    o = f.outcome
    tiers = []
    for r in f.tiers:
        cal = r.fit.calibration
        tiers.append({
            "tier": r.tier, "model": r.model, "accuracy_alone": _num(r.accuracy_alone),
            "calibration": r.fit.method if cal is not None else "none",
            "temperature": _num(cal.temperature) if cal is not None and not cal.curve else None,
            "ece_before": _num(r.fit.ece_before), "ece_after": _num(r.fit.ece_after),
            "threshold": _num(r.threshold),
            "class_thresholds": {k: _num(v) for k, v in sorted(r.class_thresholds.items())},
            "answered_share": _num(o.answered_share[r.tier]),
            "answered_accuracy": _num(o.answered_accuracy[r.tier]),
            "escalation_rate": _num(o.escalation_rate[r.tier]) if r is not f.tiers[-1] else None,
        })
    return {"task": f.task, "goals": f.goals.describe(), "resolved_goals": f.resolved_goals.describe(),
            "samples": f.samples, "signal": f.signal, "feasible": bool(f.search.feasible),
            "violations": list(f.search.violations), "tiers": tiers,
            "expected_accuracy": _num(o.accuracy), "cloud_share": _num(o.top_share),
            "escalations_per_request": _num(o.escalations_per_request),
            "oracle_escalations": _num(f.oracle_escalations)}


def replay_side(r: Any, tiers: list[str]) -> dict[str, Any]:
    """One policy's replayed numbers (the live or the candidate column of the table)."""
    return {
        "escalation_rate": {t: _num(r.escalation_rate(t)) for t in tiers[:-1]},
        "answered_share": {t: _num(r.answered[t] / r.requests) for t in tiers},
        "cloud_share": _num(r.cloud_share), "escalations_per_request": _num(r.escalations_per_request),
        "accuracy": _num(r.accuracy), "agreement_with_top": _num(r.agreement_with_top),
        "unresolved": r.unresolved,
    }


def replay_summary(name: str, a: Any, b: Any, tiers: list[str], checks: list[Any],
                   changed: int, both: int) -> dict[str, Any]:
    """One task of ``replay``: live vs candidate, changed answers, the goal checks."""
    return {"task": name, "requests": a.requests, "live": replay_side(a, tiers),
            "candidate": replay_side(b, tiers), "changed_answers": changed, "compared_answers": both,
            "live_decisions_compared": a.compared, "live_decisions_mismatched": a.mismatched,
            "top_accuracy": _num(a.top_accuracy),
            "goals": [{"goal": str(c.goal), "measured": c.measured, "met": c.met} for c in checks]}
