"""Tracing setup of a tier process: the OpenTelemetry SDK configured by the standard variables.

Environment (read once at start by :func:`setup_tracing`):

* ``OTEL_SDK_DISABLED=true``: no tracing at all (trace ids still flow between tiers).
* ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none`` (comma-separated). Unset: ``otlp``
  if an OTLP endpoint is set, else none; the trace file (``CASCADE_TRACE_DIR``) is independent.
* ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf`` (default) or ``grpc``.
* ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_HEADERS``, ``_TIMEOUT``, ``_COMPRESSION``,
  ``_CERTIFICATE``, ``OTEL_EXPORTER_OTLP_INSECURE`` (gRPC): read by the OTLP exporters.
* ``OTEL_SERVICE_NAME`` (default ``cascade-<tier>``), ``OTEL_RESOURCE_ATTRIBUTES``.
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: default ``cascade`` (see
  :class:`CascadeRootSampler`: every escalation, "unknown" answer, server error and queue drain,
  plus ``OTEL_TRACES_SAMPLER_ARG`` (default 0.01) of the requests a tier answers on its own,
  parent-based below a caller's decision); any standard SDK sampler name works too
  (``parentbased_always_on`` traces everything).
* ``CASCADE_TRACE_ROUTINE_PER_S``: with the ``cascade`` sampler, at most this many of those
  routine traces per second (default 10; ``none``: no cap), so their cost stays bounded however
  busy the tier is.
* ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``.
* ``OTEL_PROPAGATORS`` (default ``tracecontext,baggage``).

Each destination gets its own ``BatchSpanProcessor`` (no exporter I/O on the request path)
behind :class:`~cascade.observability.export.GuardedSpanExporter`, so an unreachable collector is counted
and logged once, never raised. CLIENT spans of upstream calls come from
``opentelemetry-instrumentation-httpx``; :func:`upstream_attempt` numbers them.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

from cascade.errors import ConfigError
from cascade.observability.export import TRACE_FILE_SUFFIX

log = logging.getLogger("cascade.observability.telemetry")

__all__ = [
    "DEFAULT_ROUTINE_PER_S", "DEFAULT_SAMPLE_RATIO", "HONOURED_ENV", "ROUTINE_CAP_VAR",
    "SAMPLING_REASON", "CascadeRootSampler", "CascadeSampler", "RateCap", "Tracing", "TracingConfig",
    "build_tracer_provider", "cascade_sampler", "fastapi_options", "instrument_httpx",
    "setup_tracing", "upstream_attempt",
]

HONOURED_ENV: Final[tuple[str, ...]] = (
    "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_PROPAGATORS",
    "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_EXPORT_TIMEOUT", "OTEL_SEMCONV_STABILITY_OPT_IN",
)
"""The OpenTelemetry variables a tier honours (docs and the compose test check against it)."""

DEFAULT_EXPORT_BATCH_SIZE: Final[int] = 64
"""Spans per export batch unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says otherwise."""

DEFAULT_SAMPLE_RATIO: Final[float] = 0.01
"""Share of locally answered requests the ``cascade`` sampler keeps when no ratio is given."""

DEFAULT_ROUTINE_PER_S: Final[float] = 10.0
"""At most this many routine traces per second per tier (``CASCADE_TRACE_ROUTINE_PER_S``).

A sampled routine answer costs the tier about 0.4 ms of CPU (three spans and their export,
``benchmarks/bench_tracing.py``): 10 per second is at most ~0.5% of a core at any load, while a
quiet tier (under 1,000 requests/s) still gets its full ratio. Without a cap, 1% of a busy
endpoint's answers are also its slowest 1%, which is its p99."""
ROUTINE_CAP_VAR: Final[str] = "CASCADE_TRACE_ROUTINE_PER_S"

_EXPORTERS: Final[frozenset[str]] = frozenset({"otlp", "console", "none"})
_PROTOCOLS: Final[frozenset[str]] = frozenset({"http/protobuf", "grpc"})


