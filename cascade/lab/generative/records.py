"""Recorded generations: each generative tier's answers on the held-out splits, kept in
``data/<task>.predictions.json`` so calibration, replay and tests re-score them in
milliseconds instead of running the models again (minutes on two cores).

A run is one model file under one prompt style (tiers sharing both share the run); it holds,
per split, one record per document in split order: the :class:`Generation` (text, token texts,
log-probabilities, finish reason, token counts, time to first token) and the measured
latency. A run is valid for a split only if it was recorded on the very same documents
(:func:`split_digest` of their texts and true answers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.contract.outputs import Generation
from cascade.errors import ModelError

__all__ = ["Record", "RecordedRun", "Recordings", "predictions_path", "run_key", "split_digest"]


@dataclass(frozen=True)
class Record:
    """One document's answer and how long it took."""

    generation: Generation
    latency_ms: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (token texts and logprobs kept exactly)."""
        g = self.generation
        return {"text": g.text, "tokens": list(g.tokens), "token_logprobs": list(g.token_logprobs),
                "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens, "ttft_ms": g.ttft_ms,
                "latency_ms": self.latency_ms}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Record:
        """Back from :meth:`to_json`."""
        generation = Generation(
            text=data["text"], tokens=tuple(data["tokens"]),
            token_logprobs=tuple(float(x) for x in data["token_logprobs"]),
            finish_reason=data["finish_reason"], prompt_tokens=int(data["prompt_tokens"]),
            completion_tokens=int(data["completion_tokens"]), ttft_ms=data.get("ttft_ms"))
        return cls(generation, float(data["latency_ms"]))


def split_digest(texts: Sequence[str], labels: Sequence[str]) -> str:
    """Identity of one split's documents and answers (another split size: another digest)."""
    import hashlib

    return hashlib.sha256(json.dumps([list(texts), list(labels)], ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def run_key(sha256: str, prompt: str) -> str:
    """The key of a run: the model file's digest (short) and the prompt style."""
    return f"{sha256[:16]}:{prompt}"


@dataclass
class RecordedRun:
    """One model file under one prompt style, on each split it was run on."""

    model: str
    sha256: str
    prompt: str
    splits: dict[str, list[Record]] = field(default_factory=dict)
    split_digest: dict[str, str] = field(default_factory=dict)

    def records(self, split: str, digest: str) -> list[Record] | None:
        """The records of ``split`` if they were made on these very documents."""
        if self.split_digest.get(split) != digest:
            return None
        return self.splits.get(split)


@dataclass
class Recordings:
    """Every run of one task (the predictions file)."""

    task: str
    runs: dict[str, RecordedRun] = field(default_factory=dict)

    def run(self, sha256: str, prompt: str, model: str) -> RecordedRun:
        """The run of a model and prompt (created empty if new)."""
        key = run_key(sha256, prompt)
        if key not in self.runs:
            self.runs[key] = RecordedRun(model, sha256, prompt)
        return self.runs[key]

    def find(self, sha256: str, prompt: str) -> RecordedRun | None:
        """The run of a model and prompt, if recorded."""
        return self.runs.get(run_key(sha256, prompt))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form."""
        return {"task": self.task, "runs": {
            key: {"model": r.model, "sha256": r.sha256, "prompt": r.prompt,
                  "split_digest": r.split_digest,
                  "splits": {s: [rec.to_json() for rec in recs] for s, recs in r.splits.items()}}
            for key, r in self.runs.items()}}

    @classmethod
    def load(cls, path: Path, task: str) -> Recordings:
        """Read a predictions file (an empty set when there is none)."""
        if not path.is_file():
            return cls(task)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            runs = {
                key: RecordedRun(r["model"], r["sha256"], r["prompt"],
                                 {s: [Record.from_json(x) for x in recs]
                                  for s, recs in r["splits"].items()},
                                 dict(r.get("split_digest", {})))
                for key, r in data["runs"].items()
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: not a predictions file of recorded generations ({exc}); "
                             "delete it and run `cascade models build --generative`") from None
        return cls(data.get("task", task), runs)

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)


def predictions_path(models_dir: Path, task: str) -> Path:
    """Where a task's recorded generations live in a models directory."""
    return Path(models_dir) / "data" / f"{task}.predictions.json"


def latency_summary(records: Sequence[Record]) -> dict[str, float | None]:
    """p50 and p95 latency, p50 time to first token and decode speed of a run's records."""
    import numpy as np

    if not records:
        return {"latency_ms_p50": 0.0, "latency_ms_p95": 0.0, "ttft_ms_p50": None,
                "tokens_per_s": None}
    lat = np.asarray([r.latency_ms for r in records])
    ttft = [r.generation.ttft_ms for r in records if r.generation.ttft_ms is not None]
    rates = [(r.generation.completion_tokens - 1) / ((r.latency_ms - r.generation.ttft_ms) / 1e3)
             for r in records if r.generation.ttft_ms is not None
             and r.latency_ms > r.generation.ttft_ms and r.generation.completion_tokens > 1]
    return {"latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
            "ttft_ms_p50": round(float(np.median(ttft)), 1) if ttft else None,
            "tokens_per_s": round(float(np.median(rates)), 1) if rates else None}
