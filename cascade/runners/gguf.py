"""GGUF language models in-process through llama-cpp-python: the ``gguf`` runtime.

Each worker thread owns one llama.cpp context (``workers`` of them, the model's weights shared
through mmap); a :class:`~cascade.runners.execution.BlockingCalls` pinned to threads sits in
front: a request waits for a free worker at most until its deadline, at most ``max_queue``
requests wait at once (more: 503 ``model_busy`` with a retry hint), and every wait is measured
(``cascade_runner_wait_seconds``). The event loop never runs llama.cpp.

A generation runs in its worker as a token loop over ``Llama.generate`` (llama.cpp's sampler,
grammar and KV-cache reuse; under a JSON schema, greedy decoding asks the grammar about the best
token only: :mod:`cascade.runners.gguf_grammar`): each token's logprob is log-softmax of the logits that chose it
(the context's last row: no ``logits_all``, which would compute and keep a vocabulary-wide row
for every prompt token, 1 MB each for Gemma 3), its bytes go through :class:`~cascade.runners.token_text.
TokenText` (UTF-8 across tokens, stop sequences). The loop stops at the end of generation or a
stop sequence (``stop``), at ``max_tokens`` (``length``), when the deadline passes
(``deadline``, keeping what was generated) or when the request is abandoned (the consumer of
:meth:`GgufRunner.stream` stopped iterating, or the awaiting task was cancelled: a flag the
worker reads after every token, so it is free again one token later).

Why not ``create_completion(logprobs=1)``: llama-cpp-python then sorts the whole vocabulary in
Python for every token (a top-k list nobody reads): measured here 3-4x slower generation on
SmolLM2 (49k vocabulary), worse on Gemma 3 (262k); and its streamed text drops a character
split over two tokens. ``benchmarks/bench_llm_runtime.py`` measures both.

Options (``ModelSpec.options``, the manifest tier entry's ``options``)::

    n_ctx       context window in tokens (prompt + answer)            default 2048
    n_threads   llama.cpp threads per worker                           default cores / workers
    workers     contexts, each on its own thread                       default the tier's
                                                                       runner_concurrency (1)
    max_queue   requests that may wait for a worker                    default 4 x workers
    n_batch     prompt tokens evaluated per batch                      default 512
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from contextlib import closing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from cascade.contract.deadline import Deadline
from cascade.contract.outputs import CompletionInput, Generation, Output, TokenDelta
from cascade.errors import InvalidInput, ModelError
from cascade.runners.base import completion_inputs
from cascade.runners.execution import BlockingCalls, measure_ms
from cascade.runners.gguf_grammar import grammar_sampling
from cascade.runners.options import parse_options
from cascade.runners.token_text import TokenText

if TYPE_CHECKING:
    from cascade.runners.registry import ModelSpec

__all__ = ["GgufOptions", "GgufRunner", "load_gguf"]

Emit = Callable[[TokenDelta], None]


class GgufOptions(BaseModel):
    """The ``gguf`` runtime's options; unknown keys are refused (errors name the key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_ctx: int = Field(2048, ge=16, le=131_072)
    n_threads: int | None = Field(None, ge=1, le=256)
    workers: int | None = Field(None, ge=1, le=64)
    max_queue: int | None = Field(None, ge=0, le=10_000)
    n_batch: int = Field(512, ge=1, le=65_536)


class _Llama(Protocol):
    """The part of ``llama_cpp.Llama`` this module uses."""

    @property
    def model(self) -> Any: ...

    @property
    def ctx(self) -> Any: ...

    def n_vocab(self) -> int: ...

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        ...

    def detokenize(self, tokens: list[int]) -> bytes: ...

    def generate(self, tokens: list[int], **kwargs: Any) -> Generator[int, Any, None]: ...

    def close(self) -> None: ...


def _open_context(path: Path, options: GgufOptions, n_threads: int) -> _Llama:
    """One llama.cpp context on ``path``; :class:`ModelError` naming the file if it fails."""
    from llama_cpp import Llama

    try:
        # logits_all=False: the token loop reads the one row of logits it needs from the
        # context; True would compute and copy a vocabulary-wide row per prompt token too.
        llama = Llama(model_path=str(path), n_ctx=options.n_ctx, n_batch=options.n_batch,
                      n_threads=n_threads, n_threads_batch=n_threads, logits_all=False,
                      verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"llama.cpp cannot load the GGUF file {path}: {exc}",
                         field="file") from exc
    return cast(_Llama, llama)


@lru_cache(maxsize=64)
def _grammar(schema_json: str) -> Any:
    """The llama.cpp grammar of one JSON schema (canonical JSON text), built once."""
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_json_schema(schema_json)


def _grammar_for(schema: Mapping[str, Any] | None) -> Any:
    if schema is None:
        return None
    try:
        return _grammar(json.dumps(schema, sort_keys=True))
    except (TypeError, ValueError, KeyError, AssertionError, RecursionError) as exc:
        raise InvalidInput(f"json_schema cannot be turned into a grammar: {exc}",
                           field="json_schema") from exc


