"""Hard examples: inputs a tier found hard, labelled by the upper tier, kept for retraining.

Three reasons put an input here (``tasks.<task>.hard_examples`` of the policy says which):
``escalated`` (this tier escalated it and an upper tier answered), ``disagreed`` (a shadow
audit's upper tier gave another label than this tier's own answer) and ``low_confidence``
(answered here below the policy's ``confidence_floor``; audited for its label). The label is
always the upper tier's answer, never this tier's. Inputs are stored only when the policy says
``include_payloads: true``; otherwise the row keeps the input's sha256 (counting and
deduplication still work, retraining does not).

Writing reuses the decision log's buffered writer (:class:`~cascade.observability.decisionlog.
DecisionLog` over its own table): nothing on the request path beyond appending a tuple, a
bounded file (``max_rows``, oldest first), failures logged and counted, never raised.
``cascade examples export`` reads the file back into a dataset (:func:`export_examples`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cascade.observability.decisionlog import DecisionLog, LogTable, read_log

__all__ = ["EXAMPLES_PATH_ENV", "HardExample", "HardExampleStore", "export_examples",
           "input_sha256", "read_examples"]

log = logging.getLogger("cascade.observability.examples")

EXAMPLES_PATH_ENV: Final[str] = "CASCADE_EXAMPLES_PATH"

Reason = Literal["escalated", "disagreed", "low_confidence"]

_TABLE = LogTable("examples", """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    task TEXT NOT NULL,
    reason TEXT NOT NULL,          -- escalated | disagreed | low_confidence
    input_sha256 TEXT NOT NULL,
    payload TEXT,                  -- the input as JSON, only with include_payloads
    local_label TEXT,              -- what this tier's model said
    local_confidence REAL,
    label TEXT NOT NULL,           -- the upper tier's answer: the training label
    label_tier TEXT NOT NULL       -- which tier gave it
);
""", ("ts", "request_id", "tier", "task", "reason", "input_sha256", "payload", "local_label",
      "local_confidence", "label", "label_tier"))


def input_sha256(payload: Any) -> str:
    """The sha256 of an input (canonical JSON: sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class HardExample:
    """One hard example as this tier saw it."""

    request_id: str
    task: str
    reason: Reason
    payload: Any
    local_label: str | None
    local_confidence: float | None
    label: str
    label_tier: str


class HardExampleStore:
    """A tier's hard examples, following the live policy (one file per tier, opened when a task
    of the policy enables hard examples). :meth:`add` never blocks and never raises."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.log: DecisionLog | None = None
        self.kept: dict[str, dict[str, int]] = {}
        """Examples handed to the writer, per task and reason (for /metrics)."""

    def configure(self, policy: Any) -> None:
        """Open, switch or close the file to match the policy's ``hard_examples`` blocks."""
        enabled = [t.hard_examples for t in policy.policy.tasks.values()
                   if t.hard_examples.enabled]
        path = self._path(enabled[0].path) if enabled else None
        max_rows = max((h.max_rows for h in enabled), default=None)
        if self.log is not None and (path != self.log.path or max_rows != self.log.max_rows):
            self.log.close()
            self.log = None
        if path is not None and self.log is None:
            try:
                self.log = DecisionLog(path, table=_TABLE, max_rows=max_rows)
            except (OSError, sqlite3.Error) as exc:
                log.error("hard example store %s cannot be opened, not keeping any: %s",
                          path, exc)

    def _path(self, template: str) -> Path:
        return Path((os.environ.get(EXAMPLES_PATH_ENV) or template)
                    .replace("{tier}", self.tier)).expanduser()

    def add(self, example: HardExample, *, include_payload: bool) -> None:
        """Keep one example (its payload only with ``include_payload``)."""
        if self.log is None:
            return
        self.log.record((
            time.time(), example.request_id, self.tier, example.task, example.reason,
            input_sha256(example.payload),
            json.dumps(example.payload) if include_payload else None,
            example.local_label, example.local_confidence, example.label, example.label_tier))
        by_reason = self.kept.setdefault(example.task, {})
        by_reason[example.reason] = by_reason.get(example.reason, 0) + 1

    def flush(self) -> None:
        """Commit what has been added (tests, ``cascade examples export`` of a live tier)."""
        if self.log is not None:
            self.log.flush()

    def close(self) -> None:
        """Commit and close the file."""
        if self.log is not None:
            self.log.close()
            self.log = None


def read_examples(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Every row of the given example files as dicts (oldest first per file; read in short
    chunks, see :func:`~cascade.observability.decisionlog.read_log`)."""
    from cascade.errors import ConfigError

    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such hard example file", field="path")
        yield from read_log(path, _TABLE.name, "hard example file", field="path")


def export_examples(paths: Sequence[Path], out: Path, *, task: str | None = None,
                    reasons: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the examples of ``paths`` to ``out`` as a JSON-lines dataset, one
    ``{"task", "input", "label", "reason", "input_sha256", "tier"}`` per line, deduplicated by
    (task, input sha256) (the latest label wins). Rows without a payload cannot train and are
    counted, not written. Returns the counts."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    counts = {"rows": 0, "hash_only": 0, "duplicates": 0, "filtered": 0}
    for row in read_examples(paths):
        counts["rows"] += 1
        if (task is not None and row["task"] != task) or \
                (reasons is not None and row["reason"] not in reasons):
            counts["filtered"] += 1
            continue
        if row["payload"] is None:
            counts["hash_only"] += 1
            continue
        key = (row["task"], row["input_sha256"])
        counts["duplicates"] += key in latest
        latest[key] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, int] = {}
    with out.open("w") as f:
        for (name, digest), row in latest.items():
            f.write(json.dumps({"task": name, "input": json.loads(row["payload"]),
                                "label": row["label"], "reason": row["reason"],
                                "input_sha256": digest, "tier": row["tier"]}) + "\n")
            per_task[name] = per_task.get(name, 0) + 1
    return {**counts, "written": len(latest), "per_task": per_task, "out": str(out)}
