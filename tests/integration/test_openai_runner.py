"""The openai runtime against real servers: ``python -m llama_cpp.server`` serving SmolLM2
(a subprocess, started once for the module), and tiny HTTP servers on real sockets that fail
on purpose (5xx, 4xx) or nothing at all listening on a port.

No wall-clock assertions: waits poll with generous timeouts (the machine may be loaded).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import CompletionInput, Generation, TokenDelta
from cascade.errors import InvalidInput, ModelError, ServiceUnavailable
from cascade.models.llm_files import locate_gguf
from cascade.runners.base import StreamingRunner
from cascade.runners.openai_compat import OpenAIRunner
from cascade.runners.registry import ModelSpec, load_runner
from tests.conftest import free_port_block
from tests.fault.proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.llm]

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
LONG = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"
"""A prompt whose greedy continuation runs to 1500 tokens under llama_cpp.server's own sampling
defaults (its repeat penalty 1.1: with it "Count from 1 to 1000: 1, 2, 3, 4," ends after 74
tokens, in about 2.5 s here, and a 3 s deadline could come after the answer)."""


class LlamaServer:
    """``python -m llama_cpp.server`` on a free port, its output in a log file."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                 "--n_threads", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        stop = time.monotonic() + timeout_s
        while time.monotonic() < stop:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama_cpp.server not ready in {timeout_s}s: "
                           f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    model = locate_gguf("smollm2-135m-instruct").path
    server = LlamaServer(model, tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def spec(**options: Any) -> ModelSpec:
    return ModelSpec(task="chat", tier="cloud", runtime="openai", model_name="chat/cloud:remote",
                     classes=(), input_kind="text", path=Path("unused"), data=b"",
                     options=options)


@pytest.fixture
async def open_runner() -> AsyncIterator[Callable[..., OpenAIRunner]]:
    runners: list[OpenAIRunner] = []

    def make(**options: Any) -> OpenAIRunner:
        runner = load_runner(spec(**options))
        assert isinstance(runner, OpenAIRunner)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        await runner.aclose()


def check_generation(generation: Generation, max_tokens: int) -> None:
    assert generation.text == "".join(generation.tokens)
    assert len(generation.tokens) == len(generation.token_logprobs) == generation.completion_tokens
    assert 1 <= generation.completion_tokens <= max_tokens
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in generation.token_logprobs)
    assert generation.ttft_ms is not None and generation.ttft_ms > 0


async def test_run_and_stream_against_llama_cpp_server(
        llama_server: LlamaServer, open_runner: Callable[..., OpenAIRunner]) -> None:
    runner = open_runner(base_url=llama_server.url, model="smollm2")
    assert isinstance(runner, StreamingRunner)
    [generation] = await runner.run([CompletionInput(QUESTION, max_tokens=16)])
    assert isinstance(generation, Generation)
    check_generation(generation, 16)
    assert "Paris" in generation.text
    # llama_cpp.server streams no usage: the runner asks its tokenizer, which counts what a
    # plain (non-streamed) completion reports as usage.
    async with httpx.AsyncClient(timeout=120) as client:
        plain = (await client.post(f"{llama_server.url}/v1/completions",
                                   json={"prompt": QUESTION, "max_tokens": 1})).json()
    assert generation.prompt_tokens == plain["usage"]["prompt_tokens"] > 10
    [uncounted] = await open_runner(base_url=llama_server.url, count_prompt_tokens=False).run(
        [CompletionInput(QUESTION, max_tokens=2)])
    assert isinstance(uncounted, Generation) and uncounted.prompt_tokens == 0

    *deltas, final = [event async for event in runner.stream(CompletionInput(QUESTION, 16))]
    assert isinstance(final, Generation) and final.text == generation.text  # greedy
    assert tuple(d.text for d in deltas if isinstance(d, TokenDelta)) == final.tokens


async def test_json_schema_is_sent_as_a_grammar(
        llama_server: LlamaServer, open_runner: Callable[..., OpenAIRunner]) -> None:
    runner = open_runner(base_url=f"{llama_server.url}/v1")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"]}
    [generation] = await runner.run([CompletionInput(QUESTION, 48, json_schema=schema)])
    assert isinstance(generation, Generation)
    answer = json.loads(generation.text)
    assert set(answer) == {"city", "capital"} and isinstance(answer["capital"], bool)


