"""Readable validation errors for the YAML files users write (policies, ``task.yaml``).

One pydantic error becomes one sentence that names the key path and what is allowed there:
``tasks.vision.tiers.endpoint.threshhold: unknown key (did you mean 'threshold'?); allowed
keys here: ...``. Discriminated unions (``input: {kind: image, ...}``) are walked by their tag,
which is left out of the key path the user sees.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["describe_error", "key_path", "validation_lines", "yaml_problem"]


def yaml_problem(exc: Exception) -> str:
    """Where and what a YAML parse error is: ``not valid YAML at line 3, column 7: ...``."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"not valid YAML{where}: {problem}"


def validation_lines(exc: ValidationError, *, source: str,
                     root: type[BaseModel]) -> list[tuple[str, str]]:
    """``(key path, "<source>: <key path>: <sentence>")`` per error, unknown keys first (a
    typo shows up as an unknown key *and* a missing one: the unknown key says more)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    out = []
    for error in errors:
        path = key_path(tuple(error["loc"]), root)
        out.append((path, f"{source}: {path}: {describe_error(dict(error), root)}"))
    return out


def key_path(loc: tuple[Any, ...], root: type[BaseModel] | None = None) -> str:
    """``('tasks', 'vision', 'floor')`` -> ``tasks.vision.floor``; union tags left out."""
    parts = loc if root is None else _walk(loc, root)[0]
    return ".".join(_key_name(part) for part in parts) or "(root)"


def _key_name(part: Any) -> str:
    """A key as the path shows it; quoted when it would not read as one key (empty, blank,
    with a dot or spaces around it), so an odd key in a file is still named."""
    text = str(part)
    if isinstance(part, str) and (not text.strip() or "." in text or text != text.strip()):
        return repr(part)
    return text


def describe_error(error: dict[str, Any], root: type[BaseModel]) -> str:
    """One readable sentence for one pydantic error, including the allowed values."""
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _walk(tuple(error["loc"]), root)[1]
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; allowed keys here: {', '.join(allowed)}"
    if kind == "literal_error":
        return f"got {error.get('input')!r}; allowed: {ctx.get('expected')}"
    if kind == "union_tag_invalid":
        return f"got {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "missing":
        return "required key is missing"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in error and kind not in ("model_type", "dict_type"):
        return f"{message} (got {error['input']!r})"
    return message


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[Any], list[str]]:
    """The user's key path of ``loc`` (union tags dropped) and the keys the schema allows at
    the mapping that contains its last part."""
    shown: list[Any] = []
    model: Any = root
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(part)
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            shown.extend(parts)
            return shown, sorted(fields or {}) if not parts else []
        annotation = _unwrap(fields[part].annotation)
        if typing.get_origin(annotation) is dict:
            model = typing.get_args(annotation)[1]
            if parts:
                shown.append(parts.pop(0))  # the mapping key (a task or tier name)
            continue
        members = _models_of(annotation)
        if len(members) > 1 and parts:
            tagged = [m for m in members if _tag(m) == parts[0]]
            if tagged:
                parts.pop(0)  # the union tag pydantic puts in loc; not a key the user wrote
                model = tagged[0]
                continue
        model = members[0] if len(members) == 1 else annotation
    return shown, sorted(getattr(model, "model_fields", {}))


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _models_of(annotation: Any) -> list[Any]:
    """The pydantic models an annotation may hold (``X | None`` -> [X]; a union -> all)."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if hasattr(a, "model_fields")]
    return [annotation] if hasattr(annotation, "model_fields") else []


def _tag(model: Any) -> Any:
    field = model.model_fields.get("kind")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None