@dataclass(frozen=True)
class TracingConfig:
    """Where a tier's spans go, decided from the environment and ``CASCADE_TRACE_DIR``."""

    tier: str
    enabled: bool = True
    exporters: tuple[str, ...] = ()
    """Subset of ``otlp``, ``console``."""
    otlp_protocol: str = "http/protobuf"
    otlp_endpoint: str | None = None
    trace_file: Path | None = None
    sampler: str = "cascade"
    """``cascade`` (ours) or a name the SDK knows (``OTEL_TRACES_SAMPLER``)."""
    sample_ratio: float = DEFAULT_SAMPLE_RATIO
    """Ratio of the ``cascade`` sampler (``OTEL_TRACES_SAMPLER_ARG``)."""
    routine_per_s: float | None = DEFAULT_ROUTINE_PER_S
    """Cap of the ``cascade`` sampler's routine traces per second (None: no cap)."""
    trace_file_max_bytes: int | None = None
    """Rotate the trace file past this size (None: the exporter's default)."""

    @property
    def active(self) -> bool:
        """True when spans are made and go somewhere."""
        return self.enabled and bool(self.exporters or self.trace_file)

    @classmethod
    def from_env(
        cls, tier: str, *, trace_dir: Path | None = None, environ: Mapping[str, str] | None = None
    ) -> TracingConfig:
        """Validate the ``OTEL_*`` variables; raises :class:`ConfigError` naming the bad one."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(tier, enabled=False)
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        raw = env.get("OTEL_TRACES_EXPORTER")
        if raw is None:
            names = ["otlp"] if endpoint else []
        else:
            names = [n.strip().lower() for n in raw.split(",") if n.strip()]
            for name in names:
                if name not in _EXPORTERS:
                    raise ConfigError(
                        f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; allowed: "
                        f"{', '.join(sorted(_EXPORTERS))}", field="OTEL_TRACES_EXPORTER",
                    )
        exporters = tuple(n for n in dict.fromkeys(names) if n != "none")
        var = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" in env
               else "OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = env.get(var, "http/protobuf").strip().lower()
        if protocol not in _PROTOCOLS:
            raise ConfigError(
                f"{var}: {protocol!r} is not supported; allowed: {', '.join(sorted(_PROTOCOLS))}",
                field=var,
            )
        trace_file = Path(trace_dir) / f"{tier}{TRACE_FILE_SUFFIX}" if trace_dir else None
        sampler = (env.get("OTEL_TRACES_SAMPLER") or "cascade").strip().lower()
        ratio = DEFAULT_SAMPLE_RATIO
        if sampler == "cascade":
            raw_ratio = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
            try:
                ratio = float(raw_ratio) if raw_ratio else DEFAULT_SAMPLE_RATIO
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(
                    f"OTEL_TRACES_SAMPLER_ARG: {raw_ratio!r} is not a ratio between 0 and 1 "
                    "(the share of locally answered requests to trace)",
                    field="OTEL_TRACES_SAMPLER_ARG",
                )
        return cls(tier, True, exporters, protocol, endpoint, trace_file, sampler, ratio,
                   _routine_cap(env))


def _routine_cap(env: Mapping[str, str]) -> float | None:
    raw = env.get(ROUTINE_CAP_VAR, "").strip().lower()
    if not raw:
        return DEFAULT_ROUTINE_PER_S
    if raw == "none":
        return None
    try:
        cap = float(raw)
    except ValueError:
        cap = -1.0
    if not 0.0 <= cap < float("inf"):
        raise ConfigError(
            f"{ROUTINE_CAP_VAR}: {raw!r} is not a number of traces per second >= 0, or 'none' "
            "(the cap on routine traces per second)", field=ROUTINE_CAP_VAR)
    return cap


def _resource_attributes(tier: str, env: Mapping[str, str]) -> dict[str, str]:
    attrs = {"cascade.tier": tier, "service.namespace": "cascade"}
    # Resource.create lets explicit attributes win over the environment: name the service
    # only when the operator did not.
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = f"cascade-{tier}"
    return attrs


def _otlp_exporter(config: TracingConfig) -> Any:
    """The OTLP exporter for the configured protocol; it reads endpoint, headers... from env."""
    import importlib

    # Imported on demand: gRPC pulls in grpcio, which an HTTP-only tier never needs.
    module = importlib.import_module(
        f"opentelemetry.exporter.otlp.proto.{'grpc' if config.otlp_protocol == 'grpc' else 'http'}"
        ".trace_exporter"
    )
    try:
        return module.OTLPSpanExporter()
    except Exception as exc:  # noqa: BLE001 - bad certificate path, malformed headers...
        raise ConfigError(f"cannot set up the OTLP trace exporter: {exc}") from None


SAMPLING_REASON: Final[str] = "cascade.sampling.reason"
"""Attribute the ``cascade`` sampler puts on every trace root it keeps, saying why:
``escalate``, ``unknown``, ``error``, ``drain`` or ``routine`` (the ratio sample)."""


class CascadeRootSampler(Sampler):
    """Which new traces to keep: what an SRE chases, plus a sample of the routine.

    Always kept: a request the gate escalates or answers ``unknown`` (decided on the SERVER
    span's ``cascade.decision``, which the tier knows before it starts the span), a server error
    (``http.response.status_code`` >= 500) and a queue drain (CONSUMER span). The rest, mostly
    confident local answers, by trace-id ratio. Tracing every request costs the endpoint about
    half its throughput (``benchmarks/bench_tracing.py``); the routine answers are also counted
    in full by ``/metrics``.

    The routine sample is also capped at ``per_second`` traces per second (None: no cap), so
    its cost stays bounded on a busy tier; what it keeps first is what the ratio picked.

    A tier may draw the routine sample itself before making any span (:meth:`keep_routine`:
    a request it drops then costs no SDK call at all) and mark the root it keeps with
    ``cascade.sampling.reason=routine``, which this sampler honours.
    """

    ALWAYS_DECISIONS: Final[frozenset[str]] = frozenset({"escalate", "unknown"})

    def __init__(self, ratio: float = DEFAULT_SAMPLE_RATIO,
                 per_second: float | None = DEFAULT_ROUTINE_PER_S) -> None:
        self.ratio = ratio
        self.per_second = per_second
        self._routine = TraceIdRatioBased(ratio)
        self._cap = None if per_second is None else RateCap(per_second)
        self.routine_kept = 0
        """Routine traces kept (``cascade_telemetry_routine_traces{outcome="kept"}``)."""
        self.routine_capped = 0
        """Routine traces the ratio picked and the spent cap declined (``outcome="capped"``)."""

    def keep_routine(self) -> bool:
        """One draw of the routine sample (for a tier deciding before it makes a span)."""
        return random.random() < self.ratio and self._admit()

    def _admit(self) -> bool:
        """A routine trace the ratio picked: kept unless this second's cap is spent."""
        if self._cap is None or self._cap.take():
            self.routine_kept += 1
            return True
        self.routine_capped += 1
        return False

    def should_sample(self, parent_context: Any, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Any = None, links: Any = None,
                      trace_state: Any = None) -> SamplingResult:
        reason: str | None = None
        if kind is SpanKind.CONSUMER:
            reason = "drain"
        elif attributes is not None:
            decision = attributes.get("cascade.decision")
            if decision in self.ALWAYS_DECISIONS:
                reason = decision
            elif attributes.get("http.response.status_code", 0) >= 500:
                reason = "error"
            elif attributes.get(SAMPLING_REASON) == "routine":  # drawn by the tier already
                reason = "routine"
        if reason is None:
            result = self._routine.should_sample(parent_context, trace_id, name, kind, attributes, links)
            if result.decision is not Decision.RECORD_AND_SAMPLE:  # DROP (ratio: no RECORD_ONLY)
                return result
            if not self._admit():
                return SamplingResult(Decision.DROP)
            reason = "routine"
        return SamplingResult(Decision.RECORD_AND_SAMPLE, {**(attributes or {}), SAMPLING_REASON: reason})

    def get_description(self) -> str:
        cap = "none" if self.per_second is None else f"{self.per_second:g}"
        return f"CascadeRootSampler{{ratio={self.ratio:g},routine_per_s={cap}}}"


class RateCap:
    """A token bucket: on average at most ``per_second`` takes per second, in bursts of at
    most one second's worth (and at least one)."""

    __slots__ = ("_last", "_lock", "_tokens", "capacity", "per_second")

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.capacity = max(1.0, per_second)
        self._tokens = self.capacity if per_second > 0 else 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.per_second)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class CascadeSampler(ParentBased):
    """The default sampler: a caller's decision wins; new traces by :class:`CascadeRootSampler`."""

    def __init__(self, ratio: float = DEFAULT_SAMPLE_RATIO,
                 per_second: float | None = DEFAULT_ROUTINE_PER_S) -> None:
        self.root = CascadeRootSampler(ratio, per_second)
        super().__init__(self.root)


