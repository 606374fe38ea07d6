"""The disk budget's parts without servers: shares and their validation, the gauge's warning,
how many rows to evict, and each self-bounding store (log file, trace file, decision log)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import yaml

from cascade.errors import ConfigError
from cascade.observability.disk import MIB, DiskSettings, DiskUsage, StoreGauge
from cascade.observability.logs import RotatingLogFile
from cascade.outbox.space import Space, rows_to_evict, wal_limit_bytes


def test_shares_split_the_budget_and_each_part_can_be_set() -> None:
    shares = DiskSettings(budget_mb=20).shares()
    assert shares == {"results": 10 * MIB, "decisions": 2 * MIB, "logs": 3 * MIB,
                      "traces": 4 * MIB, "models": 1 * MIB}
    assert DiskSettings(budget_mb=20, results_mb=15).share_bytes("results") == 15 * MIB


def test_parts_over_the_budget_name_the_keys(tmp_path: Path) -> None:
    from cascade.tier.settings import load_node_settings

    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"tier": "endpoint", "tasks": ["vision"],
                                      "disk": {"budget_mb": 10, "results_mb": 8, "logs_mb": 4}}))
    with pytest.raises(ConfigError) as err:
        load_node_settings(config)
    message = err.value.message
    assert "disk.results_mb 8 + disk.logs_mb 4 = 12 MiB exceeds disk.budget_mb 10" in message
    assert f"config file {config}" in message


def test_gauge_warns_once_past_its_fraction_until_it_falls_below_half(caplog) -> None:
    gauge = StoreGauge("results", 1000, tier="edge-node", warn_fraction=0.8)
    with caplog.at_level(logging.WARNING, logger="cascade.disk"):
        for used in (100, 850, 900, 700, 850, 300, 810):
            gauge.set_used(used)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "results store of tier edge-node" in warnings[0] and "disk.results_mb" in warnings[0]
    gauge.evicted("budget", 3)
    gauge.evicted("budget", 2)
    gauge.evicted("retention", 0)
    assert gauge.view() == {"used_bytes": 810, "budget_bytes": 1000, "used_fraction": 0.81,
                            "evictions": {"budget": 5}}


def test_usage_view_measures_file_stores(tmp_path: Path) -> None:
    file = tmp_path / "x.log"
    file.write_bytes(b"x" * 100)
    disk = DiskUsage("endpoint", DiskSettings(budget_mb=1))
    disk.gauge("logs", measure=lambda: file.stat().st_size)
    file.write_bytes(b"x" * 300)
    view = disk.view()
    assert view["stores"]["logs"]["used_bytes"] == 300
    assert view["budget_bytes"] == MIB and view["used_bytes"] == 300


@pytest.mark.parametrize(("live", "rows", "expected"), [
    (700_000, 1000, 0),                   # below 80%: nothing
    (900_000, 1000, 278),                 # down to 65% of 1 MB: 250 000 bytes, 900 a row
    (5_000_000, 1000, 870),
    (10_000_000, 10, 10),                 # never more rows than there are
    (900_000, 0, 0),
])
def test_rows_to_evict(live: int, rows: int, expected: int) -> None:
    space = Space(on_disk_bytes=live, live_bytes=live, file_bytes=live, wal_bytes=0, rows=rows)
    assert rows_to_evict(space, 1_000_000) == expected


def test_wal_limit_is_an_eighth_of_the_share_within_bounds() -> None:
    assert wal_limit_bytes(1 * MIB) == 128 * 1024
    assert wal_limit_bytes(100 * 1024) == 64 * 1024
    assert wal_limit_bytes(1024 * MIB) == 4 * MIB


def test_log_file_rotates_within_its_share(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "endpoint.log"
    handler = RotatingLogFile(path, max_bytes=4096, backups=2, flush_interval_s=0,
                              own_std_fds=False)
    rotated: list[int] = []
    handler.on_rotate = lambda: rotated.append(1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.rotation")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for i in range(2000):
            logger.warning("line %05d %s", i, "y" * 40)  # warnings are written at once
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["endpoint.log", "endpoint.log.1", "endpoint.log.2"]
    assert all(p.stat().st_size <= 4096 for p in path.parent.iterdir())
    assert handler.disk_bytes() <= 3 * 4096
    assert handler.rotations == len(rotated) > 10
    assert path.read_text().splitlines()[-1].startswith("line 01999")


def test_trace_file_rotation_is_counted(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from cascade.observability.export import JsonLinesSpanExporter

    exporter = JsonLinesSpanExporter(tmp_path / "edge-node.jsonl", max_bytes=2000)
    rotated: list[int] = []
    exporter.on_rotate = lambda: rotated.append(1)
    provider = TracerProvider()  # local: the process's global tracing stays untouched
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    for i in range(40):
        with tracer.start_as_current_span(f"span-{i}"):
            pass
    provider.shutdown()
    assert exporter.rotations == len(rotated) >= 3
    assert exporter.disk_bytes() <= 2 * 2000


def test_decision_log_stays_within_its_share(tmp_path: Path) -> None:
    from cascade.observability.decisionlog import COLUMNS, DecisionLog

    gauge = StoreGauge("decisions", 256 * 1024)
    log = DecisionLog(tmp_path / "decisions-endpoint.db", gauge=gauge, retention_s=3600,
                      upkeep_interval_s=0.0, flush_interval_s=0.01)
    row = tuple([time.time() if c == "ts" else "x" * 200 if c == "probs" else 0
                 for c in COLUMNS])
    try:
        for _ in range(40):
            for _ in range(100):
                log.record(row)
            log.flush()
    finally:
        log.close()
    assert gauge.evictions.get("budget", 0) > 0
    assert gauge.used_bytes <= 256 * 1024
    files = tmp_path.glob("decisions-endpoint.db*")
    assert sum(p.stat().st_size for p in files) <= 256 * 1024


def test_decision_log_files_stay_within_its_share_at_every_statement(tmp_path: Path) -> None:
    # The share of a 3 MiB budget (tests/fault/test_disk_soak.py), rows like a tier's (random
    # request ids, so a commit changes many index pages), in bursts of 200: a second of a
    # tier logging every request at 200 requests/s.
    # The files are measured at the start of every statement the writer runs (each sees what
    # the one before left on disk, the WAL at its longest included), not only at the end.
    import random
    import sqlite3

    from cascade.observability.decisionlog import COLUMNS, DecisionLog

    share = DiskSettings(budget_mb=3).shares()["decisions"]
    path = tmp_path / "decisions-endpoint.db"
    gauge = StoreGauge("decisions", share)
    # Each flush() is one drain of its burst (the writer never wakes by itself), and each
    # drain is followed by the budget upkeep.
    log = DecisionLog(path, gauge=gauge, retention_s=3600, flush_interval_s=3600,
                      upkeep_interval_s=0.0)
    peak = {"bytes": 0, "files": {}}

    def measure(_statement: str) -> None:
        files = {p.name: p.stat().st_size for p in tmp_path.glob(path.name + "*")}
        if sum(files.values()) > peak["bytes"]:
            peak.update(bytes=sum(files.values()), files=files)

    conn: sqlite3.Connection = log._conn  # the writer's own connection: its statements
    conn.set_trace_callback(measure)
    rng = random.Random(7)
    last = ""
    try:
        for burst in range(20):
            for i in range(200):
                last = f"req-{rng.getrandbits(64):016x}-{burst}-{i}"
                values = {"ts": time.time(), "request_id": last,
                          "probs": str([rng.random() for _ in range(10)])}
                log.record(tuple(values.get(c, 0) for c in COLUMNS))
            log.flush()
    finally:
        log.close()
    measure("closed")
    assert gauge.evictions.get("budget", 0) > 0  # the share was filled, more than once
    assert peak["bytes"] <= share, (peak, share)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM decisions WHERE request_id = ?",
                          (last,)).fetchone() == (1,)  # the newest rows are the ones kept
