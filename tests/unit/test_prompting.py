"""Prompts per tier model and the generative input decoder."""

import json

import pytest

from cascade.contract.outputs import CompletionInput
from cascade.errors import InvalidInput, ModelError
from cascade.models.extraction.documents import split_documents
from cascade.models.extraction.fields import FIELDS, JSON_SCHEMA
from cascade.models.prompting import (
    MAX_DOCUMENT_CHARS,
    SHOTS,
    build_prompt,
    completion_decoder,
    completion_input,
)

DOC = "ACME Ltd\nInvoice No: INV-1\nDate: 2024-01-02\nTotal: EUR 5.00\n"


def test_chatml_prompt_for_an_instruct_model():
    prompt = build_prompt("chatml", DOC)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\n" + prompt.split("<|im_start|>user\n")[1])
    assert prompt.count("<|im_start|>") == 3 and prompt.count("<|im_end|>") == 2
    assert prompt.endswith(f"Document:\n{DOC.strip()}<|im_end|>\n<|im_start|>assistant\n")
    for name in FIELDS:
        assert f"- {name}:" in prompt


def test_chatml_fewshot_prompt_has_worked_examples_as_turns():
    prompt = build_prompt("chatml-fewshot", DOC)
    answers = [turn.split("<|im_end|>")[0] for turn in prompt.split("<|im_start|>assistant\n")[1:-1]]
    assert len(answers) == len(SHOTS["chatml-fewshot"])
    train = split_documents("train")
    for answer, index in zip(answers, SHOTS["chatml-fewshot"]):
        parsed = json.loads(answer)
        assert list(parsed) == list(FIELDS)  # the order the schema's grammar forces
        assert parsed == train[index].written
    assert prompt.endswith("<|im_start|>assistant\n")


def test_fewshot_prompt_for_a_base_model_has_no_chat_template():
    prompt = build_prompt("fewshot", DOC)
    assert "<|im_start|>" not in prompt
    assert prompt.endswith(f"Document:\n{DOC.strip()}\nJSON:")
    assert prompt.count("\nJSON: {") == len(SHOTS["fewshot"])
    kinds = {split_documents("train")[i].kind for i in SHOTS["fewshot"]}
    assert kinds == {"invoice", "letter", "shipping_notice"}


def test_prompts_are_the_same_every_time():
    assert build_prompt("fewshot", DOC) == build_prompt("fewshot", DOC)


def test_completion_input_carries_schema_stops_and_greedy_decoding():
    chat = completion_input("chatml", DOC)
    assert chat.json_schema == JSON_SCHEMA and chat.temperature == 0.0
    assert chat.stop == ("<|im_end|>",)
    base = completion_input("fewshot", DOC)
    assert "\n\n###" in base.stop and base.max_tokens >= 96


def test_decoder_returns_one_completion_input():
    decode = completion_decoder("chatml-fewshot")
    item = decode({"text": DOC}, max_text_chars=100_000, max_tokens=None)
    assert isinstance(item, CompletionInput)
    assert item == completion_input("chatml-fewshot", DOC)
    assert decode({"text": DOC}, max_tokens=12).max_tokens == 12


@pytest.mark.parametrize(("value", "message"), [
    ({}, "'text' is missing"),
    ({"text": "   "}, "text is empty"),
    ({"text": 5}, "text must be a string"),
    ({"text": "x" * (MAX_DOCUMENT_CHARS + 1)}, f"at most {MAX_DOCUMENT_CHARS}"),
    ({"text": "x", "image": []}, "unknown key"),
])
def test_decoder_refuses_bad_text_naming_the_field(value, message):
    decode = completion_decoder("chatml")
    with pytest.raises(InvalidInput) as info:
        decode(value, max_text_chars=100_000)
    assert info.value.status == 422 and message in info.value.message
    assert info.value.field.startswith("input.")


def test_decoder_takes_the_tier_limit_when_smaller():
    decode = completion_decoder("chatml")
    with pytest.raises(InvalidInput, match="at most 10"):
        decode({"text": "x" * 11}, max_text_chars=10)


def test_unknown_prompt_style_is_refused_when_the_decoder_is_made():
    with pytest.raises(ModelError, match="allowed: chatml, chatml-fewshot, fewshot"):
        completion_decoder("alpaca")
