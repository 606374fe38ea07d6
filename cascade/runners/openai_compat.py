"""A model behind any OpenAI-compatible server: the ``openai`` runtime.

``POST {base_url}/completions`` (``/v1`` is appended to ``base_url`` when missing) with
``logprobs: 1`` and ``stream: true``: tokens are read from the server-sent events as they come
(``data: {...}`` events, then ``data: [DONE]``; parsed by the tiers' own
:class:`~cascade.contract.streaming.SseParser`), so a deadline keeps what was generated
(``finish_reason="deadline"``) and a consumer that stops iterating closes the connection, which
stops the server's generation (llama_cpp.server checks for a disconnect after every token).
``run`` drains the same stream.

Opening the stream is retried like an escalation to the next tier
(:mod:`cascade.contract.retrying`): connection errors, timeouts and 5xx, with full-jitter
backoff, never past the deadline; then 503 ``model_unavailable``. A 4xx is final: 408/429 are
503 ``model_busy``, 401/403/404 a :class:`ModelError` (the key, the URL or the model name is
wrong), any other a 422 naming ``prompt`` with the server's message.

Options (``ModelSpec.options``)::

    base_url            required, e.g. http://127.0.0.1:8080 or https://api.example.com/v1
    model               the server's model name (sent as ``model``)             default none
    api_key_env         NAME of the environment variable holding the API key    default none
    timeout_s           longest attempt when the request has no deadline       default 60
    connect_timeout_ms  default 500;  max_attempts  default 3
    backoff_initial_ms  default 20;   backoff_max_ms  default 500
    json_constraint     how a json_schema is sent: ``grammar`` (a GBNF ``grammar`` field:
                        llama.cpp servers) or ``response_format`` (OpenAI's json_schema)
    stream_usage        ask for usage in the stream (``stream_options.include_usage``)
    count_prompt_tokens when a stream carried no usage (llama_cpp.server sends none in
                        streams), count the prompt with the server's ``POST
                        /extras/tokenize/count`` (llama_cpp.server's own endpoint; the same
                        tokenization its usage reports), after the last token; a server
                        without it leaves ``prompt_tokens`` 0 (said once in the log) default true
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import CompletionInput, Generation, Output, TokenDelta
from cascade.contract.retrying import MIN_ATTEMPT_MS, JitterBackoff, deadline_retrying
from cascade.contract.streaming import SseParser
from cascade.errors import InvalidInput, ModelError, ServiceUnavailable
from cascade.runners.base import completion_inputs
from cascade.runners.options import parse_options

if TYPE_CHECKING:
    from cascade.runners.registry import ModelSpec

__all__ = ["OpenAIOptions", "OpenAIRunner", "load_openai"]

log = logging.getLogger("cascade.runners.openai")


class OpenAIOptions(BaseModel):
    """The ``openai`` runtime's options; unknown keys are refused (errors name the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(pattern=r"^https?://")
    model: str | None = None
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_ms: float = Field(500.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)
    backoff_initial_ms: float = Field(20.0, ge=0)
    backoff_max_ms: float = Field(500.0, ge=0)
    json_constraint: Literal["grammar", "response_format"] = "grammar"
    stream_usage: bool = True
    count_prompt_tokens: bool = True


class _Retryable(Exception):
    """One attempt failed in a way another may fix (transport error, timeout, 5xx)."""


class _Collected:
    """The generation so far, built from stream chunks."""

    def __init__(self, started_s: float) -> None:
        self.started_s = started_s
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.finish_reason = "length"
        self.prompt_tokens = 0
        self.usage_seen = False
        self.first_token_s: float | None = None

    def add(self, chunk: Mapping[str, Any], where: str) -> list[TokenDelta]:
        """The chunk's tokens (its ``usage`` and ``finish_reason`` are noted)."""
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.usage_seen = True
        deltas: list[TokenDelta] = []
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
            text = choice.get("text") or ""
            logprobs = choice.get("logprobs")
            if not logprobs:
                if text:
                    raise ModelError(f"{where} streamed text without logprobs; the generative "
                                     "gate needs them (does the server support logprobs?)")
                continue
            values = [float(v) for v in logprobs.get("token_logprobs") or ()]
            pieces = [text] if len(values) == 1 else list(logprobs.get("tokens") or ())
            for piece, value in zip(pieces, values, strict=True):
                self.first_token_s = self.first_token_s or time.perf_counter()
                self.tokens.append(piece)
                self.logprobs.append(value)
                deltas.append(TokenDelta(piece, value))
        return deltas

    def generation(self) -> Generation:
        ttft = None if self.first_token_s is None else (self.first_token_s - self.started_s)
        return Generation(text="".join(self.tokens), tokens=tuple(self.tokens),
                          token_logprobs=tuple(self.logprobs), finish_reason=self.finish_reason,
                          prompt_tokens=self.prompt_tokens, completion_tokens=len(self.tokens),
                          ttft_ms=None if ttft is None else ttft * 1000.0)


