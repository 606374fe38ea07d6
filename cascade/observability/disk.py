"""A tier's disk budget: how many bytes each local store may use, and what each uses now.

A field site runs unattended on a small disk, so every file a tier writes has a byte bound as
well as a time bound (architecture §6): the ``disk:`` block of a node config
(:class:`DiskSettings`) splits ``budget_mb`` into one share per store, each overridable:

    results     the outbox database: answers kept for idempotency and ``/v1/results``, the
                escalations owed upstream, callbacks (evicts final, delivered answers older than
                ``idempotency_window_s``, oldest first; never anything still owed)
    decisions   the sampled decision log (evicts its oldest rows)
    logs        the tier's log file and its rotated copies (rotation drops the oldest)
    traces      the JSON-lines trace file and its rotated copy (the same)
    models      the model files this tier serves (measured only: nothing is evicted)

Each store reports into a :class:`StoreGauge` (bytes used, its share, evictions by reason), and
:class:`DiskUsage` gathers them for ``/readyz``, ``/metrics`` and the warning line a store
writes when it passes ``warn_fraction`` of its share. Nothing here touches a store itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("cascade.disk")

MIB: Final[int] = 1024 * 1024
STORES: Final[tuple[str, ...]] = ("results", "decisions", "logs", "traces", "models")
DEFAULT_SHARES: Final[dict[str, float]] = {
    "results": 0.50, "decisions": 0.10, "logs": 0.15, "traces": 0.20, "models": 0.05,
}
"""Each store's part of ``budget_mb`` unless its ``<store>_mb`` is set."""

__all__ = ["DEFAULT_SHARES", "MIB", "STORES", "DiskSettings", "DiskUsage", "StoreGauge",
           "files_bytes"]


class DiskSettings(BaseModel):
    """The ``disk:`` block of a node config: one byte budget per tier, split across its stores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_mb: float = Field(
        default=1024.0, ge=1,
        description="Disk this tier's files may use in total (MiB), split across the stores "
        "by DEFAULT_SHARES unless a store's own <store>_mb is set.")
    results_mb: float | None = Field(default=None, ge=0.25, description="Outbox database share.")
    decisions_mb: float | None = Field(default=None, ge=0.25, description="Decision log share.")
    logs_mb: float | None = Field(default=None, ge=0.25, description="Log files share.")
    traces_mb: float | None = Field(default=None, ge=0.25, description="Trace files share.")
    models_mb: float | None = Field(default=None, ge=0, description="Model files share.")
    idempotency_window_s: float = Field(
        default=600.0, ge=0,
        description="A final, delivered answer is kept at least this long (a client retrying "
        "with the same Idempotency-Key within it gets the same answer) before it may be evicted "
        "to make room; outbox.results_retention_s still bounds how long it is kept at most.")
    decisions_retention_s: float = Field(
        default=30 * 86_400.0, gt=0, description="Decision log rows older than this are removed.")
    log_backups: int = Field(default=2, ge=1, le=20,
                             description="Rotated log files kept beside the current one.")
    warn_fraction: float = Field(default=0.8, gt=0, lt=1,
                                 description="Warn in the log when a store passes this share.")

    @model_validator(mode="after")
    def _parts_fit(self) -> DiskSettings:
        explicit = {s: getattr(self, f"{s}_mb") for s in STORES if getattr(self, f"{s}_mb") is not None}
        if sum(explicit.values()) > self.budget_mb:
            parts = " + ".join(f"disk.{s}_mb {v:g}" for s, v in explicit.items())
            raise ValueError(f"{parts} = {sum(explicit.values()):g} MiB exceeds disk.budget_mb "
                             f"{self.budget_mb:g}; raise the budget or lower a part")
        return self

    def share_bytes(self, store: str) -> int:
        """The bytes ``store`` may use: its ``<store>_mb``, else its default share of the budget."""
        explicit = getattr(self, f"{store}_mb")
        mb = explicit if explicit is not None else self.budget_mb * DEFAULT_SHARES[store]
        return int(mb * MIB)

    def shares(self) -> dict[str, int]:
        """Every store's share in bytes."""
        return {store: self.share_bytes(store) for store in STORES}


