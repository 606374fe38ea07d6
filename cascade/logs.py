"""Structured logs: one JSON object per line, carrying the current trace and span ids.

Every tier logs to stderr (``cascade up`` sends each tier's stream to ``var/logs/<tier>.log``).
A line looks like::

    {"ts": "2026-01-02T03:04:05.678Z", "level": "info", "logger": "cascade.access",
     "tier": "endpoint", "msg": "POST /v1/infer 200", "trace_id": "4bf9...", "span_id": "00f0...",
     "method": "POST", "route": "/v1/infer", "code": 200, "duration_ms": 1.42, "task": "vision",
     "status": "final", "answered_by": "edge-node", "decision": "escalate", "request_id": "..."}

Request lines (logger ``cascade.access``) carry a fixed set of fields; bodies, inputs, labels'
inputs and headers are never logged. Other messages are whatever the code logs, plus ids.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Final, Literal

import orjson
from opentelemetry import trace

ACCESS_LOGGER: Final[str] = "cascade.access"
"""Logger of the one-line-per-request log (info level)."""

LogFormat = Literal["json", "text"]

__all__ = ["ACCESS_LOGGER", "JsonLogFormatter", "LogFormat", "configure_logging", "log_fields"]

_HANDLER_MARK: Final[str] = "_cascade_handler"


def log_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields attached with ``extra={"fields": {...}}``."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _trace_ids() -> tuple[str | None, str | None]:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class JsonLogFormatter(logging.Formatter):
    """Formats a record as one JSON line (see the module docstring)."""

    def __init__(self, tier: str | None = None) -> None:
        super().__init__()
        self.tier = tier

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ).replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "tier": self.tier,
            "msg": record.getMessage(),
        }
        trace_id, span_id = _trace_ids()
        if trace_id:
            line["trace_id"], line["span_id"] = trace_id, span_id
        line.update(log_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class _TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, still with the trace id."""

    def __init__(self, tier: str | None) -> None:
        super().__init__(f"%(asctime)s %(levelname)s %(name)s [{tier or '-'}] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in log_fields(record).items() if v is not None)
        trace_id, _ = _trace_ids()
        if trace_id and "trace_id" not in log_fields(record):
            extra = f"{extra} trace_id={trace_id}".strip()
        return f"{text} {extra}" if extra else text


def configure_logging(
    tier: str | None,
    level: str = "info",
    *,
    fmt: LogFormat = "json",
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log record (uvicorn's too) to ``stream`` (stderr) as JSON lines or text.

    Replaces a handler installed by an earlier call, so it is safe to call twice. Returns the
    handler (tests attach it to a buffer).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter(tier) if fmt == "json" else _TextFormatter(tier))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours (`uvicorn.run(log_config=None)` leaves them bare).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it
    return handler
