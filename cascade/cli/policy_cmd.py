"""``cascade policy check|calibrate``."""

from __future__ import annotations

from pathlib import Path

import typer

from cascade.cli.common import console, fail
from cascade.errors import PolicyError

policy_app = typer.Typer(
    help="Validate and calibrate escalation policies (policies/*.yaml).", no_args_is_help=True
)


@policy_app.command("check")
def check(files: list[Path] = typer.Argument(..., help="Policy YAML files to validate.")) -> None:
    """Validate policy files; every error names the file, the key path and what is allowed.

    Exit code 0 when all are valid, 2 otherwise. Example: cascade policy check policies/*.yaml
    """
    from cascade.policy import load_policy

    bad = 0
    for path in files:
        try:
            loaded = load_policy(path)
        except PolicyError as exc:
            bad += 1
            console.print(f"[red]✗[/] {exc.message}", highlight=False)
            continue
        tasks = ", ".join(
            f"{task} ({len(tp.tiers)} tiers)" for task, tp in loaded.policy.tasks.items()
        )
        console.print(f"[green]✓[/] {path}: policy {loaded.policy.name!r} version "
                      f"{loaded.version}: {tasks}", highlight=False)
    if bad:
        fail(f"{bad} of {len(files)} policy files invalid")
