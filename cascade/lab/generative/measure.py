"""Run a GGUF model over a split's documents and record every answer: the measurements behind
a generative ladder (accuracy, latency) and its recorded predictions.

Generation uses llama-cpp-python directly: greedy, constrained by the schema's grammar, each
token's natural-log probability under the model's raw next-token distribution (before the
grammar), the same quantity a serving runtime reports as ``logprobs``. It is read by a logits
processor (one vectorised log-sum-exp per token) rather than through ``logits_all`` and
``create_completion(logprobs=1)``, which also computes every prompt position's logits and sorts
the whole vocabulary in Python after each token: 10-100 times slower on these models, the same
numbers. The answers are those of the ``gguf`` runtime a tier serves with: same text, tokens and
log-probabilities to 1e-5 (``tests/integration/test_generative_gguf.py``). One context serves a
whole run, so the prompt's fixed prefix (instructions and worked
examples) is evaluated once and reused, as on a serving tier that keeps its context warm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cascade.contract.outputs import CompletionInput, Generation
from cascade.errors import ModelError
from cascade.lab.generative.records import Record
from cascade.runners.gguf_grammar import grammar_sampling

__all__ = ["Generate", "gguf_generator", "record_run"]

Generate = Callable[[CompletionInput], Generation]
Progress = Callable[[int, int], None]


@contextmanager
def gguf_generator(path: Path, *, n_ctx: int = 2048, n_threads: int = 1) -> Iterator[Generate]:
    """A function generating one answer at a time with the GGUF model at ``path``.

    One thread by default: on a loaded two-core machine llama.cpp's threads wait on each other
    at every layer, and one thread is faster than two.
    """
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_grammar import LlamaGrammar
    except ImportError:
        raise ModelError("measuring a generative model needs llama-cpp-python: "
                         "pip install -e '.[llm]'", field="runtime") from None
    import json

    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                  n_threads_batch=n_threads, verbose=False)
    grammars: dict[str, Any] = {}

    def generate(request: CompletionInput) -> Generation:
        grammar = None
        if request.json_schema is not None:
            key = json.dumps(request.json_schema)
            if key not in grammars:
                grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
            grammar = grammars[key]
        return _complete(llama, request, grammar)

    try:
        yield generate
    finally:
        llama.close()


class _LogprobReader:
    """A logits processor that keeps each step's raw logits and their log-sum-exp."""

    def __init__(self) -> None:
        self.logits: np.ndarray | None = None
        self.log_total = 0.0
        self.first_s: float | None = None

    def __call__(self, _input_ids: Any, scores: np.ndarray) -> np.ndarray:
        self.first_s = self.first_s or time.perf_counter()
        self.logits = np.array(scores, dtype=np.float64)
        top = float(self.logits.max())
        self.log_total = top + float(np.log(np.exp(self.logits - top).sum()))
        return scores

    def logprob(self, token: int) -> float:
        assert self.logits is not None
        return float(self.logits[token] - self.log_total)


def _complete(llama: Any, request: CompletionInput, grammar: Any) -> Generation:
    """One greedy completion with token log-probabilities (EOS ends it and is not kept)."""
    from llama_cpp import LogitsProcessorList, llama_cpp

    started = time.perf_counter()
    prompt = llama.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True)
    reader = _LogprobReader()
    ids: list[int] = []
    texts: list[str] = []
    logprobs: list[float] = []
    finish_reason = "length"
    with grammar_sampling(grammar, request.temperature, llama._model.vocab,
                          llama.n_vocab()) as sampling:
        processors = LogitsProcessorList([reader, *sampling.pop("logits_processor", [])])
        with closing(llama.generate(prompt, temp=request.temperature, logits_processor=processors,
                                    reset=True, **sampling)) as generated:
            for token in generated:
                if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                    finish_reason = "stop"
                    break
                texts.append(llama.detokenize([token], prev_tokens=prompt + ids)
                             .decode("utf-8", errors="ignore"))
                ids.append(token)
                logprobs.append(reader.logprob(token))
                text = llama.detokenize(ids).decode("utf-8", errors="ignore")
                if any(stop in text for stop in request.stop):
                    finish_reason = "stop"
                    break
                if len(ids) >= request.max_tokens:
                    break
    text = llama.detokenize(ids).decode("utf-8", errors="ignore")
    for stop in request.stop:
        text = text.split(stop)[0] if stop in text else text
    ttft_ms = None if reader.first_s is None else (reader.first_s - started) * 1000.0
    return Generation(text=text, tokens=tuple(texts), token_logprobs=tuple(logprobs),
                      finish_reason=finish_reason, prompt_tokens=len(prompt),
                      completion_tokens=len(ids), ttft_ms=ttft_ms)


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
