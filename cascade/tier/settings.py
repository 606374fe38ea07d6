"""Node configuration: one YAML file per tier, overridable by ``CASCADE_*`` environment variables.

Precedence (highest first): explicit overrides passed in code, environment variables
(``CASCADE_PORT=9000``, ``CASCADE_UPSTREAM_URL=...``), then the YAML node config file, then the
defaults below. Relative paths are resolved against the current working directory (``cascade
up`` and ``make run`` run from the project root).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

from cascade.errors import ConfigError
from cascade.observability.disk import DiskSettings
from cascade.outbox.config import OutboxSettings
from cascade.policy.schema import TIER_NAME
from cascade.tier.rollout_settings import BundleSettings
from cascade.trust import CallbackSettings, ClientAuthSettings, TlsSettings

ENV_PREFIX = "CASCADE_"


class RayServeSettings(BaseModel):
    """How the tier runs as a Ray Serve application (``cascade.deploy.ray_serve``); ignored by
    ``cascade serve``. See ``edge_nodes/README.md``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_deployments: bool | list[str] = Field(
        True, description="Which tasks' models run in their own batched, autoscaled deployment: "
        "true: every classification task (generative models run in the ingress, or behind "
        "their own server); false: none, all in the ingress replica (one Ray hop less per "
        "request, no batching); a list: those tasks.")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Most concurrent requests a model replica takes in one call.")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0, le=10, description="How long a model replica waits to fill a batch.")
    ingress_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the HTTP ingress (the node: gate, outbox).")
    ingress_max_ongoing_requests: int = Field(
        64, ge=1, le=10_000, description="Requests one ingress replica serves at once.")
    ingress_num_cpus: float = Field(0.25, gt=0, le=64, description="CPUs reserved per ingress replica.")
    model_num_cpus: float = Field(0.25, gt=0, le=64, description="CPUs reserved per model replica.")
    model_min_replicas: int = Field(1, ge=1, le=64, description="Autoscaling floor per task model.")
    model_max_replicas: int = Field(1, ge=1, le=64, description="Autoscaling ceiling per task model.")
    model_target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling aims at this many requests in flight per model replica.")
    model_upscale_delay_s: float = Field(
        30.0, ge=0, le=3600, description="How long the load must stay above target before "
        "autoscaling adds a model replica.")
    model_downscale_delay_s: float = Field(
        600.0, ge=0, le=86_400, description="How long the load must stay below target before "
        "autoscaling removes a model replica.")
    route_prefix: str = Field("/", pattern=r"^/", description="Where the Serve proxy routes the tier.")
    metrics_export_interval_s: float = Field(
        5.0, ge=0, le=3600, description="How often each ingress replica copies its /metrics "
        "into Ray's metrics (ray.util.metrics, tagged with the replica; served by every node's "
        "metrics agent, see infra/README.md); 0: not at all.")
    upstream_app: str | None = Field(
        None, description="A Serve application on the same cluster that is the upstream tier: "
        "escalate through a DeploymentHandle to its ingress instead of over HTTP "
        "(upstream_url stays the tier's address for everything else).")

    @model_validator(mode="after")
    def _replica_bounds(self) -> RayServeSettings:
        if self.model_min_replicas > self.model_max_replicas:
            raise ValueError(f"model_min_replicas ({self.model_min_replicas}) must not exceed "
                             f"model_max_replicas ({self.model_max_replicas})")
        return self


