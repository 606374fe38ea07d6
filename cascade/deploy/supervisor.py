"""Start a chain of tier processes, wait until each is ready, and stop them all.

Used by ``cascade up``, the integration tests and ``cascade bench``. Children are started top
tier first (so every upstream exists before its client), each with ``PR_SET_PDEATHSIG`` on
Linux so that they die with the supervisor even if it is SIGKILLed: no orphans. A tier whose
node config lists ``model_servers`` gets its local model servers started (and waited for)
just before it, and stopped after every tier (``cascade.deploy.model_server``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import yaml

from cascade.deploy.model_server import ModelServer, ModelServerPlan, plan_model_servers
from cascade.errors import ConfigError

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

    @property
    def pid(self) -> int:
        return self.process.pid


def plan_chain(
    configs: Sequence[str | Path],
    *,
    base_port: int | None = None,
    host: str = "127.0.0.1",
    top_upstream_url: str | None = None,
) -> list[tuple[str, Path, int, dict[str, str]]]:
    """(tier, config, port, env overrides) per config, bottom to top.

    With ``base_port`` the tiers get consecutive ports from it and each tier's upstream is
    rewired to the next config's port, so a whole chain can run beside another one; the last
    tier gets ``top_upstream_url`` (none by default: it is the top).
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
        plan.append((tier, path, port, env))
    return plan


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> float:
    """Poll ``url/readyz`` until 200; returns seconds waited. Raises if the child exits or times out."""
    started = time.monotonic()
    with httpx.Client(timeout=0.5) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tier at {url} exited with code {process.returncode} before ready")
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"tier at {url} not ready after {timeout_s:.0f} s")
            time.sleep(0.05)


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
    ) -> None:
        self.plan = plan_chain(
            configs, base_port=base_port, host=host, top_upstream_url=top_upstream_url
        )
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

    def start(self) -> Self:
        """Start every tier, top first, each waited for until ready (again after :meth:`stop`)."""
        self.tiers = []
        self.model_servers = []
        try:
            for tier, cfg, port, env in reversed(self.plan):
                for server in self._model_server_plans(cfg, env):
                    self.model_servers.append(ModelServer(
                        server, log_dir=self.log_dir, python=self.python,
                        preexec_fn=_die_with_parent).start())
                self.tiers.insert(0, self._spawn(tier, cfg, port, env))
                self.ready_s[tier] = wait_ready(self.tiers[0].url, self.tiers[0].process, self.ready_timeout_s)
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

    def _spawn(self, tier: str, cfg: Path, port: int, env: dict[str, str]) -> TierProcess:
        child_env = {**os.environ, **self.extra_env, **env}
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{tier}.log"
            # The tier writes and rotates this file itself (within disk.logs_mb); its output
            # before logging is set up (a config error) reaches the same file through stdout.
            child_env["CASCADE_LOG_FILE"] = str(log_path)
        # the child gets its own copy of the log's descriptor; ours closes once it is started
        with open(log_path, "ab") if log_path else nullcontext(subprocess.DEVNULL) as out:
            proc = subprocess.Popen(
                [self.python, "-m", "cascade.deploy.process", "--config", str(cfg)],
                env=child_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl and setpgrp, no locks
            )
        return TierProcess(tier, cfg, port, f"http://{self.host}:{port}", proc, log_path, env)

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