class _Stop:
    """Asked by the worker after every token: stop once the request's deadline passed or its
    consumer went away (``cancelled``, set from the event loop)."""

    def __init__(self, deadline: Deadline | None) -> None:
        self.deadline = deadline
        self.cancelled = threading.Event()

    def reason(self) -> str | None:
        """``"cancelled"``, ``"deadline"`` or None (go on)."""
        if self.cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and self.deadline.expired:
            return "deadline"
        return None


@dataclass
class _Job:
    """One generation as a worker thread runs it."""

    request: CompletionInput
    grammar: Any
    stop: _Stop
    started_s: float
    emit: Emit | None = None


class GgufRunner:
    """A GGUF model served by llama.cpp contexts on worker threads (a ``StreamingRunner``).

    ``run([CompletionInput, ...])`` returns one :class:`Generation` per input (one after the
    other); ``stream(CompletionInput)`` yields a :class:`TokenDelta` per token, then the
    :class:`Generation`. Build one with :func:`load_gguf` (the model repository checks the
    file's sha256 first).
    """

    def __init__(self, contexts: list[_Llama], *, task: str, model_name: str, path: Path,
                 n_ctx: int, calls: BlockingCalls) -> None:
        self.task = task
        self.model_name = model_name
        self.path = path
        self.n_ctx = n_ctx
        self.calls = calls
        self.contexts = contexts
        self._idle: queue.SimpleQueue[_Llama] = queue.SimpleQueue()
        for context in contexts:
            self._idle.put(context)
        self._running: set[_Stop] = set()

    async def run(self, inputs: Any, deadline: Deadline | None = None) -> list[Output]:
        """One :class:`Generation` per :class:`CompletionInput`, generated in turn."""
        jobs = [self._job(item, deadline) for item in completion_inputs(inputs)]
        outputs: list[Output] = []
        for job in jobs:
            job.started_s = time.perf_counter()
            outputs.append(await self._call(job, deadline))
        return outputs

    async def stream(self, inputs: CompletionInput,
                     deadline: Deadline | None = None) -> AsyncIterator[TokenDelta | Generation]:
        """Tokens as the worker produces them, then the whole :class:`Generation`. Leaving the
        loop early (or cancelling the consuming task) stops the generation."""
        job = self._job(inputs, deadline)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[TokenDelta | None] = asyncio.Queue()

        def emit(delta: TokenDelta) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                job.stop.cancelled.set()

        job.emit = emit
        task = asyncio.ensure_future(self._call(job, deadline))
        task.add_done_callback(lambda _: deltas.put_nowait(None))
        try:
            while (delta := await deltas.get()) is not None:
                yield delta
            yield await task
        finally:
            if not task.done():
                job.stop.cancelled.set()  # the worker notices within one token
                task.add_done_callback(_consume_outcome)

    def warmup(self) -> None:
        """A short completion on every context (first requests pay no setup), timed so the
        retry hints of a full queue start from a real figure."""
        def complete(context: _Llama) -> None:
            job = _Job(CompletionInput("Hello", max_tokens=4), None, _Stop(None),
                       time.perf_counter())
            self._generate_on(context, job)

        for context in self.contexts[1:]:
            complete(context)
        self.calls.calibrate(measure_ms(lambda: complete(self.contexts[0]), repeats=1))

    def close(self) -> None:
        """Stop generations in progress, the worker threads, and free every context."""
        for stop in list(self._running):
            stop.cancelled.set()
        self.calls.close()
        for context in self.contexts:
            context.close()
        self.contexts = []

    def _job(self, item: CompletionInput, deadline: Deadline | None) -> _Job:
        """Checks what can be checked on the event loop (before any worker is taken)."""
        if not isinstance(item.max_tokens, int) or not 1 <= item.max_tokens < self.n_ctx:
            raise InvalidInput(f"max_tokens must be an integer from 1 to {self.n_ctx - 1} (the "
                               f"context window of {self.model_name} is {self.n_ctx} tokens), "
                               f"got {item.max_tokens!r}", field="max_tokens")
        return _Job(item, _grammar_for(item.json_schema), _Stop(deadline), time.perf_counter())

    async def _call(self, job: _Job, deadline: Deadline | None) -> Generation:
        self._running.add(job.stop)
        try:
            return await self.calls.call(self._generate, job, deadline=deadline)
        except asyncio.CancelledError:
            job.stop.cancelled.set()
            raise
        finally:
            self._running.discard(job.stop)

    def _generate(self, job: _Job) -> Generation:
        """On a worker thread: one generation on an idle context (there is one per thread)."""
        stopped = job.stop.reason()
        if stopped is not None:  # abandoned or out of time while it waited: skip the prompt
            return Generation("", (), (), stopped, 0, 0)
        context = self._idle.get()
        try:
            return self._generate_on(context, job)
        finally:
            self._idle.put(context)

    def _generate_on(self, llama: _Llama, job: _Job) -> Generation:
        """The token loop: sample, score, decode, emit; stop on end of generation, a stop
        sequence, ``max_tokens``, the deadline or a cancel."""
        import llama_cpp

        request = job.request
        prompt_ids = self._prompt_ids(llama, request)
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        n_vocab = llama.n_vocab()
        text = TokenText(request.stop)
        tokens: list[str] = []
        logprobs: list[float] = []
        first_token_s: float | None = None

        def take(pieces: list[tuple[str, float]]) -> None:
            nonlocal first_token_s
            for piece, logprob in pieces:
                first_token_s = first_token_s or time.perf_counter()
                tokens.append(piece)
                logprobs.append(logprob)
                if job.emit is not None:
                    job.emit(TokenDelta(piece, logprob))

        finish_reason = "length"
        with grammar_sampling(job.grammar, request.temperature, vocab, n_vocab) as sampling, \
                closing(llama.generate(prompt_ids, temp=request.temperature, top_k=40, top_p=0.95,
                                       min_p=0.05, repeat_penalty=1.0, **sampling)) as generated:
            for count, token in enumerate(generated, start=1):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                # the logits that chose `token`: the context's last output row, untouched by
                # the sampler chain (which works on a copy), so grammar or not they are raw
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1),
                                               shape=(n_vocab,))
                take(text.add(llama.detokenize([token]), _logprob(logits, token)))
                if text.stopped:
                    finish_reason = "stop"
                    break
                if count >= request.max_tokens:
                    break
                stopped = job.stop.reason()
                if stopped is not None:
                    finish_reason = stopped
                    break
        take(text.finish())
        ttft_ms = None if first_token_s is None else (first_token_s - job.started_s) * 1000.0
        return Generation(text="".join(tokens), tokens=tuple(tokens),
                          token_logprobs=tuple(logprobs), finish_reason=finish_reason,
                          prompt_tokens=len(prompt_ids), completion_tokens=len(tokens),
                          ttft_ms=ttft_ms)

    def _prompt_ids(self, llama: _Llama, request: CompletionInput) -> list[int]:
        """The prompt's tokens (as llama.cpp adds BOS/EOS for this model); 422 when it, or it
        and ``max_tokens``, do not fit the context window."""
        ids = llama.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
        if len(ids) >= self.n_ctx:
            # Named after what the client sent: a tier's prompt is made of its input.text.
            raise InvalidInput(f"the prompt made of input.text is {len(ids)} tokens long; "
                               f"{self.model_name} reads at most {self.n_ctx - 1} (its context "
                               f"window, n_ctx, is {self.n_ctx}): send a shorter text",
                               field="input.text", code="prompt_too_long")
        if len(ids) + request.max_tokens > self.n_ctx:
            raise InvalidInput(f"max_tokens {request.max_tokens} does not fit: the prompt takes "
                               f"{len(ids)} of the {self.n_ctx} tokens of {self.model_name}'s "
                               f"context, leaving {self.n_ctx - len(ids)}", field="max_tokens")
        return ids

    def __repr__(self) -> str:
        return f"GgufRunner({self.model_name!r}, workers={len(self.contexts)}, n_ctx={self.n_ctx})"


