"""Operator policies: YAML schema, loading with file/key errors, calibration."""

from cascade.policy.loader import LoadedPolicy, load_policy, load_policy_bytes, parse_policy
from cascade.policy.schema import Policy, QueuePolicy, TaskPolicy, TierPolicy

__all__ = [
    "LoadedPolicy",
    "Policy",
    "QueuePolicy",
    "TaskPolicy",
    "TierPolicy",
    "load_policy",
    "load_policy_bytes",
    "parse_policy",
]
