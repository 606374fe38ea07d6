"""Structured logs: one JSON object per line, carrying the current trace and span ids.

Every tier logs to stderr, or with ``log_file`` to that file, rotated within the tier's disk
share (:class:`RotatingLogFile`; ``cascade up`` sets ``var/logs/<tier>.log``). A line looks like::

    {"ts": "2026-01-02T03:04:05.678Z", "level": "info", "logger": "cascade.access",
     "tier": "endpoint", "msg": "POST /v1/infer 200", "trace_id": "4bf9...", "span_id": "00f0...",
     "method": "POST", "route": "/v1/infer", "code": 200, "duration_ms": 1.42, "task": "vision",
     "status": "final", "answered_by": "edge-node", "decision": "escalate", "request_id": "..."}

Request lines (logger ``cascade.access``) carry a fixed set of fields; bodies, inputs and
headers are never logged. Other messages are whatever the code logs, plus ids. Libraries that
log each call at info level (httpx's ``HTTP Request: POST ...`` for every escalation, watchfiles'
change events) are kept at warning, so a request leaves one line per tier; at
``log_level: debug`` (``CASCADE_LOG_LEVEL=debug``) they log everything.

Lines are written in batches: every ``flush_interval_s`` (0.25 s), when 256 are pending, and at
once for warnings and errors, so the one-line-per-request log costs no system call per request.
A crash can lose at most the last quarter second of info lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Final, Literal

import orjson
from opentelemetry import trace

ACCESS_LOGGER: Final[str] = "cascade.access"
"""Logger of the one-line-per-request log (info level)."""

LogFormat = Literal["json", "text"]

__all__ = [
    "ACCESS_LOGGER", "THIRD_PARTY_LOGGERS", "BatchingStreamHandler", "JsonLogFormatter",
    "LogFormat", "RotatingLogFile", "configure_logging", "current_handler", "log_fields",
]

_HANDLER_MARK: Final[str] = "_cascade_handler"

THIRD_PARTY_LOGGERS: Final[tuple[str, ...]] = ("httpx", "httpcore", "watchfiles")
"""Loggers kept at warning unless the tier logs at debug level (see the module docstring)."""


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
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        # One strftime per second, not per line: this runs once per request.
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self._timestamp(record.created),
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


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes formatted lines in batches (see the module docstring)."""

    max_pending = 256

    def __init__(self, stream: IO[str], flush_interval_s: float = 0.25) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._stop = threading.Event()
        if flush_interval_s > 0:
            threading.Thread(target=self._flush_every, args=(flush_interval_s,),
                             name="log-flusher", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called by Handler.handle() with self.lock held.
        try:
            self._pending.append(self.format(record))
            if record.levelno >= logging.WARNING or len(self._pending) >= self.max_pending:
                self._write_pending()
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)

    def _write_pending(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def flush(self) -> None:
        """Write what is pending now."""
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _flush_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream at exit: nothing to do
                pass

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


class RotatingLogFile(BatchingStreamHandler):
    """Batched lines appended to ``path``, rotated to ``path.1`` .. ``path.<backups>`` (the
    oldest dropped) before the current file would pass ``max_bytes``.

    The tier writes its own file rather than the supervisor rotating its redirected output: a
    file the child holds open can only be rotated from outside by copying and truncating it,
    which loses lines written in between, and a ``cascade serve`` under systemd or Docker gets
    the same bound. File descriptors 1 and 2 follow the current file, so what bypasses logging
    (a crash's traceback, a library printing) lands in it too and is rotated with it.
    """

    def __init__(self, path: Path, *, max_bytes: int, backups: int = 2,
                 flush_interval_s: float = 0.25, own_std_fds: bool = True) -> None:
        """``own_std_fds``: point file descriptors 1 and 2 at the current file (a tier process;
        not a test runner sharing the process)."""
        self.path = Path(path)
        self.own_std_fds = own_std_fds
        self.max_bytes = max(4096, max_bytes)
        self.backups = backups
        self.rotations = 0
        self.on_rotate: Any = None
        """Called with no argument after each rotation (the disk gauge counts evictions)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(self._open(), flush_interval_s)

    def _open(self) -> IO[str]:
        stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed on rotation
        for fd in (1, 2) if self.own_std_fds else ():
            try:
                os.dup2(stream.fileno(), fd)
            except OSError:  # pragma: no cover - no such descriptor in an embedded interpreter
                pass
        return stream

    def files(self) -> list[Path]:
        """The current file and its rotated copies."""
        return [self.path, *(self.path.with_name(f"{self.path.name}.{i}")
                             for i in range(1, self.backups + 1))]

    def disk_bytes(self) -> int:
        """Bytes of the current file and its rotated copies."""
        total = 0
        for path in self.files():
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def _write(self, text: str) -> None:
        data_len = len(text.encode("utf-8", "replace"))
        if self.stream.tell() + data_len > self.max_bytes and self.stream.tell() > 0:
            self._rotate()
        super()._write(text)

    def _rotate(self) -> None:
        self.stream.close()
        files = self.files()
        for older, newer in zip(reversed(files[1:]), reversed(files[:-1])):
            if newer.exists():
                os.replace(newer, older)
        self.stream = self._open()
        self.rotations += 1
        if self.on_rotate is not None:
            self.on_rotate()


def current_handler() -> BatchingStreamHandler | None:
    """The handler :func:`configure_logging` installed, if any."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return handler  # type: ignore[return-value]
    return None


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
    flush_interval_s: float = 0.25,
    file: Path | None = None,
    file_max_bytes: int = 64 * 1024 * 1024,
    file_backups: int = 2,
) -> BatchingStreamHandler:
    """Send every log record (uvicorn's too) to ``stream`` (stderr), or to ``file`` rotated at
    ``file_max_bytes`` with ``file_backups`` copies, as JSON lines or text.

    Replaces a handler installed by an earlier call, so it is safe to call twice. Returns the
    handler (call its ``flush()`` to write pending lines now).
    """
    for old in [h for h in logging.getLogger().handlers if getattr(h, _HANDLER_MARK, False)]:
        logging.getLogger().removeHandler(old)
        old.close()
    handler: BatchingStreamHandler
    if file is not None:
        handler = RotatingLogFile(file, max_bytes=file_max_bytes, backups=file_backups,
                                  flush_interval_s=flush_interval_s)
    else:
        handler = BatchingStreamHandler(stream or sys.stderr, flush_interval_s)
    handler.setFormatter(JsonLogFormatter(tier) if fmt == "json" else _TextFormatter(tier))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    root.addHandler(handler)
    # Lines never show thread or process names: don't pay for looking them up per record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours (`uvicorn.run(log_config=None)` leaves them bare).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our access line replaces it
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if level.lower() == "debug"
                                         else logging.WARNING)
    return handler
