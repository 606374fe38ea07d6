"""Fit a policy to an operator goal: what ``cascade policy calibrate`` does, minus the printing.

Per task: run every tier's model over the calibration split (never the test split), fit each
tier's confidence calibration, search thresholds (and per-class thresholds where a class needs
them) that meet the goal with the fewest escalations, predict the outcome, and record each
tier's drift reference (its confidence histogram on the samples that reach it). Settings the
search does not touch (deadlines, offline behaviour, queue bounds, floor actions, drift alarm
settings, audits, hard examples, answer cache, pressure fallbacks, decision log) are kept from
a base policy.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cascade.errors import PolicyError
from cascade.gating.drift import DriftReference
from cascade.gating.gate import SIGNAL_NAMES, GateRule, SignalName
from cascade.gating.logprobs import GENERATION_SIGNAL_NAMES
from cascade.policy.calibrate import (
    CascadeOutcome,
    drift_references,
    oracle_escalations_for,
    simulate_cascade,
)
from cascade.policy.calibration import CalibrationFit, Method, fit_calibration, gate_confidences
from cascade.policy.goals import Goals
from cascade.policy.search import (
    SearchResult,
    cross_validate,
    per_sample_thresholds,
    search_thresholds,
)


@dataclass(frozen=True)
class FitOptions:
    """Knobs of one calibration run."""

    signal: SignalName | Literal["auto"] = "max_prob"
    """A signal, or ``auto``: per task the one whose thresholds do best under cross-validation."""
    calibration: Method | Literal["auto"] = "auto"
    per_class: bool = True
    class_min_support: int = 20
    grid: int = 64
    split: str = "calibration"
    target: Literal["correct", "agreement"] = "correct"
    """What a lower tier's confidence is calibrated to predict and its thresholds are searched
    on: ``correct``, its own answer is right; ``agreement``, its answer is the top tier's. With
    ``agreement`` an accuracy goal bounds how often the cascade's answer is the top tier's
    (``accuracy>=top``: always, on the split), so a weak tier may not answer the samples the
    top tier also gets wrong: on the split that costs nothing, but held out it lets through
    answers the top tier would have got right. The policy's expected accuracy is still
    computed against the labels."""


@dataclass(frozen=True)
class TierReport:
    """One tier's fitted calibration and threshold, and what it does on the split."""

    tier: str
    model: str
    accuracy_alone: float
    fit: CalibrationFit
    threshold: float
    class_thresholds: dict[str, float]
    drift_reference: DriftReference | None = None
    """Histogram of the calibrated confidence of the split's samples reaching this tier."""


@dataclass(frozen=True)
class TaskFit:
    """One task's result: the policy section and the expected outcome on the split."""

    task: str
    samples: int
    goals: Goals
    resolved_goals: Goals
    tiers: list[TierReport]
    search: SearchResult
    oracle_escalations: float | None
    signal: SignalName = "max_prob"
    signal_cv: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """With ``--signal auto``: per signal, the cross-validated (violation, cost...) key."""
    section: dict[str, Any] = field(default_factory=dict)
    target: str = "correct"
    """What the lower tiers were fitted to (:attr:`FitOptions.target`); with ``agreement``
    ``resolved_goals`` bound agreement with the top tier, not accuracy."""

    @property
    def outcome(self) -> CascadeOutcome:
        """Expected outcome on the split."""
        return self.search.outcome


