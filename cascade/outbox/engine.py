"""Opening the outbox database: URL checks, SQLite pragmas, schema, and storage-error reporting.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for writes: pysqlite's own transaction
handling is switched off (``isolation_level=None``) and SQLAlchemy's ``begin`` event emits the
``BEGIN`` instead, with the mode taken from the connection's ``cascade_begin`` execution option.
Writers therefore take the write lock when the transaction starts, not halfway through it, so
two writers (the tier and ``cascade queue``) queue on the busy timeout instead of deadlocking.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from cascade.errors import ConfigError, ServiceUnavailable
from cascade.outbox.tables import SCHEMA_VERSION, meta, metadata

log = logging.getLogger("cascade.outbox")

SQLITE_BUSY_TIMEOUT_MS = 5_000
WAL_AUTOCHECKPOINT_PAGES = 4_096
"""Backstop only (16 MiB of WAL): the tier checkpoints every second in the background."""
DEFAULT_WAL_LIMIT_BYTES = 4 << 20
"""``journal_size_limit``: a WAL reset by a checkpoint is truncated back to this size."""
SUPPORTED = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"


def parse_outbox_url(url: str) -> URL:
    """Validate an outbox URL; ``postgresql://`` means psycopg 3. Raises :class:`ConfigError`."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError(f"outbox_url {url!r} is not a database URL; use {SUPPORTED}",
                          field="outbox_url") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ConfigError(f"outbox_url {url!r}: only the built-in SQLite driver is supported",
                              field="outbox_url")
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(f"outbox_url {url!r}: the outbox must be a file (it must survive "
                              "a restart); use sqlite:///var/<tier>.db", field="outbox_url")
        return parsed
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgresql+psycopg"):
            return parsed.set(drivername="postgresql+psycopg")
        raise ConfigError(f"outbox_url {url!r}: use the psycopg 3 driver (postgresql+psycopg://)",
                          field="outbox_url")
    raise ConfigError(f"outbox_url {url!r}: backend {backend!r} is not supported; use {SUPPORTED}",
                      field="outbox_url")


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL, else None."""
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None


def create_outbox_engine(
    url: str | URL, *, synchronous: str = "full", create_dirs: bool = True, pool_size: int = 4,
    sqlite_max_bytes: int | None = None, wal_limit_bytes: int = DEFAULT_WAL_LIMIT_BYTES,
) -> Engine:
    """An engine for the outbox database (no I/O yet except creating a SQLite file's directory).

    ``create_dirs=False`` (the operator CLI) refuses a SQLite file that does not exist rather
    than creating an empty database by mistake. ``sqlite_max_bytes`` bounds a SQLite file: past
    it, writes fail with SQLite's "database or disk is full", as on a full disk.
    ``wal_limit_bytes``: the WAL is truncated to this size whenever a checkpoint resets it.
    """
    parsed = url if isinstance(url, URL) else parse_outbox_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        if create_dirs:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"outbox_url: cannot create directory {path.parent}: {exc}",
                                  field="outbox_url") from None
        elif not path.is_file():
            raise ConfigError(f"no outbox database at {path} (has this tier run yet?)",
                              field="outbox_url")
        engine = sa.create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size, max_overflow=4,
        )
        _install_sqlite_hooks(engine, synchronous.upper(), sqlite_max_bytes, wal_limit_bytes)
        return engine
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError("outbox_url is PostgreSQL but the psycopg package is not installed; "
                          "pip install 'psycopg[binary]'", field="outbox_url") from None
    return sa.create_engine(parsed, pool_size=pool_size, max_overflow=4, pool_pre_ping=True)


def _install_sqlite_hooks(engine: Engine, synchronous: str, max_bytes: int | None,
                          wal_limit_bytes: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see module doc)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            # SQLite's own checkpoint as a backstop at the WAL's limit (the tier's upkeep runs
            # one every second, beside the writer, so commits seldom pay for it).
            pages = max(16, min(WAL_AUTOCHECKPOINT_PAGES, wal_limit_bytes // 4096))
            cursor.execute(f"PRAGMA wal_autocheckpoint={pages}")
            cursor.execute(f"PRAGMA journal_size_limit={int(wal_limit_bytes)}")
            # Takes effect only on a new, empty file (before the first table): its freed pages
            # can then be given back to the disk (cascade.outbox.space.shrink).
            try:
                cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            except Exception:  # noqa: BLE001, S110 - a read-only file keeps what it has
                pass
            if max_bytes is not None:
                (page_size,) = cursor.execute("PRAGMA page_size").fetchone()
                cursor.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            except Exception as exc:  # noqa: BLE001 - a read-only file can't switch; reads still work
                log.warning("cannot switch %s to WAL: %s", engine.url.database, exc)
        finally:
            cursor.close()

    # Read-only connections are not kept. On a read-only filesystem SQLite opens the database
    # read-only (when its WAL files are there), and such a connection stays read-only after the
    # filesystem is writable again. Worse, SQLite shares one WAL index per file among all the
    # connections of a process, so while one read-only connection is open every new connection
    # is read-only too. So a connection opened while the file could not be written is closed
    # when it is returned, and one that meets a read-only, failed or vanished file is treated
    # as a disconnect: it is closed, the idle ones are closed at once (each may have inherited
    # the read-only index, and would hand it on to every connection opened while it stays
    # open), and those in use are replaced when they come back.
    path = sqlite_path(engine.url)

    @event.listens_for(engine, "connect")
    def _mark_read_only(_dbapi_connection: Any, record: Any) -> None:
        record.info["read_only"] = path is not None and _read_only(path)

    stale_since = [0.0]
    """When a connection last met a read-only, failed or vanished file (time.time())."""

    @event.listens_for(engine, "checkin")
    def _close_read_only(_dbapi_connection: Any, record: Any) -> None:
        if record.info.get("read_only") or record.starttime <= stale_since[0]:
            record.invalidate()

    @event.listens_for(engine, "handle_error")
    def _on_error(context: Any) -> None:
        if _stale_connection_error(context.original_exception):
            context.is_disconnect = True
            stale_since[0] = time.time()  # those in use now are closed when they come back
            engine.pool.dispose()  # closes the idle connections only; the pool stays usable
            # Close the failed statement's cursor now: SQLite keeps a closed connection (and
            # the file) open while a statement of it is alive, and the exception's traceback
            # would keep this one alive until the next garbage collection.
            cursor = getattr(context.execution_context, "cursor", None)
            if cursor is not None:
                try:
                    cursor.close()
                except Exception:  # noqa: BLE001, S110 - it is being thrown away
                    pass

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("cascade_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN = 8, 10, 14


def _sqlite_code(exc: BaseException | None) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _stale_connection_error(exc: BaseException) -> bool:
    """A SQLite error after which the connection cannot be trusted to write again (read-only,
    I/O error, cannot open), unlike a full disk or a lock, which pass with the connection intact."""
    return _sqlite_code(exc) in (_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CANTOPEN)


def refused_by_a_stale_connection(exc: sa.exc.DBAPIError) -> bool:
    """The connection was replaced because it could not write (read-only, or the file could not
    be opened): nothing was written, so the same writes may be tried on a new connection. (Not
    after an I/O error: a commit that failed that way may still have reached the disk.)"""
    return exc.connection_invalidated and _sqlite_code(exc.orig) in (_SQLITE_READONLY,
                                                                     _SQLITE_CANTOPEN)


def checkpoint(conn: sa.Connection, *, truncate: bool = False) -> None:
    """Copy committed WAL frames into the database file without blocking the writer; with
    ``truncate``, wait for readers and writers (busy timeout) and empty the WAL file."""
    conn.exec_driver_sql(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})").all()


def writer_connection(engine: Engine) -> sa.Connection:
    """A connection whose transactions take the write lock at BEGIN (SQLite's BEGIN IMMEDIATE)."""
    return engine.connect().execution_options(cascade_begin="IMMEDIATE")


def ensure_schema(engine: Engine) -> None:
    """Create missing tables and check the schema version; clear errors when that fails."""
    try:
        with writer_connection(engine) as conn, conn.begin():
            metadata.create_all(conn, checkfirst=True)
            row = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).first()
            if row is None:
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                conn.execute(meta.insert().values(key="created_at", value=repr(time.time())))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigError(
                    f"outbox database {engine.url.render_as_string(hide_password=True)} has schema "
                    f"version {row[0]}, newer than this cascade ({SCHEMA_VERSION}); upgrade cascade",
                    field="outbox_url")
    except sa.exc.SQLAlchemyError as exc:
        cause = describe_storage_error(exc, engine.url)
        if schema_present(engine) or cause.startswith(("the disk", "the outbox database is")):
            # A storage condition (read-only, full, locked), not a configuration mistake: serve
            # what needs no outbox, and answer 503 storage_unavailable for what does.
            log.error("outbox database unusable (requests that need it get 503): %s", cause)
            return
        raise ConfigError(
            f"cannot create the outbox in {engine.url.render_as_string(hide_password=True)}: "
            f"{cause}", field="outbox_url") from None


def schema_present(engine: Engine) -> bool:
    """True if the outbox tables exist (readable)."""
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).has_table("cascade_outbox")
    except sa.exc.SQLAlchemyError:
        return False