def cascade_sampler(ratio: float = DEFAULT_SAMPLE_RATIO,
                    per_second: float | None = DEFAULT_ROUTINE_PER_S) -> CascadeSampler:
    """The default sampler (see :class:`CascadeRootSampler`)."""
    return CascadeSampler(ratio, per_second)


def build_tracer_provider(config: TracingConfig, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """An SDK provider with one batch processor per destination of ``config``."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    from cascade.observability.export import GuardedSpanExporter, JsonLinesSpanExporter

    env = os.environ if environ is None else environ
    provider = TracerProvider(
        resource=Resource.create(_resource_attributes(config.tier, env)), shutdown_on_exit=False,
        # None: the SDK builds the standard sampler OTEL_TRACES_SAMPLER names.
        sampler=(cascade_sampler(config.sample_ratio, config.routine_per_s)
                 if config.sampler == "cascade" else None),
    )
    destinations: list[tuple[Any, str, str]] = []
    if "otlp" in config.exporters:
        destinations.append((_otlp_exporter(config), f"otlp-{config.otlp_protocol.split('/')[0]}",
                             config.otlp_endpoint or "the default OTLP endpoint"))
    if "console" in config.exporters:
        destinations.append((ConsoleSpanExporter(), "console", "stdout"))
    if config.trace_file is not None:
        sized = ({"max_bytes": config.trace_file_max_bytes}
                 if config.trace_file_max_bytes else {})
        destinations.append((JsonLinesSpanExporter(config.trace_file, **sized), "file",
                             str(config.trace_file)))
    # Smaller batches than the SDK's 512: encoding a batch holds the GIL, and a long hold shows
    # up in the request path's p99 (measured: p99 at 10% sampling 15-22 ms -> 12 ms).
    batch = None if "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" in env else DEFAULT_EXPORT_BATCH_SIZE
    for exporter, name, where in destinations:
        provider.add_span_processor(BatchSpanProcessor(
            GuardedSpanExporter(exporter, name, destination=where), max_export_batch_size=batch))
    return provider


@dataclass
class Tracing:
    """Handle on a process's tracing; :meth:`shutdown` flushes within a bounded time."""

    config: TracingConfig
    provider: TracerProvider | None = None
    _closed: bool = field(default=False, repr=False)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Flush and stop the exporters, waiting at most ``timeout_s`` (a dead collector must
        not hold a stopping tier hostage)."""
        if self.provider is None or self._closed:
            return
        self._closed = True
        worker = threading.Thread(target=self.provider.shutdown, name="trace-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("trace export did not finish within %.1f s at shutdown; unsent spans dropped", timeout_s)


def setup_tracing(
    tier: str, *, trace_dir: Path | None = None, environ: Mapping[str, str] | None = None,
    trace_file_max_bytes: int | None = None,
) -> Tracing:
    """Configure this process's tracing from the environment (call once, before serving).
    ``trace_file_max_bytes``: rotate the trace file past this size (its disk share)."""
    from dataclasses import replace

    from cascade.observability.export import quiet_sdk_loggers

    config = replace(TracingConfig.from_env(tier, trace_dir=trace_dir, environ=environ),
                     trace_file_max_bytes=trace_file_max_bytes)
    if not config.active:
        log.info("tracing off (%s)", "OTEL_SDK_DISABLED" if not config.enabled else
                 "no exporter: set OTEL_EXPORTER_OTLP_ENDPOINT or CASCADE_TRACE_DIR")
        # Install the API's no-op provider explicitly: with none installed, every
        # get_tracer_provider() call (several per request) looks up an env var.
        from opentelemetry.trace import NoOpTracerProvider

        trace.set_tracer_provider(NoOpTracerProvider())
        return Tracing(config)
    quiet_sdk_loggers()
    provider = build_tracer_provider(config, environ)
    trace.set_tracer_provider(provider)
    instrument_httpx(provider)
    handle = Tracing(config, provider)
    atexit.register(handle.shutdown)
    log.info("tracing on: exporters=%s protocol=%s endpoint=%s file=%s sampler=%s",
             ",".join(config.exporters) or "-", config.otlp_protocol, config.otlp_endpoint or "-",
             config.trace_file or "-", provider.sampler.get_description())
    return handle


def fastapi_options() -> dict[str, Any]:
    """``FastAPI(**fastapi_options())``: turn off FastAPI's native telemetry (recent releases
    trace every request themselves once an SDK provider exists); our middleware makes the
    SERVER span, so keeping both would double it."""
    import inspect

    from fastapi import FastAPI

    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    return {}


def instrument_httpx(provider: TracerProvider | None = None) -> None:
    """CLIENT span + traceparent injection on every httpx request (idempotent)."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    # Stable HTTP semantic conventions (http.response.status_code, url.full...), the same names
    # as our SERVER spans; read once, when the instrumentation first initialises.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider, async_request_hook=_on_client_request)


# -- upstream attempts: the CLIENT span of each gets its number --------------------------------


_RESEND_COUNT: ContextVar[int | None] = ContextVar("cascade_resend_count", default=None)


@contextmanager
def upstream_attempt(resend_count: int) -> Iterator[None]:
    """``UpstreamClient(on_attempt=...)`` hook: tags the attempt's CLIENT span with its number."""
    token = _RESEND_COUNT.set(resend_count)
    try:
        yield
    finally:
        _RESEND_COUNT.reset(token)


async def _on_client_request(span: trace.Span, request: Any) -> None:
    count = _RESEND_COUNT.get()
    if count is not None and span.is_recording():
        span.set_attribute("http.request.resend_count", count)

