"""Greedy JSON decoding: llama-cpp-python's ``grammar=`` against the one-token check (issue 12).

Both ways decode the extraction task's prompts (the test split's documents, each model's own
prompt style) under the task's JSON schema, greedily, with the same llama.cpp context settings:

  chain    ``Llama.generate(..., grammar=g)``: llama.cpp's sampler chain matches every token of
           the vocabulary against the grammar at every step (49k tokens for SmolLM2, 262k for
           Gemma 3), then takes the best
  checked  ``cascade.runners.gguf_grammar.GreedyGrammar`` as a logits processor: the grammar is
           asked about the best token only, the whole vocabulary masked only when it refuses it

Each side has its own llama.cpp context fed the same prompts in the same order. Per model and
document, in alternating order (machine load hits both alike): decode tokens/s
(after the first token), time to first token, whether the token ids are identical, and the
share of steps where the checked way had to mask. Prints the ratios measured side by side and
writes reports/bench_grammar.json.

Run: python benchmarks/bench_grammar.py [--documents 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade.lab.generative.build import locate_model
from cascade.lab.generative.ladder import LADDER
from cascade.models.prompting import completion_input
from cascade.runners.gguf_grammar import grammar_sampling

SPLITS = ROOT / "models" / "data" / "extraction.json"


def decode(llama: Any, prompt: str, max_tokens: int, **sampling: Any) -> dict[str, Any]:
    from llama_cpp import llama_cpp

    tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    started = time.perf_counter()
    first = None
    ids: list[int] = []
    for token in llama.generate(tokens, temp=0.0, **sampling):
        first = first or time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token) or len(ids) >= max_tokens:
            break
        ids.append(token)
    ended = time.perf_counter()
    assert first is not None
    return {"ids": ids, "ttft_ms": (first - started) * 1000.0,
            "decode_tokens_per_s": (len(ids) - 1) / (ended - first) if len(ids) > 1 else None}


def bench_model(name: str, prompt_style: str, texts: list[str], threads: int) -> dict[str, Any]:
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import LlamaGrammar

    located = locate_model(name)
    # One context per side, fed the same prompts in the same order: llama.cpp's logits depend
    # on how a prompt was split into batches (what the KV cache already held), so sides sharing
    # one context could differ by a near tie for that reason alone.
    contexts = {side: Llama(model_path=str(located.path), n_ctx=2048, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
                for side in ("chain", "checked")}
    rows: dict[str, list[dict[str, Any]]] = {"chain": [], "checked": []}
    identical = steps = masked = 0
    for i, text in enumerate(texts):
        item = completion_input(prompt_style, text)  # type: ignore[arg-type]
        grammar = LlamaGrammar.from_json_schema(json.dumps(item.json_schema), verbose=False)
        got: dict[str, list[int]] = {}
        for side in ("chain", "checked") if i % 2 == 0 else ("checked", "chain"):
            llama = contexts[side]
            if side == "chain":
                row = decode(llama, item.prompt, item.max_tokens, grammar=grammar)
            else:
                with grammar_sampling(grammar, 0.0, llama._model.vocab,
                                      llama.n_vocab()) as sampling:
                    [checker] = sampling["logits_processor"]
                    row = decode(llama, item.prompt, item.max_tokens, **sampling)
                steps, masked = steps + checker.steps, masked + checker.masked_steps
            got[side] = row.pop("ids")
            row["tokens"] = len(got[side])
            rows[side].append(row)
        identical += got["chain"] == got["checked"]
        print(f"  {name} {i + 1}/{len(texts)}: chain "
              f"{rows['chain'][-1]['decode_tokens_per_s'] or 0:.1f} tok/s, checked "
              f"{rows['checked'][-1]['decode_tokens_per_s'] or 0:.1f} tok/s, same tokens "
              f"{got['chain'] == got['checked']}", flush=True)
    for llama in contexts.values():
        llama.close()

    def side(samples: list[dict[str, Any]]) -> dict[str, Any]:
        rates = [s["decode_tokens_per_s"] for s in samples if s["decode_tokens_per_s"]]
        return {"decode_tokens_per_s_p50": statistics.median(rates),
                "ttft_ms_p50": statistics.median(s["ttft_ms"] for s in samples),
                "tokens": sum(s["tokens"] for s in samples)}

    chain, checked = side(rows["chain"]), side(rows["checked"])
    return {"model": name, "file": located.path.name, "prompt": prompt_style,
            "documents": len(texts), "chain": chain, "checked": checked,
            "decode_speedup": checked["decode_tokens_per_s_p50"] / chain["decode_tokens_per_s_p50"],
            "identical_answers": identical, "masked_step_share": masked / steps if steps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    texts = json.loads(SPLITS.read_text())["test"]["texts"][:args.documents]
    models = {(t.candidate.model, t.candidate.prompt) for t in LADDER if t.runtime == "gguf"}
    results = [bench_model(name, style, texts, args.threads) for name, style in sorted(models)]
    print(f"\n{'model':34} {'chain tok/s':>12} {'checked tok/s':>14} {'speedup':>8} "
          f"{'same answers':>13} {'masked steps':>13}")
    for r in results:
        print(f"{r['file']:34} {r['chain']['decode_tokens_per_s_p50']:12.1f} "
              f"{r['checked']['decode_tokens_per_s_p50']:14.1f} {r['decode_speedup']:7.2f}x "
              f"{r['identical_answers']:>6}/{r['documents']:<6} {r['masked_step_share']:12.1%}")
    out = ROOT / "reports" / "bench_grammar.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
