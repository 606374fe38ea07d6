"""Hot reload of a running tier's policy: file watch and SIGHUP, applied between requests.

A watcher task (watchfiles, inotify-backed) follows the policy file's *directory*, so editors
that write a new file and rename it over the old one, and Kubernetes ConfigMap symlink swaps,
are seen too; a change is applied within ~100 ms. ``kill -HUP <pid>`` forces a re-read. Nothing
runs per request: a request reads the node's policy reference once, and a reload replaces that
reference in one assignment on the event loop, so every request sees the old or the new policy,
never a mix.

The same validation applies to a policy given another way (:func:`apply_policy_bytes`: a Ray
Serve ``reconfigure``); once such a policy is live, the file no longer replaces it.

An invalid new file (bad YAML, a bad key, a tier it does not cover) is refused: the old policy
stays live, the error naming file and key is logged, counted on ``/readyz``
(``policy.reload``) and on ``/metrics`` (``cascade_policy_reloads_total{outcome="rejected"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cascade.errors import CascadeError
from cascade.policy.loader import load_policy_bytes

log = logging.getLogger("cascade.policy.reload")


class PolicyReloader:
    """Keeps ``node``'s policy in step with its policy file."""

    def __init__(self, node: Any, path: Path | str | None = None, *, debounce_ms: int = 50) -> None:
        self.node = node
        self.path = Path(path if path is not None else node.policy.path)
        self.debounce_ms = debounce_ms
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sighup = False
        self._refused_sha256: str | None = None  # report a bad file once, not on every event

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, *, watch: bool = True,
                    also_on_sighup: Callable[[], object] | None = None) -> None:
        """Start watching (unless ``watch`` is False) and listen for SIGHUP (main thread only;
        ``also_on_sighup`` runs on the same signal: a process has one handler per signal)."""
        self._stop.clear()
        if watch:
            self._task = asyncio.create_task(self._watch(), name=f"policy-watch:{self.path.name}")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup, also_on_sighup)
            self._sighup = True
        _register_metrics(self.node)

    def _on_sighup(self, also: Callable[[], object] | None) -> None:
        self.reload("SIGHUP")
        if also is not None:
            also()

    async def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        from watchfiles import awatch

        directory = self.path.parent.resolve()
        name = self.path.name

        def relevant(_change: object, changed: str) -> bool:
            # The file itself, or a ConfigMap-style "..data" symlink swap; not the databases or
            # logs that may share the directory.
            base = Path(changed).name
            return base == name or base.startswith("..")

        while not self._stop.is_set():
            try:
                async for _changes in awatch(directory, stop_event=self._stop,
                                             watch_filter=relevant, debounce=self.debounce_ms,
                                             step=25, rust_timeout=500, yield_on_timeout=False):
                    self.reload("file change")
            except Exception as exc:  # noqa: BLE001 - a broken watcher must not kill the tier
                log.error("policy watcher on %s failed (%s); retrying in 1 s; SIGHUP still works",
                          directory, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    # -- reloading ----------------------------------------------------------------------------

    def reload(self, reason: str = "request") -> bool:
        """Re-read the policy file and apply it if it changed and is valid.

        Returns True when a new policy went live. Never raises: a bad file is logged and
        counted, and the old policy stays.
        """
        source = str(self.path)
        if Path(self.node.policy.path) != self.path:
            # The live policy came from elsewhere (a Ray Serve user_config): it governs now,
            # and a touch of the file must not silently undo it.
            log.info("policy file %s not applied (%s): the live policy came from %s",
                     source, reason, self.node.policy.path)
            return False
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            # Mid-rename, or deleted: keep serving the old policy (a rename lands shortly).
            return self._reject(f"{source}: no such policy file (keeping the old policy)", reason)
        except OSError as exc:
            return self._reject(f"{source}: cannot read: {exc.strerror}", reason)
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self.node.policy.sha256 or digest == self._refused_sha256:
            return False  # touched, or the same bad file again: nothing new to apply or report
        applied = apply_policy_bytes(self.node, raw, source=source, reason=reason)
        self._refused_sha256 = None if applied else digest
        return applied

    def _reject(self, message: str, reason: str) -> bool:
        return refuse_policy(self.node, message, reason)


def apply_policy_bytes(node: Any, raw: bytes, *, source: str, reason: str) -> bool:
    """Validate ``raw`` (policy YAML from ``source``) and make it ``node``'s live policy.

    The one way a running tier changes policy: the file watch, SIGHUP and a Ray Serve
    ``reconfigure`` all come here. Never raises: an invalid policy (its error names ``source``
    and the key) is logged and counted on ``/readyz`` and ``/metrics``, and the old one stays.
    Returns True when the new policy went live.
    """
    try:
        new = load_policy_bytes(raw, source=source)
        node.set_policy(new)
    except CascadeError as exc:
        return refuse_policy(node, exc.message, reason)
    stats = node.policy_reloads
    stats["reloads"] += 1
    stats["last_error"] = None
    log.info("policy %s reloaded (%s): version %s", source, reason, new.version)
    return True


def refuse_policy(node: Any, message: str, reason: str) -> bool:
    """Count and log a refused policy change (``message`` names its source and key); the old
    policy stays live. Returns False, what the caller returns."""
    stats = node.policy_reloads
    stats["errors"] += 1
    stats["last_error"] = message
    log.error("policy reload (%s) refused, keeping version %s: %s", reason,
              node.policy.version, message)
    return False


def _register_metrics(node: Any) -> None:
    """Export reload and decision-log counters on the tier's ``/metrics`` (if it has one)."""
    metrics = getattr(getattr(node, "telemetry", None), "metrics", None)
    registry = getattr(metrics, "registry", None)
    if registry is None or getattr(node, "_policy_collector", None) is not None:
        return
    collector = _PolicyCollector(node)
    registry.register(collector)
    node._policy_collector = collector


class _PolicyCollector:
    """Scrape-time families: reloads by outcome, live policy version, decision log rows."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        tier = self.node.tier
        stats = self.node.policy_reloads
        reloads = CounterMetricFamily(
            "cascade_policy_reloads", "Policy file reloads: applied, or rejected (old kept).",
            labels=["tier", "outcome"])
        reloads.add_metric([tier, "applied"], stats["reloads"])
        reloads.add_metric([tier, "rejected"], stats["errors"])
        yield reloads
        info = GaugeMetricFamily("cascade_policy_info", "The live policy (value 1).",
                                 labels=["tier", "name", "version"])
        policy = self.node.policy
        info.add_metric([tier, policy.policy.name, policy.version], 1.0)
        yield info
        decision_log = getattr(getattr(self.node, "decisions", None), "log", None)
        if decision_log is not None:
            rows = CounterMetricFamily(
                "cascade_decision_log_rows", "Decision log rows: written, dropped (buffer full), "
                "lost (write failed).", labels=["tier", "outcome"])
            rows.add_metric([tier, "written"], decision_log.stats["written"])
            rows.add_metric([tier, "dropped"], decision_log.stats["dropped_full"])
            rows.add_metric([tier, "lost"], decision_log.stats["lost"])
            yield rows
