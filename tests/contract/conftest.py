"""Backends for the outbox contract suite: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.pgserver import PostgresServer, find_bindir

REQUIRE_POSTGRES = "CASCADE_REQUIRE_POSTGRES"
"""Set to 1 (``.ci/run`` does) and the PostgreSQL tests fail, not skip, without a server."""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (CI installs the Debian package).

    Without the server binaries the tests that need it skip (the reason shows with ``-ra``),
    unless ``CASCADE_REQUIRE_POSTGRES=1``: then they fail, so a CI run cannot pass with half
    of the store contract untested.
    """
    if find_bindir() is None:
        reason = ("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                  "/usr/lib/postgresql/*/bin or on PATH; apt-get install postgresql "
                  "(.ci/run installs them)")
        if os.environ.get(REQUIRE_POSTGRES, "").strip() not in ("", "0"):
            pytest.fail(f"{REQUIRE_POSTGRES} is set but {reason}", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def outbox_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty outbox database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/outbox.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    yield server.url
    import sqlalchemy as sa

    from cascade.outbox.tables import metadata

    engine = sa.create_engine(server.url)
    metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
async def make_outbox(outbox_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Open (and start) outboxes on the test's database; all are closed at the end."""
    from cascade.outbox import Outbox, OutboxSettings

    opened: list[Outbox] = []

    async def make(tier: str = "endpoint", start: bool = True, clock: Any = None,
                   gauge: Any = None, idempotency_window_s: float = 600.0,
                   **settings: Any) -> Outbox:
        extra = {"clock": clock} if clock is not None else {}
        box = Outbox(outbox_url, tier=tier, settings=OutboxSettings(**settings), gauge=gauge,
                     idempotency_window_s=idempotency_window_s, **extra)
        if start:
            await box.start(background=False)
        opened.append(box)
        return box

    yield make
    for box in opened:
        if box._started:
            await box.aclose()
