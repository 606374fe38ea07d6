"""Installing signed model bundles into a serving tier: verify, stage, probe, swap, canary,
promote or roll back (architecture §5; knobs in docs/model-updates.md).

An install runs in one task at a time per tier. Its steps and what a crash at each leaves:

1. **verify** the signature and every hash (:func:`cascade.models.bundle.read_bundle`) and that
   the bundle is for a task and ladder tier this tier serves, with the same classes and input;
2. **stage**: files written and fsynced under ``staging/``, moved into ``versions/`` in one
   rename (a crash: staging is wiped on start, a version the state does not name removed);
3. **probe**: the version is loaded and run on its probe set, one sample per call; its accuracy
   must not fall more than ``probe_tolerance`` below the served model's manifest accuracy or
   its own, its p95 must stay within ``probe_latency_p95_ms``;
4. **swap**: the state file names it (canary or active) in one ``os.replace``, then the node's
   task entry is replaced in one assignment on the event loop: between two requests.

While it is a canary, the outcome observer feeds its guards (:mod:`cascade.tier.canary`);
the verdict promotes it (the old version moves to ``previous``, ``keep_versions`` are kept) or
rolls it back (the version is marked refused; a scheduled pull does not try it again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import Classification
from cascade.errors import BundleRejected, ModelError, NotFound, UnknownTask
from cascade.gating.gate import Decision, decide
from cascade.gating.scoring import assess_output
from cascade.models.bundle import OpenedBundle, read_bundle
from cascade.models.manifest import Manifest, TierEntry
from cascade.models.signing import load_public_keys
from cascade.models.versions import InstalledVersion, VersionStore
from cascade.observability.outcome import RequestOutcome
from cascade.runners.base import Runner
from cascade.tier.canary import Canary, MeteredRunner
from cascade.tier.node import Node
from cascade.tier.settings import NodeSettings

if TYPE_CHECKING:
    from cascade.tier.bundle_source import BundleSource

__all__ = ["MANIFEST_VERSION", "Rollout", "RolloutCollector", "TaskModelLoader"]

log = logging.getLogger("cascade.tier.rollout")

MANIFEST_VERSION = "manifest"
"""The version label of a model served from the models directory (no bundle installed)."""
_MAX_SHADOWS = 4  # shadow runs in flight at once; more are skipped (counted), never queued
_SHADOW_DEADLINE_MS = 10_000
_HOLD_ENV = "CASCADE_FAULT_INSTALL_HOLD"  # test-only: pause an install at a step (see tests)

TaskModelLoader = Callable[[str, InstalledVersion | None], MeteredRunner]
"""Loads an installed version of a task (None: the models directory's model) as compose loads
every model (blocking calls, warm-up, metering)."""


class Rollout:
    """Model versions of one tier: installs, canaries, rollbacks, and what they report."""

    def __init__(self, settings: NodeSettings, store: VersionStore, manifest: Manifest,
                 load_version: TaskModelLoader) -> None:
        self.settings = settings
        self.config = settings.bundles
        self.store = store
        self.manifest = manifest
        self.keys = load_public_keys(self.config.trusted_keys)
        self._load_version = load_version
        self._lock = asyncio.Lock()
        self.node: Node | None = None
        self.source: BundleSource | None = None  # set by the composition root
        self.events: dict[tuple[str, str], int] = {}  # (task, outcome) -> count, for /metrics
        self._retiring: set[asyncio.Task[None]] = set()
        self._shadows: set[asyncio.Task[None]] = set()
        self.last_verdicts: dict[str, dict[str, Any]] = {}  # per task, for /readyz

    # -- binding to a node ----------------------------------------------------------------------

    def bind(self, node: Node) -> None:
        """Serve through ``node``: observe its outcomes, report in its /readyz, resume a canary
        that a restart interrupted (its window starts again)."""
        self.node = node
        node.rollout = self
        node.add_observer(self.observe)
        node.readiness_sections["model_versions"] = self.readiness
        for task in node.tasks:
            version = self.store.state(task).canary
            if version is not None:
                try:
                    runner = self._load_version(task, self.store.installed(task, version))
                except ModelError as exc:
                    log.error("canary %s of %s cannot be resumed: %s", version, task, exc.message)
                    self._forget_canary(task, version, refused=True)
                    continue
                self._start_canary(task, runner)

    def version_of(self, task: str) -> str:
        """The active version of ``task`` (``manifest`` when none is installed)."""
        return self.store.state(task).active or MANIFEST_VERSION

    # -- install --------------------------------------------------------------------------------

    async def install(self, data: bytes, *, what: str) -> dict[str, Any]:
        """Install the bundle in ``data``; a report of what happened, or
        :class:`BundleRejected` saying which check failed."""
        async with self._lock:
            started, task = time.perf_counter(), "unverified"
            try:
                bundle = await asyncio.to_thread(read_bundle, data, self.keys, what=what)
                task = bundle.meta.task
                return await self._install(bundle, what, started)
            except BundleRejected as exc:
                self._count(task, f"refused_{exc.code}")
                log.warning("model bundle refused: %s", exc.message,
                            extra={"fields": {"task": task, "code": exc.code}})
                raise

    async def _install(self, bundle: OpenedBundle, what: str, started: float) -> dict[str, Any]:
        meta = bundle.meta
        self._check_target(bundle, what)
        state = self.store.state(meta.task)
        if meta.version in (state.active, state.canary):
            return {"task": meta.task, "version": meta.version, "outcome": "already_installed"}
        await _hold("verified")
        staging = await asyncio.to_thread(self.store.stage, bundle)
        await _hold("written")
        installed = await asyncio.to_thread(self.store.publish, staging, meta)
        await _hold("staged")
        try:
            runner = await asyncio.to_thread(self._load_version, meta.task, installed)
        except Exception as exc:  # noqa: BLE001 - whatever the runtime raises on a bad file
            self._refuse(meta.task, meta.version)
            raise BundleRejected(f"{what}: the model does not load: {exc}",
                                 code="model_load_failed") from None
        try:
            probe = await self._probe(bundle, runner, what)
        except BundleRejected:
            runner.close()
            self._refuse(meta.task, meta.version)
            raise
        await _hold("probed")
        outcome = self._swap(meta.task, runner)
        log.info("%s: model version %s installed as %s (%s)", meta.task, meta.version, outcome, what,
                 extra={"fields": {"task": meta.task, "model_version": meta.version}})
        return {"task": meta.task, "version": meta.version, "outcome": outcome,
                "signer": bundle.signer, "probe": probe,
                "install_ms": round((time.perf_counter() - started) * 1000, 1)}

    def _check_target(self, bundle: OpenedBundle, what: str) -> None:
        meta = bundle.meta
        served = self.settings.tasks.get(meta.task)
        if served is None:
            raise BundleRejected(f"{what}: task {meta.task!r} is not served by tier "
                                 f"{self.settings.tier} (serves {', '.join(self.settings.tasks)})",
                                 code="bundle_wrong_target", field="task")
        if meta.tier != served:
            raise BundleRejected(f"{what}: a {meta.task}/{meta.tier} model; this tier serves "
                                 f"{meta.task} with the {served} model", code="bundle_wrong_target",
                                 field="tier")
        entry = self.manifest.task(meta.task)
        if tuple(meta.classes) != tuple(entry.classes) or meta.input_kind != entry.input_kind:
            raise BundleRejected(f"{what}: classes or input differ from the served task's "
                                 f"({', '.join(entry.classes)}; {entry.input_kind})",
                                 code="bundle_wrong_target", field="classes")

    async def _probe(self, bundle: OpenedBundle, runner: Runner, what: str) -> dict[str, Any]:
        """Run the probe set one sample per call; refuse on accuracy or latency."""
        inputs, labels = bundle.probe()
        correct, latencies = 0, []
        for i, label in enumerate(labels):
            sample = inputs[i:i + 1]
            begun = time.perf_counter()
            (output,) = await runner.run(sample, Deadline.from_ms(60_000))
            latencies.append((time.perf_counter() - begun) * 1000)
            assert isinstance(output, Classification)
            correct += output.classes[output.top_index] == label
        accuracy = correct / len(labels)
        p95 = float(np.percentile(latencies, 95))
        reference = self._served_accuracy(bundle.meta.task)
        claimed = bundle.meta.entry.accuracy
        floor = max(reference, claimed) - self.config.probe_tolerance
        report = {"accuracy": round(accuracy, 4), "samples": len(labels), "p95_ms": round(p95, 3),
                  "served_accuracy": reference, "bundle_accuracy": claimed}
        if accuracy < floor:
            raise BundleRejected(
                f"{what}: probe accuracy {accuracy:.2%} on {len(labels)} samples is below "
                f"{floor:.2%} (the higher of the served model's {reference:.2%} and the bundle's "
                f"own {claimed:.2%}, minus probe_tolerance {self.config.probe_tolerance:.2%})",
                code="probe_accuracy")
        if p95 > self.config.probe_latency_p95_ms:
            raise BundleRejected(f"{what}: probe p95 latency {p95:.1f} ms exceeds "
                                 f"probe_latency_p95_ms {self.config.probe_latency_p95_ms}",
                                 code="probe_latency")
        return report

    def _served_accuracy(self, task: str) -> float:
        active = self.store.state(task).active
        if active is not None:
            return self.store.installed(task, active).meta.entry.accuracy
        entry = self.manifest.tier(task, self.settings.tasks[task])
        assert isinstance(entry, TierEntry)
        return entry.accuracy

    # -- swap, canary, promote, roll back ---------------------------------------------------------

    def _swap(self, task: str, runner: MeteredRunner) -> str:
        """Name the new version in the state, then hand it to the node (canary or all)."""
        state = self.store.state(task)
        if self.config.canary.share > 0:
            if state.canary is not None:  # a newer version replaces a canary still running
                self._forget_canary(task, state.canary, refused=False)
            state.canary = runner.version
            self.store.commit()
            self._start_canary(task, runner)
            return "canary"
        self._promote(task, runner)
        return "promoted"

    def _start_canary(self, task: str, runner: MeteredRunner) -> None:
        assert self.node is not None
        current = self.node.tasks[task]
        stable = current.runner
        assert isinstance(stable, MeteredRunner)
        self.node.tasks[task] = replace(current, canary=Canary(runner, stable,
                                                               self.config.canary))
        self._count(task, "canary_started")

    def _promote(self, task: str, runner: MeteredRunner) -> None:
        assert self.node is not None
        state = self.store.state(task)
        if state.active is not None:
            state.previous = [state.active, *[v for v in state.previous if v != state.active]]
        state.previous = [v for v in state.previous if v != runner.version]
        state.previous = state.previous[:self.config.keep_versions]
        state.active, state.canary = runner.version, None
        self.store.commit()  # from here a restart serves the new version
        current = self.node.tasks[task]
        self.node.tasks[task] = replace(current, runner=runner, canary=None)
        self._retire(current.runner)
        self.store.prune(task)
        self._count(task, "promoted")

    def _forget_canary(self, task: str, version: str, *, refused: bool) -> None:
        state = self.store.state(task)
        state.canary = None
        if refused and version not in state.refused:
            state.refused.append(version)
        self.store.commit()
        if self.node is not None and task in self.node.tasks:
            current = self.node.tasks[task]
            if current.canary is not None:
                self.node.tasks[task] = replace(current, canary=None)
                self._retire(current.canary.runner)
        self.store.prune(task)

    def _refuse(self, task: str, version: str) -> None:
        state = self.store.state(task)
        if version not in state.refused:
            state.refused.append(version)
        self.store.commit()
        self.store.prune(task)

    def observe(self, outcome: RequestOutcome) -> None:
        """Count each version's answers and escalations; act on the canary's verdict."""
        runtime = self.node.tasks.get(outcome.task) if self.node is not None else None
        canary = runtime.canary if runtime is not None else None
        if canary is None:
            return
        for runner in (canary.runner, canary.stable):
            if outcome.model == runner.model_name:
                runner.stats.answered += 1
                runner.stats.escalated += outcome.decision == "escalate"
        if canary.take_shadow():
            self._shadow(outcome, canary)
        self._judge(outcome.task, canary)

    def _judge(self, task: str, canary: Canary) -> None:
        before = canary.verdict
        verdict, reason = canary.judge()
        if verdict != before:
            self._conclude(task, canary, verdict, reason)

    def _shadow(self, outcome: RequestOutcome, canary: Canary) -> None:
        """Run the canary on this request's input in the background and count what its gate
        would have decided (the answer went out already; at most _MAX_SHADOWS at a time)."""
        if len(self._shadows) >= _MAX_SHADOWS:
            canary.shadow_skipped += 1
            return
        assert self.node is not None
        runtime = self.node.tasks[outcome.task]

        async def run_shadow() -> None:
            try:
                x = runtime.decode(outcome.payload, max_text_chars=self.settings.max_text_chars,
                                   max_tokens=None)
                (output,) = await canary.runner.run(x, Deadline.from_ms(_SHADOW_DEADLINE_MS))
                scored = assess_output(output, outcome.rule, fields=runtime.fields)
                decision = decide(scored.confidence, scored.label, outcome.rule,
                                  has_upstream=outcome.has_upstream)
                canary.runner.stats.answered += 1
                canary.runner.stats.escalated += decision is Decision.ESCALATE
            except Exception as exc:  # noqa: BLE001 - counted by the meter; never raised
                log.debug("shadow run of %s failed: %s", canary.runner.version, exc)
            self._judge(outcome.task, canary)

        task = asyncio.get_running_loop().create_task(run_shadow())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    def _conclude(self, task: str, canary: Canary, verdict: str, reason: str) -> None:
        version = canary.runner.version
        if verdict == "promote":
            self._promote(task, canary.runner)
        else:
            self._forget_canary(task, version, refused=True)
            self._count(task, "rolled_back")
        log.log(logging.INFO if verdict == "promote" else logging.WARNING,
                "%s: canary %s %s (%s); it served %d of %d requests", task, version,
                "promoted" if verdict == "promote" else "rolled back",
                reason, canary.runner.stats.calls, canary.seen,
                extra={"fields": {"task": task, "model_version": version}})
        self.last_verdicts[task] = {"version": version, "verdict": verdict, "reason": reason,
                                    "canary_requests": canary.runner.stats.calls,
                                    "requests_seen": canary.seen}

    async def rollback(self, task: str, version: str | None = None) -> dict[str, Any]:
        """Stop a canary, or go back to ``version`` (default: the newest previous one, else the
        models directory's model)."""
        if self.node is None or task not in self.node.tasks:
            raise UnknownTask(f"task {task!r} is not served by tier {self.settings.tier}; "
                              f"allowed: {', '.join(sorted(self.settings.tasks))}", field="task")
        async with self._lock:
            state = self.store.state(task)
            installed = [v for v in (state.active, *state.previous) if v]
            if version not in (None, MANIFEST_VERSION, *installed):
                raise NotFound(f"{task}: version {version!r} is not installed here; installed: "
                               f"{', '.join([MANIFEST_VERSION, *installed])}", field="version")
            if state.canary is not None and version is None:
                stopped = state.canary
                self._forget_canary(task, stopped, refused=True)
                self._count(task, "rolled_back")
                return {"task": task, "stopped_canary": stopped, "version": self.version_of(task)}
            target = version or (state.previous[0] if state.previous else MANIFEST_VERSION)
            if target == self.version_of(task):
                return {"task": task, "version": target, "outcome": "already_active"}
            runner = await asyncio.to_thread(self._load_target, task, target)
            if state.active is not None:
                state.refused.append(state.active)
            state.previous = [v for v in state.previous if v != target]
            state.active, state.canary = (None if target == MANIFEST_VERSION else target), None
            self.store.commit()
            current = self.node.tasks[task]
            self.node.tasks[task] = replace(current, runner=runner, canary=None)
            self._retire(current.runner)
            self.store.prune(task)
            self._count(task, "rolled_back")
            log.warning("model of %s rolled back to %s", task, target,
                        extra={"fields": {"task": task, "model_version": target}})
            return {"task": task, "version": target, "outcome": "rolled_back"}

    def _load_target(self, task: str, version: str) -> MeteredRunner:
        if version == MANIFEST_VERSION:
            return self._load_version(task, None)
        return self._load_version(task, self.store.installed(task, version))

    def _retire(self, runner: Runner) -> None:
        """Close a replaced runner once the requests still using it are done."""
        async def close_when_idle() -> None:
            while getattr(runner, "in_flight", 0):
                await asyncio.sleep(0.05)
            runner.close()

        task = asyncio.get_running_loop().create_task(close_when_idle())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _count(self, task: str, outcome: str) -> None:
        self.events[(task, outcome)] = self.events.get((task, outcome), 0) + 1

    # -- reporting -------------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        """``/readyz``'s ``model_versions``: per task the active version, canary, history."""
        out: dict[str, Any] = {}
        for task, runtime in (self.node.tasks.items() if self.node else ()):
            state = self.store.state(task)
            out[task] = {"version": self.version_of(task), "model": runtime.runner.model_name,
                         "canary": runtime.canary.view() if runtime.canary else None,
                         "previous": list(state.previous), "refused": list(state.refused),
                         "last_verdict": self.last_verdicts.get(task)}
        return out


async def _hold(step: str) -> None:
    """Test-only fault injection: with ``CASCADE_FAULT_INSTALL_HOLD=<step>``, an install stops
    here for good (the tier keeps serving; the test SIGKILLs it) after writing the marker file
    ``CASCADE_FAULT_INSTALL_HOLD_MARKER`` the test waits for."""
    if os.environ.get(_HOLD_ENV) == step:
        marker = os.environ.get(f"{_HOLD_ENV}_MARKER")
        if marker:
            with open(marker, "w") as handle:  # noqa: ASYNC230 - a few bytes, test-only
                handle.write(step)
        await asyncio.Event().wait()


class RolloutCollector(Collector):
    """``/metrics`` of model versions, read at scrape time: which version serves each task (and
    which is in canary), what the canary did, and install, promotion and rollback counts."""

    def __init__(self, tier: str, rollout: Rollout) -> None:
        self.tier = tier
        self.rollout = rollout

    def describe(self) -> list[Any]:
        return []  # dynamic: one series per task and version

    def collect(self) -> Iterator[Any]:
        info = GaugeMetricFamily("cascade_model_version_info", "Always 1: the model version "
                                 "serving each task (role active) and any canary.",
                                 labels=["tier", "task", "version", "role"])
        canary_calls = GaugeMetricFamily("cascade_canary_requests", "Requests the canary "
                                         "version answered in its window so far.",
                                 labels=["tier", "task", "version"])
        events = CounterMetricFamily("cascade_model_rollout_events", "Model version events: "
                                     "canary_started, promoted, rolled_back, refused_<code>.",
                                     labels=["tier", "task", "event"])
        node = self.rollout.node
        for task, runtime in (node.tasks.items() if node is not None else ()):
            info.add_metric([self.tier, task, self.rollout.version_of(task), "active"], 1)
            if runtime.canary is not None:
                version = runtime.canary.runner.version
                info.add_metric([self.tier, task, version, "canary"], 1)
                canary_calls.add_metric([self.tier, task, version],
                                        runtime.canary.runner.stats.calls)
        for (task, event), count in sorted(self.rollout.events.items()):
            events.add_metric([self.tier, task, event], count)
        yield from (info, canary_calls, events)
