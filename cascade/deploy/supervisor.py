"""Start a chain of tier processes, wait until each is ready, and stop them all.

Used by ``cascade up``, the integration tests and ``cascade bench``. Children are started top
tier first (so every upstream exists before its client), each with ``PR_SET_PDEATHSIG`` on
Linux so that they die with the supervisor even if it is SIGKILLed: no orphans. A tier whose
node config lists ``model_servers`` gets its local model servers started (and waited for)
just before it, and stopped after every tier (``cascade.deploy.model_server``).

With a :class:`~cascade.deploy.restarts.RestartPolicy`, :meth:`Chain.supervise` restarts a
tier that died (same port, config and log) after its backoff, within its budget, while the
other tiers keep serving: a tier whose upstream is down answers provisionally and queues the
escalation, which its outbox delivers once the upstream is back. Every restart is a
:class:`ChainEvent`, logged (``cascade.deploy.supervisor``, and ``<log_dir>/supervisor.log``
as JSON lines) and returned for the caller to show.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import httpx
import yaml

from cascade.deploy.model_server import (
    ModelServer,
    ModelServerPlan,
    plan_model_servers,
    start_model_servers,
)
from cascade.deploy.restarts import RestartHistory, RestartPolicy
from cascade.errors import ConfigError
from cascade.trust.certs import SiteCerts

log = logging.getLogger("cascade.deploy.supervisor")

DEFAULT_CHAIN: tuple[str, ...] = (
    "edge_nodes/endpoint.yaml",
    "edge_nodes/edge-node.yaml",
    "edge_nodes/edge-server.yaml",
    "cloud/cloud.yaml",
)
"""Node configs of the default local chain, bottom (tier 1) to top."""

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()  # Ctrl-C in the terminal reaches the supervisor only; it stops children in order


@dataclass
class TierProcess:
    """One running tier."""

    tier: str
    config: Path
    port: int
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    state: str = "up"
    """``up``, ``waiting`` (dead, restart due at ``restart_at``), ``starting`` (restarted, not
    ready yet) or ``failed`` (dead, restart budget spent)."""
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    history: RestartHistory | None = None
    instance: str | None = None
    """The token this start of the process got (``CASCADE_INSTANCE``); its ``/readyz`` says it."""

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(frozen=True)
class ChainEvent:
    """Something the supervisor did or saw: ``exited``, ``restarted``, ``ready``, ``gave_up``."""

    tier: str
    kind: str
    message: str
    pid: int | None = None
    exit_code: int | None = None
    delay_s: float | None = None


def plan_chain(
    configs: Sequence[str | Path],
    *,
    base_port: int | None = None,
    host: str = "127.0.0.1",
    top_upstream_url: str | None = None,
    tls: SiteCerts | None = None,
) -> list[tuple[str, Path, int, dict[str, str]]]:
    """(tier, config, port, env overrides) per config, bottom to top.

    With ``base_port`` the tiers get consecutive ports from it and each tier's upstream is
    rewired to the next config's port, so a whole chain can run beside another one; the last
    tier gets ``top_upstream_url`` (none by default: it is the top). With ``tls`` every tier
    serves HTTPS with its certificate from there and calls its upstream over https; tier 1
    asks no client certificate (its clients are products), the others require one on their API.
    """
    plan = []
    for i, cfg in enumerate(configs):
        path = Path(cfg)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read node config: {exc}") from None
        tier = str(data.get("tier") or path.stem)
        env: dict[str, str] = {}
        port = int(data.get("port", 8101 + i))
        if base_port is not None:
            port = base_port + i
            env["CASCADE_PORT"] = str(port)
            env["CASCADE_HOST"] = host
            env["CASCADE_UPSTREAM_URL"] = (
                f"http://{host}:{base_port + i + 1}"
                if i + 1 < len(configs)
                else (top_upstream_url or "")
            )
        if tls is not None:
            env.update(_tls_env(tls, tier, bottom=i == 0,
                                declared=(data.get("tls") or {}).get("client_cert")))
            upstream = env.get("CASCADE_UPSTREAM_URL", data.get("upstream_url")) or ""
            env["CASCADE_UPSTREAM_URL"] = upstream.replace("http://", "https://", 1)
        plan.append((tier, path, port, env))
    return plan


def _tls_env(site: SiteCerts, tier: str, *, bottom: bool,
             declared: str | None) -> dict[str, str]:
    """The tier's certificate files; its client_cert mode unless its config declares one."""
    return {"CASCADE_TLS__CERT_FILE": str(site.cert_file(tier)),
            "CASCADE_TLS__KEY_FILE": str(site.key_file(tier)),
            "CASCADE_TLS__CA_FILE": str(site.ca_file),
            "CASCADE_TLS__CLIENT_CERT": declared or ("never" if bottom else "api")}


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float,
               verify: ssl.SSLContext | bool = True, instance: str | None = None) -> float:
    """Poll ``url/readyz`` until 200; returns seconds waited. Raises if the child exits or times out.

    With ``instance`` only an answer reporting that instance counts: another process answering
    on the port (a second chain, an old tier) is not this one, which may be about to fail to bind.
    """
    started = time.monotonic()
    other: str | None = None
    with httpx.Client(timeout=0.5, verify=verify) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tier at {url} exited with code {process.returncode} before "
                                   f"ready{_answered_by(other)}")
            try:
                response = client.get(f"{url}/readyz")
                if response.status_code == 200:
                    if _is_instance(response, instance):
                        return time.monotonic() - started
                    other = _describe(response)
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"tier at {url} not ready after {timeout_s:.0f} s"
                                   f"{_answered_by(other)}")
            time.sleep(0.05)


