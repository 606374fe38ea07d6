"""Read-side of the outbox: what ``GET /v1/results/{id}`` and ``cascade queue`` show.

Plain functions over a connection; they never write, so they run on any pooled connection
(WAL readers do not wait for the writer).
"""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace
from typing import Any

import orjson
import sqlalchemy as sa

from cascade.outbox.tables import CALLBACK_STATES, HELD_STATES, STATES, callbacks, outbox, results


def iso(ts: float | None) -> str | None:
    """UNIX seconds as ISO-8601 UTC with milliseconds (``2025-01-31T12:00:00.000Z``)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def escalation_view(row: Any, tier: str) -> dict[str, Any]:
    """The contract's escalation state of one outbox row."""
    return {
        "state": row.state,
        "held_by": tier,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "handed_over": bool(row.handed_over),
        "last_error": row.last_error,
        "reason": row.reason,
        "queued_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "expires_at": iso(row.expires_at),
        "next_attempt_at": iso(row.next_attempt_at),
    }


def callback_view(row: Any) -> dict[str, Any]:
    """Delivery state of the callback of one request."""
    return {
        "url": row.url,
        "state": row.state,
        "attempts": row.attempts,
        "max_attempts": row.max_attempts,
        "last_error": row.last_error,
        "delivered_at": iso(row.delivered_at),
    }


_ESCALATION_COLS = ("state", "attempts", "max_attempts", "handed_over", "last_error", "reason",
                    "created_at", "updated_at", "expires_at", "next_attempt_at")
_CALLBACK_COLS = ("url", "state", "attempts", "max_attempts", "last_error", "delivered_at")

# One prebuilt query (the idempotency check runs it for every keyed request).
_RESULT_QUERY = (
    sa.select(results.c.response, results.c.request_hash, results.c.computations,
              outbox.c.id.label("o_id"), callbacks.c.id.label("c_id"),
              *[outbox.c[name].label(f"o_{name}") for name in _ESCALATION_COLS],
              *[callbacks.c[name].label(f"c_{name}") for name in _CALLBACK_COLS])
    .select_from(results.outerjoin(outbox, outbox.c.id == results.c.id)
                 .outerjoin(callbacks, callbacks.c.id == results.c.id))
    .where(results.c.id == sa.bindparam("id"))
)


def read_result(conn: sa.Connection, id_: str, tier: str) -> dict[str, Any] | None:
    """Latest answer for ``id_`` with its escalation and callback state, or None if unknown.

    Adds ``request_hash`` and ``computations`` under private keys (``_request_hash``,
    ``_computations``) for the idempotency check; the API strips them.
    """
    row = conn.execute(_RESULT_QUERY, {"id": id_}).first()
    if row is None:
        return None
    m = row._mapping
    body: dict[str, Any] = orjson.loads(row.response)
    body["escalation"] = None
    if m["o_id"] is not None:
        body["escalation"] = escalation_view(
            SimpleNamespace(**{name: m[f"o_{name}"] for name in _ESCALATION_COLS}), tier)
    if m["c_id"] is not None:
        body["callback"] = callback_view(
            SimpleNamespace(**{name: m[f"c_{name}"] for name in _CALLBACK_COLS}))
    body["_request_hash"] = row.request_hash
    body["_computations"] = row.computations
    return body


def next_due_at(conn: sa.Connection) -> float | None:
    """When the next live row becomes due (None when nothing is live)."""
    return conn.execute(sa.select(sa.func.min(outbox.c.next_attempt_at))).scalar()


def next_callback_due_at(conn: sa.Connection) -> float | None:
    """When the next pending callback becomes due."""
    return conn.execute(sa.select(sa.func.min(callbacks.c.next_attempt_at))).scalar()


def read_stats(conn: sa.Connection) -> dict[str, Any]:
    """Counts per state, bytes held, oldest live row, callbacks, results."""
    now = time.time()
    per_state = {s: {"rows": 0, "bytes": 0, "oldest_age_s": None} for s in STATES}
    for state, n, size, oldest in conn.execute(
        sa.select(outbox.c.state, sa.func.count(), sa.func.sum(outbox.c.size_bytes),
                  sa.func.min(outbox.c.created_at)).group_by(outbox.c.state)
    ):
        per_state[state] = {"rows": n, "bytes": int(size or 0),
                            "oldest_age_s": round(now - oldest, 3) if oldest else None}
    cb = dict.fromkeys(CALLBACK_STATES, 0)
    for state, n in conn.execute(sa.select(callbacks.c.state, sa.func.count())
                                 .group_by(callbacks.c.state)):
        cb[state] = n
    live_oldest = conn.execute(sa.select(sa.func.min(outbox.c.created_at))
                               .where(outbox.c.next_attempt_at.is_not(None))).scalar()
    return {
        "states": per_state,
        "held_rows": sum(per_state[s]["rows"] for s in HELD_STATES),
        "held_bytes": sum(per_state[s]["bytes"] for s in HELD_STATES),
        "oldest_live_age_s": round(now - live_oldest, 3) if live_oldest else None,
        "callbacks": cb,
        "results": conn.execute(sa.select(sa.func.count()).select_from(results)).scalar() or 0,
    }


def list_rows(
    conn: sa.Connection, *, states: tuple[str, ...] | None = None, task: str | None = None,
    limit: int = 20, oldest_first: bool = True,
) -> list[Any]:
    """Outbox rows for ``cascade queue ls``."""
    query = sa.select(outbox)
    if states:
        query = query.where(outbox.c.state.in_(states))
    if task:
        query = query.where(outbox.c.task == task)
    order = outbox.c.seq.asc() if oldest_first else outbox.c.seq.desc()
    return list(conn.execute(query.order_by(order).limit(limit)))


def read_row(conn: sa.Connection, id_: str) -> tuple[Any, Any, Any]:
    """(outbox row, results row, callback row) of one id; each may be None."""
    return (
        conn.execute(sa.select(outbox).where(outbox.c.id == id_)).first(),
        conn.execute(sa.select(results).where(results.c.id == id_)).first(),
        conn.execute(sa.select(callbacks).where(callbacks.c.id == id_)).first(),
    )
