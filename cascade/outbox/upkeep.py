"""The outbox's background upkeep: WAL checkpoints, TTL sweeps and retention, the disk budget.

Every second (or ``sweep_interval_s`` if shorter) it:

* checkpoints a SQLite WAL (PASSIVE, beside the writer); when the WAL has nevertheless grown
  past its limit (readers kept old frames pinned), a TRUNCATE checkpoint empties it;
* every ``sweep_interval_s``: TTL expiry and time retention (:func:`maintenance.sweep`);
* with a disk budget: measures the database, evicts the oldest final, delivered answers past
  the idempotency window when it passes its share (:mod:`cascade.outbox.space`), and refuses
  new stored work while only unevictable rows remain past that line (a SQLite store is also
  checked by its writer after every batch).

SQLite's automatic checkpoint would run inside whichever commit crosses its threshold, adding
its fsyncs to that batch's latency; here it runs from a reader thread instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from cascade.errors import ServiceUnavailable
from cascade.observability.disk import MIB
from cascade.outbox.background import BackgroundLoop
from cascade.outbox.engine import checkpoint, sqlite_path
from cascade.outbox.space import (
    EVICT_ABOVE,
    MAX_EVICT_PASSES,
    Space,
    measure,
    rows_to_evict,
    wal_limit_bytes,
)

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.outbox import Outbox

log = logging.getLogger("cascade.outbox")


class Upkeep(BackgroundLoop):
    """The maintenance loop of one outbox (see the module docstring)."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def start(self) -> None:
        """Run the loop as a background task of the current event loop."""
        self._start_loop(self._run(), f"outbox-maintenance-{self.outbox.tier}")

    async def stop(self) -> None:
        """Stop the loop."""
        await self._stop_loop()

    async def _run(self) -> None:
        box = self.outbox
        interval = min(1.0, box.settings.sweep_interval_s)
        last_sweep = 0.0
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                if box.is_sqlite:
                    await box._read(checkpoint)
                if time.monotonic() - last_sweep >= box.settings.sweep_interval_s:
                    last_sweep = time.monotonic()
                    swept = await box.sweep()
                    if box.gauge is not None:
                        box.gauge.evicted("retention", swept.get("results_removed", 0))
                await keep_within_budget(box)
            except ServiceUnavailable as exc:
                log.error("outbox maintenance of %s: %s", box.tier, exc.message)
            except Exception:
                log.exception("outbox maintenance of %s: unexpected error", box.tier)


async def keep_within_budget(box: Outbox) -> Space | None:
    """One pass of the disk budget (a no-op without one); returns the space measured last.

    A SQLite store is checked by its writer after every batch (:func:`space.keep_within_share`);
    here it is only given a batch, so a store that nothing writes to is checked too (answers
    pass the idempotency window and may go, and work is taken again). PostgreSQL's is checked
    here: the oldest evictable answers go, in passes until the store is back below the line or
    nothing more may go."""
    gauge = box.gauge
    if gauge is None:
        return None
    if box.commit_pages is not None:
        await box._write("check", None)
        return box.space
    share = gauge.budget_bytes
    path, wal_limit = sqlite_path(box.url), wal_limit_bytes(share)
    above = int(EVICT_ABOVE * share)
    space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
    for _ in range(MAX_EVICT_PASSES):
        wanted = rows_to_evict(space, share)
        if not wanted:
            break
        gone = await box._write("evict", (wanted, box.clock() - box.idempotency_window_s))
        gauge.evicted("budget", len(gone))
        if gone:
            log.info("disk: evicted the %d oldest delivered answers of tier %s (results store "
                     "over %.0f%% of its %.1f MiB)", len(gone), box.tier,
                     100 * space.live_bytes / share, share / MIB)
        space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
        if len(gone) < wanted:  # what is left over the line may not be evicted yet
            break
    box.note_space(space)
    return space
