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


def _parse_targets(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        task, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[task] = float(value)
        except ValueError:
            fail(f"--target {item!r}: use TASK=ACCURACY, e.g. --target vision=0.995")
        if not 0.0 < out[task] <= 1.0:
            fail(f"--target {item!r}: accuracy must be in (0, 1]")
    return out


@policy_app.command("calibrate")
def calibrate(
    out: Path = typer.Option(Path("policies/default.yaml"), help="Policy file to write."),
    models_dir: Path = typer.Option(Path("models"), help="Models directory (manifest.json)."),
    target: list[str] = typer.Option(
        [], help="TASK=ACCURACY: accuracy that answers accepted at each tier must reach on the "
        "calibration split. Default: the top tier's own calibration accuracy."
    ),
    signal: str = typer.Option("max_prob", help="Confidence signal: max_prob, margin or entropy."),
    min_answered: int = typer.Option(10, help="A tier must answer at least this many "
                                     "calibration samples for its threshold to count."),
    dry_run: bool = typer.Option(False, help="Print the result, write nothing."),
) -> None:
    """Compute per-tier thresholds from held-out predictions for an operator goal.

    Runs every tier's model over the calibration split (never the test split), picks for each
    tier below the top the lowest threshold whose accepted answers meet the target accuracy,
    simulates the cascade, prints expected accuracy and share answered per tier, and writes a
    policy YAML whose header says how and from what it was made.

    Example: cascade policy calibrate --target vision=0.995 --target documents=0.99
    """
    import datetime

    import yaml
    from rich.table import Table

    from cascade.evaluation import predict_split
    from cascade.gate import SIGNAL_NAMES
    from cascade.models.manifest import load_manifest
    from cascade.policy.calibrate import simulate_cascade, threshold_for_accuracy

    if signal not in SIGNAL_NAMES:
        fail(f"--signal {signal!r}: allowed: {', '.join(SIGNAL_NAMES)}")
    targets = _parse_targets(target)
    try:
        manifest = load_manifest(models_dir)
    except Exception as exc:  # ModelError with a clear message
        fail(f"{exc} (run `cascade models build` first)")
    unknown = set(targets) - set(manifest.tasks)
    if unknown:
        fail(f"--target: unknown task {sorted(unknown)[0]!r}; allowed: {', '.join(manifest.tasks)}")
    policy: dict = {"version": 1, "name": out.stem, "tasks": {}}
    header = [
        f"Calibrated by `cascade policy calibrate` on {datetime.date.today().isoformat()}",
        f"from the calibration split of {models_dir}/manifest.json (build {manifest.build_key[:12]}),",
        f"signal {signal}, min {min_answered} answered per tier. Goal per task (accuracy of",
        "answers accepted at each tier) and the expected outcome on the calibration split:",
    ]
    for task, task_manifest in manifest.tasks.items():
        tiers = list(task_manifest.tiers)
        with console.status(f"{task}: predicting the calibration split on {len(tiers)} tiers"):
            labels, preds = predict_split(models_dir, task, tiers, "calibration")
        goal = targets.get(task, preds[tiers[-1]].accuracy)
        conf = [preds[t].confidences(signal) for t in tiers]  # type: ignore[arg-type]
        correct = [preds[t].correct for t in tiers]
        thresholds = [
            threshold_for_accuracy(c, ok, goal, min_answered=min_answered)
            for c, ok in zip(conf[:-1], correct[:-1])
        ] + [0.0]
        outcome = simulate_cascade(tiers, conf, correct, thresholds)
        policy["tasks"][task] = {
            "deadline_ms": 2000,
            "offline": "provisional",
            "queue": {"ttl_s": 86400, "max_attempts": 20},
            "tiers": {
                t: {"signal": signal, "threshold": round(th, 6)} for t, th in zip(tiers, thresholds)
            },
        }
        table = Table(title=f"{task}: target accuracy {goal:.4f} per tier "
                      f"({len(labels)} calibration samples)", title_justify="left")
        for col in ("tier", "threshold", "alone acc.", "answers", "acc. of its answers"):
            table.add_column(col, justify="right" if col != "tier" else "left")
        for t, th in zip(tiers, thresholds):
            a = outcome.answered_accuracy[t]
            table.add_row(t, f"{th:.4f}", f"{preds[t].accuracy:.4f}",
                          f"{outcome.answered_share[t]:.1%}", "-" if a != a else f"{a:.4f}")
        console.print(table)
        summary = (f"{task}: cascade accuracy {outcome.accuracy:.4f} vs top tier alone "
                   f"{preds[tiers[-1]].accuracy:.4f}; answered below the top "
                   f"{outcome.below_top_share:.1%}, top share {outcome.top_share:.1%}")
        console.print(summary, highlight=False)
        header.append(f"  {task}: target {goal:.4f}; {summary.split(': ', 1)[1]}")
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(policy, sort_keys=False)
    if dry_run:
        console.print(text, highlight=False, markup=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"[green]wrote {out}[/]")