def files_bytes(paths: Iterable[Path]) -> int:
    """Bytes of the files that exist among ``paths`` (missing ones count 0)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


class StoreGauge:
    """What one store uses against its share, and what it evicted; thread-safe, never raises.

    The store itself calls :meth:`set_used` and :meth:`evicted`; a store whose size is just its
    files passes ``measure`` instead and is read when someone asks (:meth:`refresh`).
    """

    def __init__(self, store: str, budget_bytes: int, *, tier: str = "",
                 warn_fraction: float = 0.8, measure: Callable[[], int] | None = None) -> None:
        self.store = store
        self.tier = tier
        self.budget_bytes = budget_bytes
        self.warn_fraction = warn_fraction
        self.used_bytes = 0
        self.evictions: dict[str, int] = {}
        self._measure = measure
        self._warned = False
        self._lock = threading.Lock()

    def set_used(self, used_bytes: int) -> None:
        """The store's size now; logs one warning when it passes ``warn_fraction`` of its share
        (again only after it has fallen below half of that)."""
        self.used_bytes = used_bytes
        if not self.budget_bytes:
            return
        fraction = used_bytes / self.budget_bytes
        if fraction >= self.warn_fraction and not self._warned:
            self._warned = True
            log.warning(
                "disk: the %s store of tier %s uses %.1f MiB, %.0f%% of its share of %.1f MiB "
                "(disk.%s_mb); it evicts what is safe to evict beyond it", self.store,
                self.tier or "?", used_bytes / MIB, fraction * 100, self.budget_bytes / MIB,
                self.store,
                extra={"fields": {"store": self.store, "used_bytes": used_bytes,
                                  "budget_bytes": self.budget_bytes}})
        elif fraction < self.warn_fraction / 2:
            self._warned = False

    def evicted(self, reason: str, count: int = 1) -> None:
        """Count ``count`` evictions (rows or files) for ``reason`` (budget, retention, rotation)."""
        if count:
            with self._lock:
                self.evictions[reason] = self.evictions.get(reason, 0) + count

    def refresh(self) -> None:
        """Re-measure a file-sized store (no-op for stores that report their own size)."""
        if self._measure is not None:
            try:
                self.set_used(self._measure())
            except Exception:
                log.debug("cannot measure the %s store", self.store, exc_info=True)

    def view(self) -> dict[str, Any]:
        """``{"used_bytes", "budget_bytes", "used_fraction", "evictions"}``."""
        return {"used_bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                "used_fraction": round(self.used_bytes / self.budget_bytes, 4)
                if self.budget_bytes else None,
                "evictions": dict(self.evictions)}


class DiskUsage:
    """Every store's gauge of one tier (what ``/readyz`` and ``/metrics`` show)."""

    def __init__(self, tier: str, settings: DiskSettings | None = None) -> None:
        self.tier = tier
        self.settings = settings or DiskSettings()
        self.gauges: dict[str, StoreGauge] = {}

    def gauge(self, store: str, measure: Callable[[], int] | None = None) -> StoreGauge:
        """The gauge of ``store`` (created at its share on first use)."""
        if store not in self.gauges:
            self.gauges[store] = StoreGauge(store, self.settings.share_bytes(store), tier=self.tier,
                                            warn_fraction=self.settings.warn_fraction,
                                            measure=measure)
        return self.gauges[store]

    def refresh(self) -> None:
        """Re-measure the file-sized stores."""
        for gauge in self.gauges.values():
            gauge.refresh()

    def view(self) -> dict[str, Any]:
        """Per store: bytes used, share, fraction, evictions; and the totals."""
        self.refresh()
        stores = {name: g.view() for name, g in sorted(self.gauges.items())}
        return {"budget_bytes": int(self.settings.budget_mb * MIB),
                "used_bytes": sum(g.used_bytes for g in self.gauges.values()), "stores": stores}
