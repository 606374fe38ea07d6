"""The ``cascade`` command: serve a tier, run the local chain, build models, tune policies.

Every sub-command has ``--help`` with examples. Heavy imports happen inside the commands so
that ``cascade --help`` is instant.
"""

from __future__ import annotations

import typer

from cascade.cli.disk_cmd import disk
from cascade.cli.field_cmd import audit_app, examples_app
from cascade.cli.policy_cmd import policy_app
from cascade.cli.queue_cmd import queue_app
from cascade.cli.run_cmd import register_run_commands
from cascade.cli.traces_cmd import traces
from cascade.cli.trust_cmd import certs_app, keys_app

app = typer.Typer(
    name="cascade",
    help=(
        "Hybrid edge-cloud cascade: confidence-gated model tiers from endpoint to cloud.\n\n"
        "Quick start: `cascade models build` then `cascade up`, then in another terminal "
        "`cascade infer documents 'Shares rose after the rate cut'`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_run_commands(app)
app.add_typer(policy_app, name="policy")
app.command("traces")(traces)
app.add_typer(queue_app, name="queue")
app.command("disk")(disk)
app.add_typer(audit_app, name="audit")
app.add_typer(examples_app, name="examples")
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")


def _register_optional() -> None:
    from cascade.cli.models_cmd import models_app

    app.add_typer(models_app, name="models")
    try:
        from cascade.cli.bench_cmd import bench
    except ImportError:  # pragma: no cover - during development only
        return
    app.command("bench")(bench)


_register_optional()


def main() -> None:
    """Entry point of the console script."""
    app()


__all__ = ["app", "main"]
