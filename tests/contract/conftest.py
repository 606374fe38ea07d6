"""Backends for the outbox contract suite: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.pgserver import PostgresServer, find_bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (CI installs the Debian package)."""
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql); "
                    ".ci/run installs them")
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
                   **settings: Any) -> Outbox:
        extra = {"clock": clock} if clock is not None else {}
        box = Outbox(outbox_url, tier=tier, settings=OutboxSettings(**settings), **extra)
        if start:
            await box.start(background=False)
        opened.append(box)
        return box

    yield make
    for box in opened:
        if box._started:
            await box.aclose()
