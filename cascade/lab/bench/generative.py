"""The generative section of ``cascade bench`` (``cascade bench --task extraction``).

Measured in one run, side by side:

- **runtime overhead**: the endpoint's model served by a tier process (``POST /v1/infer``
  streamed as Server-Sent Events, read by this process) against raw llama-cpp-python in this
  process (``Llama.create_completion(stream=True)``, the library's fastest path: no logprobs),
  on the same GGUF file, the same prompts (the tier's prompt of each test document), the same
  grammar checked the same way (the best token only), greedy, the same threads; and the same
  raw call with llama-cpp-python's ``grammar=`` (every token of the vocabulary checked at each
  step: what a caller of the plain library gets); each side first in turn. Per side: tokens/s
  over the whole call, time to first token (TTFT) as the caller sees it;
- **the live chain** (four tier processes and the cloud's llama_cpp.server, started as ``cascade
  up`` does) on the test documents, one at a time: accuracy of the cascade, share answered per
  tier and below the cloud, escalations per request, TTFT p50/p95 per tier (each hop's own
  ``ttft_ms``) and the prompt length it was measured at;
- **offline, on the recorded answers** of the build (``data/extraction.predictions.json``, the
  same gate code as serving): each tier alone, the policy simulated, threshold sweeps and the
  oracle, drawn as accuracy against escalations like the classification tasks.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascade.deploy.supervisor import DEFAULT_CHAIN, Chain

__all__ = ["GenerativeBenchConfig", "run_generative_bench"]


@dataclass
class GenerativeBenchConfig:
    """Knobs of one generative benchmark run."""

    task: str
    models_dir: Path = Path("models")
    out_dir: Path = Path("reports")
    policy: Path = Path("policies/default.yaml")
    base_port: int = 18101
    documents: int | None = None
    """Test documents sent through the live chain (None: the whole test split)."""
    overhead_prompts: int = 8
    """Prompts of the service-vs-raw comparison (each run on both sides)."""
    threads: int = 1
    """llama.cpp threads of both sides of the overhead comparison."""
    ttft_lengths: tuple[int, ...] = (100, 200, 400, 800)
    """Document lengths (characters, cut at a word) at which both sides' time to first token is
    measured: the few-shot prefix is cached after the first call, so the document is what a
    request's first token waits for."""
    ttft_repeats: int = 3
    """Documents per length (each measured on both sides, one token each)."""
    deadline_ms: int = 600_000
    """Every bench request's deadline: the measure is the models, not the policy's deadline."""
    configs: tuple[str, ...] = DEFAULT_CHAIN
    log: Callable[[str], None] = print


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def _test_documents(cfg: GenerativeBenchConfig) -> tuple[list[str], list[str]]:
    """The whole test split (texts, labels)."""
    from cascade.models.manifest import load_split

    texts, labels = load_split(cfg.models_dir, cfg.task, "test")
    return [str(t) for t in texts], list(labels)


def _stream_events(client: Any, url: str,
                   body: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    """(event name, data, arrival time) of one streamed request."""
    from cascade.contract.streaming import SseParser

    parser = SseParser()
    with client.stream("POST", f"{url}/v1/infer", json={**body, "stream": True}) as response:
        response.raise_for_status()
        for chunk in response.iter_text():
            now = time.perf_counter()
            for event, data in parser.feed(chunk):
                yield event, data, now


def _measure_service(client: Any, url: str, body: dict[str, Any]) -> dict[str, float]:
    """Tokens, seconds and TTFT as the client sees them; ``path_ms``: the client's TTFT less
    the tier's own (its runner's, in the answer's hop), what HTTP, the node and the SSE
    delivery add to the first token."""
    started = time.perf_counter()
    first, tokens, ended, tier_ttft = None, 0, started, None
    for event, data, at in _stream_events(client, url, body):
        if event == "token":
            first = first or at
            tokens += 1
        elif event == "answer":
            ended = at
            hops = json.loads(data).get("hops") or [{}]
            tier_ttft = hops[0].get("ttft_ms")
    ttft_ms = ((first or ended) - started) * 1000.0
    out = {"tokens": tokens, "seconds": ended - started, "ttft_ms": ttft_ms}
    if tier_ttft is not None and first is not None:
        out["path_ms"] = ttft_ms - float(tier_ttft)
    return out


def _measure_raw(llama: Any, grammar: Any, prompt: str, stop: list[str],
                 max_tokens: int, *, chain: bool = False) -> dict[str, float]:
    """One raw completion: the grammar checked as the service checks it (the best token
    only), or with ``chain`` as llama-cpp-python's ``grammar=`` does (the whole vocabulary)."""
    from contextlib import nullcontext

    from cascade.runners.gguf_grammar import grammar_sampling

    with (nullcontext({"grammar": grammar}) if chain else grammar_sampling(
            grammar, 0.0, llama._model.vocab, llama.n_vocab())) as sampling:
        started = time.perf_counter()
        first, tokens = None, 0
        for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stop=stop, **sampling):
            if chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                tokens += 1
    ended = time.perf_counter()
    return {"tokens": tokens, "seconds": ended - started,
            "ttft_ms": ((first or ended) - started) * 1000.0}


