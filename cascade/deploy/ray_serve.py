"""One tier as a Ray Serve application: the only module of cascade that imports Ray.

The application is two kinds of deployment, built from the tier's own node config
(``edge_nodes/*.yaml``, ``cloud/cloud.yaml``; knobs under ``ray_serve:``)::

    Serve HTTP proxy ─▶ <tier>-ingress ──DeploymentHandle──▶ <tier>-model-<task>  (one per task)
                        the FastAPI app of                   the task's model, @serve.batch:
                        cascade.http.app (same routes,       concurrent requests computed in
                        errors, /readyz, /metrics,           one batch, each answer exactly
                        OpenAPI); the Node, built in          as alone (cascade.runners.batching);
                        the replica; policy = user_config    autoscaled (autoscaling_config)

The ingress is the unchanged tier: idempotency, gate, escalation over HTTP to the upstream,
outbox, traces and metrics. Its runners are :class:`ServeHandleRunner`, which call the model
deployment through a ``DeploymentHandle``. ``user_config: {"policy": {...}}`` on the ingress is
the tier's policy, applied live by ``reconfigure()`` through the same validation as a policy
file's hot reload (an invalid one is refused, counted and logged naming its source and key;
the old one stays).

Run it with ``serve run cascade.deploy.ray_serve:app_builder config=cloud/cloud.yaml`` or a
config file (``cloud/serve_config.yaml``), or from Python with :func:`deploy_tier`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import yaml
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.util import get_node_ip_address
from ray.util.metrics import Gauge

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import Classification, Output
from cascade.deploy.replicas import MetricsMirror, ReplicaHeaderMiddleware
from cascade.errors import CascadeError, ConfigError, ModelError, PolicyError, ServiceUnavailable
from cascade.http.app import create_app
from cascade.models.manifest import load_manifest, load_split
from cascade.models.repository import model_spec
from cascade.policy.loader import parse_policy
from cascade.policy.reload import apply_policy_bytes, refuse_policy
from cascade.runners.base import BatchClassifier, Runner
from cascade.runners.batching import ExactBatcher, batching_is_exact
from cascade.runners.execution import BlockingCalls
from cascade.runners.registry import ModelSpec, load_runner
from cascade.tier.compose import build_node
from cascade.tier.node import Node
from cascade.tier.settings import NodeSettings, load_node_settings

__all__ = ["HandleTransport", "ServeHandleRunner", "TaskModel", "TierIngress", "app_builder", "build_tier_app",
           "deploy_chain", "deploy_tier", "policy_user_config", "portable_settings",
           "start_ray", "stop_ray", "validate_user_config"]

log = logging.getLogger("cascade.deploy.ray_serve")

EXACTNESS_SAMPLES = 64
"""Held-out rows on which a model replica measures whether batching is exact."""

_USER_CONFIG_KEYS = ("policy", "source")


class ServeHandleRunner:
    """A :class:`~cascade.runners.base.Runner` whose model runs in the task's model
    deployment, reached through a ``DeploymentHandle`` (the call is bounded by the deadline)."""

    def __init__(self, handle: DeploymentHandle[Any], *, task: str, model_name: str,
                 classes: tuple[str, ...]) -> None:
        self.task = task
        self.model_name = model_name
        self.classes = classes
        self._handle = handle

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """One :class:`Classification` per input row, computed by a model replica."""
        response = self._handle.predict.remote(inputs)
        timeout = None if deadline is None else max(0.001, deadline.remaining_s())
        try:
            probabilities = await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]
            raise ServiceUnavailable(f"model {self.model_name} did not answer before the "
                                     "request's deadline", code="model_busy") from None
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise ServiceUnavailable(f"model {self.model_name} is unavailable: {exc}",
                                     code="model_busy") from None
        except RayTaskError as exc:
            if isinstance(exc.cause, CascadeError):
                raise exc.cause from None  # e.g. an input the model refuses: the same 4xx
            raise ServiceUnavailable(f"model {self.model_name} failed: {exc.cause!r}",
                                     code="model_error") from None
        return [Classification(row, self.classes) for row in probabilities]

    def warmup(self) -> None:
        """Nothing here: each model replica warms its model when it starts."""

    def close(self) -> None:
        """Nothing to release: the handle belongs to Serve."""


class HandleTransport(httpx.AsyncBaseTransport):
    """Carries the upstream client's HTTP requests to a tier's ingress on the same Serve
    cluster through a ``DeploymentHandle`` (no proxy hop). The upstream client keeps doing
    everything else as over HTTP: headers (``traceparent``, deadline, hop count, idempotency
    key), retries, circuit breaker, outbox. A dead or unreachable ingress is a connect error,
    a call past its timeout a read timeout, as the client expects of any transport."""

    def __init__(self, handle: DeploymentHandle[Any], *, strip_prefix: str = "") -> None:
        self.handle = handle
        self._prefix = strip_prefix.rstrip("/")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to the ingress's :meth:`TierIngress.handle_http`."""
        path = request.url.raw_path.decode()
        if self._prefix and path.startswith(self._prefix):
            path = path[len(self._prefix):] or "/"
        body = await request.aread()
        timeouts = request.extensions.get("timeout") or {}
        timeout = timeouts.get("read")
        response = self.handle.handle_http.remote(request.method, path,
                                                   list(request.headers.items()), body)
        try:
            status, headers, content = await asyncio.wait_for(response, timeout)
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]
            raise httpx.ReadTimeout("the upstream ingress did not answer in time",
                                    request=request) from None
        except (RayTaskError, BackPressureError, DeploymentUnavailableError) as exc:
            raise httpx.ConnectError(f"upstream ingress unreachable: {exc}",
                                     request=request) from None
        return httpx.Response(status, headers=headers, content=content, request=request)


