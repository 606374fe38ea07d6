"""A local OpenAI-compatible server for a tier's model: ``python -m llama_cpp.server``.

A tier whose task runs on ``runtime: openai`` calls a model server at its options' ``base_url``
(the cloud's generative model in the default chain). When the tier's node config lists the task
under ``model_servers``, the supervisor (``cascade up``, tests, bench) starts that server before
the tier, as one more supervised child: the manifest's GGUF file, checksum verified first (a
tampered file is refused before anything starts), listening on the host and port of
``base_url``, ready once ``GET /v1/models`` answers, its output in ``<log_dir>/<tier>-<task>-
model-server.log``, stopped after the tiers. Pointing the tier at any other OpenAI-compatible
service instead is configuration: drop ``model_servers`` and set ``model_options``
(``base_url``, ``model``, ``api_key_env``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from cascade.errors import ConfigError
from cascade.models.manifest import load_manifest
from cascade.models.repository import model_spec, verified_model_file
from cascade.tier.settings import ModelServerSettings, NodeSettings

__all__ = ["ModelServer", "ModelServerPlan", "plan_model_servers", "start_model_servers"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ModelServerPlan:
    """What to start for one task of one tier."""

    tier: str
    task: str
    model_file: Path
    host: str
    port: int
    alias: str | None
    settings: ModelServerSettings

    @property
    def url(self) -> str:
        """The server's base URL (what the tier's ``base_url`` names)."""
        return f"http://{self.host}:{self.port}"

    def command(self, python: str = sys.executable) -> list[str]:
        """The server's command line."""
        args = [python, "-m", "llama_cpp.server", "--model", str(self.model_file),
                "--host", self.host, "--port", str(self.port),
                "--n_ctx", str(self.settings.n_ctx), "--n_threads", str(self.settings.n_threads)]
        return args + (["--model_alias", self.alias] if self.alias else [])


def plan_model_servers(settings: NodeSettings) -> list[ModelServerPlan]:
    """The model servers ``settings`` asks for, each model file checksum-verified; a
    :class:`ConfigError` naming the key when one cannot be planned. A listed task the tier does
    not serve (an optional task not built) needs no server."""
    plans = []
    for task, server in settings.model_servers.items():
        model_tier = settings.tasks.get(task)
        if model_tier is None:
            continue
        where = f"model_servers.{task} of tier {settings.tier}"
        manifest = load_manifest(Path(settings.models_dir))
        spec = model_spec(manifest, task, model_tier, verify_sha256=False,
                          options=settings.model_options.get(task))
        if spec.runtime != "openai":
            raise ConfigError(f"{where}: the manifest's {task}/{model_tier} model runs on "
                              f"runtime {spec.runtime!r}, in the tier itself; a model server is "
                              "for runtime 'openai'")
        base_url = str(spec.options.get("base_url") or "")
        parts = urlsplit(base_url)
        if parts.hostname not in _LOOPBACK or parts.port is None:
            raise ConfigError(f"{where}: base_url {base_url!r} is not a port on this machine "
                              "(http://127.0.0.1:PORT), so no local server can answer there; "
                              f"to use a remote service remove model_servers.{task}")
        plans.append(ModelServerPlan(
            tier=settings.tier, task=task,
            model_file=verified_model_file(manifest, task, model_tier),
            host=parts.hostname, port=parts.port, alias=spec.options.get("model"),
            settings=server))
    return plans


class ModelServer:
    """One running model server (started by :meth:`start`, always stoppable)."""

    def __init__(self, plan: ModelServerPlan, *, log_dir: Path | None = None,
                 python: str = sys.executable,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.plan = plan
        self.log_path = (log_dir / f"{plan.tier}-{plan.task}-model-server.log"
                         if log_dir is not None else None)
        self.python = python
        self._preexec_fn = preexec_fn
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None

    def start(self) -> ModelServer:
        """Start the server and wait until ``/v1/models`` answers (or raise, stopped)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab") if self.log_path is not None else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.plan.command(self.python), stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=self._preexec_fn)  # noqa: PLW1509 - prctl and setpgrp only
        finally:
            if not isinstance(out, int):
                out.close()
        try:
            self.ready_s = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> float:
        assert self.process is not None
        started = time.monotonic()
        url = f"{self.plan.url}/v1/models"
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"model server for {self.plan.tier}/{self.plan.task} exited with code "
                        f"{self.process.returncode} before ready: {self._log_tail()}")
                try:
                    if client.get(url).status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass
                if time.monotonic() - started > self.plan.settings.ready_timeout_s:
                    raise TimeoutError(
                        f"model server for {self.plan.tier}/{self.plan.task} at {url} not ready "
                        f"after {self.plan.settings.ready_timeout_s:.0f} s (model_servers."
                        f"{self.plan.task}.ready_timeout_s): {self._log_tail()}")
                time.sleep(0.1)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "no log (give a log_dir)"
        return f"log {self.log_path}: " + self.log_path.read_text(errors="replace")[-1500:]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_model_servers(plans: Iterable[ModelServerPlan], *, log_dir: Path | None,
                        python: str = sys.executable,
                        preexec_fn: Callable[[], None] | None = None) -> list[ModelServer]:
    """Start the planned model servers in order, each ready before the next; on any failure
    the ones already started are stopped and the error raised."""
    started: list[ModelServer] = []
    try:
        for plan in plans:
            started.append(ModelServer(plan, log_dir=log_dir, python=python,
                                       preexec_fn=preexec_fn).start())
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started
