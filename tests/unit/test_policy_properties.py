"""Property-based tests of the policy loader: any YAML becomes a validated policy or a
:class:`PolicyError` that names the file and the key, never another exception.

Documents are drawn near the real thing (``policies/default.yaml`` with one to three edits:
a value replaced by any YAML value, a key removed, an unknown key added) and far from it
(any YAML value, any bytes). Hypothesis runs derandomized, so a failure replays.
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.errors import PolicyError
from cascade.policy import load_policy_bytes
from tests.helpers import REPO_ROOT

SOURCE = "site/policy.yaml"
DEFAULT = yaml.safe_load((REPO_ROOT / "policies/default.yaml").read_text())

PROPERTY = settings(derandomize=True, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path (mapping keys and list indexes) inside a parsed document."""
    out = [prefix] if prefix else []
    children = (node.items() if isinstance(node, dict)
                else enumerate(node) if isinstance(node, list) else ())
    for key, child in children:
        out.extend(_paths(child, (*prefix, key)))
    return out


@st.composite
def edited_default(draw: st.DrawFn) -> Any:
    """``policies/default.yaml`` with one to three random edits."""
    doc = yaml.safe_load(yaml.safe_dump(DEFAULT))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        holder = doc
        for key in parents:
            holder = holder[key]
        edit = draw(st.sampled_from(("replace", "remove", "add")))
        if edit == "replace":
            holder[last] = draw(yaml_values)
        elif edit == "remove" and isinstance(holder, dict):
            del holder[last]
        elif isinstance(holder, dict):
            holder[draw(st.text(min_size=1, max_size=10))] = draw(yaml_values)
    return doc


def load_or_refuse(raw: bytes) -> None:
    """Load ``raw``; a refusal must be a PolicyError naming the file (and the key when the
    YAML parsed); a policy that loads must give a gate rule and drift settings for every
    task and tier it lists."""
    try:
        loaded = load_policy_bytes(raw, source=SOURCE)
    except PolicyError as exc:
        assert exc.file == SOURCE and exc.message.startswith(f"{SOURCE}: "), exc.message
        if exc.key == "(root)":  # the document itself: not a mapping
            assert "must be a YAML mapping" in exc.message, exc.message
        elif exc.key is not None:  # None only for text that is not YAML
            assert f"{SOURCE}: {exc.key}: " in exc.message, (exc.key, exc.message)
        else:
            assert "not valid YAML" in exc.message or "cannot" in exc.message, exc.message
        return
    for task, task_policy in loaded.policy.tasks.items():
        for tier in task_policy.tiers:
            loaded.rule(task, tier)
            loaded.drift(task, tier)


@PROPERTY
@given(edited_default())
def test_an_edited_policy_loads_or_is_refused_naming_file_and_key(doc: Any) -> None:
    load_or_refuse(yaml.safe_dump(doc, allow_unicode=True).encode())


@PROPERTY
@given(yaml_values)
def test_any_yaml_value_loads_or_is_refused_naming_file_and_key(doc: Any) -> None:
    load_or_refuse(yaml.safe_dump(doc, allow_unicode=True).encode())


@PROPERTY
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_load_or_are_refused_naming_the_file(raw: bytes) -> None:
    load_or_refuse(raw)