class ModelServerSettings(BaseModel):
    """A local OpenAI-compatible server for one task's model (``python -m llama_cpp.server``),
    started by ``cascade up`` before the tier (``cascade.deploy.model_server``). See
    ``edge_nodes/README.md``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_threads: int = Field(1, ge=1, le=256, description="llama.cpp threads of the server.")
    n_ctx: int = Field(2048, ge=64, le=1_048_576, description="Context size (tokens).")
    ready_timeout_s: float = Field(
        180.0, gt=0, description="How long to wait for the server's /v1/models to answer.")


class NodeSettings(BaseSettings):
    """Everything one tier process needs to know. See ``edge_nodes/README.md`` for each knob."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True,
        env_nested_delimiter="__",  # CASCADE_OUTBOX__MAX_ROWS=5000 sets outbox.max_rows
    )

    tier: str = Field(..., description="This tier's name, e.g. endpoint, edge-node, edge-server, cloud.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8101, ge=0, le=65535, description="Port to listen on (0: any free port).")
    tasks: dict[str, str] = Field(
        default_factory=dict,
        description="Task -> which model of the manifest serves it here (a tier name of the "
        "ladder); a list of task names serves each with this tier's own model.",
    )
    optional_tasks: dict[str, str] = Field(
        default_factory=dict,
        description="Like tasks, but served only when the models directory has the task and the "
        "policy covers it (e.g. the generative extraction task, built by `cascade models build "
        "--generative`); skipped otherwise, with the reason logged.",
    )
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Task -> runtime options merged over the manifest's (e.g. the openai "
        "runtime's base_url, model, api_key_env: point a tier at another server).",
    )
    model_servers: dict[str, ModelServerSettings] = Field(
        default_factory=dict,
        description="Task -> a local llama_cpp.server that `cascade up` starts for the task's "
        "model (the manifest's GGUF file) at its options' base_url, before this tier.",
    )
    models_dir: Path = Field(Path("models"), description="Directory holding manifest.json.")
    verify_models: bool = Field(True, description="Refuse to load a model whose sha256 differs.")
    policy: Path = Field(Path("policies/default.yaml"), description="Escalation policy file.")
    upstream_url: str | None = Field(
        None, description="Base URL of the next tier; unset on the top tier."
    )
    upstream_max_attempts: int = Field(3, ge=1, le=20)
    upstream_backoff_initial_ms: float = Field(20.0, ge=0)
    upstream_backoff_max_ms: float = Field(500.0, ge=0)
    upstream_connect_timeout_ms: float = Field(500.0, gt=0)
    breaker_failure_threshold: int = Field(3, ge=1, description="Failures before the breaker opens.")
    breaker_reset_s: float = Field(2.0, gt=0, description="Open breaker waits this long before a probe.")
    runner_offload: Literal["auto", "inline", "thread"] = Field(
        "auto",
        description="Where blocking models run: inline on the event loop, on worker threads, "
        "or auto: threads only for a model whose warm-up median reaches runner_offload_above_ms "
        "(a thread hop costs about 0.2 ms; every built-in ONNX model is faster than that).",
    )
    runner_offload_above_ms: float = Field(
        2.0, gt=0, description="auto: offload models at least this slow (warm-up median).")
    runner_concurrency: int = Field(
        1, ge=1, le=64,
        description="Worker threads per offloaded model: calls beyond it wait (measured in "
        "cascade_runner_wait_seconds), at most until their deadline (then 503 model_busy).",
    )
    max_hops: int = Field(8, ge=1, le=64, description="Loop guard: refuse requests past this hop count.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Larger request bodies get a 413.")
    max_text_chars: int = Field(100_000, ge=1, description="Longest document text accepted.")
    outbox_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the durable outbox; default sqlite:///var/<tier>.db.",
    )
    outbox: OutboxSettings = Field(
        default_factory=OutboxSettings,
        description="Outbox bounds and pacing (caps, TTL sweeps, forwarder, callbacks, retention).",
    )
    disk: DiskSettings = Field(
        default_factory=DiskSettings,
        description="Disk budget of this tier's files, split across its stores (results, "
        "decision log, logs, traces, models) and the idempotency window eviction respects.",
    )
    bundles: BundleSettings = Field(
        default_factory=BundleSettings,
        description="Signed model bundles: trusted keys, where to pull them, install checks, "
        "canary and rollback (docs/model-updates.md).",
    )
    ray_serve: RayServeSettings = Field(
        default_factory=RayServeSettings,
        description="Ray Serve deployment: batching, replicas and CPUs (cascade.deploy.ray_serve).",
    )
    tls: TlsSettings | None = Field(
        None, description="This tier's certificate, key and site CA (`cascade certs init`): "
        "serve HTTPS, verify callers' client certificates, present ours upstream. Unset: "
        "plain HTTP, for local development only (warned at start and on /readyz).")
    clients: ClientAuthSettings = Field(
        default_factory=ClientAuthSettings,
        description="API keys (hashed) with rate limits and quotas, and which routes need one.")
    callbacks: CallbackSettings = Field(
        default_factory=CallbackSettings,
        description="Where callback_url may point (schemes, hosts, allowed networks) and the "
        "key that signs callback bodies.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines as JSON (with trace and span ids) or plain text."
    )
    log_file: Path | None = Field(
        None,
        description="Write this tier's log here, rotated within its disk share (disk.logs_mb, "
        "disk.log_backups copies), instead of to stderr; `cascade up` sets var/logs/<tier>.log.",
    )
    instance: str | None = Field(
        None,
        description="Which start of this tier process this is: a token its supervisor (`cascade "
        "up`, the tests) sets in CASCADE_INSTANCE and /readyz reports, so the supervisor counts "
        "only its own process ready, never another one answering on the same port.",
    )
    trace_dir: Path | None = Field(
        None,
        description="Also write this tier's spans to <trace_dir>/<tier>.jsonl (read them with "
        "`cascade traces`); OTLP export is configured by the standard OTEL_* variables.",
    )

    @field_validator("tier")
    @classmethod
    def _tier_name(cls, value: str) -> str:
        if not TIER_NAME.match(value):
            raise ValueError("use lowercase letters, digits and '-' (e.g. edge-node)")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("tasks", "optional_tasks", mode="before")
    @classmethod
    def _task_list(cls, value: Any, info: ValidationInfo) -> Any:
        # ["wine", "vision"]: each task served by the model of this tier's own name.
        if isinstance(value, list) and all(isinstance(name, str) for name in value):
            tier = info.data.get("tier")
            if tier is None:
                raise ValueError("a list of tasks needs a valid 'tier' (its model's name)")
            return dict.fromkeys(value, tier)
        return value

    @model_validator(mode="after")
    def _some_task(self) -> NodeSettings:
        if not self.tasks and not self.optional_tasks:
            raise ValueError("tasks: at least one task must be served (tasks or optional_tasks)")
        return self

    @field_validator("ray_serve")
    @classmethod
    def _replicas_share_a_database(cls, value: RayServeSettings,
                                   info: ValidationInfo) -> RayServeSettings:
        # One process owns a SQLite outbox (it voids others' leases at start, and keeps the
        # idempotency keys it computes in memory): replicas need a database they can share.
        url = info.data.get("outbox_url") or "sqlite:"
        if value.ingress_replicas > 1 and url.startswith("sqlite"):
            raise ValueError(
                f"ingress_replicas: {value.ingress_replicas} replicas cannot share a SQLite "
                "outbox (one process owns a SQLite file); set outbox_url to a PostgreSQL URL "
                "(postgresql+psycopg://user@host/db) or use 1 ingress replica")
        return value

    @model_validator(mode="after")
    def _tls_upstream(self) -> NodeSettings:
        if self.tls is not None and (self.upstream_url or "").startswith("http://"):
            raise ValueError(f"upstream_url {self.upstream_url} is plain http while this tier "
                             "has tls: use https:// (or drop tls for a plain development chain)")
        return self

    @property
    def resolved_outbox_url(self) -> str:
        """The outbox URL, defaulting to a SQLite file per tier under ``var/``."""
        return self.outbox_url or f"sqlite:///var/{self.tier}.db"


