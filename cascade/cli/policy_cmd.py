"""``cascade policy check|calibrate|replay``: validate, fit to a goal, and what-if a policy."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from cascade.cli.common import console, fail, print_json, print_table
from cascade.errors import CascadeError, PolicyError

policy_app = typer.Typer(
    help=(
        "Validate, calibrate and replay escalation policies (policies/*.yaml).\n\n"
        "Typical loop: `cascade policy calibrate --goal 'cloud<=10%' --out policies/new.yaml`, "
        "then `cascade policy replay policies/new.yaml` (exit 1 if a goal breaks), then copy it "
        "over the live file: running tiers reload it within a second."
    ),
    no_args_is_help=True,
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


GOAL_HELP = (
    "Operator goal, repeatable: [TASK:]METRIC OP VALUE. METRIC is accuracy (>=, of the whole "
    "cascade; VALUE may be 'top' or 'top-0.3%': relative to the top tier alone), cloud (<=, "
    "share of requests reaching the top tier) or escalation[.TIER] (<=, share of the requests "
    "reaching a tier that it escalates). Examples: 'accuracy>=0.99', 'cloud<=10%', "
    "'vision:escalation.endpoint<=0.2'."
)


def _load_manifest(models_dir: Path):  # type: ignore[no-untyped-def]
    from cascade.models.manifest import load_manifest

    try:
        return load_manifest(models_dir)
    except CascadeError as exc:
        fail(exc.message)


def _check_tasks(selected: list[str], available: list[str], what: str = "--task") -> list[str]:
    unknown = [t for t in selected if t not in available]
    if unknown:
        fail(f"{what}: unknown task {unknown[0]!r}; allowed: {', '.join(available)}")
    return selected or available


def _parse_goal_options(goal: list[str], tasks: list[str]):  # type: ignore[no-untyped-def]
    from cascade.policy.goals import GoalSyntaxError, parse_goals

    try:
        return parse_goals(goal, tasks)
    except GoalSyntaxError as exc:
        fail(f"--goal: {exc}")


def _command_line(goal: list[str], out: Path, models_dir: Path, signal: str, calibration: str,
                  per_class: bool, tasks: list[str], target: str = "correct") -> str:
    import shlex

    parts = ["cascade", "policy", "calibrate"]
    for g in goal:
        parts += ["--goal", g]
    parts += ["--signal", signal, "--calibration", calibration]
    if not per_class:
        parts.append("--no-per-class")
    if target != "correct":
        parts += ["--target", target]
    for t in tasks:
        parts += ["--task", t]
    if models_dir != Path("models"):
        parts += ["--models-dir", str(models_dir)]
    parts += ["--out", str(out)]
    return shlex.join(parts)


@policy_app.command("calibrate")
def calibrate(
    goal: list[str] = typer.Option(
        [], "--goal", "-g", help=GOAL_HELP + " Default: 'accuracy>=top' and 'cloud<=10%'."),
    out: Path = typer.Option(Path("policies/default.yaml"), help="Policy file to write."),
    base: Path | None = typer.Option(
        None, help="Policy whose other settings (deadlines, offline, queue, floor actions, "
        "decision log) to keep. Default: --out if it exists."),
    models_dir: Path = typer.Option(Path("models"), help="Models directory (manifest.json)."),
    signal: str = typer.Option(
        "auto", help="Confidence signal: max_prob, margin, entropy (classifiers); mean_logprob, "
        "min_logprob, field_mean_logprob, field_min_logprob, answer_logprob (generative "
        "tasks); or auto (per task, the one of its kind whose thresholds do best under 5-fold "
        "cross-validation on the calibration split)."),
    calibration: str = typer.Option(
        "auto", help="Confidence calibration per tier: temperature, isotonic, none, or auto "
        "(the lowest cross-validated calibration error)."),
    per_class: bool = typer.Option(
        True, help="Search per-class thresholds too (kept only where they beat the tier "
        "threshold under cross-validation)."),
    task: list[str] = typer.Option([], help="Only these tasks (default: every task in the "
                                   "manifest). Other tasks are kept from the base policy."),
    target: str = typer.Option(
        "correct", help="What the lower tiers' confidences are fitted to: correct (their "
        "answer is right) or agreement (their answer is the top tier's: an accuracy goal then "
        "bounds how often the cascade answers as the top tier would, so a weak tier cannot "
        "answer what the top tier also gets wrong; steadier held out when a tier is rarely "
        "right, and needs no labels beyond the top tier's answers)."),
    dry_run: bool = typer.Option(False, help="Print the result, write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (the fit of "
                                 "each task, what was written, which tiers watch it)."),
) -> None:
    """Fit calibration and thresholds to an operator goal (calibration split).

    Per task: runs every tier's model over the calibration split (never the
    test split), fits each tier's confidence calibration (so a confidence of
    0.9 means about 90% correct; the expected calibration error before and
    after is printed), then searches the per-tier thresholds, and per-class
    thresholds where a class needs them, that meet the goal with the fewest
    escalations. Prints the expected accuracy, the share answered per tier
    and the cloud share, and writes a policy YAML whose header says how and
    from what it was made. With budget goals only (cloud, escalation) it
    maximises accuracy within the budget.

    Exit code 0 when every task's goal is met on the split, 1 when one is
    not (nothing is written then), 2 on bad arguments.

    Examples:

      cascade policy calibrate                       # accuracy>=top, cloud<=10%

      cascade policy calibrate -g 'accuracy>=0.99' -g 'vision:cloud<=5%' \\
          --out policies/strict.yaml

      cascade policy calibrate -g 'escalation<=0.2' --signal margin --dry-run
    """
    import yaml

    from cascade.gating.gate import ALL_SIGNAL_NAMES
    from cascade.lab.fit import FitOptions, header_lines, policy_document
    from cascade.policy.calibration import METHODS

    if signal not in (*ALL_SIGNAL_NAMES, "auto"):
        fail(f"--signal {signal!r}: allowed: auto, {', '.join(ALL_SIGNAL_NAMES)}")
    if calibration not in (*METHODS, "auto"):
        fail(f"--calibration {calibration!r}: allowed: auto, {', '.join(METHODS)}")
    manifest = _load_manifest(models_dir)
    tasks = _check_tasks(task, list(manifest.tasks))
    goal = goal or ["accuracy>=top", "cloud<=10%"]
    goals = _parse_goal_options(goal, tasks)
    base_path = base or (out if out.is_file() else None)
    base_doc = _read_base(base_path)
    if target not in ("correct", "agreement"):
        fail(f"--target {target!r}: allowed: correct, agreement")
    options = FitOptions(signal=signal, calibration=calibration,  # type: ignore[arg-type]
                         per_class=per_class, target=target)  # type: ignore[arg-type]
    fits = [_fit_one(models_dir, name, list(manifest.tasks[name].tiers), goals[name], options,
                     (base_doc.get("tasks") or {}).get(name), quiet=as_json) for name in tasks]
    sections = {**(base_doc.get("tasks") or {}), **{f.task: f.section for f in fits}}
    doc = policy_document(out.stem, sections, base_doc)
    command = _command_line(goal, out, models_dir, signal, calibration, per_class, task, target)
    header = header_lines(command, models_dir, manifest.build_key, fits, options)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(doc, sort_keys=False, width=100,
                                                                default_flow_style=None)
    _validate_written(text, out)
    _write_and_report(fits, text, out, dry_run=dry_run, as_json=as_json)


def _fit_one(models_dir: Path, name: str, tiers: list[str], goals, options,  # type: ignore[no-untyped-def]
             base_section, *, quiet: bool):
    """Fit one task (calibration split), printing its table unless ``quiet``."""
    from cascade.lab.fit import fit_task

    try:
        with console.status(f"{name}: predicting the calibration split on {len(tiers)} "
                            "tiers, fitting calibration, searching thresholds"):
            fitted = fit_task(models_dir, name, tiers, goals, options, base_section)
    except CascadeError as exc:  # a model that fails its checksum, a missing split file
        fail(exc.message)
    if not quiet:
        _print_fit(fitted)
    return fitted


def _write_and_report(fits: list, text: str, out: Path, *,  # type: ignore[type-arg]
                      dry_run: bool, as_json: bool) -> None:
    """Write the policy when every goal is met (atomically), then say what happened: which
    goals were missed, and whether running tiers will load the file."""
    missed = [f for f in fits if not f.search.feasible]
    written = not dry_run and not missed
    if written:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)  # atomic: a running tier's watcher never reads half a file
    if as_json:
        from cascade.cli.policy_json import fit_summary

        print_json({"tasks": [fit_summary(f) for f in fits], "out": str(out), "written": written,
                    "watched_by": _watchers(), "policy": text if dry_run else None})
        raise typer.Exit(1 if missed else 0)
    for f in missed:
        console.print(f"[red]✗ {f.task}: goal {f.resolved_goals.describe()} cannot be met on the "
                      f"calibration split; closest: {'; '.join(f.search.violations)}. Relax the "
                      "goal (e.g. a larger cloud budget) or improve the lower tiers.[/]",
                      highlight=False)
    if dry_run:
        console.print(text, highlight=False, markup=False)
    elif missed:
        fail(f"{len(missed)} goal(s) not met; {out} not written", code=1)
    else:
        console.print(f"[green]wrote {out}[/]; {_who_picks_it_up(out)}", highlight=False)
    if missed:
        raise typer.Exit(1)


def _watchers() -> dict[str, str]:
    """Tier -> the policy file it watches, for the tiers of the local chain (their node
    configs and ``CASCADE_POLICY``), so a written file can say whether they will load it."""
    from cascade.deploy.supervisor import DEFAULT_CHAIN
    from cascade.tier.settings import load_node_settings

    watched = {}
    for config in DEFAULT_CHAIN:
        try:
            node = load_node_settings(config)
        except CascadeError:
            continue
        watched[node.tier] = str(node.policy)
    return watched


def _who_picks_it_up(out: Path) -> str:
    """Which running tiers load ``out`` (within a second), or which file they watch instead."""
    watched = _watchers()
    mine = [tier for tier, path in watched.items() if Path(path).resolve() == out.resolve()]
    if mine:
        return f"running tiers that use it ({', '.join(mine)}) pick it up within a second"
    if not watched:
        return "no local node config found; a tier uses it once its policy: key names it"
    files = sorted(set(watched.values()))
    return (f"the local chain's tiers watch {', '.join(files)}, not {out}: set policy: {out} "
            f"in their node configs (or CASCADE_POLICY={out}) for it to take effect")


def _read_base(path: Path | None) -> dict:  # type: ignore[type-arg]
    if path is None:
        return {}
    from cascade.policy import load_policy

    try:
        loaded = load_policy(path)
    except CascadeError as exc:
        fail(f"--base: {exc.message}")
    return loaded.policy.model_dump(mode="json", exclude_defaults=True)


def _print_fit(f) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    o = f.outcome
    resolved = f.resolved_goals.describe()
    if f.target == "agreement":
        resolved = f"{resolved} (accuracy: agreement with the top tier)"
    table = Table(title=f"{f.task}: goal {f.goals.describe()} → {resolved} "
                  f"({f.samples} calibration samples, signal {f.signal})", title_justify="left")
    for col in ("tier", "model", "alone acc.", "calibration", "ECE before → after (5-fold CV)",
                "threshold", "class thresholds", "answers here", "acc. of its answers",
                "escalates"):
        table.add_column(col, justify="left" if col in ("tier", "model", "calibration",
                                                         "class thresholds") else "right")
    for r in f.tiers:
        acc = o.answered_accuracy[r.tier]
        cal = r.fit.calibration
        how = "none" if cal is None else f"T={cal.temperature:.3f}" if not cal.curve \
            else f"isotonic ({len(cal.curve)} knots)"
        table.add_row(
            r.tier, r.model.split(":", 1)[-1], f"{r.accuracy_alone:.4f}", how,
            f"{r.fit.ece_before:.3f} → {r.fit.ece_after:.3f} "
            f"({r.fit.ece_cv['none']:.3f} → {r.fit.ece_cv[r.fit.method]:.3f})",
            f"{r.threshold:.4f}",
            ", ".join(f"{k}:{v:.3f}" for k, v in sorted(r.class_thresholds.items())) or "-",
            f"{o.answered_share[r.tier]:.1%}", "-" if math.isnan(acc) else f"{acc:.4f}",
            f"{o.escalation_rate[r.tier]:.1%}" if r is not f.tiers[-1] else "-",
        )
    print_table(table)
    oracle = f.oracle_escalations
    ratio = f" ({o.escalations_per_request / oracle:.1f}x the oracle router's {oracle:.3f})" \
        if oracle else ""
    mark = "[green]✓[/]" if f.search.feasible else "[red]✗[/]"
    console.print(
        f"{mark} {f.task}: expected accuracy {o.accuracy:.4f} (top tier alone "
        f"{f.tiers[-1].accuracy_alone:.4f}); cloud share {o.top_share:.1%}; "
        f"{o.escalations_per_request:.3f} escalations per request{ratio}", highlight=False)


def _validate_written(text: str, out: Path) -> None:
    """The file about to be written must load as a policy (a bug otherwise: say so plainly)."""
    from cascade.policy import load_policy_bytes

    try:
        load_policy_bytes(text.encode(), source=str(out))
    except CascadeError as exc:
        fail(f"the calibrated policy does not validate: {exc.message}")


# -- replay -------------------------------------------------------------------------------------


@policy_app.command("replay")
def replay(
    candidate: Path = typer.Argument(..., help="The policy to try (YAML)."),
    live: Path = typer.Option(Path("policies/default.yaml"), help="The live policy to compare with."),
    log: list[Path] = typer.Option(
        [], help="Decision log SQLite file(s) (var/decisions-<tier>.db), repeatable. Without "
        "--log the held-out split is replayed."),
    split: str = typer.Option("test", help="Split to replay without --log: test or calibration."),
    models_dir: Path = typer.Option(Path("models"), help="Models directory (for --split)."),
    goal: list[str] = typer.Option(
        [], "--goal", "-g", help=GOAL_HELP + " Default: the candidate's own `goals:`."),
    task: list[str] = typer.Option([], help="Only these tasks."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document per task (JSON "
                                 "lines): live and candidate numbers, changed answers, goals."),
) -> None:
    """What-if: re-decide traffic under a candidate policy, no model run.

    Prints, side by side with the live policy: escalation rate per tier,
    share answered per tier, cloud share, escalations per request, accuracy
    where labels are known (the split, or a log's true_label column),
    agreement with the top tier where its answer is known, and how many
    answers change. With decision logs, decisions the live policy made are
    re-derived and must match (printed as "reproduced"); requests the
    candidate escalates beyond what was recorded are "unresolved" and count
    as reaching the cloud for the budget check.

    Exit code 0 when the candidate meets every goal, 1 when it breaks one
    (use it to gate a policy change in CI), 2 on bad input. A goal that
    cannot be measured (accuracy without labels) is reported, not failed.

    Examples:

      cascade policy replay policies/new.yaml                      # test split, its own goals

      cascade policy replay policies/new.yaml -g 'cloud<=5%' \\
          --log var/decisions-endpoint.db --log var/decisions-edge-node.db \\
          --log var/decisions-edge-server.db --log var/decisions-cloud.db
    """
    from cascade.policy import load_policy

    try:
        cand = load_policy(candidate)
        live_policy = load_policy(live)
    except CascadeError as exc:
        fail(exc.message)
    if split not in ("test", "calibration"):
        fail(f"--split {split!r}: allowed: test, calibration")
    traffic, source, goals = _replay_traffic(log, live_policy, cand, task, split, models_dir,
                                             goal)
    if not as_json:
        console.print(f"Replaying {source}: live {live} ({live_policy.version}) vs candidate "
                      f"{candidate} ({cand.version})", highlight=False)
    broken = 0
    for name, tt in traffic.items():
        try:
            broken += _replay_one(name, tt, live_policy, cand, goals[name], as_json)
        except CascadeError as exc:
            fail(exc.message)
    if as_json:
        raise typer.Exit(1 if broken else 0)
    if broken:
        console.print(f"[red]✗ the candidate breaks {broken} goal(s)[/]")
        raise typer.Exit(1)
    console.print("[green]✓ the candidate meets every stated goal[/]")


def _replay_traffic(log: list[Path], live_policy, cand, task: list[str],  # type: ignore[no-untyped-def]
                    split: str, models_dir: Path, goal: list[str]):
    """The traffic to replay (decision logs or a held-out split), where it came from, the goals."""
    from cascade.lab.replay import traffic_from_logs, traffic_from_split

    missing = [p for p in log if not p.is_file()]
    if missing:
        fail(f"--log {missing[0]}: no such decision log file")
    try:
        if log:
            traffic = traffic_from_logs(log, live_policy, task or None)
            if not traffic:
                fail(f"no recorded decisions{' for ' + ', '.join(task) if task else ''} in "
                     f"{', '.join(map(str, log))} (is decision_log.sample_rate > 0?)")
            source = f"{sum(len(t.requests) for t in traffic.values())} recorded requests from " \
                     f"{len(log)} decision log(s)"
        else:
            manifest = _load_manifest(models_dir)
            names = _check_tasks(task, [t for t in manifest.tasks if t in live_policy.policy.tasks])
            with console.status(f"predicting the {split} split"):
                traffic = {t: traffic_from_split(models_dir, t, list(manifest.tasks[t].tiers), split)
                           for t in names}
            source = f"the {split} split of {models_dir}"
        goals = _parse_goal_options(goal, list(traffic)) if goal else {
            t: cand.task(t).goals for t in traffic}
    except CascadeError as exc:
        fail(exc.message)
    return traffic, source, goals


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.4f}"


def _replay_one(name: str, traffic, live, cand, goals,  # type: ignore[no-untyped-def]
                as_json: bool = False) -> int:
    from rich.table import Table

    from cascade.lab.replay import changed_answers, replay_task
    from cascade.policy.goals import check_goals

    a, b = replay_task(traffic, live), replay_task(traffic, cand)
    tiers = traffic.tiers
    checks = check_goals(goals, accuracy=b.accuracy, cloud_share=b.cloud_share_upper,
                         escalation_rate={t: b.escalation_rate(t) for t in tiers},
                         top_tier=tiers[-1], top_accuracy=a.top_accuracy)
    if as_json:
        from cascade.cli.common import print_json_lines
        from cascade.cli.policy_json import replay_summary

        print_json_lines([replay_summary(name, a, b, list(tiers), checks,
                                         *changed_answers(a, b))])
        return sum(c.met is False for c in checks)
    table = Table(title=f"{name}: {a.requests} requests", title_justify="left")
    for col in ("", "live", "candidate"):
        table.add_column(col, justify="left" if not col else "right")
    for t in tiers[:-1]:
        table.add_row(f"escalation rate {t}", _fmt(a.escalation_rate(t), True),
                      _fmt(b.escalation_rate(t), True))
    for t in tiers:
        table.add_row(f"answered by {t}", _fmt(a.answered[t] / a.requests, True),
                      _fmt(b.answered[t] / b.requests, True))
    table.add_row("cloud share", _fmt(a.cloud_share, True), _fmt(b.cloud_share, True))
    table.add_row("escalations per request", f"{a.escalations_per_request:.3f}",
                  f"{b.escalations_per_request:.3f}")
    table.add_row("accuracy (labelled)", _fmt(a.accuracy), _fmt(b.accuracy))
    table.add_row("agreement with the top tier", _fmt(a.agreement_with_top), _fmt(b.agreement_with_top))
    if a.unresolved or b.unresolved:
        table.add_row("unresolved (beyond the log)", str(a.unresolved), str(b.unresolved))
    print_table(table)
    changed, both = changed_answers(a, b)
    notes = [f"answers changed by the candidate: {changed} of {both}"]
    if a.compared:
        notes.append(f"live decisions reproduced: {a.compared - a.mismatched} of {a.compared}")
    if a.top_accuracy is not None:
        notes.append(f"top tier alone: {a.top_accuracy:.4f}")
    console.print("; ".join(notes), highlight=False)
    if a.mismatched:
        console.print(f"[yellow]warning: {a.mismatched} recorded decisions differ from a replay under "
                      "the same policy version (were the models changed?)[/]")
    if not checks:
        console.print(f"{name}: no goals stated (pass --goal or add `goals:` to the candidate)")
    for c in checks:
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]?[/]"}[c.met]
        note = " (not measurable on this traffic)" if c.met is None else ""
        console.print(f"  {mark} {name}: {c.goal}: {c.measured}{note}", highlight=False)
    return sum(c.met is False for c in checks)
