"""Run a GGUF model over a split's documents and record every answer: the measurements behind
a generative ladder (accuracy, latency) and its recorded predictions.

Generation goes through the ``gguf`` runtime when it is installed
(``cascade.runners.gguf``: exactly what a tier runs); otherwise through llama-cpp-python
directly, with the same call (greedy, token log-probabilities, the schema's grammar, streamed
so the time to the first token is seen). One context serves a whole run, so the prompt's
fixed prefix (instructions and worked examples) is evaluated once and reused, as it is on a
serving tier that keeps its context warm.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cascade.contract.outputs import CompletionInput, Generation
from cascade.errors import ModelError
from cascade.lab.generative.records import Record

__all__ = ["Generate", "gguf_generator", "record_run"]

Generate = Callable[[CompletionInput], Generation]
Progress = Callable[[int, int], None]


@contextmanager
def gguf_generator(path: Path, *, n_ctx: int = 2048, n_threads: int = 2) -> Iterator[Generate]:
    """A function generating one answer at a time with the GGUF model at ``path``."""
    try:
        from llama_cpp import Llama, LlamaGrammar
    except ImportError:
        raise ModelError("measuring a generative model needs llama-cpp-python: "
                         "pip install -e '.[llm]'", field="runtime") from None
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                  n_threads_batch=n_threads, logits_all=True, verbose=False)
    grammars: dict[str, Any] = {}

    def generate(request: CompletionInput) -> Generation:
        grammar = None
        if request.json_schema is not None:
            key = json.dumps(request.json_schema, sort_keys=True)
            if key not in grammars:
                grammars[key] = LlamaGrammar.from_json_schema(json.dumps(request.json_schema),
                                                              verbose=False)
            grammar = grammars[key]
        return _complete(llama, request, grammar)

    try:
        yield generate
    finally:
        llama.close()


def _complete(llama: Any, request: CompletionInput, grammar: Any) -> Generation:
    """One streamed, greedy completion with token log-probabilities."""
    started = time.perf_counter()
    prompt_tokens = len(llama.tokenize(request.prompt.encode("utf-8"), add_bos=True,
                                       special=True))
    chunks = llama.create_completion(
        request.prompt, max_tokens=request.max_tokens, temperature=request.temperature,
        stop=list(request.stop), logprobs=1, stream=True, grammar=grammar)
    tokens: list[str] = []
    logprobs: list[float] = []
    finish_reason, first_s = "length", None
    for chunk in chunks:
        choice = chunk["choices"][0]
        if choice["finish_reason"] is not None:
            finish_reason = choice["finish_reason"]
        if choice["logprobs"] is None:
            continue
        first_s = first_s or time.perf_counter()
        tokens.append(choice["text"])
        logprobs.append(float(choice["logprobs"]["token_logprobs"][0]))
    ttft_ms = None if first_s is None else (first_s - started) * 1000.0
    return Generation(text="".join(tokens), tokens=tuple(tokens), token_logprobs=tuple(logprobs),
                      finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                      completion_tokens=len(tokens), ttft_ms=ttft_ms)


def record_run(generate: Generate, requests: Sequence[CompletionInput], *,
               progress: Progress | None = None, warm: bool = True) -> list[Record]:
    """Answer every request in order, timing each; ``warm``: one throw-away answer first (the
    shared prompt prefix gets cached, as on a serving tier that has seen a request)."""
    if warm and requests:
        generate(requests[0])
    records = []
    for i, request in enumerate(requests):
        started = time.perf_counter()
        generation = generate(request)
        records.append(Record(generation, round((time.perf_counter() - started) * 1000.0, 2)))
        if progress is not None:
            progress(i + 1, len(requests))
    return records