@serve.deployment
class TaskModel:
    """One task's model as a Serve deployment; concurrent calls are computed in batches that
    answer each request exactly as alone (see :mod:`cascade.runners.batching`)."""

    def __init__(self, settings: dict[str, Any], task: str) -> None:
        """Load, verify and warm the model; measure whether vectorized batches are exact."""
        node = NodeSettings.model_validate(settings)
        knobs = node.ray_serve
        manifest = load_manifest(Path(node.models_dir))
        spec = model_spec(manifest, task, node.tasks[task], verify_sha256=node.verify_models,
                          calls=BlockingCalls(name=f"{task}/{node.tasks[task]}", mode="inline"))
        runner = load_runner(spec)
        if not isinstance(runner, BatchClassifier):
            raise ModelError(f"{spec.model_name}: runtime {spec.runtime!r} has no batch API "
                             "(predict_proba), which a batching model deployment needs; "
                             "serve it in the ingress (ray_serve.model_deployments: false)",
                             field="runtime")
        runner.warmup()
        self.model_name = spec.model_name
        vectorized = _exact_when_vectorized(runner, Path(node.models_dir), task,
                                            knobs.max_batch_size)
        self._batcher = ExactBatcher(runner.predict_proba, vectorized=vectorized)
        self.predict.set_max_batch_size(knobs.max_batch_size)  # type: ignore[attr-defined]
        self.predict.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            knobs.batch_wait_timeout_s)
        log.info("model %s ready: batches of up to %d computed %s", spec.model_name,
                 knobs.max_batch_size, "vectorized" if vectorized else "sample by sample")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def predict(self, batch: list[Any]) -> list[npt.NDArray[np.floating[Any]]]:
        """Probabilities per request of ``batch`` (each caller sends one decoded input)."""
        return self._batcher.run(batch)

    def stats(self) -> dict[str, Any]:
        """Batches, requests and samples computed by this replica, and how."""
        return {"model": self.model_name, "vectorized": self._batcher.vectorized,
                **self._batcher.stats.as_dict()}


def _exact_when_vectorized(runner: BatchClassifier, models_dir: Path, task: str,
                           max_batch_size: int) -> bool:
    """Whether this model may compute batches as one tensor: only when it gives bit-identical
    answers that way on held-out rows (no built-in model does; see cascade.runners.batching)."""
    if max_batch_size < 2:
        return False
    try:
        inputs, _labels = load_split(models_dir, task, "calib")
    except (CascadeError, OSError) as exc:
        log.info("%s: no held-out rows to measure batching on (%s): sample by sample",
                 runner.model_name, exc)
        return False
    return batching_is_exact(runner.predict_proba, inputs[:EXACTNESS_SAMPLES],
                             max_batch_size=max_batch_size)