def _readyz_body(response: httpx.Response) -> dict[str, object]:
    """A ``/readyz`` answer's JSON object ({} when it is none)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _is_instance(response: httpx.Response, instance: str | None) -> bool:
    """Does this 200 ``/readyz`` come from the process started as ``instance`` (None: any)?"""
    return instance is None or _readyz_body(response).get("instance") == instance


def _describe(response: httpx.Response) -> str:
    body = _readyz_body(response)
    if body.get("tier"):
        return f"tier {body['tier']} (instance {body.get('instance')})"
    return f"a process that is no tier of this chain ({response.text[:80]!r})"


def _answered_by(other: str | None) -> str:
    return "" if other is None else (f"; meanwhile its port was answered by another process: "
                                     f"{other}. Is another chain running on these ports?")


def _answers_ready(url: str, verify: ssl.SSLContext | bool = True,
                   instance: str | None = None) -> bool:
    try:
        response = httpx.get(f"{url}/readyz", timeout=0.5, verify=verify)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and _is_instance(response, instance)


class Chain:
    """A running chain of tier processes (a context manager that always stops them)."""

    def __init__(
        self,
        configs: Sequence[str | Path] = DEFAULT_CHAIN,
        *,
        base_port: int | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        ready_timeout_s: float = 30.0,
        python: str = sys.executable,
        state_dir: Path | None = None,
        top_upstream_url: str | None = None,
        restart: RestartPolicy | None = None,
        launcher: Sequence[str] = (),
        tls: SiteCerts | None = None,
    ) -> None:
        """``restart``: what :meth:`supervise` does when a tier dies (None: nothing).
        ``launcher``: a command prefix for every tier (e.g. ``ip netns exec NAME``).
        ``tls``: serve every tier over HTTPS with the site's certificates (see
        :func:`plan_chain`); None: plain HTTP (local development and most tests)."""
        self.plan = plan_chain(
            configs, base_port=base_port, host=host, top_upstream_url=top_upstream_url, tls=tls
        )
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        if state_dir is not None:
            # Each tier's durable state (outbox database) under state_dir instead of var/.
            for _tier, _cfg, _port, tier_env in self.plan:  # not `env`: that is the argument
                tier_env["CASCADE_OUTBOX_URL"] = f"sqlite:///{Path(state_dir) / _tier}.db"
        self.host = host
        self.extra_env = env or {}
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.python = python
        self.tiers: list[TierProcess] = []
        self.model_servers: list[ModelServer] = []
        self.ready_s: dict[str, float] = {}
        self.restart = restart
        self.launcher = tuple(launcher)

    def start(self) -> Self:
        """Start every tier, top first, each waited for until ready (again after :meth:`stop`)."""
        self.tiers = []
        self.model_servers = []
        try:
            for tier, cfg, port, env in reversed(self.plan):
                self.model_servers += start_model_servers(
                    self._model_server_plans(cfg, env), log_dir=self.log_dir,
                    python=self.python, preexec_fn=_die_with_parent)
                self.tiers.insert(0, self._spawn(tier, cfg, port, env))
                self.ready_s[tier] = wait_ready(self.tiers[0].url, self.tiers[0].process,
                                                self.ready_timeout_s, self.verify,
                                                self.tiers[0].instance)
        except BaseException:
            self.stop()
            raise
        return self

    def _model_server_plans(self, cfg: Path, env: dict[str, str]) -> list[ModelServerPlan]:
        """The model servers the tier's settings ask for, read as the tier will read them
        (its environment included); none unless its config or environment names any."""
        child_env = {**os.environ, **self.extra_env, **env}
        if "model_servers" not in cfg.read_text() and not any(
                k.startswith("CASCADE_MODEL_SERVERS") for k in child_env):
            return []
        from cascade.tier.settings import load_node_settings

        saved = dict(os.environ)
        os.environ.update(child_env)  # pydantic-settings reads the process environment
        try:
            settings = load_node_settings(cfg)
        except ConfigError:
            return []  # the tier itself reports its bad config (exit code 2, in its log)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return plan_model_servers(settings)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How a client of this chain checks its tiers' certificates (the site CA)."""
        if self.tls is None:
            return True
        return ssl.create_default_context(cafile=str(self.tls.ca_file))

    def _spawn(self, tier: str, cfg: Path, port: int, env: dict[str, str]) -> TierProcess:
        child_env = {**os.environ, **self.extra_env, **env}
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{tier}.log"
            # The tier writes and rotates this file itself (within disk.logs_mb); its output
            # before logging is set up (a config error) reaches the same file through stdout.
            child_env["CASCADE_LOG_FILE"] = str(log_path)
        # Its /readyz reports this token: only this process's answer counts as it being ready.
        instance = child_env["CASCADE_INSTANCE"] = secrets.token_hex(8)
        # the child gets its own copy of the log's descriptor; ours closes once it is started
        with open(log_path, "ab") if log_path else nullcontext(subprocess.DEVNULL) as out:
            proc = subprocess.Popen(
                [*self.launcher, self.python, "-m", "cascade.deploy.process", "--config",
                 str(cfg)],
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl and setpgrp, no locks
            )
        return TierProcess(tier, cfg, port, f"{self.scheme}://{self.host}:{port}", proc, log_path,
                           env, instance=instance)

    def supervise(self, now: float | None = None) -> list[ChainEvent]:
        """One supervision pass (call it every fraction of a second): notice tiers that died,
        restart those whose backoff is over, notice restarted tiers that are ready. Without a
        restart policy, a dead tier is only reported (``exited``)."""
        now = time.monotonic() if now is None else now
        events: list[ChainEvent] = []
        for i, tier in enumerate(self.tiers):
            if tier.state in ("up", "starting") and tier.process.poll() is not None:
                events.append(self._died(tier, now))
            elif tier.state == "waiting" and now >= tier.restart_at:
                self.tiers[i] = tier = self._respawn(tier, now)
                events.append(ChainEvent(tier.tier, "restarted", f"tier {tier.tier} restarted "
                                         f"(pid {tier.pid}, log: {tier.log_path})", pid=tier.pid))
            elif tier.state == "starting" and _answers_ready(tier.url, self.verify,
                                                              tier.instance):
                tier.state = "up"
                events.append(ChainEvent(tier.tier, "ready", f"tier {tier.tier} is ready again "
                                         f"({now - tier.started_at:.1f} s after its restart)",
                                         pid=tier.pid))
        for event in events:
            self._note(event)
        return events

    def _died(self, tier: TierProcess, now: float) -> ChainEvent:
        code = tier.process.returncode
        policy = self.restart
        delay = None
        if policy is not None:
            tier.history = tier.history or RestartHistory(policy)
            delay = tier.history.next_delay_s(now)
        if delay is None:
            tier.state = "failed"
            why = ("no restart policy" if policy is None else
                   f"restart budget spent: {policy.budget} restarts within {policy.window_s:g} s")
            return ChainEvent(tier.tier, "gave_up" if policy else "exited",
                              f"tier {tier.tier} exited with code {code}; {why}; it stays down "
                              f"(log: {tier.log_path})", pid=tier.pid, exit_code=code)
        assert tier.history is not None and policy is not None
        tier.state, tier.restart_at = "waiting", now + delay
        return ChainEvent(tier.tier, "exited",
                          f"tier {tier.tier} exited with code {code}; restarting in {delay:.1f} s "
                          f"(restart {tier.history.recent(now) + 1} of {policy.budget} allowed "
                          f"within {policy.window_s:g} s; log: {tier.log_path})",
                          pid=tier.pid, exit_code=code, delay_s=delay)

    def _respawn(self, dead: TierProcess, now: float) -> TierProcess:
        assert dead.history is not None
        dead.history.record(now)
        tier = self._spawn(dead.tier, dead.config, dead.port, dead.env)
        tier.state, tier.history = "starting", dead.history
        return tier

    def _note(self, event: ChainEvent) -> None:
        """Log ``event`` and append it to ``<log_dir>/supervisor.log`` (one JSON line)."""
        log.warning(event.message, extra={"tier_event": event.kind, "tier_name": event.tier})
        if self.log_dir is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(event)}
        try:
            with open(self.log_dir / "supervisor.log", "a") as out:
                out.write(json.dumps(record) + "\n")
        except OSError:
            log.exception("cannot write %s", self.log_dir / "supervisor.log")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every tier (bottom first, so no new work flows up), then SIGKILL stragglers."""
        for t in self.tiers:
            if t.process.poll() is None:
                t.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for t in self.tiers:
            try:
                t.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                t.process.kill()
                t.process.wait()
        for server in self.model_servers:  # after the tiers: they are its clients
            server.stop(max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def entry_url(self) -> str:
        """URL of tier 1, where clients send requests."""
        return self.tiers[0].url
