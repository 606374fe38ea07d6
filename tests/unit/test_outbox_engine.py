"""Opening outbox databases: URL validation, startup errors, storage-error wording, settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cascade.errors import ConfigError
from cascade.outbox import Outbox, OutboxSettings
from cascade.outbox.engine import describe_storage_error, parse_outbox_url, storage_unavailable
from cascade.tier.settings import load_node_settings


@pytest.mark.parametrize("url,message", [
    ("not a url", "is not a database URL"),
    ("mysql://h/db", "backend 'mysql' is not supported"),
    ("sqlite://", "must be a file"),
    ("sqlite:///:memory:", "must be a file"),
    ("postgresql+asyncpg://h/db", "use the psycopg 3 driver"),
])
def test_bad_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError) as info:
        parse_outbox_url(url)
    assert message in info.value.message and info.value.field == "outbox_url"


def test_plain_postgresql_means_psycopg():
    assert parse_outbox_url("postgresql://u@h/db").drivername == "postgresql+psycopg"


def test_a_database_in_an_impossible_place_fails_at_startup(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as info:
        Outbox(f"sqlite:///{blocker}/sub/x.db", tier="endpoint")
    assert "cannot create directory" in info.value.message


def test_a_file_that_is_not_sqlite_fails_at_startup(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError) as info:
        Outbox(f"sqlite:///{junk}", tier="endpoint")
    assert "cannot create the outbox" in info.value.message


@pytest.mark.parametrize("error,expected", [
    (sqlite3.OperationalError("database or disk is full"), "the disk holding the outbox is full"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "is read-only"),
    (sqlite3.OperationalError("database is locked"), "stayed locked by another writer"),
    (sqlite3.OperationalError("something else"), "something else"),
])
def test_storage_errors_name_their_cause(error, expected):
    assert expected in describe_storage_error(error)
    exc = storage_unavailable(error)
    assert exc.status == 503 and exc.code == "storage_unavailable"
    assert expected in exc.message and "nothing was queued" in exc.message


def test_outbox_block_in_node_config_and_bad_values(tmp_path: Path):
    config = tmp_path / "n.yaml"
    config.write_text("tier: endpoint\ntasks: {vision: endpoint}\n"
                      "outbox: {max_rows: 5, retry_initial_s: 9, retry_max_s: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_node_settings(config)
    assert "retry_initial_s must not exceed retry_max_s" in info.value.message
    config.write_text("tier: endpoint\ntasks: {vision: endpoint}\noutbox: {max_rowz: 5}\n")
    with pytest.raises(ConfigError) as info:
        load_node_settings(config)
    assert "outbox.max_rowz" in info.value.message
    config.write_text("tier: endpoint\ntasks: {vision: endpoint}\noutbox: {max_rows: 5}\n")
    assert load_node_settings(config).outbox == OutboxSettings(max_rows=5)