def _logprob(logits: npt.NDArray[np.float32], token: int) -> float:
    """log softmax(logits)[token], computed stably (what llama-cpp-python reports as a token's
    logprob, without sorting the whole vocabulary for a top-k nobody reads)."""
    top = float(logits.max())
    return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))


def _consume_outcome(task: asyncio.Future[Generation]) -> None:
    """Retrieve an abandoned generation's result or error (nobody awaits it any more)."""
    if not task.cancelled():
        task.exception()


def load_gguf(spec: ModelSpec) -> GgufRunner:
    """The registry's loader for ``runtime: gguf`` (``spec.path``: a checksum-verified file)."""
    options = parse_options(GgufOptions, spec.options, where=f"{spec.task}/{spec.tier}",
                            runtime="gguf")
    calls = spec.calls or BlockingCalls(name=spec.model_name)
    workers = options.workers or calls.max_concurrency
    calls.pin_to_threads(max_concurrency=workers,
                         max_waiting=4 * workers if options.max_queue is None
                         else options.max_queue)
    n_threads = options.n_threads or max(1, (os.cpu_count() or 1) // workers)
    contexts: list[_Llama] = []
    try:
        for _ in range(workers):
            contexts.append(_open_context(spec.path, options, n_threads))
    except ModelError:
        for context in contexts:
            context.close()
        raise
    return GgufRunner(contexts, task=spec.task, model_name=spec.model_name, path=spec.path,
                      n_ctx=options.n_ctx, calls=calls)
