"""``cascade audit report`` and ``cascade examples export``: field accuracy from shadow audits,
and the hard examples a tier kept, as a training dataset (``docs/field-operations.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cascade.cli.common import fail, print_json, print_table
from cascade.errors import CascadeError

audit_app = typer.Typer(help="Live field accuracy from shadow audits.", no_args_is_help=True)
examples_app = typer.Typer(help="Hard examples kept by tiers, for retraining.",
                           no_args_is_help=True)


@audit_app.command("report")
def report(
    url: str = typer.Option(..., help="A running tier (its /readyz is read)."),
    models_dir: Path = typer.Option(Path("models"), help="Models of the calibration split."),
    policy: Path | None = typer.Option(
        None, help="Policy to judge the calibration split with (default: the tier's live one, "
        "by the path its /readyz names)."),
    model_tier: str | None = typer.Option(
        None, help="Which ladder model the tier runs (default: the tier's own name)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Per task: the tier's live accuracy next to the calibration split's. Own answers: the
    agreement of the upper tier with the answers the tier gave itself (shadow audits, Wilson
    interval) vs the accuracy of the calibration samples its gate answers. Model, all
    traffic: audited answers and escalations weighted by their shares vs the model's accuracy
    on the whole split.

    A live estimate well below the calibration accuracy is the field telling you the model no
    longer sees the data it was trained for: export the hard examples and retrain.

    Examples:
      cascade audit report --url http://127.0.0.1:8101
      cascade audit report --url http://127.0.0.1:8101 --policy policies/default.yaml --json
    """
    import httpx

    from cascade.lab.field import calibration_accuracy
    from cascade.policy import load_policy

    try:
        ready = httpx.get(f"{url.rstrip('/')}/readyz", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"cannot read {url}/readyz: {exc}", 1)
    if "audit" not in ready:
        fail(f"{url} reports no audits (an older cascade?)", 1)
    tier = ready["tier"]
    rows: list[dict[str, Any]] = []
    try:
        live_policy = load_policy(policy or Path(ready["policy"]["path"]))
        for task, live in ready["audit"].items():
            offline = calibration_accuracy(models_dir, task, model_tier or tier, live_policy, tier)
            rows.append({"task": task, "tier": tier, "live": live, "calibration": offline})
    except CascadeError as exc:
        fail(exc.message)
    if as_json:
        print_json(rows)
        return
    _print_report(rows)


def _pct(value: float | None, interval: list[float] | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" + ("" if interval is None else f" ({interval[0]:.1%}..{interval[1]:.1%})")


def _print_report(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="field accuracy: live (shadow audits, escalations) vs the calibration "
                  "split", title_justify="left")
    for col in ("tier", "task", "audits", "own answers: live", "calibration",
                "model, all traffic: live", "calibration ", "alarm", "dropped"):
        table.add_column(col, justify="left" if col in ("tier", "task", "alarm") else "right")
    for row in rows:
        live, offline = row["live"], row["calibration"]
        counts, model = live.get("counts", {}), live.get("model_accuracy") or {}
        table.add_row(
            row["tier"], row["task"], str(live.get("audits", 0)),
            _pct(live.get("agreement"), live.get("interval")),
            f"{_pct(offline['accuracy'])} of {offline['answered']}",
            _pct(model.get("estimate"), model.get("interval")),
            _pct(offline["accuracy_all"]), "ON" if live.get("alarm") else "off",
            str(counts.get("dropped_budget", 0) + counts.get("dropped_queue_full", 0)))
    print_table(table)


@examples_app.command("export")
def export(
    stores: list[Path] = typer.Argument(..., help="Hard example files (var/examples-<tier>.db)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset to write (JSON lines)."),
    task: str | None = typer.Option(None, help="Only this task."),
    reason: list[str] = typer.Option(
        [], help="Only these reasons (escalated, disagreed, low_confidence); repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Write the hard examples of one or more tiers as a training dataset: one
    {"task", "input", "label", "reason", "input_sha256", "tier"} per line, labelled by the
    upper tier, deduplicated by input. Rows kept as hashes only (the policy's
    hard_examples.include_payloads was false) cannot train and are counted, not written.
    Retrain with `cascade models build --extra-data OUT`.

    Examples:
      cascade examples export var/examples-endpoint.db -o var/hard.jsonl
      cascade examples export var/examples-*.db -o var/hard.jsonl --task vision --reason disagreed
    """
    from cascade.observability.examples import export_examples

    allowed = {"escalated", "disagreed", "low_confidence"}
    if bad := [r for r in reason if r not in allowed]:
        fail(f"--reason {bad[0]!r} is not allowed; allowed: {', '.join(sorted(allowed))}")
    try:
        counts = export_examples(stores, out, task=task, reasons=reason or None)
    except CascadeError as exc:
        fail(exc.message)
    if as_json:
        print_json(counts)
        return
    typer.echo(f"wrote {counts['written']} examples to {out} ({counts['rows']} rows read, "
               f"{counts['hash_only']} without payload, {counts['duplicates']} duplicates, "
               f"{counts['filtered']} filtered out)")