def true_indices(classes: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Index of each label in a model's classes (-1 for a label the model does not know)."""
    position = {c: i for i, c in enumerate(classes)}
    return np.asarray([position.get(y, -1) for y in labels])


def fit_task(models_dir: Path, task: str, tiers: Sequence[str], goals: Goals,
             options: FitOptions, base_section: dict[str, Any] | None = None) -> TaskFit:
    """Fit one task's calibrations and thresholds for ``goals`` on the calibration split."""
    from cascade.lab.evaluation import predict_split

    labels, preds = predict_split(models_dir, task, list(tiers), options.split)
    correct = [preds[t].correct for t in tiers]
    generative = preds[tiers[0]].output == "generation"
    targets, answers = _targets(preds, tiers, labels, correct, options.target)
    signals = _signals_to_try(options.signal, generative=generative, task=task)
    fitted_by_signal = {}
    for sig in signals:
        fits, conf = [], []
        for tier in tiers:
            p = preds[tier]
            # a generation's calibration target is its correctness (see fit_calibration)
            target = (targets[tiers.index(tier)].astype(int) if generative
                      else true_indices(p.classes, answers[tier]))
            fit = fit_calibration(p.probabilities, target, signal=sig,
                                  method=options.calibration)
            fits.append(fit)
            conf.append(gate_confidences(p.probabilities, GateRule(sig, 0.0, calibration=fit.calibration))[1])
        fitted_by_signal[sig] = (fits, conf)
    signal_cv: dict[str, tuple[float, ...]] = {}
    if len(signals) > 1:
        for sig, (_, conf) in fitted_by_signal.items():
            key, _ = cross_validate(tiers, conf, targets, goals)
            signal_cv[sig] = tuple(round(float(v), 9) for v in key)
    chosen = min(signals, key=lambda s: (signal_cv.get(s, ()), signals.index(s)))
    reports_fit, conf = fitted_by_signal[chosen]
    # answers of a generation are not classes: no per-class thresholds
    predicted = [preds[t].predicted for t in tiers] if options.per_class and not generative \
        else None
    search = search_thresholds(tiers, conf, targets, goals, predicted=predicted, grid=options.grid,
                               class_min_support=options.class_min_support)
    per_sample = [per_sample_thresholds(search.thresholds[i], search.class_thresholds[i],
                                        preds[t].predicted if predicted else None)
                  for i, t in enumerate(tiers)]
    if options.target == "agreement":  # what the policy does against the labels
        search = dataclasses.replace(search, outcome=simulate_cascade(tiers, conf, correct,
                                                                      per_sample))
    references = drift_references(tiers, conf, per_sample, search.thresholds)
    reports = [
        TierReport(tier=t, model=preds[t].model_name, accuracy_alone=preds[t].accuracy, fit=f,
                   threshold=search.thresholds[i], class_thresholds=search.class_thresholds[i],
                   drift_reference=references.get(t))
        for i, (t, f) in enumerate(zip(tiers, reports_fit))
    ]
    fitted = TaskFit(
        task=task, samples=len(labels), goals=goals,
        resolved_goals=goals.resolved(1.0 if options.target == "agreement"
                                      else preds[tiers[-1]].accuracy),
        tiers=reports, search=search, target=options.target,
        oracle_escalations=oracle_escalations_for(correct, search.outcome.accuracy),
        signal=chosen, signal_cv=signal_cv,
    )
    return TaskFit(**{**fitted.__dict__, "section": task_section(fitted, options, base_section)})


def _targets(preds: dict[str, Any], tiers: Sequence[str], labels: Sequence[str],
             correct: list[np.ndarray], target: str) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Per tier what its thresholds are searched on (right answers, or answers equal to the
    top tier's), and the labels its calibration is fitted to (the truth, or the top's)."""
    if target == "correct":
        return correct, dict.fromkeys(tiers, labels)
    top = np.asarray(preds[tiers[-1]].predicted, dtype=object)
    agree = [np.asarray(preds[t].predicted, dtype=object) == top for t in tiers[:-1]]
    answers: dict[str, Any] = {t: list(top) for t in tiers[:-1]}
    answers[tiers[-1]] = labels  # the top's own calibration stays against the truth
    return [*agree, np.ones_like(correct[-1], dtype=bool)], answers


def _signals_to_try(signal: str, *, generative: bool, task: str) -> tuple[SignalName, ...]:
    """The signals ``--signal`` asks for on this task (``auto``: every one of its kind)."""
    kind = GENERATION_SIGNAL_NAMES if generative else SIGNAL_NAMES
    if signal == "auto":
        return kind  # type: ignore[return-value]
    if signal not in kind:
        what = "generates text" if generative else "classifies"
        raise PolicyError(f"--signal {signal}: task {task!r} {what}; its signals are "
                          f"{', '.join(kind)} (or auto)", key="signal")
    return (signal,)  # type: ignore[return-value]


def _calibration_block(fit: CalibrationFit) -> dict[str, Any]:
    cal = fit.calibration
    if cal is None:
        return {"method": "none"}
    if cal.curve:
        return {"method": "isotonic", "curve": [[float(x), float(y)] for x, y in cal.curve]}
    return {"method": "temperature", "temperature": float(cal.temperature)}


def drift_reference_block(ref: DriftReference, split: str) -> dict[str, Any]:
    """The ``drift_reference`` mapping of a tier in the policy file."""
    block: dict[str, Any] = {"split": split, "edges": [float(e) for e in ref.edges],
                             "counts": [int(c) for c in ref.counts]}
    if ref.escalation_rate is not None:
        block["escalation_rate"] = float(ref.escalation_rate)
    return block


def _round_threshold(t: float) -> float:
    """Six decimals keep the file readable; always rounded **up**. A searched threshold sits
    midway between two samples' confidences (rounding up moves it past one only if they differ
    by < 1e-6), except "answer none", one step above the highest confidence: rounded to the
    nearest it fell below it, and every sample at that confidence (an isotonic calibration puts
    many on one plateau) was answered by the written policy though not in the search."""
    if t in (0.0, 1.0):
        return t
    return min(1.0, float(Decimal(repr(t)).quantize(Decimal("0.000001"), rounding=ROUND_CEILING)))


def task_section(fitted: TaskFit, options: FitOptions, base: dict[str, Any] | None) -> dict[str, Any]:
    """The ``tasks.<task>`` section of the policy file."""
    base = dict(base or {})
    base_tiers = base.get("tiers", {}) or {}
    section: dict[str, Any] = {
        "deadline_ms": base.get("deadline_ms", 2000),
        "offline": base.get("offline", "provisional"),
        "queue": base.get("queue", {"ttl_s": 86400, "max_attempts": 20}),
    }
    goals = fitted.goals.model_dump(exclude_none=True)
    if goals:
        section["goals"] = goals
    for key in ("drift", "audit", "hard_examples", "cache"):  # operator settings, not fitted
        if base.get(key):
            section[key] = base[key]
    section["tiers"] = {}
    for i, report in enumerate(fitted.tiers):
        tier: dict[str, Any] = {"signal": fitted.signal,
                                "threshold": _round_threshold(report.threshold)}
        if report.class_thresholds:
            tier["class_thresholds"] = {k: _round_threshold(v)
                                        for k, v in sorted(report.class_thresholds.items())}
        for key in ("floor_action", "pressure"):
            if (base_tiers.get(report.tier) or {}).get(key):
                tier[key] = base_tiers[report.tier][key]
        tier["calibration"] = _calibration_block(report.fit)
        if report.drift_reference is not None:
            tier["drift_reference"] = drift_reference_block(report.drift_reference, options.split)
        section["tiers"][report.tier] = tier
    return section


def policy_document(name: str, sections: dict[str, dict[str, Any]],
                    base: dict[str, Any] | None) -> dict[str, Any]:
    """The whole policy mapping (keeps the base's description and decision log settings)."""
    base = base or {}
    doc: dict[str, Any] = {"version": 1, "name": base.get("name", name)}
    if base.get("description"):
        doc["description"] = base["description"]
    doc["decision_log"] = base.get("decision_log", {"sample_rate": 0.0})
    doc["tasks"] = sections
    return doc


def header_lines(command: str, models_dir: Path, build_key: str, fits: Sequence[TaskFit],
                 options: FitOptions) -> list[str]:
    """The comment header: how and from what the policy was made, and what to expect."""
    lines = [
        f"Made by `{command}`",
        (f"on {datetime.date.today().isoformat()} from the {options.split} split of "
         f"{models_dir}/manifest.json (build {build_key[:12]}); do not edit thresholds by hand,"),
        "re-run the command (settings it does not fit are kept from the previous file).",
        (f"Signal {options.signal}, calibration {options.calibration}, per-class thresholds "
         f"{'on' if options.per_class else 'off'}"
         + (", lower tiers fitted to agree with the top tier" if options.target == "agreement"
            else "") + f". Expected on the {options.split} split:"),
    ]
    for f in fits:
        o = f.outcome
        top = f.tiers[-1]
        oracle = "n/a" if not f.oracle_escalations else f"{o.escalations_per_request / f.oracle_escalations:.1f}x"
        lines.append(
            f"  {f.task} ({f.samples} samples, signal {f.signal}), goal {f.goals.describe()}: accuracy "
            f"{o.accuracy:.4f} (top alone {top.accuracy_alone:.4f}), cloud share {o.top_share:.1%}, "
            f"{o.escalations_per_request:.3f} escalations/request ({oracle} the oracle's)"
        )
        lines.append("    answered per tier: " + ", ".join(
            f"{t} {s:.1%}" for t, s in o.answered_share.items()))
        lines.append("    ECE before -> after: " + ", ".join(
            f"{r.tier} {r.fit.ece_before:.3f}->{r.fit.ece_after:.3f} ({r.fit.method})" for r in f.tiers))
    return lines