async def test_a_deadline_keeps_what_was_streamed(
        llama_server: LlamaServer, open_runner: Callable[..., OpenAIRunner]) -> None:
    # Through a link of 2 kB/s: the 3 s deadline comes long before the answer (hundreds of kB
    # of events) however fast this machine generates, and after the first events (< 1 kB each).
    proxy = FaultProxy(llama_server.port).start()
    try:
        proxy.set(bandwidth_bps=2_000)
        runner = open_runner(base_url=proxy.url)
        [generation] = await runner.run([CompletionInput(LONG, max_tokens=1500)],
                                        Deadline.from_ms(3000))
    finally:
        proxy.stop()
    assert isinstance(generation, Generation)
    assert generation.finish_reason == "deadline"
    assert 1 <= generation.completion_tokens < 1500
    assert generation.text == "".join(generation.tokens)


async def test_abandoning_a_stream_stops_the_server_generating(
        llama_server: LlamaServer, open_runner: Callable[..., OpenAIRunner]) -> None:
    runner = open_runner(base_url=llama_server.url)
    stream = runner.stream(CompletionInput(LONG, max_tokens=1500))  # generates for seconds
    assert isinstance(await anext(stream), TokenDelta)
    await stream.aclose()
    async with asyncio.timeout(120):  # the server logs the disconnect and stops generating
        while "Disconnected from client" not in llama_server.log.read_text(errors="replace"):
            await asyncio.sleep(0.05)
    [after] = await runner.run([CompletionInput(QUESTION, max_tokens=4)])  # and serves again
    assert isinstance(after, Generation) and after.completion_tokens >= 1


# --- failing servers -----------------------------------------------------------------------


class FailingServer:
    """A real HTTP server on 127.0.0.1 answering every request with one status; it records the
    requests it got."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[dict[str, Any]] = []
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        length = int(headers.get("content-length", headers.get("Content-Length", "0")))
        body = json.loads(await reader.readexactly(length))
        self.requests.append({"headers": {k.lower(): v for k, v in headers.items()},
                              "body": body})
        payload = b'{"error": {"message": "nope"}}'
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                     + payload)
        await writer.drain()
        writer.close()


async def test_5xx_is_retried_then_503(open_runner: Callable[..., OpenAIRunner]) -> None:
    async with FailingServer(500) as server:
        runner = open_runner(base_url=server.url, max_attempts=3, backoff_initial_ms=1)
        with pytest.raises(ServiceUnavailable) as failed:
            await runner.run([CompletionInput("hi", 4)], Deadline.from_ms(30_000))
    assert (failed.value.status, failed.value.code) == (503, "model_unavailable")
    assert "after 3 attempt(s)" in failed.value.message
    assert len(server.requests) == 3
    body = server.requests[0]["body"]
    assert (body["logprobs"], body["stream"], body["prompt"]) == (1, True, "hi")


async def test_4xx_is_final(open_runner: Callable[..., OpenAIRunner]) -> None:
    async with FailingServer(400) as server:
        runner = open_runner(base_url=server.url)
        with pytest.raises(InvalidInput) as refused:
            await runner.run([CompletionInput("hi", 4)])
    assert (refused.value.status, refused.value.field) == (422, "prompt")
    assert "nope" in refused.value.message and len(server.requests) == 1


async def test_unreachable_server_is_503_after_retries(
        open_runner: Callable[..., OpenAIRunner]) -> None:
    port = free_port_block(1)  # nothing listens there
    runner = open_runner(base_url=f"http://127.0.0.1:{port}", max_attempts=2,
                         backoff_initial_ms=1)
    with pytest.raises(ServiceUnavailable, match=r"after 2 attempt\(s\).*ConnectError"):
        await runner.run([CompletionInput("hi", 4)], Deadline.from_ms(30_000))


async def test_api_key_comes_from_the_named_variable(
        monkeypatch: pytest.MonkeyPatch, open_runner: Callable[..., OpenAIRunner]) -> None:
    monkeypatch.delenv("CASCADE_TEST_LLM_KEY", raising=False)
    with pytest.raises(ModelError, match="api_key_env.*CASCADE_TEST_LLM_KEY") as missing:
        open_runner(base_url="http://127.0.0.1:1", api_key_env="CASCADE_TEST_LLM_KEY")
    assert missing.value.field == "options.api_key_env"

    monkeypatch.setenv("CASCADE_TEST_LLM_KEY", "sk-test")
    async with FailingServer(401) as server:
        runner = open_runner(base_url=server.url, api_key_env="CASCADE_TEST_LLM_KEY")
        with pytest.raises(ModelError, match="API key"):
            await runner.run([CompletionInput("hi", 4)])
    assert server.requests[0]["headers"]["authorization"] == "Bearer sk-test"


def test_options_are_validated_naming_the_key() -> None:
    with pytest.raises(ModelError, match="'base_url'") as missing:
        load_runner(spec())
    assert missing.value.field == "options.base_url"
    with pytest.raises(ModelError, match="'json_constraint'"):
        load_runner(spec(base_url="http://x", json_constraint="regex"))
