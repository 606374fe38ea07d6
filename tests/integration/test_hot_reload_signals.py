"""SIGHUP re-reads the policy: on a running tier whose file watcher cannot see the change, and
in-process with no watcher at all; a bad file is reported once and the old policy kept; an
unchanged file is a no-op."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest

from cascade.policy import load_policy
from cascade.policy.reload import PolicyReloader
from tests.fault.harness import wait_for, write_policy

GOOD = "version: 1\ntasks:\n  documents:\n    tiers:\n      endpoint: {threshold: %s}\n"


class FakeNode:
    """What the reloader needs of a node: the live policy, set_policy and the reload stats."""

    tier = "endpoint"

    def __init__(self, path: Path) -> None:
        self.policy = load_policy(path)
        self.policy_reloads = {"reloads": 0, "errors": 0, "last_error": None}

    def set_policy(self, policy) -> None:
        policy.rule("documents", self.tier)
        self.policy = policy


def test_sighup_applies_a_change_without_any_watcher(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD % 0.5)
    node = FakeNode(path)

    async def run() -> None:
        reloader = PolicyReloader(node)
        await reloader.start(watch=False)
        try:
            assert reloader._task is None  # no watcher: only the signal can reload
            path.write_text(GOOD % 0.7)
            assert node.policy.rule("documents", "endpoint").threshold == 0.5
            os.kill(os.getpid(), signal.SIGHUP)
            # The handler runs on this loop: poll it (yielding) until it has, or time out.
            async with asyncio.timeout(30):
                while node.policy_reloads["reloads"] == 0:
                    await asyncio.sleep(0.01)
        finally:
            await reloader.stop()

    asyncio.run(run())
    assert node.policy.rule("documents", "endpoint").threshold == 0.7
    assert node.policy_reloads == {"reloads": 1, "errors": 0, "last_error": None}


@pytest.mark.integration
def test_sighup_reloads_a_running_tier_whose_watcher_cannot_see_the_change(tiers, tmp_path):
    # The tier's policy is a symlink in watched/; the file it points to lives in real/. The
    # watcher follows watched/, where nothing changes when real/policy.yaml is rewritten, so only
    # SIGHUP can bring the new version in.
    real, watched = tmp_path / "real", tmp_path / "watched"
    real.mkdir()
    watched.mkdir()
    target = write_policy(real / "policy.yaml", deadline_ms=2000)
    link = watched / "policy.yaml"
    link.symlink_to(target)
    endpoint = tiers("endpoint", policy_path=link)

    def policy_state() -> dict:
        return httpx.get(f"{endpoint.url}/readyz", timeout=10).json()["policy"]

    assert policy_state()["version"] == load_policy(link).version
    write_policy(target, deadline_ms=3000)
    new_version = load_policy(link).version
    os.kill(endpoint.pid, signal.SIGHUP)
    state = wait_for(lambda: (s := policy_state())["version"] == new_version and s,
                     timeout_s=30, what="the new policy version live after SIGHUP")
    assert state["reload"] == {"reloads": 1, "errors": 0, "last_error": None}
    assert endpoint.chain.tiers[0].process.poll() is None  # SIGHUP did not stop the tier
    logged = f"policy {link} reloaded (SIGHUP): version {new_version}"  # not "(file change)"
    wait_for(lambda: logged in endpoint.log(), timeout_s=30, what="the reload logged")


def test_bad_file_is_reported_once_and_the_old_policy_kept(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD % 0.5)
    node = FakeNode(path)
    reloader = PolicyReloader(node)
    assert reloader.reload() is False  # unchanged
    path.write_text((GOOD % 0.5).replace("threshold", "treshold"))
    assert reloader.reload() is False and reloader.reload() is False
    assert node.policy_reloads["errors"] == 1
    assert f"{path}: tasks.documents.tiers.endpoint.treshold: unknown key" in \
        node.policy_reloads["last_error"]
    path.write_text(GOOD % 0.6)
    assert reloader.reload() is True
    assert node.policy_reloads == {"reloads": 1, "errors": 1, "last_error": None}
    path.write_text("version: 1\ntasks:\n  documents:\n    tiers:\n      cloud: {threshold: 0}\n")
    assert reloader.reload() is False
    assert "tasks.documents.tiers.endpoint: missing" in node.policy_reloads["last_error"]
    assert node.policy.rule("documents", "endpoint").threshold == 0.6
