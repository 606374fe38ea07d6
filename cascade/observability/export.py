"""Span exporters that never fail their caller, and the JSON-lines trace file format.

* :class:`GuardedSpanExporter` wraps any exporter (OTLP over HTTP or gRPC, the file exporter):
  it never raises, counts failed batches and spans, logs the first failure of an outage once
  (and the recovery once), and while the destination is down sheds batches for a growing
  cool-down instead of blocking the batch worker on retries.
* :class:`JsonLinesSpanExporter` appends one JSON object per span to a file, rotating it at a
  size cap, so an offline field site keeps its traces; ``cascade traces`` reads it back with
  :func:`read_span_records`.

Record format (one line per span)::

    {"trace_id": 32 hex, "span_id": 16 hex, "parent_id": 16 hex | null, "name": str,
     "kind": "SERVER"|"CLIENT"|"INTERNAL"|"PRODUCER"|"CONSUMER", "start_ns": int, "end_ns": int,
     "status": "UNSET"|"OK"|"ERROR", "service": str, "tier": str | null, "attrs": {...},
     "links": [{"trace_id", "span_id"}], "events": [{"name", "time_ns", "attrs"}]}
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("cascade.observability.telemetry")

DEFAULT_TRACE_FILE_MAX_BYTES: Final[int] = 64 * 1024 * 1024
"""A trace file is rotated to ``<name>.1`` (replacing the previous one) past this size."""

TRACE_FILE_SUFFIX: Final[str] = ".jsonl"

# Loggers of the OTLP exporters and of the batch processor. Their per-batch (and, when the
# queue is full, per-span) warnings are replaced by our once-per-outage line and counters.
_NOISY_LOGGERS: Final[tuple[str, ...]] = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)
_BATCH_LOGGER: Final[str] = "opentelemetry.sdk._shared_internal"

__all__ = [
    "DEFAULT_TRACE_FILE_MAX_BYTES",
    "ExportStats",
    "GuardedSpanExporter",
    "JsonLinesSpanExporter",
    "SpanRecord",
    "TraceFileError",
    "export_stats",
    "quiet_sdk_loggers",
    "read_span_records",
    "span_to_record",
    "trace_file_exporters",
]


@dataclass
class ExportStats:
    """What one exporter did since start; read by ``/metrics``."""

    name: str
    exported_spans: int = 0
    failed_batches: int = 0
    failed_spans: int = 0
    shed_spans: int = 0
    """Spans dropped without trying because the destination was known to be down."""


@dataclass
class _Registry:
    exporters: list[ExportStats] = field(default_factory=list)
    queue_dropped_spans: int = 0
    """Spans a batch processor dropped because its queue was full."""
    trace_files: list[JsonLinesSpanExporter] = field(default_factory=list)
    """The trace-file exporters of this process (their disk use is reported)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # What the wrapped exporter last logged, per worker thread (each batch processor has one).
    last_message: threading.local = field(default_factory=threading.local)


_REGISTRY = _Registry()


def trace_file_exporters() -> list[JsonLinesSpanExporter]:
    """The JSON-lines trace files this process writes."""
    return list(_REGISTRY.trace_files)


def export_stats() -> tuple[list[ExportStats], int]:
    """(per-exporter stats, spans dropped on full batch queues) of this process."""
    return list(_REGISTRY.exporters), _REGISTRY.queue_dropped_spans


