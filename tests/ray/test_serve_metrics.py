"""Metrics of a tier run as several Serve replicas reach one Prometheus scrape: each ingress
replica copies its ``/metrics`` into Ray's metrics (``ray.util.metrics``, tagged with the
replica), and the node's metrics agent serves them all in one text exposition, where each
replica's count equals what that replica itself reports."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from cascade.deploy.replicas import REPLICA_HEADER
from tests.fault.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.ray]

COUNTER = "cascade_http_responses_total"
INFER_200 = {"route": "/v1/infer", "code": "200", "tier": "cloud"}


def _infer_200s(text: str, name: str) -> dict[str, float]:
    """``name``'s /v1/infer 200 count per replica label ("" when untagged) in ``text``."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in INFER_200.items()):
                replica = s.labels.get("replica", "")
                counts[replica] = counts.get(replica, 0.0) + s.value
    return counts


def test_every_replicas_counts_appear_in_one_scrape(replicated_cloud, ray_instance):
    url = replicated_cloud.url
    answered_by: set[str] = set()
    with httpx.Client(timeout=60) as client:
        def ask() -> bool:  # until the proxy has sent requests to both replicas
            body = {"task": "documents", "input": {"text": "the cup final went to penalties"}}
            response = client.post(f"{url}/v1/infer", json=body)
            assert response.status_code == 200, response.text
            answered_by.add(response.headers[REPLICA_HEADER])
            return len(answered_by) == 2

        wait_for(ask, timeout_s=120, what="answers from both replicas")
        # Each replica's own count, from its own /metrics (the proxy picks the replica).
        local: dict[str, float] = {}

        def both_scraped() -> bool:
            response = client.get(f"{url}/metrics")
            own = _infer_200s(response.text, COUNTER)
            local[response.headers[REPLICA_HEADER]] = own[""]
            return len(local) == 2

        wait_for(both_scraped, timeout_s=60, what="/metrics from both replicas")
    assert set(local) == answered_by and all(n >= 1 for n in local.values())
    last: dict[str, Any] = {}

    def exported_as_reported() -> bool:
        # One scrape of the metrics agent holds both replicas' series (Ray adds "ray_").
        last["text"] = httpx.get(ray_instance.metrics_url, timeout=30).text
        mirrored = _infer_200s(last["text"], f"ray_{COUNTER}")
        last["mirrored"] = mirrored
        return all(mirrored.get(replica) == n for replica, n in local.items())

    try:
        wait_for(exported_as_reported, timeout_s=120,
                 what=f"each replica's count {local} in one scrape of Ray's metrics agent")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last mirrored counts: {last.get('mirrored')}") from None
    # Histograms come through as well (bucket series keep their le label).
    assert 'ray_cascade_request_duration_seconds_bucket{' in last["text"]