class OpenAIRunner:
    """Completions from an OpenAI-compatible server (a ``StreamingRunner``). The
    :class:`httpx.AsyncClient` is created on first use; :meth:`aclose` or :meth:`close` ends it."""

    def __init__(self, options: OpenAIOptions, *, task: str, model_name: str,
                 api_key: str | None = None) -> None:
        self.task = task
        self.model_name = model_name
        self.options = options
        base = options.base_url.rstrip("/")
        self.url = f"{base if base.endswith('/v1') else base + '/v1'}/completions"
        self._count_url: str | None = (f"{base.removesuffix('/v1')}/extras/tokenize/count"
                                       if options.count_prompt_tokens else None)
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client: httpx.AsyncClient | None = None
        self._closing: asyncio.Task[None] | None = None

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """One :class:`Generation` per :class:`CompletionInput`, one after the other."""
        outputs: list[Output] = []
        for item in completion_inputs(inputs):
            async for event in self.stream(item, deadline):
                if isinstance(event, Generation):
                    outputs.append(event)
        return outputs

    async def stream(self, inputs: CompletionInput,
                     deadline: Deadline | None = None) -> AsyncIterator[TokenDelta | Generation]:
        """Tokens as the server sends them, then the whole :class:`Generation`."""
        body = self._body(inputs)
        collected = _Collected(time.perf_counter())
        budget = deadline or Deadline.from_ms(self.options.timeout_s * 1000.0)
        response = await self._open(body, budget)
        try:
            async with aclosing(self._events(response, budget, collected)) as events:
                async for data in events:
                    for delta in collected.add(_chunk(data, self.url), self.url):
                        yield delta
        finally:
            await response.aclose()
        if not collected.usage_seen and self._count_url is not None:
            collected.prompt_tokens = await self._count_prompt_tokens(inputs.prompt, budget)
        yield collected.generation()

    async def _count_prompt_tokens(self, prompt: str, deadline: Deadline) -> int:
        """The prompt's token count from the server's tokenizer (0 when it cannot say: a
        missing endpoint is not asked again). Never fails the generation."""
        assert self._count_url is not None
        body: dict[str, Any] = {"input": prompt}
        if self.options.model:
            body["model"] = self.options.model
        try:
            response = await self._get_client().post(
                self._count_url, content=orjson.dumps(body), headers=self._headers,
                timeout=max(0.05, min(deadline.remaining_s(), 5.0)))
            if response.status_code in (404, 405, 501):
                log.warning("%s answered HTTP %d: prompt tokens of %s are not counted",
                            self._count_url, response.status_code, self.model_name)
                self._count_url = None
                return 0
            return int(response.json()["count"]) if response.status_code == 200 else 0
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0

    async def _events(self, response: httpx.Response, deadline: Deadline,
                      collected: _Collected) -> AsyncGenerator[str, None]:
        """The ``data`` of each server-sent event until ``[DONE]``, or until the deadline
        (then ``collected.finish_reason`` is ``deadline``)."""
        parser = SseParser()
        chunks = response.aiter_text()
        while True:
            try:
                async with asyncio.timeout(deadline.remaining_s()):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                raise ServiceUnavailable(f"{self.url} ended its stream without [DONE]",
                                         code="model_unavailable") from None
            except TimeoutError:
                collected.finish_reason = "deadline"
                return
            except httpx.TransportError as exc:
                raise ServiceUnavailable(f"{self.url} broke off its stream: {exc}",
                                         code="model_unavailable") from exc
            for _event, data in parser.feed(chunk):
                if data.strip() == "[DONE]":
                    return
                yield data

    def warmup(self) -> None:
        """Nothing to warm here: the server owns the model (and a tier must start even while
        the server is still loading it)."""

    def close(self) -> None:
        """Close the connection pool: on the running event loop if there is one (the tier is
        stopping inside it), else just drop it (its sockets close with it)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._closing = loop.create_task(client.aclose())

    async def aclose(self) -> None:
        """Close pooled connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _body(self, item: CompletionInput) -> dict[str, Any]:
        if not isinstance(item.max_tokens, int) or item.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be a positive integer, got {item.max_tokens!r}",
                               field="max_tokens")
        body: dict[str, Any] = {"prompt": item.prompt, "max_tokens": item.max_tokens,
                                "temperature": item.temperature, "logprobs": 1, "stream": True}
        if self.options.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.options.model:
            body["model"] = self.options.model
        if item.stop:
            body["stop"] = list(item.stop)
        if item.json_schema is not None:
            body.update(_json_constraint(item.json_schema, self.options.json_constraint))
        return body

    async def _open(self, body: dict[str, Any], deadline: Deadline) -> httpx.Response:
        """The streaming response (status 200), opened with deadline-bounded retries."""
        attempts = 0

        async def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return await self._attempt(body, deadline)

        retrying = deadline_retrying(
            deadline=deadline, max_attempts=self.options.max_attempts, retry_on=_Retryable,
            backoff=JitterBackoff(self.options.backoff_initial_ms / 1000.0,
                                  self.options.backoff_max_ms / 1000.0))
        try:
            response: httpx.Response = await retrying(attempt)
        except _Retryable as exc:
            why = "attempts used up" if attempts >= self.options.max_attempts else "deadline"
            raise ServiceUnavailable(
                f"model server {self.url} unavailable after {attempts} attempt(s) ({why}); "
                f"last error: {exc}", code="model_unavailable") from exc.__cause__
        return response

    async def _attempt(self, body: dict[str, Any], deadline: Deadline) -> httpx.Response:
        remaining_s = deadline.remaining_s()
        if remaining_s * 1000.0 < MIN_ATTEMPT_MS:
            raise _Retryable("deadline exhausted before the attempt")
        connect_s = min(self.options.connect_timeout_ms / 1000.0, remaining_s)
        client = self._get_client()
        request = client.build_request("POST", self.url, content=orjson.dumps(body),
                                       headers=self._headers,
                                       timeout=httpx.Timeout(remaining_s, connect=connect_s))
        try:
            async with asyncio.timeout(remaining_s):
                response = await client.send(request, stream=True)
        except TimeoutError as exc:
            raise _Retryable(f"no answer within the remaining {remaining_s * 1000:.0f} ms") \
                from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'transport error'}") from exc
        if response.status_code == 200:
            return response
        try:
            detail = (await response.aread())[:300].decode("utf-8", "replace")
        except httpx.TransportError:
            detail = ""
        finally:
            await response.aclose()
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code} {detail}".strip())
        raise self._refusal(response.status_code, detail)

    def _refusal(self, status: int, detail: str) -> Exception:
        """The final error for a 4xx (not retried)."""
        said = f"{self.url} answered HTTP {status}: {detail}"
        if status in (408, 429):
            return ServiceUnavailable(f"{said}; it asks to back off", code="model_busy")
        if status in (401, 403):
            return ModelError(f"{said}; check the API key (option api_key_env)",
                              field="options.api_key_env")
        if status == 404:
            return ModelError(f"{said}; check options base_url and model",
                              field="options.base_url")
        return InvalidInput(f"the model server refused the request: {said}", field="prompt",
                            code="model_rejected_input")

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(http1=True, http2=False, follow_redirects=False)
        return self._client

    def __repr__(self) -> str:
        return f"OpenAIRunner({self.model_name!r}, {self.url!r})"