def _where(field: str, config_path: Path | None) -> str:
    env_name = f"{ENV_PREFIX}{field.upper()}"
    if env_name in os.environ:
        return f"environment variable {env_name}"
    nested = sorted(k for k in os.environ if k.startswith(env_name + "__"))
    if nested:
        return f"environment variable {', '.join(nested)}"
    return f"config file {config_path}" if config_path else "defaults"


_ENV_NOT_JSON = re.compile(r'error parsing value for field "([^"]+)" from source "EnvSettingsSource"')


def _env_not_json(exc: SettingsError) -> str | None:
    """The message for a ``CASCADE_<KEY>`` whose key takes an object and whose value is not
    JSON (pydantic-settings reports only the field and "EnvSettingsSource"); None otherwise."""
    match = _ENV_NOT_JSON.search(str(exc))
    if match is None:
        return None
    field = match[1]
    env_name = f"{ENV_PREFIX}{field.upper()}"
    return (f"invalid node config:\n  {field}: {os.environ.get(env_name, '')!r} is not a JSON "
            f"object; as a variable this key takes one, e.g. {env_name}='{{\"key\": \"value\"}}', "
            f"or one key at a time: {env_name}__<KEY>=value (from environment variable "
            f"{env_name})")


def load_node_settings(config_path: Path | str | None, **overrides: Any) -> NodeSettings:
    """Validate a node config file plus ``CASCADE_*`` overrides into :class:`NodeSettings`.

    Errors are a :class:`ConfigError` naming each bad key and where its value came from.
    """
    path = Path(config_path) if config_path else None
    if path is not None and not path.is_file():
        raise ConfigError(f"{path}: no such node config file")

    class _FromFile(NodeSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            return tuple(sources)

    try:
        settings = _FromFile(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            top = str(err["loc"][0]) if err["loc"] else key
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed keys: {', '.join(sorted(NodeSettings.model_fields))}"
            lines.append(f"{key}: {msg} (from {_where(top, path)})")
        raise ConfigError("invalid node config:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:
        message = _env_not_json(exc)
        if message is None:
            raise ConfigError(f"{path}: cannot read node config: {exc}") from None
        raise ConfigError(message) from None
    except Exception as exc:  # noqa: BLE001 - YAML syntax and read errors surface from the source
        raise ConfigError(f"{path}: cannot read node config: {exc}") from None
    validated = NodeSettings.model_validate(settings.model_dump())
    if not validated.optional_tasks:
        return validated
    from cascade.tier.optional_tasks import with_optional_tasks  # reads manifest and policy

    return with_optional_tasks(validated)[0]
