"""The composition root of a tier: the one place that turns settings into a working
:class:`~cascade.tier.node.Node` and its collaborators.

It loads each task's model from the models directory by its runtime (checksum verified, warmed
up, measured: inline or off the loop), the policy, the upstream client and its breaker, the
durable outbox, and the observers (telemetry, decision log, drift alarm). Everything else
receives what it needs; nothing below this module reads settings to build its own parts.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx

from cascade.contract.input_schemas import input_json_schema
from cascade.contract.inputs import input_decoder
from cascade.gating.drift_monitor import DriftMonitor
from cascade.models.manifest import Manifest, load_manifest
from cascade.models.prompting import MAX_DOCUMENT_CHARS, tier_decoder
from cascade.models.repository import model_spec
from cascade.models.versions import InstalledVersion, VersionStore
from cascade.observability.decisionlog import DecisionRecorder
from cascade.observability.examples import HardExampleStore
from cascade.observability.telemetry import TierTelemetry, upstream_attempt
from cascade.outbox import Outbox
from cascade.policy import LoadedPolicy, load_policy
from cascade.runners.base import Runner
from cascade.runners.execution import BlockingCalls
from cascade.runners.registry import Loader, load_runner
from cascade.tier.audit import Auditor
from cascade.tier.bundle_source import BundleSource
from cascade.tier.canary import MeteredRunner, metered
from cascade.tier.disk import build_disk_usage
from cascade.tier.node import Node, TaskRuntime
from cascade.tier.pressure import PressureGuard
from cascade.tier.rollout import MANIFEST_VERSION, Rollout, RolloutCollector, TaskModelLoader
from cascade.tier.settings import NodeSettings
from cascade.trust import TierTrust
from cascade.upstream.breaker import CircuitBreaker
from cascade.upstream.client import UpstreamClient

__all__ = ["build_fallbacks", "build_node", "build_tasks", "build_trust", "build_upstream",
           "open_version_store", "task_model_loader"]


def build_tasks(settings: NodeSettings, telemetry: TierTelemetry, *,
                load: Loader = load_runner,
                store: VersionStore | None = None) -> dict[str, TaskRuntime]:
    """Each served task's runner (by runtime, checksum verified, warmed up, metered) and input
    decoder (built from the task's declared input, or the built-in decoder of its kind).

    ``load``: turns a model spec into a runner; by default the manifest's runtime, while a Ray
    Serve ingress passes one that calls the task's model deployment. ``store``: installed model
    versions (signed bundles); a task with an active version serves it instead of the models
    directory's model."""
    manifest = load_manifest(Path(settings.models_dir))
    load_version = task_model_loader(settings, telemetry, manifest, load)
    tasks: dict[str, TaskRuntime] = {}
    for task, model_tier in settings.tasks.items():
        active = store.state(task).active if store is not None else None
        installed = store.installed(task, active) if store is not None and active else None
        runner = load_version(task, installed)
        entry = manifest.task(task)
        max_chars = settings.max_text_chars
        if entry.generative:
            # The prompt style of this tier's model turns the request into its prompt.
            decode = tier_decoder(manifest, task, model_tier)
            max_chars = min(max_chars, MAX_DOCUMENT_CHARS)
        else:
            # A registered task's decoder is configured by its declared input; built-ins by kind.
            decode = input_decoder(entry.input_kind, entry.input)
        schema = input_json_schema(entry.input_kind, entry.input, max_text_chars=max_chars)
        tasks[task] = TaskRuntime(name=task, runner=runner, decode=decode,
                                  fields=entry.fields or None, input_schema=schema)
    return tasks


def blocking_calls(settings: NodeSettings, telemetry: TierTelemetry, task: str,
                   model: str) -> BlockingCalls:
    """The executor of one model's blocking calls (``runner_offload``, its concurrency and
    threshold from the node config; waits metered per task)."""
    return BlockingCalls(
        name=f"{task}/{model}", mode=settings.runner_offload,
        max_concurrency=settings.runner_concurrency,
        offload_above_ms=settings.runner_offload_above_ms,
        on_wait=partial(telemetry.metrics.observe_runner_wait, task))


def build_fallbacks(settings: NodeSettings, policy: LoadedPolicy, telemetry: TierTelemetry, *,
                    load: Loader = load_runner) -> dict[str, dict[str, Runner]]:
    """The fallback models the policy names for this tier (``tasks.<task>.tiers.<tier>.
    pressure.fallback_model``), loaded like the task's own model (checksum, warm-up)."""
    manifest = load_manifest(Path(settings.models_dir))
    out: dict[str, dict[str, Runner]] = {}
    for task in settings.tasks:
        tier_policy = policy.policy.tasks[task].tiers.get(settings.tier)
        name = tier_policy.pressure.fallback_model if tier_policy is not None else None
        if name is None:
            continue
        calls = blocking_calls(settings, telemetry, task, f"{name} (fallback)")
        runner = load(model_spec(manifest, task, name, verify_sha256=settings.verify_models,
                                 calls=calls))
        runner.warmup()
        out.setdefault(task, {})[name] = runner
    return out


def task_model_loader(settings: NodeSettings, telemetry: TierTelemetry, manifest: Manifest,
                      load: Loader) -> TaskModelLoader:
    """How this tier loads a task's model, from the models directory or an installed version:
    its blocking-call executor, checksum, warm-up (auto mode measures it here) and meter."""
    metrics = telemetry.metrics

    def load_version(task: str, installed: InstalledVersion | None) -> MeteredRunner:
        model_tier = settings.tasks[task]
        calls = blocking_calls(settings, telemetry, task, model_tier)
        if installed is None:
            spec = model_spec(manifest, task, model_tier, verify_sha256=settings.verify_models,
                              calls=calls, options=settings.model_options.get(task))
        else:
            spec = installed.spec(task, calls=calls)
        runner = load(spec)
        runner.warmup()  # measures it: auto mode now knows whether to offload
        metrics.set_runner_offloaded(task, not calls.inline)
        return metered(runner, MANIFEST_VERSION if installed is None
                       else installed.meta.version)

    return load_version


def build_trust(settings: NodeSettings) -> TierTrust:
    """The tier's TLS material, client keys and callback policy (files read now)."""
    return TierTrust.from_settings(settings.tier, settings.tls, settings.clients,
                                   settings.callbacks)


def build_upstream(settings: NodeSettings, *,
                   transport: httpx.AsyncBaseTransport | None = None,
                   trust: TierTrust | None = None) -> UpstreamClient | None:
    """The client of the next tier (with its circuit breaker), or None at the top tier.
    ``transport``: how its requests travel (default: HTTP to ``upstream_url``; a Ray Serve
    tier passes one that calls the next tier's ingress through a ``DeploymentHandle``).
    ``trust``: with TLS, the client presents the tier's certificate, trusts only the site CA
    and follows certificate reloads."""
    if not settings.upstream_url:
        return None
    tls = trust.tls if trust is not None else None
    client = UpstreamClient(
        settings.upstream_url,
        breaker=CircuitBreaker(failure_threshold=settings.breaker_failure_threshold,
                               reset_timeout_s=settings.breaker_reset_s),
        max_attempts=settings.upstream_max_attempts,
        backoff_initial_ms=settings.upstream_backoff_initial_ms,
        backoff_max_ms=settings.upstream_backoff_max_ms,
        connect_timeout_ms=settings.upstream_connect_timeout_ms,
        transport=transport,
        on_attempt=upstream_attempt,
        tls=tls.client_context() if tls is not None else None,
    )
    if tls is not None:
        tls.on_reload(client.use_tls)
    return client


def build_node(settings: NodeSettings, *, load: Loader = load_runner,
               upstream_transport: httpx.AsyncBaseTransport | None = None,
               replica: str | None = None) -> Node:
    """A tier ready to serve: raises a :class:`~cascade.errors.CascadeError` naming what is
    wrong (model file, checksum, policy key, outbox URL) before any port is bound. ``load``:
    see :func:`build_tasks`; ``upstream_transport``: see :func:`build_upstream`; ``replica``:
    this process among several serving the tier (its decision log gets its own file)."""
    telemetry = TierTelemetry(settings.tier)
    store = open_version_store(settings)
    tasks = build_tasks(settings, telemetry, load=load, store=store)
    policy = load_policy(settings.policy)
    pressure = PressureGuard(settings.tier, build_fallbacks(settings, policy, telemetry, load=load))
    model_files = (getattr(rt.runner, "path", None) for rt in tasks.values())
    disk = build_disk_usage(settings, (path for path in model_files if path is not None))
    decisions = DecisionRecorder(settings.tier, gauge=disk.gauge("decisions"),
                                 retention_s=settings.disk.decisions_retention_s,
                                 replica=replica)
    trust = build_trust(settings)
    telemetry.metrics.registry.register(trust.collector())
    # Audits get their own client: their failures never open the traffic's breaker.
    auditor = Auditor(settings.tier, upstream=build_upstream(settings, transport=upstream_transport,
                                                             trust=trust),
                      examples=HardExampleStore(settings.tier))
    # The durable outbox also keeps idempotent results, so the top tier has one too.
    node = Node(settings, tasks=tasks, policy=policy,
                upstream=build_upstream(settings, transport=upstream_transport, trust=trust),
                escalations=Outbox.from_settings(settings, disk, trust.callbacks),
                telemetry=telemetry, decisions=decisions, drift=DriftMonitor(settings.tier),
                disk=disk, auditor=auditor, pressure=pressure, replica=replica, trust=trust)
    if store is not None:
        manifest = load_manifest(Path(settings.models_dir))
        rollout = Rollout(settings, store, manifest,
                          task_model_loader(settings, telemetry, manifest, load))
        rollout.source = BundleSource(rollout, settings.upstream_url, tls=trust.tls)
        rollout.bind(node)
        telemetry.metrics.registry.register(RolloutCollector(settings.tier, rollout))
    return node


def open_version_store(settings: NodeSettings) -> VersionStore | None:
    """The tier's installed model versions, when it takes signed bundles (``bundles.
    trusted_keys`` or ``bundles.store_dir`` set); unfinished installs are dropped here."""
    bundles = settings.bundles
    if not bundles.trusted_keys and bundles.store_dir is None:
        return None
    return VersionStore.open(bundles.store_dir or Path("var") / f"models-{settings.tier}")
