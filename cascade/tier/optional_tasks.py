"""Tasks a tier serves only when they are built: the node config's ``optional_tasks``.

The generative ``extraction`` task takes minutes to build (``cascade models build
--generative``) and needs a policy that covers it, so the default chain lists it as optional:
a tier serves it like any task of ``tasks`` when the models directory has it and the tier's
policy covers it at that tier, and skips it otherwise, saying why. ``cascade up`` decides from
the same settings whether to start the task's local model server.
"""

from __future__ import annotations

from pathlib import Path

from cascade.errors import CascadeError, ConfigError
from cascade.models.manifest import load_manifest
from cascade.policy import load_policy
from cascade.tier.settings import NodeSettings

__all__ = ["optional_task_gaps", "with_optional_tasks"]


def optional_task_gaps(settings: NodeSettings) -> dict[str, str]:
    """Why each optional task not served yet cannot be (task -> reason); empty when all can."""
    pending = {t: m for t, m in settings.optional_tasks.items() if t not in settings.tasks}
    if not pending:
        return {}
    try:
        manifest_tasks = set(load_manifest(Path(settings.models_dir)).tasks)
    except CascadeError as exc:
        return dict.fromkeys(pending, f"no models: {exc.message}")
    try:
        policy_tiers = {task: set(p.tiers) for task, p in
                        load_policy(settings.policy).policy.tasks.items()}
    except CascadeError as exc:
        return dict.fromkeys(pending, f"no policy: {exc.message}")
    gaps = {}
    for task in pending:
        if task not in manifest_tasks:
            gaps[task] = (f"{settings.models_dir}/manifest.json has no task {task!r} (build it: "
                          f"cascade models build --generative)")
        elif settings.tier not in policy_tiers.get(task, ()):
            gaps[task] = (f"policy {settings.policy} has no tasks.{task}.tiers.{settings.tier} "
                          f"(merge one: cascade policy calibrate --task {task} --base "
                          f"{settings.policy} --out {settings.policy})")
    return gaps


def with_optional_tasks(settings: NodeSettings) -> tuple[NodeSettings, dict[str, str]]:
    """``settings`` whose ``tasks`` include every optional task that can be served, and the
    reasons the others cannot."""
    gaps = optional_task_gaps(settings)
    added = {t: m for t, m in settings.optional_tasks.items()
             if t not in settings.tasks and t not in gaps}
    if not settings.tasks and not added:
        raise ConfigError(f"tier {settings.tier} has no task it can serve: only optional tasks, "
                          "none servable: " + "; ".join(f"{t}: {why}" for t, why in gaps.items()))
    if not added:
        return settings, gaps
    return settings.model_copy(update={"tasks": {**settings.tasks, **added}}), gaps
