"""A models directory holding the generative ``extraction`` task, from real recorded answers.

``tests/data/extraction-recorded.json`` keeps what the GGUF ladder answered on the first
documents of each held-out split (made by :func:`make_fixture` from a real
``cascade models build --generative``); :func:`generative_models_dir` writes a models directory
around them (manifest entry, split file, predictions file) so calibration, replay and the CLI
run on real model outputs in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "data" / "extraction-recorded.json"


def make_fixture(models_dir: Path, size: int, out: Path = FIXTURE) -> None:
    """Cut the first ``size`` documents of each split out of a real build's recordings."""
    from cascade.models.manifest import load_manifest

    manifest = load_manifest(models_dir)
    entry = manifest.task("extraction")
    runs = json.loads((models_dir / "data/extraction.predictions.json").read_text())["runs"]
    tiers: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for name, tier in entry.tiers.items():
        key = f"{tier.sha256[:16]}:{tier.prompt}"  # type: ignore[union-attr]
        tiers[name] = tier.model_dump(mode="json")
        kept[key] = {**runs[key], "split_digest": {},
                     "splits": {s: [_rounded(r) for r in runs[key]["splits"][s][:size]]
                                for s in ("calibration", "test")}}
    out.write_text(json.dumps({"size": size, "tiers": tiers, "runs": kept}, ensure_ascii=False))


def _rounded(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its log-probabilities to 6 decimals (a third of the file's size)."""
    return {**record, "token_logprobs": [round(x, 6) for x in record["token_logprobs"]]}


def generative_models_dir(root: Path) -> Path:
    """A models directory with only the extraction task, its splits cut to the fixture's size."""
    from cascade.lab.generative.build import SPLIT_FILE
    from cascade.lab.generative.records import split_digest
    from cascade.models.extraction.documents import split_documents
    from cascade.models.extraction.fields import FIELDS
    from cascade.models.manifest import (
        SCHEMA_VERSION,
        GenerativeTierEntry,
        Manifest,
        SplitInfo,
        TaskEntry,
        sha256_file,
        write_manifest,
    )

    fixture = json.loads(FIXTURE.read_text())
    size = fixture["size"]
    payload: dict[str, Any] = {"fields": list(FIELDS)}
    digests = {}
    for split in ("calibration", "test"):
        docs = split_documents(split, size=size)  # the first documents of the real split
        payload[split] = {"texts": [d.text for d in docs], "labels": [d.label for d in docs]}
        digests[split] = split_digest(payload[split]["texts"], payload[split]["labels"])
    split_path = root / SPLIT_FILE
    split_path.parent.mkdir(parents=True, exist_ok=True)
    split_path.write_text(json.dumps(payload), encoding="utf-8")
    digest = sha256_file(split_path)
    runs = fixture["runs"]
    for run in runs.values():
        run["split_digest"] = digests
    (root / "data/extraction.predictions.json").write_text(
        json.dumps({"task": "extraction", "runs": runs}), encoding="utf-8")
    entry = TaskEntry(
        output="generation", fields=FIELDS, input_kind="text",
        splits=SplitInfo(seed=0, train=None, calibration=size, test=size, file=SPLIT_FILE,
                         sha256=digest, source="tests/data/extraction-recorded.json"),
        tiers={name: GenerativeTierEntry.model_validate(t) for name, t in fixture["tiers"].items()})
    manifest = Manifest(schema_version=SCHEMA_VERSION, build_key="test",
                        created_at="2026-01-01T00:00:00Z", build_seconds=0.0, packages={},
                        tasks={"extraction": entry})
    write_manifest(manifest, root)
    return root
