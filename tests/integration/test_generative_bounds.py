"""The generative tier's bounds over HTTP, on a real tier process running SmolLM2 on llama.cpp
(``runtime: gguf``): too long a text (in characters, in bytes, in prompt tokens against the
context window) and ``max_tokens`` that do not fit are 413/422 naming the field before the
model runs; a full generation queue is 503 ``model_busy`` with ``Retry-After``; the request's
deadline stops generation with finish reason ``deadline``; a tampered GGUF stops the tier at
start with an error naming the file."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from httpx_sse import connect_sse

from tests.fault.harness import Tier
from tests.integration.test_generative_gguf import smollm2_file
from tests.integration.test_generative_tiers import DOCUMENT, TASK, models

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.integration, pytest.mark.llm]

__all__ = ["models"]  # the module-scoped models directory fixture, found by name

PROMPT_TOKENS = 868
"""Tokens of DOCUMENT's prompt (chatml-fewshot, SmolLM2's tokenizer); the first test checks."""
N_CTX = 2048  # the fixture manifest's n_ctx for SmolLM2


def write_top_policy(tmp: Path) -> Path:
    """One top tier that answers everything it can."""
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "name": "bounds", "tasks": {TASK: {
        "deadline_ms": 600_000, "tiers": {"cloud": {"signal": "field_min_logprob",
                                                    "threshold": 0.0}}}}}))
    return policy


@pytest.fixture
def tier(models: Path, tmp_path: Path):
    """A top tier serving SmolLM2 with one worker and no waiting room (model_options)."""
    made = Tier(tmp_path, "cloud", models, write_top_policy(tmp_path), tasks={TASK: "endpoint"},
                model_options={TASK: {"workers": 1, "max_queue": 0}},
                ready_timeout_s=300).start()
    try:
        yield made
    finally:
        made.stop()


def test_lengths_and_max_tokens_are_refused_naming_the_field(tier: Tier) -> None:
    body = {"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 8}
    long_text = ((DOCUMENT + " ") * 40)[:3990]  # under the 4000 characters, over the context
    with httpx.Client(timeout=900) as client:
        fits = client.post(f"{tier.url}/v1/infer", json=body)
        assert fits.status_code == 200, fits.text
        assert fits.json()["usage"]["input_tokens"] == PROMPT_TOKENS
        for request, status, field, code, says in [
            ({**body, "input": {"text": long_text}}, 422, "input.text", "prompt_too_long",
             f"at most {N_CTX - 1}"),
            ({**body, "max_tokens": N_CTX - PROMPT_TOKENS + 1}, 422, "max_tokens",
             "invalid_input", f"leaving {N_CTX - PROMPT_TOKENS}"),
            ({**body, "max_tokens": N_CTX}, 422, "max_tokens", "invalid_input",
             f"from 1 to {N_CTX - 1}"),
            ({**body, "input": {"text": "x" * 4001}}, 422, "input.text", "invalid_input",
             "at most 4000"),
            ({**body, "input": {"text": "x" * 300_000}}, 413, "body", "payload_too_large",
             "bytes"),
        ]:
            r = client.post(f"{tier.url}/v1/infer", json=request)
            assert r.status_code == status, (field, r.text)
            error = r.json()["error"]
            assert (error.get("field"), error["code"]) == (field, code), r.text
            assert says in error["message"], error
        # Refused before the model: the one answer computed is the first.
        metrics = client.get(f"{tier.url}/metrics").text
    (count,) = [line for line in metrics.splitlines()
                if line.startswith("cascade_gen_ai_time_to_first_token_seconds_count{")]
    assert count.endswith(" 1.0"), count


def test_a_full_generation_queue_is_503_with_retry_after(tier: Tier) -> None:
    body = {"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 96}
    refused = None
    with httpx.Client(timeout=900) as client:
        # The worker is busy from the stream's first token until its answer is whole (tens of
        # tokens). If that answer is done before the second request arrives (a machine much
        # faster than this one), try again: the bound itself is not timing-dependent.
        for _ in range(5):
            with connect_sse(client, "POST", f"{tier.url}/v1/infer",
                             json={**body, "stream": True}) as source:
                events = source.iter_sse()
                assert next(events).event == "token"  # generating now: the only worker is busy
                second = client.post(f"{tier.url}/v1/infer", json=body)
                rest = [e.event for e in events]
            assert rest[-1] == "answer"  # the first request is served whole
            if second.status_code == 503:
                refused = second
                break
            assert second.status_code == 200, second.text
    assert refused is not None, "the second request never met a busy worker"
    error = refused.json()["error"]
    assert error["code"] == "model_busy" and "max_waiting=0" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1


def unread_document() -> str:
    """DOCUMENT behind about 500 tokens of line items no earlier request sent (a fresh tag). The
    tier's llama.cpp context keeps the last prompt's tokens and reads only where a new prompt
    departs from them: DOCUMENT's own prompt, just read, would take no time at all to read."""
    tag = uuid.uuid4().hex
    items = [f"Line {i}: {i * 3} boxes of item {tag[i:i + 8]}, {i * 7}.50 EUR" for i in range(1, 17)]
    return "\n".join([f"Ref {tag}", *items, DOCUMENT])


def test_the_deadline_stops_generation_with_finish_reason_deadline(tier: Tier) -> None:
    body = {"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 96}
    with httpx.Client(timeout=900) as client:
        whole = client.post(f"{tier.url}/v1/infer", json=body).json()
        # 50 ms: less than reading ~500 new prompt tokens takes on any CPU this runs on, so the
        # deadline has passed when the first token comes. (With DOCUMENT again the prompt was
        # all cached: the first tokens came within 50 ms on a quiet machine, and a 4th token
        # was made before the deadline, red in the soak.)
        cut = client.post(f"{tier.url}/v1/infer", json={
            **body, "input": {"text": unread_document()}, "deadline_ms": 50})
    assert cut.status_code == 200, cut.text
    (hop,) = cut.json()["hops"]
    assert whole["hops"][0]["finish_reason"] == "stop" and whole["hops"][0]["tokens"] > 10
    # Cut after the first token it produced (a token's text may reach the answer in pieces).
    assert hop["finish_reason"] == "deadline" and hop["tokens"] <= 3
    assert hop["confidence"] == 0.0 and cut.json()["fields"] is None  # a cut answer is not one


def test_a_tampered_gguf_stops_the_tier_at_start(models: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "models"
    shutil.copytree(models, tampered, symlinks=True)
    gguf = tampered / "extraction" / smollm2_file().name
    gguf.unlink()
    shutil.copyfile(smollm2_file(), gguf)
    with gguf.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x01]))
    tier = Tier(tmp_path, "cloud", tampered, write_top_policy(tmp_path), tasks={TASK: "endpoint"},
                ready_timeout_s=300)
    with pytest.raises(RuntimeError, match="exited with code 2") as failed:
        tier.start()
    assert f"{gguf} for extraction/endpoint failed its checksum" in str(failed.value)
    assert "Refusing to load it" in str(failed.value)
