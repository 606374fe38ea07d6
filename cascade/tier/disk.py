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

__all__ = ["build_disk_usage", "measure_stores", "store_files"]


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


def store_files(settings: NodeSettings) -> dict[str, list[Path]]:
    """The files each store of the tier that ``settings`` describe writes (what may exist,
    rotated copies included); the results store of a PostgreSQL outbox has none here."""
    from cascade.observability.decisionlog import resolve_path
    from cascade.outbox.engine import parse_outbox_url, sqlite_path

    files: dict[str, list[Path]] = {store: [] for store in ("results", "decisions", "logs",
                                                            "traces", "models")}
    db = sqlite_path(parse_outbox_url(settings.resolved_outbox_url))
    if db is not None:
        files["results"] = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    try:
        from cascade.policy import load_policy

        log_settings = load_policy(settings.policy).policy.decision_log
        if log_settings.sample_rate > 0:
            path = resolve_path(log_settings.path, settings.tier)
            files["decisions"] = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    except Exception:  # noqa: BLE001, S110 - a bad policy is reported by the tier, not here
        pass
    if settings.log_file is not None:
        log = Path(settings.log_file)
        files["logs"] = [log, *(log.with_name(f"{log.name}.{i}")
                                for i in range(1, settings.disk.log_backups + 1))]
    if settings.trace_dir is not None:
        trace = Path(settings.trace_dir) / f"{settings.tier}.jsonl"
        files["traces"] = [trace, trace.with_name(trace.name + ".1")]
    try:
        from cascade.models.manifest import load_manifest

        manifest = load_manifest(Path(settings.models_dir))
        files["models"] = [manifest.model_path(task, tier) for task, tier in settings.tasks.items()]
    except Exception:  # noqa: BLE001, S110 - no models built yet: nothing to measure
        pass
    return files


def measure_stores(settings: NodeSettings) -> dict[str, object]:
    """What ``/readyz`` shows under ``disk``, measured from the files (no running tier needed;
    evictions are only known to a running tier). PostgreSQL outboxes are asked for their size."""
    shares = settings.disk.shares()
    stores: dict[str, dict[str, object]] = {}
    for store, paths in store_files(settings).items():
        used = files_bytes(paths)
        if store == "results" and not paths:
            used = _postgres_bytes(settings)
        stores[store] = {"used_bytes": used, "budget_bytes": shares[store],
                         "used_fraction": round(used / shares[store], 4) if shares[store] else None,
                         "files": [str(p) for p in paths if p.exists()]}
    return {"budget_bytes": int(settings.disk.budget_mb * 1024 * 1024),
            "used_bytes": sum(int(s["used_bytes"]) for s in stores.values()),  # type: ignore[call-overload]
            "stores": stores}


def _postgres_bytes(settings: NodeSettings) -> int:
    import sqlalchemy as sa

    from cascade.outbox.engine import create_outbox_engine

    engine = create_outbox_engine(settings.resolved_outbox_url, create_dirs=False, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT pg_total_relation_size('cascade_results') + pg_total_relation_size("
                "'cascade_outbox') + pg_total_relation_size('cascade_callbacks')")).scalar() or 0)
    finally:
        engine.dispose()
