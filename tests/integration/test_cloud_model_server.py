"""``cascade up``'s supervisor (:class:`cascade.deploy.supervisor.Chain`) starts the cloud's
local model server, ``python -m llama_cpp.server``, from the cloud tier's ``model_servers``
before the cloud tier, and stops it with the chain: an extraction request escalated from the
endpoint (real SmolLM2 in process) is answered by the cloud through that server (runtime
``openai``). The tasks are ``optional_tasks``, as in the default chain; the cloud's
``model_options`` move the server to a free port. A model file whose checksum differs is
refused before any process starts.

The cloud serves SmolLM2 too (its manifest entry rewritten to that file): Gemma 3 behind the
server would make this minutes long on two cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from cascade.deploy.supervisor import Chain
from cascade.errors import ModelError
from cascade.models.manifest import load_manifest, sha256_file, write_manifest
from tests.conftest import free_port_block
from tests.generative_fixture import generative_models_dir
from tests.integration.test_generative_gguf import smollm2_file
from tests.integration.test_generative_tiers import DOCUMENT, TASK

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.integration, pytest.mark.llm]

ROOT = Path(__file__).resolve().parents[2]


def models_with_served_cloud(root: Path, *, copy: bool = False) -> Path:
    """The fixture's extraction models with the cloud entry on SmolLM2 behind a server."""
    source = smollm2_file()
    models = generative_models_dir(root)
    target = models / "extraction" / source.name
    target.parent.mkdir(exist_ok=True)
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(source, target)
    manifest = load_manifest(models)
    entry = manifest.tasks[TASK]
    endpoint = entry.tiers["endpoint"]
    cloud = endpoint.model_copy(update={
        "runtime": "openai", "options": {"base_url": "http://127.0.0.1:8110", "model": "smollm2"}})
    tiers = {**entry.tiers, "cloud": cloud}
    write_manifest(manifest.model_copy(update={"tasks": {
        TASK: entry.model_copy(update={"tiers": tiers})}}), models)
    return models


def write_chain(tmp: Path, models: Path, server_port: int) -> list[Path]:
    """endpoint (escalates every answer) -> cloud (answers all), extraction optional on both."""
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "version": 1, "name": "model-server-test",
        "tasks": {TASK: {"deadline_ms": 600_000, "tiers": {
            "endpoint": {"signal": "field_min_logprob", "threshold": 1.0},
            "cloud": {"signal": "field_min_logprob", "threshold": 0.0}}}}}))
    common = {"models_dir": str(models), "policy": str(policy)}
    configs = []
    for tier, extra in [
        ("endpoint", {}),
        ("cloud", {"model_options": {TASK: {"base_url": f"http://127.0.0.1:{server_port}"}},
                   "model_servers": {TASK: {"n_threads": 1, "ready_timeout_s": 300}}}),
    ]:
        path = tmp / f"{tier}.yaml"
        path.write_text(yaml.safe_dump({"tier": tier, "optional_tasks": {TASK: tier},
                                        **common, **extra}))
        configs.append(path)
    return configs


def chain_of(tmp: Path, configs: list[Path]) -> Chain:
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Chain(configs, base_port=free_port_block(2), env=env, log_dir=tmp / "logs",
                 state_dir=tmp, ready_timeout_s=300)


def test_the_chain_starts_the_cloud_model_server_and_escalates_through_it(tmp_path: Path) -> None:
    models = models_with_served_cloud(tmp_path / "models")
    server_port = free_port_block(1)
    chain = chain_of(tmp_path, write_chain(tmp_path, models, server_port))
    body = {"task": TASK, "input": {"text": DOCUMENT}, "max_tokens": 64}
    with chain:
        (server,) = chain.model_servers
        assert (server.plan.tier, server.plan.task, server.plan.port) == ("cloud", TASK,
                                                                          server_port)
        assert server.plan.model_file == models / "extraction" / smollm2_file().name
        endpoint, cloud = chain.tiers
        with httpx.Client(timeout=900) as client:
            assert client.get(f"http://127.0.0.1:{server_port}/v1/models").status_code == 200
            alone = client.post(f"{cloud.url}/v1/infer", json=body)
            assert alone.status_code == 200, alone.text
            prompt_tokens = alone.json()["usage"]["input_tokens"]
            answer = client.post(f"{endpoint.url}/v1/infer", json=body).json()
        assert [(h["tier"], h["decision"]) for h in answer["hops"]] == [
            ("endpoint", "escalate"), ("cloud", "answer")], answer
        assert answer["hops"][1]["model"] == "extraction/cloud:SmolLM2-135M-Instruct-Q4_1"
        assert answer["answered_by"] == "cloud" and answer["status"] == "final"
        assert answer["hops"][1]["tokens"] > 0 and set(answer["fields"]) >= {"amount", "type"}
        # Both tiers read the same prompt with the same tokenizer: the server's count (which
        # llama_cpp.server does not stream) equals the in-process one.
        assert prompt_tokens > 500 and answer["usage"]["input_tokens"] == 2 * prompt_tokens
        log = server.log_path.read_text(errors="replace")
        assert log.count("POST /v1/completions") == 2  # the cloud's two generations went there
    assert server.process is not None and server.process.poll() is not None  # stopped


def test_a_tampered_model_file_is_refused_before_anything_starts(tmp_path: Path) -> None:
    models = models_with_served_cloud(tmp_path / "models", copy=True)
    gguf = models / "extraction" / smollm2_file().name
    with gguf.open("r+b") as handle:  # one byte in the middle of the weights
        handle.seek(gguf.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert sha256_file(gguf) != load_manifest(models).tier(TASK, "cloud").sha256
    chain = chain_of(tmp_path, write_chain(tmp_path, models, free_port_block(1)))
    with pytest.raises(ModelError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf for "
                                         r"extraction/cloud failed its checksum") as refused:
        chain.start()
    assert "Refusing to load it" in refused.value.message
    assert chain.tiers == [] and chain.model_servers == []  # nothing was started