def _side(rows: list[dict[str, float]]) -> dict[str, Any]:
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    ttft = [r["ttft_ms"] for r in rows]
    out = {"requests": len(rows), "tokens": int(tokens),
           "tokens_per_s": tokens / seconds if seconds else None,
           "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p95": _pct(ttft, 95)}
    path = [r["path_ms"] for r in rows if "path_ms" in r]
    if path:
        out["path_ms_p50"] = _pct(path, 50)
    return out


def overhead_phase(cfg: GenerativeBenchConfig, state: Path, texts: list[str]) -> dict[str, Any]:
    """The endpoint's model through a tier process vs raw llama-cpp-python, interleaved."""
    import httpx
    import yaml
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import LlamaGrammar

    from cascade.models.manifest import load_manifest
    from cascade.models.prompting import tier_decoder

    manifest = load_manifest(cfg.models_dir)
    tier = DEFAULT_CHAIN_TIERS[0]
    entry = manifest.tier(cfg.task, tier)
    n_ctx = int(entry.options.get("n_ctx", 2048))
    decode = tier_decoder(manifest, cfg.task, tier)
    prompts = texts[:cfg.overhead_prompts]
    policy = state / "overhead-policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "name": "bench-overhead", "tasks": {
        cfg.task: {"deadline_ms": cfg.deadline_ms, "tiers": {
            tier: {"signal": "mean_logprob", "threshold": 0.0}}}}}))
    config = state / "overhead-endpoint.yaml"
    config.write_text(yaml.safe_dump({
        "tier": tier, "tasks": {cfg.task: tier}, "models_dir": str(cfg.models_dir.resolve()),
        "policy": str(policy.resolve()), "outbox_url": f"sqlite:///{state / 'overhead.db'}",
        "model_options": {cfg.task: {"n_threads": cfg.threads, "workers": 1}}}))
    first = decode({"text": prompts[0]})
    # The tier's gguf runner reads prompts with n_threads too (llama-cpp-python's default
    # n_threads_batch is every core: not the same work).
    # Each raw side has its own context (the service has its own in the tier): a context that
    # has just answered a prompt holds it in its KV cache, and the next call on that prompt
    # would read only its last token.
    contexts = {side: Llama(model_path=str(manifest.model_path(cfg.task, tier)), n_ctx=n_ctx,
                            n_threads=cfg.threads, n_threads_batch=cfg.threads, verbose=False)
                for side in ("raw", "chain")}
    grammar = LlamaGrammar.from_json_schema(json.dumps(first.json_schema), verbose=False)
    sides = ("service", "raw", "chain")
    rows: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with Chain([config], base_port=cfg.base_port + 40, log_dir=state / "logs",
               env={"CASCADE_UPSTREAM_URL": ""}, ready_timeout_s=600) as one, \
            httpx.Client(timeout=cfg.deadline_ms / 1000.0) as client:
        url = one.entry_url
        for i, text in enumerate(prompts):
            item = decode({"text": text})
            body = {"task": cfg.task, "input": {"text": text}, "max_tokens": item.max_tokens,
                    "deadline_ms": cfg.deadline_ms}
            for side in sides[i % 3:] + sides[:i % 3]:  # each side first in turn
                rows[side].append(
                    _measure_service(client, url, body) if side == "service" else
                    _measure_raw(contexts[side], grammar, item.prompt, list(item.stop),
                                 item.max_tokens, chain=side == "chain"))
            service, raw, chain = (rows[side][-1] for side in sides)
            cfg.log(f"  overhead {i + 1}/{len(prompts)}: service {service['tokens']} tokens, "
                    f"TTFT {service['ttft_ms']:.0f} ms; raw {raw['tokens']} tokens, TTFT "
                    f"{raw['ttft_ms']:.0f} ms; raw with grammar= "
                    f"{chain['tokens'] / chain['seconds']:.1f} tokens/s")
        by_length = [_ttft_at_length(cfg, client, url, contexts["raw"], grammar, decode,
                                     prompts, chars) for chars in cfg.ttft_lengths]
    for context in contexts.values():
        context.close()
    out: dict[str, Any] = {"model": manifest.model_name(cfg.task, tier), "threads": cfg.threads,
           "prompts": len(prompts), "service": _side(rows["service"]), "raw": _side(rows["raw"]),
           "raw_grammar_chain": _side(rows["chain"]),
           "raw_means": "llama-cpp-python create_completion(stream=True), the grammar checked "
                        "as the service does (the best token only), no logprobs (the service "
                        "computes each token's logprob too); raw_grammar_chain: the same call "
                        "with grammar=, llama.cpp checking the whole vocabulary per token"}
    out["ttft_by_length"] = by_length
    s, r = out["service"], out["raw"]
    if s["tokens_per_s"] and r["tokens_per_s"]:
        out["tokens_per_s_ratio"] = s["tokens_per_s"] / r["tokens_per_s"]
    if s["tokens_per_s"] and out["raw_grammar_chain"]["tokens_per_s"]:
        out["tokens_per_s_ratio_vs_grammar_chain"] = (
            s["tokens_per_s"] / out["raw_grammar_chain"]["tokens_per_s"])
    if s["ttft_ms_p50"] is not None and r["ttft_ms_p50"] is not None:
        out["ttft_ms_p50_difference"] = s["ttft_ms_p50"] - r["ttft_ms_p50"]
    return out


