"""One record per answered request, consumed by every observer of a tier.

The node builds a :class:`RequestOutcome` once the answer is known and hands the same record
to each observer (metrics and span attributes in :class:`~cascade.observability.telemetry.
TierTelemetry`, the sampled :class:`~cascade.observability.decisionlog.DecisionRecorder`),
instead of calling each with its own long argument list. The drift alarm is not an observer:
it runs before the decision, since a ``tighten`` alarm changes the rule the gate applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cascade.contract.answer import Answer
from cascade.gating.gate import GateRule
from cascade.gating.scoring import Assessment
from cascade.policy.loader import LoadedPolicy

__all__ = ["OutcomeObserver", "RequestOutcome"]


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~4 us more to build per request
class RequestOutcome:
    """What happened to one request at one tier."""

    tier: str
    task: str
    hop: int
    """Hops the request had crossed before this tier (0: from a client)."""
    model: str
    policy: LoadedPolicy
    """The policy the whole request was served under."""
    rule: GateRule
    """The rule the gate applied (a drift alarm's stricter twin when one was on)."""
    assessment: Assessment
    decision: str
    has_upstream: bool
    answer: Answer
    queued: bool
    """This tier committed the answer with an escalation to its own queue."""
    payload: Any = None
    """The request's input (the decision log keeps it only when the policy says so)."""
    traceparent: str | None = None
    """The request's span at this tier (a shadow audit of it links there)."""


OutcomeObserver = Callable[[RequestOutcome], None]
"""Anything that consumes outcomes; must not raise (telemetry never breaks a request)."""
