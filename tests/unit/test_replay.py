"""Decision log and what-if replay: recorded decisions are re-derived exactly, candidates differ."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from cascade.lab.replay import (
    Observation,
    Request,
    TaskTraffic,
    changed_answers,
    replay_task,
    traffic_from_logs,
)
from cascade.observability.decisionlog import DecisionLog, connect, read_rows, sampled
from cascade.policy import load_policy_bytes
from cascade.tier.node import Node
from tests.unit.otel_fixtures import send_texts, text_node

POLICY = """\
version: 1
name: replay-test
decision_log: {{sample_rate: {rate}, path: "{path}", include_payloads: {payloads}}}
tasks:
  documents:
    tiers:
      endpoint: {{threshold: {t_end}, calibration: {{method: temperature, temperature: 1.5}}}}
      cloud: {{threshold: 0.0}}
"""


def policy_text(tmp_path: Path, *, rate: float = 1.0, t_end: float = 0.6, payloads: bool = False) -> str:
    return POLICY.format(rate=rate, path=tmp_path / "decisions-{tier}.db", t_end=t_end,
                         payloads=str(payloads).lower())


def serve(node: Node, probs: list[float]) -> list[dict]:
    return asyncio.run(send_texts(node, probs))


def test_sampling_is_by_request_id_and_close_to_the_rate():
    ids = [f"r{i}" for i in range(20_000)]
    share = np.mean([sampled(i, 0.1) for i in ids])
    assert 0.09 < share < 0.11
    assert [sampled(i, 0.1) for i in ids[:50]] == [sampled(i, 0.1) for i in ids[:50]]
    assert not any(sampled(i, 0.0) for i in ids[:100]) and all(sampled(i, 1.0) for i in ids[:100])


def test_decision_log_round_trips_exact_probabilities(tmp_path):
    log = DecisionLog(tmp_path / "d.db")
    row = (1.0, "r1", None, "endpoint", "documents", 0, "m", "v1", 1, "[0.1234567890123, 0.8765432109877]",
           "b", 0.87, 0.75, 0.3, "max_prob", 0.9, 0.87, "escalate", "b", "cloud", "final", None)
    log.record(row)
    log.flush()
    log.close()
    (got,) = list(read_rows([tmp_path / "d.db"]))
    assert got["probs"] == "[0.1234567890123, 0.8765432109877]" and got["decision"] == "escalate"
    assert log.stats["written"] == 1 and log.stats["lost"] == 0


def test_a_paused_reader_of_a_live_log_does_not_keep_its_wal_from_being_emptied(tmp_path):
    # A replay reads a tier's live log while the tier writes it. A read left open between two
    # rows (the replay busy with one) would pin the WAL: the tier's TRUNCATE checkpoint would
    # be refused as busy, and the WAL would grow past the log's disk share. Rows are read in
    # short chunks instead, and reading on after the checkpoint still yields every row once,
    # in order, including rows written meanwhile.
    import sqlite3

    from cascade.observability.decisionlog import COLUMNS, read_log

    path = tmp_path / "d.db"
    log = DecisionLog(path)

    def row(i: int) -> tuple:
        return (float(i), f"r{i}", None, "endpoint", "documents", 0, "m", "v1", 1, "[0.4, 0.6]",
                "b", 0.6, 0.2, 0.6, "max_prob", 0.9, 0.6, "escalate", "b", "cloud", "final", None)

    for i in range(25):
        log.record(row(i))
    log.flush()
    log.close()
    tier = sqlite3.connect(path)  # the tier's writer
    assert tier.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    try:
        for readers in (read_rows([path]), read_log(path, "decisions", "log", chunk=10)):
            first = next(readers)  # the reader pauses here
            new = row(100 + first["id"])
            with tier:
                tier.execute(f"INSERT INTO decisions ({', '.join(COLUMNS[:len(new)])}) "
                             f"VALUES ({', '.join('?' * len(new))})", new)
            assert Path(f"{path}-wal").stat().st_size > 0
            busy, _, _ = tier.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert busy == 0 and Path(f"{path}-wal").stat().st_size == 0
            ids = [first["id"]] + [r["id"] for r in readers]
            assert ids == sorted(set(ids)) and set(range(1, 26)) <= set(ids)
    finally:
        tier.close()


def test_replay_of_a_node_log_reproduces_every_live_decision(tmp_path):
    node = text_node(tmp_path, policy_text(tmp_path))
    probs = [0.95, 0.7, 0.55, 0.51, 0.99, 0.6, 0.58]
    answers = serve(node, probs)
    asyncio.run(node.aclose())
    traffic = traffic_from_logs([tmp_path / "decisions-endpoint.db"], node.policy)["documents"]
    assert len(traffic.requests) == len(probs)
    result = replay_task(traffic, node.policy)
    assert result.compared == len(probs) and result.mismatched == 0
    for i, answer in enumerate(answers):
        assert result.decisions[(f"req-{i}", "endpoint")] == answer["hops"][0]["decision"]
    # What the calibrated gate did: T=1.5 softens 0.7 to ~0.64 (answered) and 0.6 to ~0.57.
    assert [a["hops"][0]["decision"] for a in answers] == [
        "answer", "answer", "escalate", "escalate", "answer", "escalate", "escalate"]
    rows = list(read_rows([tmp_path / "decisions-endpoint.db"]))
    assert rows[2]["final_label"] == "b" and rows[2]["answered_by"] == "cloud"
    assert all(r["payload"] is None for r in rows)


def test_candidate_that_escalates_beyond_the_log_leaves_requests_unresolved(tmp_path):
    node = text_node(tmp_path, policy_text(tmp_path))
    serve(node, [0.95, 0.7, 0.55])
    asyncio.run(node.aclose())
    traffic = traffic_from_logs([tmp_path / "decisions-endpoint.db"], node.policy)["documents"]
    stricter = load_policy_bytes(policy_text(tmp_path, t_end=0.9).encode(), source="cand.yaml")
    result = replay_task(traffic, stricter)
    # Only the endpoint was logged: what the cloud would say is unknown for escalated requests
    # (even 0.95 is below 0.9 once T=1.5 softens it to ~0.88).
    assert result.escalated["endpoint"] == 3 and result.unresolved == 3
    assert result.cloud_share == 0.0 and result.cloud_share_upper == 1.0
    assert result.compared == 0  # a different policy version: nothing to compare


def test_payloads_only_when_asked_and_sampling_follows_the_policy(tmp_path):
    node = text_node(tmp_path, policy_text(tmp_path, payloads=True))
    serve(node, [0.95])
    node.set_policy(load_policy_bytes(policy_text(tmp_path, rate=0.0).encode(), source="p2.yaml"))
    assert node.decisions.log is None  # logging switched off by the new policy
    serve(node, [0.96])
    asyncio.run(node.aclose())
    rows = list(read_rows([tmp_path / "decisions-endpoint.db"]))
    assert len(rows) == 1 and '"text": "p=0.95 doc"' in rows[0]["payload"]


def _traffic() -> TaskTraffic:
    def obs(p: float, label: str, up: bool) -> Observation:
        return Observation([p, 1 - p] if label == "a" else [1 - p, p], label, up)

    reqs = [
        Request("1", {"edge": obs(0.9, "a", True), "top": obs(0.9, "a", False)}, "a"),
        Request("2", {"edge": obs(0.6, "a", True), "top": obs(0.9, "b", False)}, "b"),
        Request("3", {"edge": obs(0.7, "a", True), "top": obs(0.9, "b", False)}, "a"),
        Request("4", {"edge": obs(0.95, "b", True), "top": obs(0.8, "b", False)}, "b"),
    ]
    return TaskTraffic("documents", ["edge", "top"], reqs)


def _policy(threshold: float):
    text = f"version: 1\ntasks:\n  documents:\n    tiers:\n      edge: {{threshold: {threshold}}}\n" \
           "      top: {threshold: 0.0}\n"
    return load_policy_bytes(text.encode(), source=f"t{threshold}.yaml")


def test_replay_numbers_on_known_traffic():
    live, cand = replay_task(_traffic(), _policy(0.8)), replay_task(_traffic(), _policy(0.65))
    assert live.escalation_rate("edge") == 0.5 and live.cloud_share == 0.5
    assert live.accuracy == 0.75 and live.top_accuracy == 0.75
    assert live.agreement_with_top == 1.0
    assert cand.escalation_rate("edge") == 0.25 and cand.answered["edge"] == 3
    # Request 3: the edge now answers it ('a', right) instead of the top ('b', wrong).
    assert cand.accuracy == 1.0 and cand.agreement_with_top == 0.75
    assert changed_answers(live, cand) == (1, 4)
    assert cand.escalations_per_request == 0.25


def test_decision_log_schema_has_a_true_label_column_for_feedback(tmp_path):
    conn = connect(tmp_path / "x.db")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(decisions)")}
    conn.close()
    assert {"probs", "decision", "policy_version", "true_label", "payload"} <= cols