class _SdkLogFilter(logging.Filter):
    """Swallows the SDK's repetitive export/queue warnings, keeping count and the last message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == _BATCH_LOGGER:
            if message.startswith(("Queue full", "Queue is full")):  # SDK wording varies
                _REGISTRY.queue_dropped_spans += 1
                return False
            return True
        _REGISTRY.last_message.text = message
        return False


_FILTER = _SdkLogFilter()


def quiet_sdk_loggers() -> None:
    """Install the filter on the SDK loggers (idempotent)."""
    for name in (*_NOISY_LOGGERS, _BATCH_LOGGER):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class GuardedSpanExporter(SpanExporter):
    """Make ``inner`` safe for the batch worker: never raise, count, log once, shed while down.

    After a failed batch the destination is considered down for ``cooldown_s`` (doubling per
    consecutive failure up to ``max_cooldown_s``); batches ending in that window are dropped
    and counted as shed, so a dead collector costs neither memory nor a blocked worker.
    """

    def __init__(
        self,
        inner: SpanExporter,
        name: str,
        *,
        destination: str = "",
        cooldown_s: float = 1.0,
        max_cooldown_s: float = 30.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.inner = inner
        self.destination = destination or name
        self.stats = ExportStats(name)
        self._cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._down_until = 0.0
        self._consecutive_failures = 0
        with _REGISTRY.lock:
            _REGISTRY.exporters.append(self.stats)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._consecutive_failures and self._clock() < self._down_until:
            self.stats.shed_spans += len(spans)
            return SpanExportResult.FAILURE
        _REGISTRY.last_message.text = ""
        try:
            result = self.inner.export(spans)
            detail = getattr(_REGISTRY.last_message, "text", "")
        except Exception as exc:  # noqa: BLE001 - an exporter must never take the worker down
            result, detail = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        if result is SpanExportResult.SUCCESS:
            self.stats.exported_spans += len(spans)
            if self._consecutive_failures:
                log.info(
                    "trace export to %s recovered after %d failed batch(es)",
                    self.destination, self._consecutive_failures,
                )
                self._consecutive_failures = 0
            return result
        self.stats.failed_batches += 1
        self.stats.failed_spans += len(spans)
        self._consecutive_failures += 1
        if self._consecutive_failures == 1:
            log.warning(
                "trace export to %s failing (%s); requests are unaffected, spans are dropped "
                "and counted in cascade_telemetry_spans_dropped_total until it recovers",
                self.destination, detail or "no detail from the exporter",
            )
        delay = min(self._max_cooldown_s, self._cooldown_s * 2 ** (self._consecutive_failures - 1))
        self._down_until = self._clock() + delay
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:  # noqa: BLE001
            return False

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception:
            log.debug("exporter %s failed to shut down", self.stats.name, exc_info=True)


# -- the JSON-lines trace file ------------------------------------------------------------------

SpanRecord = dict[str, Any]
"""One decoded line of a trace file (see the module docstring for its keys)."""


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_to_record(span: ReadableSpan) -> SpanRecord:
    """The JSON-lines record of one finished span."""
    ctx = span.context
    assert ctx is not None
    resource = span.resource.attributes
    parent = span.parent
    return {
        "trace_id": _hex(ctx.trace_id, 32),
        "span_id": _hex(ctx.span_id, 16),
        "parent_id": _hex(parent.span_id, 16) if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "service": resource.get("service.name"),
        "tier": resource.get("cascade.tier"),
        "attrs": dict(span.attributes or {}),
        "links": [
            {"trace_id": _hex(link.context.trace_id, 32), "span_id": _hex(link.context.span_id, 16)}
            for link in span.links
        ],
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attrs": dict(e.attributes or {})}
            for e in span.events
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to ``path`` as JSON lines; rotates to ``<path>.1`` past ``max_bytes``.

    Runs on the batch processor's worker thread. Errors (disk full, permissions) surface as a
    failed export, which :class:`GuardedSpanExporter` counts and logs once.
    """

    def __init__(self, path: Path | str, *, max_bytes: int = DEFAULT_TRACE_FILE_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.rotations = 0
        self.on_rotate: Any = None
        """Called with no argument after each rotation (the disk gauge counts evictions)."""
        self._lock = threading.Lock()
        with _REGISTRY.lock:
            _REGISTRY.trace_files.append(self)

    def disk_bytes(self) -> int:
        """Bytes of the trace file and its rotated copy."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + ".1")):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        payload = b"".join(orjson.dumps(span_to_record(s), default=str) + b"\n" for s in spans)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(payload) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self.rotations += 1
                if self.on_rotate is not None:
                    self.on_rotate()
            # O_APPEND: whole-batch writes from one process never interleave mid-line.
            with open(self.path, "ab") as out:
                out.write(payload)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        return None


class TraceFileError(Exception):
    """A trace file or directory cannot be read; the message says which and why."""


def _trace_files(path: Path) -> list[Path]:
    if not path.exists():
        raise TraceFileError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.name.endswith(TRACE_FILE_SUFFIX) or p.name.endswith(TRACE_FILE_SUFFIX + ".1"))
    )
    if not files:
        raise TraceFileError(
            f"{path}: no trace files (*{TRACE_FILE_SUFFIX}) in this directory; tiers write "
            "them when CASCADE_TRACE_DIR is set (the default in `cascade up`)"
        )
    return files


def _otlp_json_records(doc: dict[str, Any]) -> Iterator[SpanRecord]:
    """Records from one OTLP/JSON line (the Collector's file exporter writes these)."""
    for rs in doc.get("resourceSpans", []):
        rattrs = {a["key"]: _otlp_value(a.get("value", {})) for a in rs.get("resource", {}).get("attributes", [])}
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                yield {
                    "trace_id": s["traceId"].lower(),
                    "span_id": s["spanId"].lower(),
                    "parent_id": (s.get("parentSpanId") or "").lower() or None,
                    "name": s.get("name", ""),
                    "kind": str(s.get("kind", "SPAN_KIND_INTERNAL")).removeprefix("SPAN_KIND_"),
                    "start_ns": int(s["startTimeUnixNano"]),
                    "end_ns": int(s["endTimeUnixNano"]),
                    "status": str(s.get("status", {}).get("code", "STATUS_CODE_UNSET")).removeprefix("STATUS_CODE_"),
                    "service": rattrs.get("service.name"),
                    "tier": rattrs.get("cascade.tier"),
                    "attrs": {a["key"]: _otlp_value(a.get("value", {})) for a in s.get("attributes", [])},
                    "links": [{"trace_id": k["traceId"].lower(), "span_id": k["spanId"].lower()} for k in s.get("links", [])],
                    "events": [],
                }


def _otlp_value(value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in value:
            return value[key]
    if "intValue" in value:
        return int(value["intValue"])
    return None


_REQUIRED: Final[tuple[str, ...]] = ("trace_id", "span_id", "name", "start_ns", "end_ns")


def read_span_records(path: Path | str) -> tuple[list[SpanRecord], list[str]]:
    """All span records under ``path`` (a trace file or a directory of them).

    Returns ``(records, problems)``: unreadable lines are skipped and described in
    ``problems`` (a crash can leave a torn last line). Raises :class:`TraceFileError` when
    nothing usable is there at all: missing path, empty directory, or a file with no valid line.
    """
    records: list[SpanRecord] = []
    problems: list[str] = []
    for file in _trace_files(Path(path)):
        good = bad = 0
        first_bad = ""
        try:
            handle = open(file, "rb")  # noqa: SIM115 - closed by the `with` below
        except OSError as exc:
            raise TraceFileError(f"{file}: cannot read: {exc.strerror or exc}") from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    doc = orjson.loads(line)
                    if isinstance(doc, dict) and "resourceSpans" in doc:
                        batch = list(_otlp_json_records(doc))
                    elif isinstance(doc, dict) and all(k in doc for k in _REQUIRED):
                        batch = [doc]
                    else:
                        raise ValueError("not a span record")
                except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
                    bad += 1
                    first_bad = first_bad or f"line {number}: {exc}"
                    continue
                good += len(batch)
                records.extend(batch)
        if bad and not good:
            raise TraceFileError(
                f"{file}: not a cascade trace file ({bad} unreadable line(s); {first_bad})"
            )
        if bad:
            problems.append(f"{file}: skipped {bad} unreadable line(s) ({first_bad})")
    return records, problems