def _cut(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters, at a word."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    return head[:head.rfind(" ")] if " " in head else head


def _ttft_at_length(cfg: GenerativeBenchConfig, client: Any, url: str, llama: Any, grammar: Any,
                    decode: Callable[..., Any], texts: list[str], chars: int) -> dict[str, Any]:
    """Both sides' time to first token (one token asked for) on documents cut to ``chars``,
    alternating which goes first; the documents' own token counts."""
    service: list[float] = []
    raw: list[float] = []
    tokens: list[float] = []
    # Distinct documents in turn: a document measured right after itself would find its
    # shorter cut still in the KV cache.
    for i, text in enumerate(texts[:max(2, cfg.ttft_repeats)]):
        cut = _cut(text, chars)
        item = decode({"text": cut})
        tokens.append(float(len(llama.tokenize(cut.encode("utf-8"), add_bos=False))))
        body = {"task": cfg.task, "input": {"text": cut}, "max_tokens": 1,
                "deadline_ms": cfg.deadline_ms}
        for side in ("service", "raw") if i % 2 == 0 else ("raw", "service"):
            if side == "service":
                service.append(_measure_service(client, url, body)["ttft_ms"])
            else:
                raw.append(_measure_raw(llama, grammar, item.prompt, list(item.stop), 1)["ttft_ms"])
    row = {"chars": chars, "document_tokens_p50": _pct(tokens, 50), "requests": len(service),
           "service_ttft_ms_p50": _pct(service, 50), "raw_ttft_ms_p50": _pct(raw, 50)}
    cfg.log(f"  TTFT at {chars} characters (~{row['document_tokens_p50']:.0f} document tokens): "
            f"service {row['service_ttft_ms_p50']:.0f} ms, raw {row['raw_ttft_ms_p50']:.0f} ms")
    return row


DEFAULT_CHAIN_TIERS = ("endpoint", "edge-node", "edge-server", "cloud")


def chain_phase(cfg: GenerativeBenchConfig, state: Path, texts: list[str],
                labels: list[str]) -> dict[str, Any]:
    """The test documents through the live chain, one at a time."""
    import httpx

    from cascade.models.extraction.fields import is_correct

    env = {"CASCADE_MODELS_DIR": str(cfg.models_dir.resolve()),
           "CASCADE_POLICY": str(cfg.policy.resolve()),
           "CASCADE_TASKS": json.dumps([cfg.task]),
           "CASCADE_DECISION_LOG_PATH": str((state / "decisions-{tier}.db").resolve())}
    answers = []
    with Chain(list(cfg.configs), base_port=cfg.base_port, env=env, log_dir=state / "logs",
               state_dir=state, ready_timeout_s=600) as chain, \
            httpx.Client(timeout=cfg.deadline_ms / 1000.0) as client:
        tiers = [t.tier for t in chain.tiers]
        for i, text in enumerate(texts):
            started = time.perf_counter()
            r = client.post(f"{chain.entry_url}/v1/infer", json={
                "task": cfg.task, "input": {"text": text}, "deadline_ms": cfg.deadline_ms})
            answer = {**r.json(), "_status_code": r.status_code,
                      "_client_ms": (time.perf_counter() - started) * 1000.0}
            answers.append(answer)
            cfg.log(f"  chain {i + 1}/{len(texts)}: answered by {answer.get('answered_by')} "
                    f"after {len(answer.get('hops', []))} hop(s), "
                    f"{answer['_client_ms'] / 1000:.1f} s")
    return summarise_chain(tiers, answers, labels, is_correct)


def summarise_chain(tiers: list[str], answers: list[dict[str, Any]], labels: list[str],
                    is_correct: Callable[[Any, Any], bool]) -> dict[str, Any]:
    """Accuracy, routing and per-tier TTFT of the live answers (plain data in, plain data out)."""
    n = max(1, len(answers))
    correct = [a.get("_status_code") == 200 and is_correct(a.get("fields"), json.loads(y))
               for a, y in zip(answers, labels)]
    answered = {t: sum(a.get("answered_by") == t for a in answers) / n for t in tiers}
    ttft: dict[str, list[float]] = {t: [] for t in tiers}
    prompt_tokens: list[int] = []
    for a in answers:
        for hop in a.get("hops", []):
            if hop.get("ttft_ms") is not None and hop["tier"] in ttft:
                ttft[hop["tier"]].append(float(hop["ttft_ms"]))
        hops = a.get("hops", [])
        if hops and a.get("usage"):
            prompt_tokens.append(int(a["usage"]["input_tokens"]) // len(hops))
    return {
        "documents": len(answers),
        "errors": sum(a.get("_status_code") != 200 for a in answers),
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "answered_share": answered,
        "answered_below_top": float(sum(answered[t] for t in tiers[:-1])),
        "escalations_per_request": float(np.mean([max(0, len(a.get("hops", [])) - 1)
                                                  for a in answers])) if answers else 0.0,
        "statuses": {s: sum(a.get("status") == s for a in answers)
                     for s in ("final", "provisional", "unknown")},
        "ttft_ms": {t: {"n": len(v), "p50": _pct(v, 50), "p95": _pct(v, 95)}
                    for t, v in ttft.items()},
        "prompt_tokens_per_hop_mean": (statistics.fmean(prompt_tokens) if prompt_tokens
                                       else None),
        "client_ms_p50": _pct([a["_client_ms"] for a in answers], 50),
    }


def offline_phase(cfg: GenerativeBenchConfig, live: dict[str, Any] | None) -> dict[str, Any]:
    """Each tier alone and the policy simulated on the recorded test answers; the figure."""
    from cascade.lab.bench.plots import analyse_task, plot_tradeoff
    from cascade.policy import load_policy

    analysis = analyse_task(cfg.models_dir, load_policy(cfg.policy), cfg.task)
    out: dict[str, Any] = {**analysis.summary}
    from cascade.lab.evaluation import predict_split

    _, preds = predict_split(cfg.models_dir, cfg.task, analysis.tiers, "test")
    out["tier_alone_accuracy"] = {t: float(preds[t].accuracy) for t in analysis.tiers}
    if live is not None:  # each tier alone on exactly the documents the live chain answered
        n = int(live["documents"])
        out["tier_alone_accuracy_live_documents"] = {
            t: float(np.mean(preds[t].correct[:n])) for t in analysis.tiers}
    try:
        figure = cfg.out_dir / f"tradeoff-{cfg.task}.png"
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        # the live point belongs on the curve only when it answered the same documents
        plot_tradeoff(analysis, live if live and live["documents"] == analysis.summary[
            "samples"] else None, figure)
        out["figure"] = figure.name
    except ImportError:
        out["figure_missing"] = "matplotlib is not installed: pip install -e '.[bench]'"
    return out


def run_generative_bench(cfg: GenerativeBenchConfig) -> dict[str, Any]:
    """Every phase; the caller writes the reports."""
    import os
    import sys

    started = time.time()
    state = cfg.out_dir / f"bench-state-{cfg.task}"
    state.mkdir(parents=True, exist_ok=True)
    for old in state.glob("*.db*"):
        old.unlink()
    all_texts, all_labels = _test_documents(cfg)
    n = len(all_labels) if cfg.documents is None else min(cfg.documents, len(all_labels))
    texts, labels = all_texts[:n], all_labels[:n]
    cfg.log(f"{cfg.task}: overhead phase (service vs raw llama-cpp-python, "
            f"{min(cfg.overhead_prompts, len(all_texts))} prompts)")
    overhead = overhead_phase(cfg, state, all_texts)  # not bounded by --documents
    cfg.log(f"{cfg.task}: chain phase ({len(texts)} test documents through the live chain)")
    chain = chain_phase(cfg, state, texts, labels)
    live = {"accuracy": chain["accuracy"], "documents": chain["documents"],
            "escalations_per_request": chain["escalations_per_request"]}
    cfg.log(f"{cfg.task}: offline phase (recorded answers, policy simulated, figure)")
    offline = offline_phase(cfg, live)
    return {
        "task": cfg.task,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_1m": os.getloadavg()[0]},
        "config": {"policy": str(cfg.policy), "documents": len(texts),
                   "overhead_prompts": overhead["prompts"], "threads": cfg.threads,
                   "deadline_ms": cfg.deadline_ms},
        "overhead": overhead,
        "chain": chain,
        "offline": offline,
    }

