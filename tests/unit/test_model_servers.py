"""Node config knobs of the generative chain, without starting anything: ``optional_tasks``
(served once built and in the policy, else skipped with the reason), ``model_options`` (over
the manifest's runtime options, from the file or ``CASCADE_MODEL_OPTIONS__...``) and
``model_servers`` (what ``cascade up`` would start, and the configs it refuses)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cascade.deploy.model_server import plan_model_servers
from cascade.errors import ConfigError
from cascade.models.manifest import load_manifest, write_manifest
from cascade.tier.optional_tasks import optional_task_gaps
from cascade.tier.settings import load_node_settings
from tests.generative_fixture import generative_models_dir

TASK = "extraction"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's extraction manifest, with a stand-in file for the cloud's model (its
    checksum recorded in the manifest)."""
    from cascade.models.manifest import sha256_file

    root = generative_models_dir(tmp_path_factory.mktemp("gen") / "models")
    stand_in = root / "extraction" / "cloud.gguf"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_bytes(b"GGUF stand-in: never loaded here")
    manifest = load_manifest(root)
    entry = manifest.tasks[TASK]
    cloud = entry.tiers["cloud"].model_copy(update={
        "file": "extraction/cloud.gguf", "sha256": sha256_file(stand_in)})
    write_manifest(manifest.model_copy(update={"tasks": {TASK: entry.model_copy(
        update={"tiers": {**entry.tiers, "cloud": cloud}})}}), root)
    return root


def node_config(tmp: Path, models: Path, *, tiers_in_policy: tuple[str, ...] = ("cloud",),
                **keys: object) -> Path:
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "name": "t", "tasks": {TASK: {"tiers": {
        t: {"signal": "field_min_logprob", "threshold": 0.5} for t in tiers_in_policy}}}}))
    path = tmp / "cloud.yaml"
    path.write_text(yaml.safe_dump({"tier": "cloud", "models_dir": str(models),
                                    "policy": str(policy), **keys}))
    return path


def test_an_optional_task_is_served_once_built_and_in_the_policy(models: Path,
                                                                 tmp_path: Path) -> None:
    settings = load_node_settings(node_config(tmp_path, models, optional_tasks={TASK: "cloud"}))
    assert settings.tasks == {TASK: "cloud"} and optional_task_gaps(settings) == {}

    no_tier = load_node_settings(node_config(tmp_path, models, tiers_in_policy=("endpoint",),
                                             tasks={"vision": "cloud"},
                                             optional_tasks={TASK: "cloud"}))
    assert no_tier.tasks == {"vision": "cloud"}
    assert "has no tasks.extraction.tiers.cloud" in optional_task_gaps(no_tier)[TASK]

    elsewhere = load_node_settings(node_config(tmp_path, tmp_path / "nothing-built",
                                               tasks={"vision": "cloud"},
                                               optional_tasks={TASK: "cloud"}))
    assert elsewhere.tasks == {"vision": "cloud"}
    assert optional_task_gaps(elsewhere)[TASK].startswith("no models:")


def test_a_tier_with_only_unservable_optional_tasks_is_refused(models: Path,
                                                               tmp_path: Path) -> None:
    config = node_config(tmp_path, models, tiers_in_policy=("endpoint",),
                         optional_tasks={TASK: "cloud"})
    with pytest.raises(ConfigError, match="no task it can serve.*tiers.cloud"):
        load_node_settings(config)
    with pytest.raises(ConfigError, match="at least one task must be served"):
        load_node_settings(node_config(tmp_path, models))


def test_model_options_override_the_manifest_and_plan_the_server(
        models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = node_config(tmp_path, models, tasks={TASK: "cloud"},
                         model_servers={TASK: {"n_threads": 2}})
    (plan,) = plan_model_servers(load_node_settings(config))
    assert (plan.host, plan.port, plan.alias) == ("127.0.0.1", 8110, "gemma-3-270m")
    assert plan.model_file == models / "extraction" / "cloud.gguf"
    assert plan.command()[1:5] == ["-m", "llama_cpp.server", "--model", str(plan.model_file)]
    assert plan.command()[-6:] == ["--n_ctx", "2048", "--n_threads", "2", "--model_alias",
                                   "gemma-3-270m"]

    monkeypatch.setenv("CASCADE_MODEL_OPTIONS__EXTRACTION__BASE_URL", "http://localhost:9123/v1")
    (moved,) = plan_model_servers(load_node_settings(config))
    assert (moved.host, moved.port, moved.url) == ("localhost", 9123, "http://localhost:9123")

    monkeypatch.setenv("CASCADE_MODEL_OPTIONS__EXTRACTION__BASE_URL", "https://llm.example.com")
    with pytest.raises(ConfigError, match="model_servers.extraction of tier cloud: base_url "
                                          "'https://llm.example.com' is not a port on this"):
        plan_model_servers(load_node_settings(config))


def test_a_model_server_is_for_runtime_openai_only(models: Path, tmp_path: Path) -> None:
    config = node_config(tmp_path, models, tasks={TASK: "endpoint"},
                         model_servers={TASK: {}})
    with pytest.raises(ConfigError, match="runs on runtime 'gguf'"):
        plan_model_servers(load_node_settings(config))
    # A task the tier does not serve (an optional one not built) needs no server.
    skipped = node_config(tmp_path, models, tasks={"vision": "cloud"},
                          model_servers={TASK: {}})
    assert plan_model_servers(load_node_settings(skipped)) == []


def test_starting_model_servers_fails_clearly_and_leaves_none_running(
        models: Path, tmp_path: Path) -> None:
    """What ``cascade up --ray`` runs before deploying its Serve tiers: every listed server
    started in order; one that exits before ready (here the stand-in file, which llama.cpp
    cannot load: a real ``llama_cpp.server`` process) raises naming its tier, task and log,
    and no server is left behind."""
    from cascade.deploy.model_server import start_model_servers

    config = node_config(tmp_path, models, tasks={TASK: "cloud"},
                         model_servers={TASK: {"ready_timeout_s": 60}})
    settings = load_node_settings(config)
    logs = tmp_path / "logs"
    with pytest.raises(RuntimeError, match=r"model server for cloud/extraction exited with "
                                           r"code \d+ before ready: log .*cloud-extraction"):
        start_model_servers(plan_model_servers(settings), log_dir=logs)
    assert (logs / "cloud-extraction-model-server.log").stat().st_size > 0
    assert start_model_servers([], log_dir=logs) == []
