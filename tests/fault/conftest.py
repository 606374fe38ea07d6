"""Fixtures for fault tests: real tier processes on 127.0.0.1, a fault proxy between them, a
callback receiver. The building blocks live in tests/fault/harness.py (the benchmark uses them
too)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.harness import CallbackReceiver, Tier, hardest_images, write_policy
from tests.fault.proxy import FaultProxy


@pytest.fixture
def tiers(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., Tier]]:
    """Make tiers; all are stopped at the end of the test."""
    made: list[Tier] = []
    policy = write_policy(tmp_path / "policy.yaml")

    def make(tier: str, *, policy_path: Path | None = None, start: bool = True,
             **kw: Any) -> Tier:
        t = Tier(tmp_path, tier, models_dir, policy_path or policy, **kw)
        made.append(t)
        return t.start() if start else t

    yield make
    for t in made:
        t.stop()


@pytest.fixture
def proxy_to() -> Iterator[Callable[[str], FaultProxy]]:
    """A fault proxy in front of a tier URL; stopped at the end of the test."""
    made: list[FaultProxy] = []

    def make(url: str) -> FaultProxy:
        p = FaultProxy(int(url.rsplit(":", 1)[1])).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def callbacks() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def hard_images(models_dir: Path) -> list[list[list[float]]]:
    """Vision test images on which the endpoint model is least sure (they always escalate)."""
    return hardest_images(models_dir)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (a real filesystem that fills up and can be remounted read-only)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
