"""A policy given as data (a Ray Serve user_config) goes through the hot reload's validation:
valid goes live and is counted, invalid is refused naming source and key; once it is live, the
policy file no longer replaces it."""

from __future__ import annotations

import tests.integration.test_hot_reload_signals as signals
from cascade.policy.reload import PolicyReloader, apply_policy_bytes


def test_apply_valid_then_invalid_then_the_file_does_not_override(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(signals.GOOD % 0.5)
    node = signals.FakeNode(path)
    reloader = PolicyReloader(node)
    assert apply_policy_bytes(node, (signals.GOOD % 0.8).encode(), source="cfg.yaml (user_config)",
                              reason="reconfigure")
    assert node.policy.rule("documents", "endpoint").threshold == 0.8
    assert node.policy.path == "cfg.yaml (user_config)"
    bad = b"version: 1\ntasks:\n  documents:\n    tiers:\n      endpoint: {threshold: 2}\n"
    assert not apply_policy_bytes(node, bad, source="cfg.yaml (user_config)", reason="reconfigure")
    assert node.policy.rule("documents", "endpoint").threshold == 0.8  # the old one stays
    assert node.policy_reloads["reloads"] == 1 and node.policy_reloads["errors"] == 1
    error = node.policy_reloads["last_error"]
    assert "cfg.yaml (user_config)" in error and "tasks.documents.tiers.endpoint.threshold" in error
    path.write_text(signals.GOOD % 0.3)
    assert not reloader.reload("file change")  # the file no longer governs
    assert node.policy.rule("documents", "endpoint").threshold == 0.8
