"""Loading policy files with errors that name the file, the key path and what is allowed."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cascade.config_errors import validation_lines, yaml_problem
from cascade.errors import PolicyError
from cascade.gating.drift import DriftReference, DriftSettings
from cascade.gating.gate import GateRule
from cascade.policy.schema import Policy, TaskPolicy


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy plus where it came from and a content hash (its version)."""

    policy: Policy
    path: str
    sha256: str

    @property
    def version(self) -> str:
        """Short content hash: what ``/readyz`` reports so operators see which policy is live."""
        return self.sha256[:12]

    def task(self, task: str) -> TaskPolicy:
        """The policy of one task; :class:`PolicyError` if the file does not cover it."""
        try:
            return self.policy.tasks[task]
        except KeyError:
            raise PolicyError(
                f"{self.path}: tasks.{task}: missing; this policy covers: "
                f"{', '.join(sorted(self.policy.tasks))}",
                file=self.path,
                key=f"tasks.{task}",
            ) from None

    @functools.cached_property
    def _rules(self) -> dict[tuple[str, str], GateRule]:
        return {
            (task, tier): rule.gate_rule()
            for task, task_policy in self.policy.tasks.items()
            for tier, rule in task_policy.tiers.items()
        }

    @functools.cached_property
    def _drift(self) -> dict[tuple[str, str], tuple[DriftSettings, DriftReference | None]]:
        out = {}
        for task, task_policy in self.policy.tasks.items():
            settings = task_policy.drift.to_settings()
            for tier, rule in task_policy.tiers.items():
                ref = rule.drift_reference
                out[(task, tier)] = (settings, None if ref is None else ref.to_reference())
        return out

    def drift(self, task: str, tier: str) -> tuple[DriftSettings, DriftReference | None]:
        """The drift settings of ``task`` and the reference of ``tier`` (None: no reference)."""
        cached = self._drift.get((task, tier))
        if cached is not None:
            return cached
        self.rule(task, tier)  # raises PolicyError naming the missing task or tier
        raise AssertionError("unreachable")  # pragma: no cover

    def rule(self, task: str, tier: str) -> GateRule:
        """The gate rule of ``tier`` for ``task`` (built once per loaded policy)."""
        cached = self._rules.get((task, tier))
        if cached is not None:
            return cached
        tiers = self.task(task).tiers
        try:
            return tiers[tier].gate_rule()
        except KeyError:
            raise PolicyError(
                f"{self.path}: tasks.{task}.tiers.{tier}: missing; this policy has tiers: "
                f"{', '.join(tiers)}",
                file=self.path,
                key=f"tasks.{task}.tiers.{tier}",
            ) from None


def parse_policy(data: Any, *, source: str) -> Policy:
    """Validate already-parsed YAML data; errors name ``source`` and every bad key path."""
    if not isinstance(data, dict):
        raise PolicyError(
            f"{source}: the file must be a YAML mapping with at least 'tasks'; got {type(data).__name__}",
            file=source,
            key="(root)",
        )
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = validation_lines(exc, source=source, root=Policy)
        raise PolicyError(
            "\n".join(line for _, line in lines), file=source, key=lines[0][0]
        ) from None


def load_policy_bytes(raw: bytes, *, source: str) -> LoadedPolicy:
    """Parse and validate policy bytes (used by the loader and by hot reload)."""
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: {yaml_problem(exc)}", file=source) from None
    policy = parse_policy(data, source=source)
    return LoadedPolicy(policy=policy, path=source, sha256=hashlib.sha256(raw).hexdigest())


def load_policy(path: str | Path) -> LoadedPolicy:
    """Read, parse and validate a policy file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{source}: no such policy file", file=source) from None
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read: {exc.strerror}", file=source) from None
    return load_policy_bytes(raw, source=source)
