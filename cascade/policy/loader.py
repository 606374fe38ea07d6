"""Loading policy files with errors that name the file, the key path and what is allowed."""

from __future__ import annotations

import difflib
import functools
import hashlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

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


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(root)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at the mapping that contains ``loc`` (walks the models)."""
    model: Any = Policy
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = _unwrap_optional(fields[part].annotation)
        if typing.get_origin(annotation) is dict:
            model = typing.get_args(annotation)[1]
            if parts:
                parts.pop(0)  # the mapping key (a task or tier name)
            else:
                return []
        else:
            model = annotation
    return sorted(getattr(model, "model_fields", {}))


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (the model whose keys an error under that key should list)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if hasattr(a, "model_fields")]
        if len(models) == 1:
            return models[0]
    return annotation


def _describe(error: dict[str, Any]) -> str:
    """One readable sentence for one pydantic error, including the allowed values."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(tuple(error["loc"]))
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"got {error.get('input')!r}; allowed: {ctx.get('expected')}"
    if kind == "missing":
        return "required key is missing"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in error and kind not in ("model_type", "dict_type"):
        return f"{message} (got {error['input']!r})"
    return message


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
        # A typo shows up as an unknown key *and* a missing one: report the unknown key first.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        lines = [f"{source}: {_key_path(e['loc'])}: {_describe(dict(e))}" for e in errors]
        first = errors[0]
        raise PolicyError(
            "\n".join(lines), file=source, key=_key_path(first["loc"])
        ) from None


def load_policy_bytes(raw: bytes, *, source: str) -> LoadedPolicy:
    """Parse and validate policy bytes (used by the loader and by hot reload)."""
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}: not valid YAML{where}: {problem}", file=source) from None
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
