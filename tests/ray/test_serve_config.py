"""``cloud/serve_config.yaml`` is a valid Serve config whose applications build: its import
paths resolve, its node configs and overrides validate, each ingress carries a user_config
policy a replica would accept, and the edge-server escalates to where the cloud is routed.
No Ray cluster is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.serve")

from ray._common.utils import import_attr
from ray.serve.schema import ServeDeploySchema

from cascade.deploy.ray_serve import validate_user_config
from cascade.errors import PolicyError
from cascade.tier.settings import load_node_settings

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cloud/serve_config.yaml"


def test_serve_config_builds_and_its_policies_validate(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths resolve against the project root, as documented
    data = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(data)
    assert {app.name for app in schema.applications} == {"edge-server", "cloud"}
    proxy = f"http://{data['http_options']['host']}:{data['http_options']['port']}"
    prefixes = {app.name: app.route_prefix for app in schema.applications}
    for app in schema.applications:
        application = import_attr(app.import_path)(app.args)
        ingress = application._bound_deployment
        assert ingress.name == f"{app.name}-ingress"
        validate_user_config(ingress.user_config)  # raises, naming source and key, if not
        assert ingress.user_config["source"] == app.args["policy_user_config"]
        settings = load_node_settings(app.args["config"], **app.args.get("overrides", {}))
        assert settings.tier == app.name
        if settings.upstream_url is not None:  # to the cloud app: by handle, else the proxy
            assert settings.upstream_url == proxy + prefixes["cloud"]
            assert settings.ray_serve.upstream_app == "cloud"


def test_an_invalid_user_config_is_named():
    with pytest.raises(PolicyError) as bad:
        validate_user_config({"policy": {"tasks": {"vision": {"tiers": {"cloud": {
            "threshold": 3}}}}}, "source": "x.yaml"})
    assert "x.yaml (user_config.policy)" in bad.value.message
    assert "tasks.vision.tiers.cloud.threshold" in bad.value.message
    with pytest.raises(PolicyError, match="unknown key"):
        validate_user_config({"policy": {}, "threshold": 1})


def test_tiers_sharing_one_proxy_escalate_to_the_next_prefix():
    from cascade.deploy.ray_serve import chain_on_one_proxy

    chain = [load_node_settings(ROOT / config) for config in
             ("edge_nodes/edge-node.yaml", "edge_nodes/edge-server.yaml", "cloud/cloud.yaml")]
    wired = chain_on_one_proxy(chain, host="127.0.0.1", port=9300)
    assert [t.ray_serve.route_prefix for t in wired] == ["/", "/edge-server", "/cloud"]
    assert [t.upstream_url for t in wired] == [
        "http://127.0.0.1:9300/edge-server", "http://127.0.0.1:9300/cloud", None]
    assert [t.ray_serve.upstream_app for t in wired] == ["edge-server", "cloud", None]
    over_http = chain_on_one_proxy(chain, host="127.0.0.1", port=9300, via_handles=False)
    assert [t.ray_serve.upstream_app for t in over_http] == [None, None, None]
    assert {(t.host, t.port) for t in wired} == {("127.0.0.1", 9300)}


def test_without_model_deployments_the_app_is_the_ingress_alone():
    from cascade.deploy.ray_serve import build_tier_app

    settings = load_node_settings(ROOT / "cloud/cloud.yaml")
    split = build_tier_app(settings)._bound_deployment
    assert set(split.init_args[1]) == {"vision", "documents"}  # a model deployment per task
    inline = load_node_settings(ROOT / "cloud/cloud.yaml", ray_serve={"model_deployments": False})
    assert build_tier_app(inline)._bound_deployment.init_args[1] == {}


def test_the_rayservice_runs_the_same_applications(monkeypatch):
    import ray

    monkeypatch.chdir(ROOT)
    resource = yaml.safe_load((ROOT / "infra/k8s/rayservice.yaml").read_text())
    assert (resource["apiVersion"], resource["kind"]) == ("ray.io/v1", "RayService")
    assert resource["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    serve_config = yaml.safe_load(resource["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    prefixes = {app.name: app.route_prefix for app in schema.applications}
    assert prefixes == {"edge-server": "/", "cloud": "/cloud"}
    for app in schema.applications:
        # /app in the image is the repository root here
        args = yaml.safe_load(yaml.safe_dump(app.args).replace("/app/", f"{ROOT}/"))
        ingress = import_attr(app.import_path)(args)._bound_deployment
        validate_user_config(ingress.user_config)
        settings = load_node_settings(args["config"], **args["overrides"])
        assert settings.tier == app.name
        assert Path(settings.models_dir) == ROOT / "models"
        if settings.upstream_url is not None:  # KubeRay's Serve port, the cloud's prefix
            assert settings.upstream_url == "http://127.0.0.1:8000" + prefixes["cloud"]
            assert settings.ray_serve.upstream_app == "cloud"


def test_generative_tasks_stay_in_the_ingress_and_listed_tasks_are_checked(models_dir, tmp_path):
    """``model_deployments: true`` deploys every classification task apart and leaves a
    generative one (no batch API) in the ingress; a list names tasks, and a task the tier does
    not serve, or a generative one, is a configuration error naming the key."""
    import shutil

    from cascade.deploy.ray_serve import build_tier_app, deployed_tasks
    from cascade.errors import ConfigError
    from cascade.models.manifest import load_manifest, write_manifest
    from tests.generative_fixture import generative_models_dir

    both = tmp_path / "models"
    shutil.copytree(models_dir, both)
    generative = generative_models_dir(tmp_path / "generative")
    shutil.copytree(generative / "data", both / "data", dirs_exist_ok=True)
    manifest = load_manifest(both)
    write_manifest(manifest.model_copy(update={"tasks": {
        **manifest.tasks, **load_manifest(generative).tasks}}), both)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "name": "t", "tasks": {
        task: {"tiers": {"cloud": {"signal": signal, "threshold": 0.0}}}
        for task, signal in (("vision", "max_prob"), ("documents", "max_prob"),
                             ("extraction", "field_min_logprob"))}}))

    def settings(**ray_serve):
        return load_node_settings(ROOT / "cloud/cloud.yaml", models_dir=both, policy=policy,
                                  tasks={"vision": "cloud", "documents": "cloud",
                                         "extraction": "cloud"}, ray_serve=ray_serve)

    assert deployed_tasks(settings()) == ["vision", "documents"]
    app = build_tier_app(settings())._bound_deployment
    assert set(app.init_args[1]) == {"vision", "documents"}  # extraction: in the ingress
    assert deployed_tasks(settings(model_deployments=["documents"])) == ["documents"]
    assert deployed_tasks(settings(model_deployments=False)) == []
    with pytest.raises(ConfigError, match="ray_serve.model_deployments lists 'extraction', a "
                                          "generative task"):
        deployed_tasks(settings(model_deployments=["vision", "extraction"]))
    with pytest.raises(ConfigError, match="lists 'audio', which this tier does not serve"):
        deployed_tasks(settings(model_deployments=["audio"]))