def _chunk(data: str, url: str) -> Mapping[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ServiceUnavailable(f"{url} streamed an event that is not JSON: {data[:200]!r}",
                                 code="model_unavailable") from None
    if not isinstance(chunk, dict) or "error" in chunk:
        raise ServiceUnavailable(f"{url} streamed an error: {data[:300]}",
                                 code="model_unavailable")
    return chunk


def _json_constraint(schema: Mapping[str, Any], how: str) -> dict[str, Any]:
    """The request fields that constrain the output to ``schema``."""
    if how == "response_format":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": dict(schema), "strict": True}}}
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return {"grammar": json_schema_to_gbnf(orjson.dumps(dict(schema)).decode())}
    except (TypeError, ValueError, KeyError, AssertionError, RecursionError) as exc:
        raise InvalidInput(f"json_schema cannot be turned into a grammar: {exc}",
                           field="json_schema") from exc


def load_openai(spec: ModelSpec) -> OpenAIRunner:
    """The registry's loader for ``runtime: openai`` (no local file: the model is remote)."""
    where = f"{spec.task}/{spec.tier}"
    options = parse_options(OpenAIOptions, spec.options, where=where, runtime="openai")
    api_key = None
    if options.api_key_env is not None:
        api_key = os.environ.get(options.api_key_env)
        if not api_key:
            raise ModelError(f"{where}: option api_key_env names the environment variable "
                             f"{options.api_key_env}, which is not set (or empty): set it to the "
                             "server's API key, or drop the option if the server needs none",
                             field="options.api_key_env")
    return OpenAIRunner(options, task=spec.task, model_name=spec.model_name, api_key=api_key)

