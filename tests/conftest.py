"""Shared fixtures: the built model ladder, free ports on 127.0.0.1, a running chain."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# `spans`: real SDK spans of one test, in memory (telemetry and metrics tests).
pytest_plugins = ["tests.unit.otel_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
CHAIN_CONFIGS = [
    ROOT / "edge_nodes/endpoint.yaml",
    ROOT / "edge_nodes/edge-node.yaml",
    ROOT / "edge_nodes/edge-server.yaml",
    ROOT / "cloud/cloud.yaml",
]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The project's models directory, built (or confirmed up to date) once per session."""
    from cascade.models.build import build_models

    # CASCADE_TEST_MODELS_DIR: a private build, for developers whose ROOT/models is being
    # rebuilt by another process while they run tests.
    out = Path(os.environ.get("CASCADE_TEST_MODELS_DIR") or ROOT / "models")
    build_models(out)  # seconds when nothing changed
    return out


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port_block(n: int) -> int:
    """A base port such that ``base .. base+n-1`` are all free on 127.0.0.1 right now, and none
    of them was handed out before in this test run unless the whole slice has been gone through.

    Chosen below the kernel's ephemeral range: a port in that range, free when checked, could
    be given to some client's outgoing connection before the tier binds it (seen under load:
    a tier exiting with "address already in use"). Handed out in turn, not at random: a port
    checked free is not yet bound, so a random pick could hand it out again. A test that takes
    a port for a dead upstream and then starts a tier could get that same port for the tier,
    and the tier would escalate to itself. This was seen in a soak with two suites at once:
    the self-hop was refused 401 and its span was read as the request's.
    """
    global _cursor
    low, high = _port_slice()
    size = high - low + 1
    with _cursor_lock:
        for _ in range(size):
            base, _cursor = low + _cursor, (_cursor + 1) % size
            if base + n - 1 <= high and all(_port_free(base + i) for i in range(n)):
                _cursor = (base - low + n) % size
                return base
    raise RuntimeError(f"no free block of {n} ports in {low}..{high}")


_SLICE_PORTS = 500
_slice: tuple[int, int] | None = None
_cursor = 0
"""Offset in the slice of the next port to try: ports go out in turn, wrapping at the end."""
_cursor_lock = threading.Lock()
_slice_lock: Any = None


def _port_slice() -> tuple[int, int]:
    """This test process's own range of ports, reserved for its whole run by an exclusive lock
    on a file per range, so two suites running at once on one machine (one loading the machine
    for the other) never pick the same port for their tiers: a port checked free, then bound by
    the other suite's tier before ours binds it, would fail ours or, worse, answer for it."""
    global _slice, _slice_lock
    if _slice is None:
        top = max(20_000 + _SLICE_PORTS, _ephemeral_low())
        starts = list(range(20_000, top - _SLICE_PORTS + 1, _SLICE_PORTS))
        random.shuffle(starts)
        folder = Path(tempfile.gettempdir()) / "cascade-test-ports"
        folder.mkdir(exist_ok=True)
        for start in starts:
            handle = (folder / f"{start}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            _slice, _slice_lock = (start, start + _SLICE_PORTS - 1), handle
            break
        else:
            raise RuntimeError(f"every port range below {top} is held by another test run")
    return _slice


@pytest.fixture
def free_ports() -> type[free_port_block]:
    return free_port_block  # type: ignore[return-value]


@pytest.fixture(scope="session")
def chain_env(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for tier processes started by tests: project models and policy, tmp state."""
    var = tmp_path_factory.mktemp("var")
    return {
        "CASCADE_MODELS_DIR": str(models_dir),
        "CASCADE_POLICY": str(ROOT / "policies/default.yaml"),
        "CASCADE_TEST_VAR": str(var),
        "CASCADE_DECISION_LOG_PATH": str(var / "decisions-{tier}.db"),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


@pytest.fixture(scope="module")
def running_chain(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The four-tier chain as real processes on free 127.0.0.1 ports (shared by a module)."""
    from cascade.deploy.supervisor import Chain

    var = tmp_path_factory.mktemp("chain")
    base = free_port_block(4)
    env = {
        "CASCADE_MODELS_DIR": str(models_dir),
        "CASCADE_POLICY": str(ROOT / "policies/default.yaml"),
        # the shipped policy's decision log lives under var/: keep it out of the repository
        "CASCADE_DECISION_LOG_PATH": str(var / "decisions-{tier}.db"),
    }
    chain = Chain(CHAIN_CONFIGS, base_port=base, env=env, log_dir=var / "logs",
                  state_dir=var)
    with chain:
        yield chain
