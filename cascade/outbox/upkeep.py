"""The outbox's background upkeep: WAL checkpoints, TTL sweeps and retention, the disk budget.

Every second (or ``sweep_interval_s`` if shorter) it:

* checkpoints a SQLite WAL (PASSIVE, beside the writer); when the WAL has nevertheless grown
  past its limit (readers kept old frames pinned), a TRUNCATE checkpoint empties it;
* every ``sweep_interval_s``: TTL expiry and time retention (:func:`maintenance.sweep`);
* with a disk budget: measures the database, evicts the oldest final, delivered answers past
  the idempotency window when it passes its share (:mod:`cascade.outbox.space`), and refuses
  new stored work while only unevictable rows remain over the share.

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
from cascade.outbox.space import EVICT_ABOVE, Space, measure, rows_to_evict, wal_limit_bytes

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
    """One pass of the disk budget (a no-op without one); returns the space measured last."""
    gauge = box.gauge
    if gauge is None:
        return None
    share = gauge.budget_bytes
    path, wal_limit = sqlite_path(box.url), wal_limit_bytes(share)
    above = int(EVICT_ABOVE * share)
    space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
    wanted = rows_to_evict(space, share)
    if wanted:
        gone = await box._write("evict", (wanted, box.clock() - box.idempotency_window_s))
        gauge.evicted("budget", len(gone))
        if gone:
            log.info("disk: evicted the %d oldest delivered answers of tier %s (results store "
                     "over %.0f%% of its %.1f MiB)", len(gone), box.tier,
                     100 * space.live_bytes / share, share / MIB)
    if box.is_sqlite:
        if space.file_bytes + space.wal_bytes > share:
            await box._write("shrink", None)  # the file shrinks at the next checkpoint
        if wanted or space.file_bytes + space.wal_bytes > share:
            space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
        if space.wal_bytes > wal_limit:  # readers kept frames pinned, or evictions wrote many
            await box._read(lambda conn: checkpoint(conn, truncate=True))
            space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
    elif wanted:
        space = await box._read(lambda conn: measure(conn, path, wal_limit, above))
    gauge.set_used(space.on_disk_bytes)
    full = _full_reason(box, space) if space.live_bytes > share else None
    if full is not None and box.full_reason is None:
        log.warning("disk: %s", full.replace("Nothing was stored; retry later",
                                             "new work that needs storing gets 503"))
    elif full is None and box.full_reason is not None:
        log.warning("disk: tier %s's results store is back within its share; storing again",
                    box.tier)
    box.full_reason = full
    return space


def _full_reason(box: Outbox, space: Space) -> str:
    """The 503 message while the store is over its share with nothing left to evict."""
    share = box.gauge.budget_bytes if box.gauge else 0
    return (f"tier {box.tier}'s results store uses {space.live_bytes / MIB:.1f} MiB, over its "
            f"disk share of {share / MIB:.1f} MiB (disk.results_mb or disk.budget_mb), and holds "
            "only work it still owes or answers younger than disk.idempotency_window_s "
            f"({box.idempotency_window_s:g} s): pending escalations, undelivered callbacks, "
            "provisional answers. Nothing was stored; retry later")
