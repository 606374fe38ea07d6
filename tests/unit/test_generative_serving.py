"""A tier serving the generative task: the decoder, the scorer, the gate and the decision log,
and replay reproducing its decisions from the log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from cascade.contract.outputs import CompletionInput, Generation
from cascade.contract.schemas import InferRequest
from cascade.lab.replay import replay_task, traffic_from_logs
from cascade.models.prompting import completion_decoder
from cascade.observability.decisionlog import read_rows
from cascade.policy import load_policy
from cascade.tier.node import CallContext, Node, TaskRuntime
from cascade.tier.settings import NodeSettings
from tests.unit.otel_fixtures import AnsweringCloud

POLICY = """\
version: 1
name: gen
decision_log: {{sample_rate: 1.0, path: "{path}"}}
tasks:
  extraction:
    tiers:
      endpoint: {{signal: field_min_logprob, threshold: 0.5}}
      cloud: {{signal: field_min_logprob, threshold: 0.0}}
"""


def answer_of(document: str) -> Generation:
    """A generation whose least likely value token follows the document ('lp=-0.2')."""
    lp = float(document.split("lp=")[1].split()[0])
    tokens = ['{"', 'amount', '": "', '1', '0', '",', ' "', 'company', '": "', 'ACME', '"}']
    logprobs = [-0.01, -0.01, -0.01, lp, -0.05, -0.02, -0.01, -0.01, -0.01, -0.03, -0.02]
    if "cut" in document:  # max_tokens reached inside a value
        tokens, logprobs = tokens[:5], logprobs[:5]
    return Generation("".join(tokens), tuple(tokens), tuple(logprobs),
                      "length" if "cut" in document else "stop", 300, len(tokens))


class RecordedRunner:
    """A stand-in generative runner: the answer is chosen by the document in the prompt."""

    model_name = "extraction/test-llm"
    task = "extraction"

    def __init__(self) -> None:
        self.seen: list[CompletionInput] = []

    async def run(self, inputs: Any, deadline: Any = None) -> list[Generation]:
        item = inputs if isinstance(inputs, CompletionInput) else inputs[0]
        self.seen.append(item)
        return [answer_of(item.prompt.split("Document:\n")[-1].split("<|im_end|>")[0])]

    def warmup(self) -> None:
        return None

    def close(self) -> None:
        return None


def node(tmp_path: Path) -> tuple[Node, RecordedRunner]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(path=tmp_path / "decisions-{tier}.db"))
    runner = RecordedRunner()
    settings = NodeSettings(tier="endpoint", tasks={"extraction": "endpoint"}, policy=path,
                            upstream_url=AnsweringCloud.base_url)
    runtime = TaskRuntime("extraction", runner, completion_decoder("chatml"))
    return Node(settings, tasks={"extraction": runtime}, policy=load_policy(path),
                upstream=AnsweringCloud()), runner


async def ask(n: Node, texts: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, text in enumerate(texts):
        req = InferRequest.model_validate({"task": "extraction", "input": {"text": text}})
        out.append((await n.infer(req, CallContext(request_id=f"req-{i}"))).to_wire())
    return out


def test_a_generative_tier_gates_on_field_logprobs_and_replay_reproduces_it(tmp_path):
    n, runner = node(tmp_path)
    texts = ["invoice lp=-0.1", "invoice lp=-2.0", "invoice lp=-0.5 cut", "invoice lp=-0.6"]
    answers = asyncio.run(ask(n, texts))
    asyncio.run(n.aclose())
    assert all(item.json_schema is not None for item in runner.seen)
    decisions = [a["hops"][0]["decision"] for a in answers]
    # exp(-0.1) = 0.90 and exp(-0.6) = 0.55 pass 0.5; exp(-2) = 0.14 and a cut answer (0) do not
    assert decisions == ["answer", "escalate", "escalate", "answer"]
    assert answers[0]["hops"][0]["label"] == '{"amount":"10","company":"ACME"}'
    assert answers[2]["hops"][0]["confidence"] == 0.0
    rows = list(read_rows([tmp_path / "decisions-endpoint.db"]))
    assert len(rows) == 4 and rows[0]["max_prob"] is None
    assert json.loads(rows[0]["probs"])[3] == -0.1  # field_min_logprob, exactly
    traffic = traffic_from_logs([tmp_path / "decisions-endpoint.db"], n.policy)["extraction"]
    result = replay_task(traffic, n.policy)
    assert result.compared == 4 and result.mismatched == 0