@serve.ingress()
class TierIngress:
    """The tier's FastAPI app (:func:`cascade.http.app.create_app`) as a Serve ingress."""

    def __init__(self, settings: dict[str, Any], models: dict[str, DeploymentHandle[Any]]) -> None:
        """``models``: the handle of each task's model deployment."""
        self._settings = NodeSettings.model_validate(settings)
        self._models = models
        self._node: Node | None = None
        self._pending_user_config: dict[str, Any] | None = None
        # Serve's replica id and its node's address: which replica, and where it runs.
        node_ip = get_node_ip_address()  # type: ignore[no-untyped-call]
        self.replica = f"{serve.get_replica_context().replica_tag}@{node_ip}"

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve in the replica; the app's lifespan then builds the node here."""
        self._app = create_app(self._build_node, max_body_bytes=self._settings.max_body_bytes)
        self._app.add_middleware(ReplicaHeaderMiddleware, replica=self.replica)
        return self._app

    async def handle_http(self, method: str, path: str, headers: list[tuple[str, str]],
                          body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """One HTTP request to this tier's app from a tier below on the same cluster (see
        :class:`HandleTransport`): the same routes, middleware, errors and spans as over HTTP."""
        transport = httpx.ASGITransport(app=self._app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tier") as client:
            response = await client.request(method, path, headers=headers, content=body)
        return response.status_code, list(response.headers.items()), response.content

    def _build_node(self) -> Node:
        from cascade.observability.telemetry import setup_tracing

        setup_tracing(self._settings.tier, trace_dir=self._settings.trace_dir)
        # Tasks without a model deployment load their models here, by their manifest runtime.
        models = self._models

        def load(spec: ModelSpec) -> Runner:
            return self._handle_runner(spec) if spec.task in models else load_runner(spec)

        transport = self._transport()
        self._node = build_node(self._settings, load=load, upstream_transport=transport,
                                replica=self.replica)
        # A handle's first call sets up its router (a second or more on a busy machine): do
        # that now, not on the first request's deadline.
        loop = asyncio.get_running_loop()
        self._warmup = loop.create_task(self._warm_handles(transport))
        interval_s = self._settings.ray_serve.metrics_export_interval_s
        if interval_s > 0:
            self._metrics_export = loop.create_task(self._export_metrics(self._node, interval_s))
        if self._pending_user_config is not None:  # arrived before the node existed
            self.reconfigure(self._pending_user_config)
        return self._node

    async def _warm_handles(self, transport: HandleTransport | None) -> None:
        calls = [handle.stats.remote() for handle in self._models.values()]
        if transport is not None:
            calls.append(transport.handle.handle_http.remote("GET", "/healthz", [], b""))
        # The upstream may not be up yet: a failed warm-up only means a cold first call.
        await asyncio.gather(*calls, return_exceptions=True)

    async def _export_metrics(self, node: Node, interval_s: float) -> None:
        """Copy this replica's metrics into Ray's every ``interval_s`` (see MetricsMirror)."""
        mirror = MetricsMirror(_ray_gauge, replica=self.replica)
        metrics = node.telemetry.metrics
        while True:
            await metrics.refresh()
            mirror.export(metrics.registry)
            await asyncio.sleep(interval_s)

    def _transport(self) -> HandleTransport | None:
        """To the upstream tier's ingress by handle, when it is a Serve app of this cluster."""
        app = self._settings.ray_serve.upstream_app
        if app is None or not self._settings.upstream_url:
            return None
        return HandleTransport(serve.get_deployment_handle(f"{app}-ingress", app_name=app),
                               strip_prefix=urlsplit(self._settings.upstream_url).path)

    def _handle_runner(self, spec: ModelSpec) -> Runner:
        return ServeHandleRunner(self._models[spec.task], task=spec.task,
                                 model_name=spec.model_name, classes=spec.classes)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's live update: apply ``user_config['policy']`` like a hot-reloaded file."""
        if not user_config:
            return
        if self._node is None:
            self._pending_user_config = user_config
            return
        self._pending_user_config = None
        source = str(user_config.get("source") or "serve user_config")
        problem = _user_config_problem(user_config)
        if problem is not None:
            refuse_policy(self._node, f"{source}: {problem}", "reconfigure")
            return
        raw = yaml.safe_dump(user_config["policy"], sort_keys=False).encode()
        apply_policy_bytes(self._node, raw, source=f"{source} (user_config.policy)",
                           reason="reconfigure")

    def stats(self) -> dict[str, Any]:
        """The node's readiness report (what ``/readyz`` shows), for tests and operators."""
        return {} if self._node is None else self._node.readiness()


def _ray_gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Gauge:
    """A Ray gauge (exported by each node's metrics agent as ``ray_<name>``)."""
    return Gauge(name, description=description, tag_keys=tag_keys)


def policy_user_config(path: Path | str) -> dict[str, Any]:
    """The ingress ``user_config`` carrying the policy file at ``path``."""
    data = yaml.safe_load(Path(path).read_text())
    return {"policy": data, "source": str(path)}


def _user_config_problem(user_config: Any) -> str | None:
    """What is wrong with the shape of an ingress ``user_config`` (None: nothing)."""
    if not isinstance(user_config, dict):
        return f"user_config: must be a mapping with keys {', '.join(_USER_CONFIG_KEYS)}"
    unknown = sorted(set(user_config) - set(_USER_CONFIG_KEYS))
    if unknown:
        return (f"user_config: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: "
                f"{', '.join(_USER_CONFIG_KEYS)}")
    if not isinstance(user_config.get("policy"), dict):
        return "user_config.policy: missing or not a mapping (the policy YAML's content)"
    return None


def validate_user_config(user_config: Any) -> None:
    """Raise :class:`PolicyError` (naming source and key) unless a replica would apply
    ``user_config``: the check to run on a config file before it ships."""
    source = str(user_config.get("source") or "serve user_config") \
        if isinstance(user_config, dict) else "serve user_config"
    problem = _user_config_problem(user_config)
    if problem is not None:
        raise PolicyError(f"{source}: {problem}", file=source, key="user_config")
    parse_policy(user_config["policy"], source=f"{source} (user_config.policy)")


def portable_settings(settings: NodeSettings) -> dict[str, Any]:
    """``settings`` as plain data for the replicas, with every path made absolute (replicas
    need not share the driver's working directory)."""
    data = settings.model_dump(mode="json")
    data["models_dir"] = str(Path(settings.models_dir).resolve())
    data["policy"] = str(Path(settings.policy).resolve())
    if settings.trace_dir is not None:
        data["trace_dir"] = str(Path(settings.trace_dir).resolve())
    url = settings.resolved_outbox_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        url = prefix + str(Path(url.removeprefix(prefix)).resolve())
    data["outbox_url"] = url
    return data


def deployed_tasks(settings: NodeSettings) -> list[str]:
    """The tasks whose models get a deployment of their own (``ray_serve.model_deployments``):
    every classification task for ``true``, none for ``false``, else the listed ones, each of
    which must be a classification task the tier serves (:class:`ConfigError` naming it)."""
    choice = settings.ray_serve.model_deployments
    if choice is False:
        return []
    manifest = load_manifest(Path(settings.models_dir))
    if choice is True:
        return [t for t in settings.tasks if not manifest.task(t).generative]
    key = f"{settings.tier}: ray_serve.model_deployments"
    for task in choice:
        if task not in settings.tasks:
            raise ConfigError(f"{key} lists {task!r}, which this tier does not serve (it "
                              f"serves {', '.join(settings.tasks)})",
                              field="ray_serve.model_deployments")
        if manifest.task(task).generative:
            raise ConfigError(f"{key} lists {task!r}, a generative task: its model has no batch "
                              "API to deploy apart; it runs in the ingress (or behind its own "
                              "model server)", field="ray_serve.model_deployments")
    return list(dict.fromkeys(choice))


def build_tier_app(settings: NodeSettings, *,
                   user_config: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application of one tier: a model deployment per task and the ingress."""
    if settings.tls is not None:  # the Serve proxy would serve it plain, and no caller has a cert
        raise ConfigError(f"{settings.tier}: tls is not served by a Ray Serve tier (its proxy "
                          "speaks plain HTTP); terminate TLS in front of the proxy and drop "
                          "the tls: block", field="tls")
    knobs = settings.ray_serve
    data = portable_settings(settings)
    version = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    models = {}
    for task in deployed_tasks(settings):
        models[task] = _versioned(TaskModel, version).options(
            name=f"{settings.tier}-model-{task}",
            ray_actor_options={"num_cpus": knobs.model_num_cpus},
            max_ongoing_requests=2 * knobs.max_batch_size,  # one batch computing, one filling
            autoscaling_config={
                "min_replicas": knobs.model_min_replicas,
                "max_replicas": knobs.model_max_replicas,
                "target_ongoing_requests": knobs.model_target_ongoing_requests,
                "upscale_delay_s": knobs.model_upscale_delay_s,
                "downscale_delay_s": knobs.model_downscale_delay_s,
            },
        ).bind(data, task)
    ingress = _versioned(serve.deployment(TierIngress), version).options(
        name=f"{settings.tier}-ingress", num_replicas=knobs.ingress_replicas,
        ray_actor_options={"num_cpus": knobs.ingress_num_cpus},
        max_ongoing_requests=knobs.ingress_max_ongoing_requests, user_config=user_config,
    )
    app: serve.Application = ingress.bind(data, models)
    return app


def _versioned(deployment: Any, version: str) -> Any:
    """``deployment`` with a fixed code version. The Python API gives each ``serve.run`` a
    random one, which replaces every replica; with the same settings (same version) a redeploy
    that changes only ``user_config`` reconfigures the running replicas in place, as a config
    file deploy does. (Serve reserves ``version`` for itself, hence ``_internal``.)"""
    return deployment.options(version=version, _internal=True)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``cloud/serve_config.yaml``).

    ``args``: ``config`` (the node config file), optionally ``overrides`` (node config keys,
    as ``CASCADE_*`` variables would set them) and ``policy_user_config`` (a policy file whose
    content becomes the ingress's ``user_config``: an edited policy redeployed with the same
    config reconfigures the running replicas in place)."""
    settings = load_node_settings(args["config"], **dict(args.get("overrides") or {}))
    policy = args.get("policy_user_config")
    return build_tier_app(settings, user_config=policy_user_config(policy) if policy else None)


def deploy_tier(settings: NodeSettings, *, user_config: dict[str, Any] | None = None,
                blocking: bool = False) -> DeploymentHandle[Any]:
    """Start Serve's HTTP proxy on the tier's host and port (Ray must be initialised, or a
    local instance is started) and run the tier's application; returns the ingress handle."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_tier_app(settings, user_config=user_config)
    return serve.run(app, name=settings.tier, route_prefix=settings.ray_serve.route_prefix,
                     blocking=blocking)


def chain_on_one_proxy(settings: Sequence[NodeSettings], *, host: str, port: int,
                       via_handles: bool = True) -> list[NodeSettings]:
    """Tiers (bottom to top) rewired to share one Serve proxy at ``host:port``: the bottom one
    at ``/``, each other at ``/<tier>``, each upstream the next tier's prefix (reached through
    a ``DeploymentHandle`` when ``via_handles``, else through the proxy); the top keeps its
    own ``upstream_url`` (none, for a cloud)."""
    prefixes = ["/"] + [f"/{tier.tier}" for tier in settings[1:]]
    wired = []
    for i, tier in enumerate(settings):
        has_next = i + 1 < len(settings)
        upstream = f"http://{host}:{port}{prefixes[i + 1]}" if has_next else tier.upstream_url
        knobs = tier.ray_serve.model_copy(update={
            "route_prefix": prefixes[i],
            "upstream_app": settings[i + 1].tier if has_next and via_handles else None})
        wired.append(tier.model_copy(update={"host": host, "port": port,
                                             "upstream_url": upstream, "ray_serve": knobs}))
    return wired


def deploy_chain(settings: Sequence[NodeSettings], *, host: str | None = None,
                 port: int | None = None, via_handles: bool = True) -> list[NodeSettings]:
    """Deploy tiers (bottom to top) as Serve applications behind one proxy (by default on the
    bottom tier's host and port), top first so every upstream exists before its client.
    Returns each tier's settings as deployed (what a later :func:`deploy_tier` with a new
    ``user_config`` must be given, to reconfigure instead of replacing the replicas)."""
    wired = chain_on_one_proxy(settings, host=host or settings[0].host,
                               port=port or settings[0].port, via_handles=via_handles)
    for tier in reversed(wired):
        deploy_tier(tier)
    return wired


def start_ray(*, address: str | None = None, num_cpus: int | None = None,
              object_store_bytes: int | None = None) -> None:
    """Connect to a Ray cluster (``address``, e.g. ``auto``) or start a small local instance
    (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_bytes)


def stop_ray() -> None:
    """Delete every Serve application, stop Serve, and leave (or stop) the Ray instance."""
    import ray

    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
