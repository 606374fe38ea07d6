"""``cascade queue stats|ls|show|replay|purge``: operate a tier's outbox database.

Works on the database directly (a running tier is not needed, and may keep running: writes take
SQLite's write lock with ``BEGIN IMMEDIATE`` and the tier picks the changes up within
``outbox.idle_poll_s``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cascade.cli.common import console, fail, print_table
from cascade.errors import CascadeError

queue_app = typer.Typer(
    help="Inspect and operate a tier's durable outbox (escalations waiting for the upstream).\n\n"
    "Point it at a tier with --config edge_nodes/endpoint.yaml or --db sqlite:///var/endpoint.db.",
    no_args_is_help=True,
)

CONFIG_OPT = typer.Option(None, "--config", "-c", help="Node config YAML; its outbox_url is used.")
DB_OPT = typer.Option(None, "--db", help="Outbox database URL or SQLite file path.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of tables.")


class State(str, Enum):
    queued = "queued"
    forwarding = "forwarding"
    done = "done"
    expired = "expired"
    dead = "dead"


class _Target:
    def __init__(self, engine: Any, tier: str, settings: Any) -> None:
        self.engine, self.tier, self.settings = engine, tier, settings


@contextmanager
def _open(config: Path | None, db: str | None) -> Iterator[_Target]:
    """Open the outbox of ``--config`` or ``--db`` (never creating one); clean errors."""
    import sqlalchemy as sa

    from cascade.outbox.config import OutboxSettings
    from cascade.outbox.engine import create_outbox_engine, describe_storage_error, schema_present
    from cascade.tier.settings import load_node_settings

    if (config is None) == (db is None):
        fail("give exactly one of --config edge_nodes/<tier>.yaml or --db URL")
    try:
        if config is not None:
            node = load_node_settings(config)
            url, tier, settings = node.resolved_outbox_url, node.tier, node.outbox
        else:
            assert db is not None
            url = db if "://" in db else f"sqlite:///{db}"
            tier, settings = Path(db.rsplit("/", 1)[-1]).stem or "?", OutboxSettings()
        engine = create_outbox_engine(url, create_dirs=False, pool_size=1)
    except CascadeError as exc:
        fail(exc.message)
    if not schema_present(engine):
        fail(f"{engine.url.render_as_string(hide_password=True)} is not a cascade outbox "
             "(no cascade_outbox table), or it cannot be opened")
    try:
        yield _Target(engine, tier, settings)
    except sa.exc.SQLAlchemyError as exc:
        fail(f"outbox database error: {describe_storage_error(exc)}", 1)
    finally:
        engine.dispose()


def _write(target: _Target, kind: str, payloads: list[Any]) -> list[Any]:
    """Run one write handler in its own BEGIN IMMEDIATE transaction."""
    from cascade.outbox.engine import writer_connection
    from cascade.outbox.store import HeldCounters, OutboxWrites
    from cascade.outbox.writer import Batch

    writes = OutboxWrites(target.tier, target.settings, HeldCounters(), _NullStats())
    with writer_connection(target.engine) as conn, conn.begin():
        return writes.handlers()[kind](Batch(conn, time.time()), payloads)


class _NullStats(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> int:
        return 0


def _age(seconds: float | None) -> str:
    """A duration as 4.2s, 3.1m, 2.0h or 1.5d."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def _parse_duration(text: str, option: str = "--older-than") -> float:
    match = _DURATION.match(text.strip())
    if not match:
        fail(f"{option} {text!r}: use a number with s, m, h or d, e.g. 30m or 7d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


@queue_app.command("stats")
def stats(config: Path | None = CONFIG_OPT, db: str | None = DB_OPT,
          as_json: bool = JSON_OPT) -> None:
    """Rows and bytes per state, oldest waiting escalation, callbacks, and the caps.

    Example: cascade queue stats -c edge_nodes/endpoint.yaml
    """
    from rich.table import Table

    from cascade.outbox.views import read_stats

    with _open(config, db) as target, target.engine.connect() as conn:
        data = read_stats(conn)
    s = target.settings
    data["caps"] = {"max_rows": s.max_rows, "max_bytes": s.max_bytes}
    if as_json:
        console.print_json(data=data)
        return
    table = Table(title=f"outbox of {target.tier}", title_justify="left")
    for col in ("state", "rows", "bytes", "oldest"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for state, row in data["states"].items():
        table.add_row(state, str(row["rows"]), _bytes(row["bytes"]), _age(row["oldest_age_s"]))
    print_table(table)
    console.print(
        f"held against the caps: {data['held_rows']} / {s.max_rows} rows, "
        f"{_bytes(data['held_bytes'])} / {_bytes(s.max_bytes)}; oldest waiting: "
        f"{_age(data['oldest_live_age_s'])}", highlight=False)
    cb = data["callbacks"]
    console.print(f"callbacks: {cb['pending']} pending, {cb['delivered']} delivered, "
                  f"{cb['failed']} failed; results kept: {data['results']}", highlight=False)


@queue_app.command("ls")
def ls(
    state: list[State] = typer.Option([], "--state", "-s", help="Only these states (repeatable)."),
    task: str | None = typer.Option(None, help="Only this task."),
    limit: int = typer.Option(20, min=1, max=10_000, help="Rows to show."),
    newest: bool = typer.Option(False, help="Newest first (default: oldest first)."),
    config: Path | None = CONFIG_OPT, db: str | None = DB_OPT, as_json: bool = JSON_OPT,
) -> None:
    """List escalations, oldest first.

    Example: cascade queue ls -c edge_nodes/endpoint.yaml --state dead --limit 50
    """
    from rich.table import Table

    from cascade.outbox.views import escalation_view, list_rows

    with _open(config, db) as target, target.engine.connect() as conn:
        rows = list_rows(conn, states=tuple(s.value for s in state) or None, task=task,
                         limit=limit, oldest_first=not newest)
    if as_json:
        console.print_json(data=[{"id": r.id, "task": r.task, **escalation_view(r, target.tier)}
                                 for r in rows])
        return
    if not rows:
        console.print("no escalations match")
        return
    now = time.time()
    table = Table(title=f"outbox of {target.tier}", title_justify="left")
    for col in ("id", "task", "state", "attempts", "age", "next try", "last error"):
        table.add_column(col, overflow="fold" if col == "last error" else "ellipsis")
    for r in rows:
        next_try = "-" if r.next_attempt_at is None else (
            "now" if r.next_attempt_at <= now else "in " + _age(r.next_attempt_at - now))
        table.add_row(r.id, r.task, r.state, f"{r.attempts}/{r.max_attempts}",
                      _age(now - r.created_at), next_try, (r.last_error or "")[:120])
    print_table(table)


@queue_app.command("show")
def show(request_id: str = typer.Argument(..., help="The request id."),
         config: Path | None = CONFIG_OPT, db: str | None = DB_OPT) -> None:
    """Everything about one request: escalation, latest answer, callback, body sent upstream.

    Example: cascade queue show 3f2a9c... -c edge_nodes/endpoint.yaml
    """
    from cascade.outbox.views import callback_view, escalation_view, read_row

    with _open(config, db) as target, target.engine.connect() as conn:
        box, result, cb = read_row(conn, request_id)
    if box is None and result is None:
        fail(f"no escalation or result with id {request_id!r} in the outbox of {target.tier}", 1)
    out: dict[str, Any] = {"id": request_id}
    if box is not None:
        out["escalation"] = escalation_view(box, target.tier)
        out["escalation"]["body"] = json.loads(box.body)
        out["escalation"]["hop_count"] = box.hop_count
        out["escalation"]["traceparent"] = box.traceparent
    if result is not None:
        out["answer"] = json.loads(result.response)
        out["computations"] = result.computations
    if cb is not None:
        out["callback"] = callback_view(cb)
    console.print_json(data=out)


@queue_app.command("replay")
def replay(
    request_id: str | None = typer.Argument(None, help="Replay this request's escalation."),
    dead: bool = typer.Option(False, "--dead", help="Replay every dead escalation."),
    expired: bool = typer.Option(False, "--expired", help="Replay every expired escalation."),
    ttl: str | None = typer.Option(None, "--ttl", help="The replayed rows' new time to live, "
                                   "e.g. 30m or 2d (default: the TTL each row was queued with)."),
    config: Path | None = CONFIG_OPT, db: str | None = DB_OPT,
) -> None:
    """Queue dead or expired escalations again (fresh TTL and attempts); re-arm a failed callback.

    Examples: cascade queue replay 3f2a9c... -c edge_nodes/endpoint.yaml
              cascade queue replay --dead -c edge_nodes/endpoint.yaml
              cascade queue replay --expired --ttl 1d -c edge_nodes/endpoint.yaml
    """
    ttl_s = _parse_duration(ttl, "--ttl") if ttl else None
    if ttl_s is not None and ttl_s <= 0:
        fail(f"--ttl {ttl!r}: a replayed escalation needs a time to live above zero")
    selectors: list[tuple[str, str, float | None]] = []
    if request_id:
        selectors.append(("id", request_id, ttl_s))
    if dead:
        selectors.append(("state", "dead", ttl_s))
    if expired:
        selectors.append(("state", "expired", ttl_s))
    if not selectors:
        fail("give an ID, --dead or --expired")
    with _open(config, db) as target:
        counts = _write(target, "replay", selectors)
    if request_id and counts[0] == 0:
        fail(f"{request_id!r} is not dead or expired (nor done with a failed callback) in the "
             f"outbox of {target.tier}; see `cascade queue show {request_id}`", 1)
    console.print(f"replayed {sum(counts)} escalation(s); the forwarder of {target.tier} sends "
                  "them when its upstream is reachable", highlight=False)


@queue_app.command("purge")
def purge(
    expired: bool = typer.Option(False, "--expired", help="Delete expired escalations."),
    dead: bool = typer.Option(False, "--dead", help="Delete dead escalations (not replayable "
                              "afterwards)."),
    done: bool = typer.Option(False, "--done", help="Delete delivered escalations' records."),
    older_than: str | None = typer.Option(None, help="Only rows last changed before this "
                                             "long ago, e.g. 1h, 7d."),
    dry_run: bool = typer.Option(False, help="Count, delete nothing."),
    config: Path | None = CONFIG_OPT, db: str | None = DB_OPT,
) -> None:
    """Delete finished escalations to free the outbox caps. Live rows are never purged.

    Example: cascade queue purge --expired -c edge_nodes/endpoint.yaml
    """
    import sqlalchemy as sa

    from cascade.outbox.tables import outbox

    states = tuple(s for s, on in (("expired", expired), ("dead", dead), ("done", done)) if on)
    if not states:
        fail("say what to purge: --expired, --dead and/or --done")
    age = _parse_duration(older_than) if older_than else None
    with _open(config, db) as target:
        if dry_run:
            cond: list[sa.ColumnElement[bool]] = [outbox.c.state.in_(states)]
            if age is not None:
                cond.append(outbox.c.updated_at <= time.time() - age)
            with target.engine.connect() as conn:
                n = conn.execute(sa.select(sa.func.count()).select_from(outbox).where(*cond)).scalar()
            console.print(f"would purge {n} escalation(s) ({', '.join(states)})")
            return
        (n,) = _write(target, "purge", [(states, age)])
    console.print(f"purged {n} escalation(s) ({', '.join(states)}) from the outbox of "
                  f"{target.tier}", highlight=False)
