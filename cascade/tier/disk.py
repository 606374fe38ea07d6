"""Wiring a tier's stores to its disk budget (the ``disk:`` block of its node config).

The results store (outbox database) and the decision log measure and evict for themselves;
the log file and the trace file rotate within their shares, set when the process configured
them (:mod:`cascade.deploy.process`); the models are only measured. This module gives each its
:class:`~cascade.observability.disk.StoreGauge`, so ``/readyz``, ``/metrics`` and ``cascade disk``
show them side by side.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from cascade.observability.disk import DiskUsage, files_bytes
from cascade.observability.export import trace_file_exporters
from cascade.observability.logs import RotatingLogFile, current_handler
from cascade.tier.settings import NodeSettings

__all__ = ["build_disk_usage"]


def build_disk_usage(settings: NodeSettings, model_files: Iterable[Path]) -> DiskUsage:
    """The tier's :class:`DiskUsage`, with the logs, traces and models gauges attached (the
    results and decisions gauges are made when the outbox and the decision log ask for them)."""
    disk = DiskUsage(settings.tier, settings.disk)
    handler = current_handler()
    if isinstance(handler, RotatingLogFile):
        logs = disk.gauge("logs", measure=handler.disk_bytes)
        handler.on_rotate = partial(logs.evicted, "rotation")
    for exporter in trace_file_exporters():
        traces = disk.gauge("traces", measure=exporter.disk_bytes)
        exporter.on_rotate = partial(traces.evicted, "rotation")
    models = sorted(set(model_files))
    disk.gauge("models", measure=partial(files_bytes, models))
    disk.refresh()
    return disk
