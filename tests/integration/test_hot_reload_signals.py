"""The reloader in-process: SIGHUP alone (no watcher) applies a change; a bad file is reported
once and the old policy kept; an unchanged file is a no-op."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from cascade.policy import load_policy
from cascade.policy.reload import PolicyReloader

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
            path.write_text(GOOD % 0.7)
            await asyncio.sleep(0.2)
            assert node.policy.rule("documents", "endpoint").threshold == 0.5  # no watcher
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if node.policy.rule("documents", "endpoint").threshold == 0.7:
                    break
                await asyncio.sleep(0.01)
        finally:
            await reloader.stop()

    asyncio.run(run())
    assert node.policy.rule("documents", "endpoint").threshold == 0.7
    assert node.policy_reloads["reloads"] == 1


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
