"""What-if replay: re-decide recorded (or held-out split) traffic under a policy, no model run.

Traffic is, per task, a list of requests; each request holds what every tier it reached saw
(the model's raw probabilities and predicted class). A policy is replayed by walking each
request up the chain from where it entered and applying :func:`cascade.gating.gate.assess` and
:func:`cascade.gating.gate.decide` at each tier, exactly as serving does, so the same policy gives
the same decisions as live serving.

Two sources:

- a held-out split (:func:`traffic_from_split`): every tier's output is known for every
  sample, with true labels; any policy can be replayed completely;
- decision logs (:func:`traffic_from_logs`): only the tiers a request actually reached are
  known. A candidate that escalates a request further than live traffic went cannot be
  followed; such requests are counted as *unresolved* and bound the cloud share from above.
  Accuracy is measured against true labels where the log has them, and agreement with the
  top tier's answer where the request reached it. A decision logged while the drift alarm
  tightened the rule is replayed under the policy's drift action with the alarm on (a
  candidate with ``action: alert`` re-decides it with its plain thresholds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.errors import PolicyError
from cascade.gating.drift import effective_rule
from cascade.gating.gate import Decision, assess, decide
from cascade.policy.loader import LoadedPolicy

if TYPE_CHECKING:
    from cascade.lab.evaluation import TierPredictions


@dataclass(frozen=True)
class Observation:
    """What one tier saw of one request."""

    probabilities: Sequence[float]
    label: str
    has_upstream: bool
    recorded_decision: str | None = None
    recorded_policy: str | None = None
    drift_tightened: bool = False
    """Decided live under the drift alarm's stricter rule: replay applies the policy's too."""


@dataclass
class Request:
    """One request of the traffic: per tier what it saw, and the truth if known."""

    request_id: str
    seen: dict[str, Observation]
    true_label: str | None = None


@dataclass
class TaskTraffic:
    """One task's requests and its chain, bottom tier first."""

    task: str
    tiers: list[str]
    requests: list[Request]


