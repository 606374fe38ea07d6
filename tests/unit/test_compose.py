"""docker-compose.yml and infra/ checked statically (no Docker engine here): the files parse,
the services and ports line up, every mounted config exists, every environment variable is one
the tiers read (with a valid value), and the collector, Jaeger and Prometheus configs agree."""

from __future__ import annotations

import asyncio
import os
import re
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cascade.observability.telemetry import HONOURED_ENV, TracingConfig
from cascade.tier.settings import ENV_PREFIX, NodeSettings, load_node_settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TIERS = ("endpoint", "edge-node", "edge-server", "cloud")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(ROOT / "docker-compose.yml")


def tier_config(service: dict[str, Any]) -> Path:
    command = service["command"]
    assert command[:3] == ["cascade", "serve", "--config"], command
    return ROOT / command[3]


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).split(":")[-2:]
        out[int(container)] = int(host)
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {*TIERS, "otel-collector", "jaeger", "prometheus"}


@pytest.mark.parametrize("tier", TIERS)
def test_tier_config_exists_and_env_is_what_the_tier_reads(
    compose: dict[str, Any], tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][tier]
    config = tier_config(service)
    assert config.is_file()
    env = {k: str(v) for k, v in service["environment"].items()}
    for name in env:
        if name.startswith(ENV_PREFIX):
            field = name.removeprefix(ENV_PREFIX).lower().split("__")[0]
            assert field in NodeSettings.model_fields, f"{tier}: {name} is not a node setting"
        else:
            assert name in HONOURED_ENV, f"{tier}: {name} is not read by the tiers"
    # The values validate exactly as the tier process would validate them.
    for name in [n for n in list(os.environ) if n.startswith(("CASCADE_", "OTEL_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_node_settings(config)
    assert settings.tier == tier
    assert settings.host == "0.0.0.0"
    tracing = TracingConfig.from_env(tier, environ=env)
    assert tracing.active and tracing.exporters == ("otlp",)
    assert env["OTEL_SERVICE_NAME"] == f"cascade-{tier}"
    # Published where the config listens, and the health check probes that port.
    assert published(service) == {settings.port: settings.port}
    assert f"127.0.0.1:{settings.port}/healthz" in " ".join(service["healthcheck"]["test"])


def test_upstreams_point_at_the_next_tier_where_it_listens(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for lower, upper in pairwise(TIERS):
        url = urlsplit(services[lower]["environment"]["CASCADE_UPSTREAM_URL"])
        assert url.hostname == upper
        assert url.port == load(tier_config(services[upper]))["port"]
        assert services[lower]["depends_on"][upper]["condition"] == "service_healthy"
    assert "CASCADE_UPSTREAM_URL" not in services["cloud"]["environment"]
    # Outbox files go to the tier's own volume, one file per tier.
    urls = [services[t]["environment"]["CASCADE_OUTBOX_URL"] for t in TIERS]
    assert urls == [f"sqlite:////var/lib/cascade/{t}.db" for t in TIERS]


def test_host_ports_are_unique(compose: dict[str, Any]) -> None:
    hosts = [h for s in compose["services"].values() for h in published(s).values()]
    assert len(hosts) == len(set(hosts))


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path of bind mounts (all must exist)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("./"):
            host = ROOT / source
            assert host.is_file(), f"{source} is mounted but missing"
            out[target] = host
    return out


def collector_config(compose: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    service = compose["services"]["otel-collector"]
    config_path = service["command"][0].split("=", 1)[1]
    return service, load(mounts(service)[config_path])


def check_pipelines(config: dict[str, Any]) -> None:
    """Every component a pipeline names is defined, every extension listed exists."""
    svc = config["service"]
    for ext in svc.get("extensions", []):
        assert ext in config["extensions"], ext
    for name, pipeline in svc["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline {name}: {kind} {component} undefined"


def test_tiers_export_to_the_collectors_otlp_receiver(compose: dict[str, Any]) -> None:
    service, config = collector_config(compose)
    check_pipelines(config)
    protocols = config["receivers"]["otlp"]["protocols"]
    ports = {p: int(protocols[p]["endpoint"].rsplit(":", 1)[1]) for p in protocols}
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    for tier in TIERS:
        env = compose["services"][tier]["environment"]
        url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        protocol = "grpc" if env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc" else "http"
        assert (url.hostname, url.port) == ("otel-collector", ports[protocol])
    assert {4317, 4318} <= set(published(service))


def test_collector_sends_traces_to_jaegers_otlp_receiver(compose: dict[str, Any]) -> None:
    _, collector = collector_config(compose)
    exporters = collector["service"]["pipelines"]["traces"]["exporters"]
    (jaeger_exporter,) = [e for e in exporters if e.startswith("otlp")]
    host, port = collector["exporters"][jaeger_exporter]["endpoint"].split(":")
    jaeger = compose["services"]["jaeger"]
    assert host == "jaeger"
    config = load(mounts(jaeger)[jaeger["command"][1]])
    check_pipelines(config)
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert int(grpc.rsplit(":", 1)[1]) == int(port)
    backends = config["extensions"]["jaeger_storage"]["backends"]
    assert config["extensions"]["jaeger_query"]["storage"]["traces"] in backends
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] in backends
    ui = int(config["extensions"]["jaeger_query"]["http"]["endpoint"].rsplit(":", 1)[1])
    assert published(jaeger) == {ui: 16686}


def exposed_metric_names() -> set[str]:
    """Every metric family a tier with an upstream and an outbox exposes."""
    from prometheus_client.parser import text_string_to_metric_families

    from cascade.observability.metrics import TierMetrics
    from cascade.upstream.client import UpstreamClient

    class Queue:
        dropped = 0

        def depth(self) -> int:
            return 0

        async def queue_stats(self) -> dict[str, Any]:
            return {"oldest_live_age_s": 0, "states": {"dead": {"rows": 0}}}

        def metrics(self) -> dict[str, Any]:
            return {"enqueued": 0}

    class Drift:  # one task whose tier has a drift reference
        def detectors(self) -> dict[str, Any]:
            from cascade.gating.drift import DriftDetector, DriftReference, DriftSettings

            return {"vision": DriftDetector(DriftReference((0.5,), (10, 10)), DriftSettings())}

    from cascade.observability.disk import DiskUsage

    tier_disk = DiskUsage("endpoint")
    tier_disk.gauge("results").evicted("budget")

    class Node:
        upstream = UpstreamClient("http://up:1")
        escalations = Queue()
        drift = Drift()
        disk = tier_disk

    metrics = TierMetrics("endpoint", process_metrics=False)
    metrics.bind_node(Node())
    asyncio.run(metrics.refresh())
    families = text_string_to_metric_families(metrics.render().decode())
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def test_prometheus_scrapes_every_tier_and_the_collector(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    files = mounts(prom)
    config = load(files["/etc/prometheus/prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert rule_file in files
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = set(jobs["cascade"]["static_configs"][0]["targets"])
    assert targets == {f"{t}:{load(tier_config(compose['services'][t]))['port']}" for t in TIERS}
    assert jobs["cascade"]["metrics_path"] == "/metrics"
    _, collector = collector_config(compose)
    (reader,) = collector["service"]["telemetry"]["metrics"]["readers"]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [
        f"otel-collector:{reader['pull']['exporter']['prometheus']['port']}"]


def test_rules_use_metrics_the_tiers_expose_and_the_docs_list_them_all(compose: dict[str, Any]) -> None:
    exposed = exposed_metric_names()
    rules = load(INFRA / "prometheus-rules.yml")
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\bcascade_[a-z_]+", rule["expr"]))
    used = {re.sub(r"_(bucket|count|sum)$", "", n) if n.endswith(("_bucket", "_count", "_sum"))
            and not n.endswith("_total") else n for n in used}
    assert used and used <= exposed, used - exposed
    documented = set(re.findall(r"`(cascade_[a-z_]+)`", (INFRA / "README.md").read_text()))
    assert exposed <= documented, exposed - documented


def test_dockerfile_copies_what_exists_and_exposes_the_tier_ports(compose: dict[str, Any]) -> None:
    text = (INFRA / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY {item}: missing"
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, flags=re.MULTILINE).group(1).split()}
    ports = {load(tier_config(compose["services"][t]))["port"] for t in TIERS}
    assert ports <= exposed
    for tier in TIERS:
        assert compose["services"][tier]["build"]["dockerfile"] == "infra/Dockerfile"