def _read_only(path: Path) -> bool:
    """Is this SQLite file (or its directory) on a read-only filesystem or not writable?"""
    target = path if path.exists() else path.parent
    try:
        return bool(os.statvfs(target).f_flag & os.ST_RDONLY) or not os.access(target, os.W_OK)
    except OSError:
        return False


def describe_storage_error(exc: BaseException, url: URL | None = None) -> str:
    """A short, operator-readable cause for a database error (``url`` helps name SQLite's)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    low = text.lower()
    sqlstate = getattr(orig, "sqlstate", None) or ""
    path = sqlite_path(url) if url is not None else None
    if "disk is full" in low or "database or disk is full" in low or sqlstate == "53100":
        return f"the disk holding the outbox is full ({text})"
    if ("readonly" in low or "read-only" in low or sqlstate == "25006"
            or (path is not None and _read_only(path))):
        return f"the outbox database is read-only ({text})"
    if "locked" in low or "busy" in low:
        return f"the outbox database stayed locked by another writer ({text})"
    if sqlstate.startswith("08") or "connection" in low:
        return f"cannot reach the outbox database ({text})"
    return text


def storage_unavailable(
    exc: BaseException, *, reading: bool = False, url: URL | None = None
) -> ServiceUnavailable:
    """The 503 a client gets when the outbox cannot store (or read) its work."""
    cause = describe_storage_error(exc, url)
    if reading:
        message = f"cannot read the outbox database: {cause}; retry later"
    else:
        message = f"cannot store this request durably: {cause}; nothing was queued, retry later"
    return ServiceUnavailable(message, code="storage_unavailable")
