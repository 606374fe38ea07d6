"""The drift alarm in ``cascade bench``'s shift scenario: live, and offline with the serving code.

Live: each tier's ``/readyz`` drift state after the clean test split went through the chain,
and again after the shifted split (alarm onsets counted per phase).

Offline, streams of requests walk the chain as serving does (:class:`cascade.gating.drift.DriftMonitor`
and :func:`cascade.gating.gate.decide` at each tier, one monitor per tier) over each tier's real model
outputs:

- the whole clean test split and the whole shifted split against each tier's reference
  (PSI and escalation-rate z of the samples that reach the tier);
- **clean**: the test split in many random orders (it must never alarm), and long
  in-distribution streams drawn from a Bayesian bootstrap of the calibration split (the
  population the reference is a sample of): the false-alarm rate per request;
- **shift**: the clean split, then shifted traffic (the bench's shifted split plus two more
  draws of the same corruption): does each tier's alarm fire, and after how many requests;
- **tighten**: the same streams under ``action: tighten`` at a few steps, against ``alert``.

References come from the policy file; a policy without them gets them fitted on the
calibration split exactly as ``cascade policy calibrate`` does (:func:`policy_with_references`),
and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade.gating.drift import DriftDetector, escalation_z, psi
from cascade.gating.drift_monitor import DriftMonitor
from cascade.gating.gate import Decision, decide

CLEAN_ORDERS = 200
NULL_STREAMS = 40
NULL_LENGTH = 10_000
SHIFT_ORDERS = 60
TIGHTEN_ORDERS = 30
TIGHTEN_STEPS = (0.02, 0.05, 0.1)
EXTRA_SHIFT_SEEDS = (7, 8)
"""More draws of the same corruption (seeded like the bench's own, which uses 6)."""


# -- references -----------------------------------------------------------------------------------


def policy_with_references(policy: Any, models_dir: Path, tasks: Sequence[str]) -> tuple[Any, list[str], str]:
    """``policy`` with drift references fitted on the calibration split for the tasks where no
    tier has one (a file made before the drift alarm). Returns (policy, tasks fitted, the
    policy file's text; empty when nothing was fitted)."""
    import yaml

    from cascade.lab.evaluation import predict_split
    from cascade.lab.fit import drift_reference_block
    from cascade.policy import load_policy_bytes
    from cascade.policy.calibrate import drift_references
    from cascade.policy.search import per_sample_thresholds

    doc = policy.policy.model_dump(mode="json", exclude_none=True)
    fitted = []
    for task in tasks:
        tiers = list(policy.task(task).tiers)
        if any(policy.drift(task, t)[1] is not None for t in tiers):
            continue  # references from calibrate (a tier no sample reached has none)
        _, preds = predict_split(models_dir, task, tiers, "calibration")
        rules = [policy.rule(task, t) for t in tiers]
        conf = [preds[t].confidences(r) for t, r in zip(tiers, rules)]
        per_sample = [per_sample_thresholds(r.threshold, dict(r.class_thresholds), preds[t].predicted)
                      for t, r in zip(tiers, rules)]
        refs = drift_references(tiers, conf, per_sample, [r.threshold for r in rules])
        for tier, ref in refs.items():
            doc["tasks"][task]["tiers"][tier]["drift_reference"] = \
                drift_reference_block(ref, "calibration")
        fitted.append(task)
    if not fitted:
        return policy, [], ""
    text = (f"# {policy.path} plus drift references fitted on the calibration split by "
            f"`cascade bench` (tasks: {', '.join(fitted)})\n"
            + yaml.safe_dump(doc, sort_keys=False, width=100, default_flow_style=None))
    return load_policy_bytes(text.encode(), source=policy.path), fitted, text


# -- streaming ------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """Every tier's gate view of one split: calibrated confidence, label, correctness."""

    conf: list[np.ndarray]
    labels: list[list[str]]
    correct: list[np.ndarray]

    @property
    def size(self) -> int:
        return len(self.correct[0])

    @staticmethod
    def concat(parts: Sequence[Outputs]) -> Outputs:
        """The samples of several splits, one after the other."""
        tiers = range(len(parts[0].conf))
        return Outputs([np.concatenate([p.conf[j] for p in parts]) for j in tiers],
                       [[x for p in parts for x in p.labels[j]] for j in tiers],
                       [np.concatenate([p.correct[j] for p in parts]) for j in tiers])


def gate_outputs(policy: Any, task: str, tiers: Sequence[str], preds: dict[str, Any]) -> Outputs:
    """Calibrated confidence (as serving computes it), label and correctness per tier."""
    rules = [policy.rule(task, t) for t in tiers]
    return Outputs(conf=[preds[t].confidences(r) for t, r in zip(tiers, rules)],
                   labels=[list(preds[t].predicted) for t in tiers],
                   correct=[np.asarray(preds[t].correct, dtype=bool) for t in tiers])


@dataclass
class StreamResult:
    """What one stream did: per request correctness and escalations; per tier alarm onsets."""

    correct: np.ndarray
    escalations: np.ndarray
    onsets: dict[str, list[tuple[int, int]]]
    """Per tier, one (position in the stream, requests reached so far) per alarm onset."""
    switch_at: int
    reached_at_switch: dict[str, int]
    reached: dict[str, int]

    def fired(self, tier: str, *, before_switch: bool) -> bool:
        """Whether the tier's alarm turned on before (or after) the switch to shifted traffic."""
        return any((k < self.switch_at) == before_switch for k, _ in self.onsets[tier])

    def fired_by(self, tier: str, position: int) -> bool:
        """Whether the tier's alarm turned on after the switch and before stream ``position``."""
        return any(self.switch_at <= k < position for k, _ in self.onsets[tier])

    def delay(self, tier: str) -> int | None:
        """Requests reaching the tier after the switch until its first alarm (None: none)."""
        cut = self.reached_at_switch[tier]
        after = [r - cut for k, r in self.onsets[tier] if k >= self.switch_at]
        return min(after) if after else None


def run_stream(policy: Any, task: str, tiers: Sequence[str], out: Outputs, order: np.ndarray,
               switch_at: int | None = None) -> StreamResult:
    """Walk requests ``out[order[k]]`` up the chain with one :class:`DriftMonitor` per tier,
    exactly as serving does; ``switch_at`` is the position of the first shifted request."""
    monitors = [DriftMonitor(t) for t in tiers]
    reached = {t: 0 for t in tiers}
    at_switch: dict[str, int] | None = None
    onsets: dict[str, list[tuple[int, int]]] = {t: [] for t in tiers}
    rules = [policy.rule(task, t) for t in tiers]
    correct = np.zeros(len(order), dtype=bool)
    escalations = np.zeros(len(order), dtype=np.int64)
    top = len(tiers) - 1
    conf = [c.tolist() for c in out.conf]
    for k, i in enumerate(order.tolist()):
        if k == switch_at:
            at_switch = dict(reached)
        for j, tier in enumerate(tiers):
            c, label = conf[j][i], out.labels[j][i]
            rule = monitors[j].observe(policy, task, c, label, rules[j])
            reached[tier] += 1
            det = monitors[j].detectors()[task]
            if isinstance(det, DriftDetector) and det.alarm_at_seen == det.seen:
                onsets[tier].append((k, reached[tier]))
            if decide(c, label, rule, has_upstream=j < top) is Decision.ESCALATE:
                escalations[k] += 1
                continue
            correct[k] = bool(out.correct[j][i])
            break
    end = len(order) if switch_at is None else switch_at
    return StreamResult(correct, escalations, onsets, end,
                        at_switch if at_switch is not None else dict(reached), reached)


@contextmanager
def _quiet() -> Iterator[None]:
    """Thousands of simulated alarms would flood the bench's output with warnings."""
    logger = logging.getLogger("cascade.gating.drift")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _with_action(policy: Any, task: str, tighten_by: float) -> Any:
    import yaml

    from cascade.policy import load_policy_bytes

    doc = policy.policy.model_dump(mode="json", exclude_none=True)
    doc["tasks"][task]["drift"] = {**doc["tasks"][task].get("drift", {}), "action": "tighten",
                                   "tighten_by": tighten_by}
    return load_policy_bytes(yaml.safe_dump(doc).encode(),
                             source=f"{policy.path} [tighten +{tighten_by:g}]")


def split_statistics(policy: Any, task: str, tiers: Sequence[str], out: Outputs) -> dict[str, Any]:
    """Per tier: PSI and escalation-rate z of a whole split's samples reaching it (policy's own
    rules), against the tier's reference."""
    from bisect import bisect_right

    from cascade.policy.calibrate import reaching

    rules = [policy.rule(task, t) for t in tiers]
    thresholds = [np.asarray([r.threshold_for(x) for x in out.labels[j]]) for j, r in enumerate(rules)]
    masks = reaching(out.conf, thresholds)
    stats: dict[str, Any] = {}
    for j, tier in enumerate(tiers):
        ref = policy.drift(task, tier)[1]
        c = out.conf[j][masks[j]]
        esc = int((c < thresholds[j][masks[j]]).sum()) if j < len(tiers) - 1 else 0
        entry: dict[str, Any] = {"samples": len(c),
                                 "escalation_rate": esc / len(c) if len(c) else None}
        if ref is not None and ref.bins >= 2 and len(c):
            hist = [0] * ref.bins
            for v in c.tolist():
                hist[bisect_right(ref.edges, v)] += 1
            entry["psi"] = psi(hist, ref.counts)
            entry["escalation_z"] = escalation_z(esc, len(c), ref.escalation_rate, ref.samples)
        stats[tier] = entry
    return stats


def drift_scenario(policy: Any, task: str, tiers: Sequence[str], *, calibration: Outputs,
                   clean: Outputs, shifted: Outputs, more_shifted: Outputs | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """False alarms on clean traffic, detection on shifted traffic, and what ``action:
    tighten`` would do, for one task (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = clean.size
    settings = policy.drift(task, tiers[0])[0]
    shift_all = Outputs.concat([shifted, more_shifted]) if more_shifted else shifted
    mixed = Outputs.concat([clean, shift_all])
    with _quiet():
        orders = [run_stream(policy, task, tiers, clean, rng.permutation(n))
                  for _ in range(CLEAN_ORDERS)]
        nulls = []
        for _ in range(NULL_STREAMS):
            weights = rng.dirichlet(np.ones(calibration.size))
            nulls.append(run_stream(policy, task, tiers, calibration,
                                    rng.choice(calibration.size, NULL_LENGTH, p=weights)))
        streams = [np.r_[rng.permutation(n), n + rng.permutation(shift_all.size)]
                   for _ in range(SHIFT_ORDERS)]
        shift_runs = [run_stream(policy, task, tiers, mixed, s, switch_at=n) for s in streams]
        actions = {"alert": _outcome(shift_runs[:TIGHTEN_ORDERS], n)}
        for by in TIGHTEN_STEPS:
            tight = _with_action(policy, task, by)
            runs = [run_stream(tight, task, tiers, mixed, s, switch_at=n)
                    for s in streams[:TIGHTEN_ORDERS]]
            actions[f"tighten +{by:g}"] = _outcome(runs, n)
    clean_stats = split_statistics(policy, task, tiers, clean)
    shifted_stats = split_statistics(policy, task, tiers, shifted)
    per_tier: dict[str, dict[str, Any]] = {}
    for t in tiers:
        ref = policy.drift(task, t)[1]
        delays = [d for d in (r.delay(t) for r in shift_runs) if d is not None]
        per_tier[t] = {
            "reference_samples": None if ref is None else ref.samples,
            "reference_bins": None if ref is None else ref.bins,
            "reference_escalation_rate": None if ref is None else ref.escalation_rate,
            "detector": ref is not None and ref.bins >= 2 and settings.enabled,
            "clean_split": clean_stats[t],
            "shifted_split": shifted_stats[t],
            "clean_orders_alarmed": sum(r.fired(t, before_switch=True) for r in orders),
            "null_streams_alarmed": sum(r.fired(t, before_switch=True) for r in nulls),
            "null_onsets": sum(len(r.onsets[t]) for r in nulls),
            "null_requests_reaching": int(sum(r.reached[t] for r in nulls)),
            "shift_clean_part_alarmed": sum(r.fired(t, before_switch=True) for r in shift_runs),
            "shift_alarmed_first_split": sum(r.fired_by(t, n + shifted.size) for r in shift_runs),
            "shift_alarmed": sum(r.delay(t) is not None for r in shift_runs),
            "shift_delay_median": float(np.median(delays)) if delays else None,
            "shifted_requests_reaching": float(np.mean([r.reached[t] - r.reached_at_switch[t]
                                                        for r in shift_runs])),
        }
    return {
        "settings": {"window": settings.window, "min_samples": settings.min_samples,
                     "alarm_psi": settings.alarm_psi, "clear_psi": settings.clear_psi,
                     "significance": settings.significance, "action": settings.action},
        "clean_orders": CLEAN_ORDERS, "null_streams": NULL_STREAMS, "null_length": NULL_LENGTH,
        "shift_orders": SHIFT_ORDERS, "shifted_samples": shift_all.size,
        "first_shifted_samples": shifted.size, "tighten_orders": TIGHTEN_ORDERS,
        "tiers": per_tier, "actions": actions,
    }


def _outcome(runs: list[StreamResult], n: int) -> dict[str, float]:
    return {
        "clean_accuracy": float(np.mean([r.correct[:n].mean() for r in runs])),
        "clean_escalations_per_request": float(np.mean([r.escalations[:n].mean() for r in runs])),
        "shifted_accuracy": float(np.mean([r.correct[n:].mean() for r in runs])),
        "shifted_escalations_per_request": float(np.mean([r.escalations[n:].mean() for r in runs])),
    }


# -- live -----------------------------------------------------------------------------------------


def live_drift(chain: Any) -> dict[str, Any]:
    """Each tier's ``/readyz`` drift section (per task), right now."""
    import httpx

    out = {}
    with httpx.Client(timeout=10) as client:
        for t in chain.tiers:
            out[t.tier] = client.get(f"{t.url}/readyz").json().get("drift", {})
    return out


# -- the bench phase and its report -----------------------------------------------------------------


def drift_phase(cfg: Any, policy: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """:func:`drift_scenario` for every task, on the real models' outputs."""
    from cascade.lab.bench.shift import SHIFT_SEED, ShiftSpec, corrupt
    from cascade.lab.evaluation import predict_inputs, predict_split
    from cascade.models.manifest import load_manifest, load_split

    spec = ShiftSpec()
    manifest = load_manifest(cfg.models_dir)
    out: dict[str, Any] = {}
    for task in tasks:
        tiers = list(policy.task(task).tiers)
        input_spec = manifest.task(task).input
        _, cal = predict_split(cfg.models_dir, task, tiers, "calibration")
        inputs, labels = load_split(cfg.models_dir, task, "test")
        clean = predict_inputs(cfg.models_dir, task, tiers, inputs, labels)
        shifted, *more = (
            predict_inputs(cfg.models_dir, task, tiers,
                           corrupt(task, inputs, spec, seed, input_spec=input_spec), labels)
            for seed in (SHIFT_SEED, *EXTRA_SHIFT_SEEDS))
        views = [gate_outputs(policy, task, tiers, p) for p in (cal, clean, shifted, *more)]
        out[task] = drift_scenario(policy, task, tiers, calibration=views[0], clean=views[1],
                                   shifted=views[2], more_shifted=Outputs.concat(views[3:]))
    return out


def _live_cell(state: dict[str, Any] | None, before: dict[str, Any] | None = None) -> str:
    if not state:
        return "-"
    if state.get("state") in ("no_reference", "reference_too_small", "disabled"):
        return str(state["state"]).replace("_", " ")
    onsets = state.get("alarms", 0) - ((before or {}).get("alarms", 0) or 0)
    psi_ = "-" if state.get("psi") is None else f"{state['psi']:.3f}"
    z = "-" if state.get("escalation_z") is None else f"{state['escalation_z']:+.1f}"
    state_name = str(state.get("state", "?"))
    shown = f"**{state_name}**" if state_name == "alarm" else state_name
    return f"{shown}, {onsets} onset(s), PSI {psi_}, z {z} ({state.get('window', 0)} req.)"


def _psi_z(stats: dict[str, Any]) -> str:
    return f"{stats.get('psi', float('nan')):.3f} / {stats.get('escalation_z') or 0.0:+.1f}"


def _alarmed(now: dict[str, Any], drift: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """task/tier pairs whose alarm turned on since ``before`` (or at all)."""
    hits = []
    for task in drift:
        for tier in drift[task]["tiers"]:
            state = (now.get(tier) or {}).get(task) or {}
            prior = ((before or {}).get(tier) or {}).get(task) or {}
            if (state.get("alarms") or 0) > (prior.get("alarms") or 0):
                hits.append(f"{task}/{tier}")
    return hits


def drift_report_lines(results: dict[str, Any]) -> list[str]:
    """The report's drift alarm section (live chain, then offline, then the tighten action)."""
    drift = (results.get("policy") or {}).get("drift")
    if not drift:
        return []
    first = next(iter(drift.values()))
    s = first["settings"]
    fitted = (results.get("policy") or {}).get("drift_references_fitted")
    lines = ["", "## Drift alarm", "",
             f"Per tier and task: the gate's calibrated confidence over the last {s['window']} "
             f"requests against its histogram on the calibration split (samples reaching that "
             f"tier); alarm when PSI >= max({s['alarm_psi']:g}, sampling-noise level) or the "
             f"escalation rate is higher than calibrated (one-sided z-test), at significance "
             f"{s['significance']:g}, on 3 consecutive checks; no verdict before "
             f"{s['min_samples']} requests; action `{s['action']}`. "
             + ("References: from the policy file." if not fitted else
                f"References: the policy file has none for {', '.join(fitted)}, so the bench "
                "fitted them on the calibration split as `cascade policy calibrate` does.")]
    return (lines + _live_lines(results.get("drift_live") or {}, drift)
            + _offline_lines(drift, first) + _tighten_lines(drift, first))


def _live_lines(live: dict[str, Any], drift: dict[str, Any]) -> list[str]:
    if not live:
        return []
    lines = ["", ("Live, each tier's `/readyz` after the clean test split went through the "
                  "chain, and after the shifted split (onsets counted in that phase):"), "",
             "| task | tier | after clean | after shifted |", "|---|---|---|---|"]
    clean_live, shift_live = live.get("after_clean", {}), live.get("after_shift", {})
    for task in drift:
        for tier in drift[task]["tiers"]:
            before = (clean_live.get(tier) or {}).get(task)
            after = (shift_live.get(tier) or {}).get(task)
            lines.append(f"| {task} | {tier} | {_live_cell(before)} | {_live_cell(after, before)} |")
    clean_hits = _alarmed(clean_live, drift, None)
    shift_hits = _alarmed(shift_live, drift, clean_live)
    return lines + ["", "Live: " + (f"**alarm on the clean split at {', '.join(clean_hits)}**"
                                    if clean_hits else "no tier alarmed on the clean split")
                    + "; during the shifted split: "
                    + (f"alarm at {', '.join(shift_hits)}." if shift_hits else "no alarm.")]


def _offline_lines(drift: dict[str, Any], first: dict[str, Any]) -> list[str]:
    lines = ["", (f"Offline, same detector code, each tier fed what reaches it: the whole clean "
                  f"and shifted splits' PSI and escalation z against the reference; the clean "
                  f"test split in {first['clean_orders']} random orders; {first['null_streams']} "
                  f"in-distribution streams of {first['null_length']:,} requests (Bayesian "
                  f"bootstrap of the calibration split: populations the reference could have "
                  f"been drawn from); and {first['shift_orders']} streams of the clean split "
                  "followed by shifted traffic (the bench's shifted split plus two more draws of "
                  "the same corruption)."), "",
             ("| task | tier | reference (bins, escalation) | clean split PSI / z | shifted split "
              "PSI / z | clean orders alarmed | in-distribution streams alarmed (onsets / "
              "requests reaching) | shifted: alarmed within 1 split / 3 splits | median delay "
              "(requests reaching) |"), "|---|---|---|---|---|---|---|---|---|"]
    for task, d in drift.items():
        for tier, t in d["tiers"].items():
            if not t["detector"]:
                ref = "none" if t["reference_samples"] is None else \
                    f"{t['reference_samples']} samples: too few"
                lines.append(f"| {task} | {tier} | {ref} | - | - | - | - | - | - |")
                continue
            c, sh = t["clean_split"], t["shifted_split"]
            delay = "-" if t["shift_delay_median"] is None else f"{t['shift_delay_median']:.0f}"
            lines.append(
                f"| {task} | {tier} | {t['reference_samples']} ({t['reference_bins']}, "
                f"{t['reference_escalation_rate']:.1%}) | {_psi_z(c)} ({c['samples']}) | {_psi_z(sh)} "
                f"({sh['samples']}) | {t['clean_orders_alarmed']}/{d['clean_orders']} | "
                f"{t['null_streams_alarmed']}/{d['null_streams']} ({t['null_onsets']} / "
                f"{t['null_requests_reaching']:,}) | "
                f"{t['shift_alarmed_first_split']}/{d['shift_orders']} / "
                f"{t['shift_alarmed']}/{d['shift_orders']} | {delay} |")
    return lines


def _tighten_lines(drift: dict[str, Any], first: dict[str, Any]) -> list[str]:
    lines = ["", (f"What `action: tighten` would do (offline, first {first['tighten_orders']} of "
                  "those clean-then-shifted streams; accuracy and escalations per request of the "
                  "clean and the shifted part):"), "",
             ("| task | action | clean accuracy | clean escalations/request | shifted accuracy | "
              "shifted escalations/request |"), "|---|---|---|---|---|---|"]
    notes = []
    for task, d in drift.items():
        alert = d["actions"]["alert"]
        for name, a in d["actions"].items():
            lines.append(f"| {task} | {name} | {a['clean_accuracy']:.4f} | "
                         f"{a['clean_escalations_per_request']:.3f} | {a['shifted_accuracy']:.4f} | "
                         f"{a['shifted_escalations_per_request']:.3f} |")
            if name != "alert":
                gain = (a["shifted_accuracy"] - alert["shifted_accuracy"]) * 100
                cost = a["shifted_escalations_per_request"] / max(
                    1e-9, alert["shifted_escalations_per_request"])
                notes.append(f"{task} {name}: {gain:+.2f} pt for {cost:.2f}x the escalations")
    return lines + ["", "Shifted part, tighten vs alert: " + "; ".join(notes) + "."]