@dataclass
class ReplayResult:
    """What a policy does with one task's traffic."""

    task: str
    tiers: list[str]
    requests: int
    reaching: dict[str, int]
    escalated: dict[str, int]
    answered: dict[str, int]
    unresolved: int
    labelled: int
    correct: int
    top_known: int
    agree_with_top: int
    top_alone_correct: int
    top_alone_labelled: int
    answers: dict[str, str | None] = field(default_factory=dict)
    """Final label per resolved request id (None: 'unknown')."""
    decisions: dict[tuple[str, str], str] = field(default_factory=dict)
    """(request id, tier) -> decision, for every tier visited."""
    mismatched: int = 0
    """Decisions that differ from the recorded ones made under this very policy version."""
    compared: int = 0

    def escalation_rate(self, tier: str) -> float:
        """Share of the requests reaching ``tier`` that it escalated."""
        return self.escalated[tier] / self.reaching[tier] if self.reaching[tier] else 0.0

    @property
    def cloud_share(self) -> float:
        """Share of requests reaching the top tier (unresolved ones not counted)."""
        return self.reaching[self.tiers[-1]] / self.requests if self.requests else 0.0

    @property
    def cloud_share_upper(self) -> float:
        """Cloud share if every unresolved request went all the way up (a safe bound)."""
        return (self.reaching[self.tiers[-1]] + self.unresolved) / self.requests if self.requests else 0.0

    @property
    def escalations_per_request(self) -> float:
        """Tier-to-tier escalations per request (resolved and unresolved ones as far as known)."""
        return sum(self.escalated.values()) / self.requests if self.requests else 0.0

    @property
    def accuracy(self) -> float | None:
        """Accuracy against true labels (None without labels)."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def top_accuracy(self) -> float | None:
        """Accuracy of the top tier answering every labelled request it saw (None: unknown)."""
        return self.top_alone_correct / self.top_alone_labelled if self.top_alone_labelled else None

    @property
    def agreement_with_top(self) -> float | None:
        """Share of answers equal to the top tier's, where the top tier's answer is known."""
        return self.agree_with_top / self.top_known if self.top_known else None


def replay_task(traffic: TaskTraffic, policy: LoadedPolicy) -> ReplayResult:
    """Re-decide every request of ``traffic`` under ``policy``."""
    tiers = traffic.tiers
    rules = {t: policy.rule(traffic.task, t) for t in tiers}
    zero = {t: 0 for t in tiers}
    r = ReplayResult(traffic.task, tiers, len(traffic.requests), dict(zero), dict(zero),
                     dict(zero), 0, 0, 0, 0, 0, 0, 0)
    for req in traffic.requests:
        top_obs = req.seen.get(tiers[-1])
        if top_obs is not None and req.true_label is not None:
            r.top_alone_labelled += 1
            r.top_alone_correct += top_obs.label == req.true_label
        start = next((i for i, t in enumerate(tiers) if t in req.seen), None)
        if start is None:
            continue
        answer: str | None = None
        resolved = False
        for tier in tiers[start:]:
            obs = req.seen.get(tier)
            if obs is None:
                break  # escalated beyond what was recorded
            rule = rules[tier]
            if obs.drift_tightened:
                rule = effective_rule(rule, policy.drift(traffic.task, tier)[0], alarm=True)
            _, conf = assess(obs.probabilities, rule)
            decision = decide(conf, obs.label, rule, has_upstream=obs.has_upstream)
            r.reaching[tier] += 1
            r.decisions[(req.request_id, tier)] = decision.value
            if obs.recorded_decision is not None and obs.recorded_policy == policy.version:
                r.compared += 1
                r.mismatched += decision.value != obs.recorded_decision
            if decision is Decision.ESCALATE:
                r.escalated[tier] += 1
                continue
            r.answered[tier] += 1
            answer = None if decision is Decision.UNKNOWN else obs.label
            resolved = True
            break
        if not resolved:
            r.unresolved += 1
            continue
        r.answers[req.request_id] = answer
        if req.true_label is not None:
            r.labelled += 1
            r.correct += answer == req.true_label
        if top_obs is not None:
            r.top_known += 1
            r.agree_with_top += answer == top_obs.label
    return r


def changed_answers(a: ReplayResult, b: ReplayResult) -> tuple[int, int]:
    """(answers that differ, requests resolved under both) between two replays."""
    both = a.answers.keys() & b.answers.keys()
    return sum(a.answers[k] != b.answers[k] for k in both), len(both)


# -- sources ------------------------------------------------------------------------------------


def traffic_from_split(models_dir: Path, task: str, tiers: Sequence[str], split: str = "test") -> TaskTraffic:
    """Every sample of a held-out split, seen by every tier (runs each model once, offline)."""
    from cascade.lab.evaluation import predict_split

    labels, preds = predict_split(models_dir, task, list(tiers), split)
    return traffic_from_predictions(task, tiers, labels, preds, id_prefix=f"{split}:")


def traffic_from_predictions(task: str, tiers: Sequence[str], labels: Sequence[str],
                             preds: Mapping[str, TierPredictions], *,
                             id_prefix: str = "") -> TaskTraffic:
    """Every sample of ``labels``, seen by every tier as ``preds`` (from
    :func:`~cascade.lab.evaluation.predict_inputs`) says; request ids ``<id_prefix><index>``."""
    requests = [
        Request(
            request_id=f"{id_prefix}{i}",
            seen={t: Observation(preds[t].probabilities[i], preds[t].predicted[i],
                                 has_upstream=j < len(tiers) - 1)
                  for j, t in enumerate(tiers)},
            true_label=labels[i],
        )
        for i in range(len(labels))
    ]
    return TaskTraffic(task, list(tiers), requests)


def traffic_from_logs(paths: Sequence[Path], policy: LoadedPolicy,
                      tasks: Sequence[str] | None = None) -> dict[str, TaskTraffic]:
    """Requests recorded in decision logs, joined across tiers by request id.

    The chain order per task is the tier order of ``policy``; a logged tier the policy does
    not know is an error naming it.
    """
    import json

    from cascade.observability.decisionlog import read_rows

    by_task: dict[str, dict[str, Request]] = defaultdict(dict)
    for row in read_rows(paths):
        task = row["task"]
        if tasks is not None and task not in tasks:
            continue
        known = policy.task(task).tiers
        if row["tier"] not in known:
            raise PolicyError(
                f"{policy.path}: tasks.{task}.tiers.{row['tier']}: missing, but the decision log "
                f"has decisions of tier {row['tier']!r}; this policy has tiers: {', '.join(known)}",
                file=policy.path, key=f"tasks.{task}.tiers.{row['tier']}",
            )
        req = by_task[task].setdefault(row["request_id"], Request(row["request_id"], {}))
        # A request retried with the same id is decided once (idempotency): keep the first.
        req.seen.setdefault(row["tier"], Observation(
            probabilities=json.loads(row["probs"]), label=row["label"],
            has_upstream=bool(row["has_upstream"]), recorded_decision=row["decision"],
            recorded_policy=row["policy_version"], drift_tightened=bool(row.get("drift_tightened")),
        ))
        if row.get("true_label"):
            req.true_label = row["true_label"]
    return {
        task: TaskTraffic(task, list(policy.task(task).tiers), list(reqs.values()))
        for task, reqs in by_task.items()
    }


def summary(result: ReplayResult) -> dict[str, Any]:
    """The numbers of a replay as a plain dict (reports, JSON)."""
    return {
        "requests": result.requests,
        "unresolved": result.unresolved,
        "escalation_rate": {t: result.escalation_rate(t) for t in result.tiers[:-1]},
        "answered_share": {t: result.answered[t] / result.requests if result.requests else 0.0
                           for t in result.tiers},
        "cloud_share": result.cloud_share,
        "escalations_per_request": result.escalations_per_request,
        "accuracy": result.accuracy,
        "top_accuracy": result.top_accuracy,
        "agreement_with_top": result.agreement_with_top,
    }
