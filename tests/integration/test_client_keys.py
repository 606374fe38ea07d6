"""API keys of tier 1's clients over real HTTP: 401, 403 and 429 with Retry-After, configurable
protected routes, per-key counters in /metrics, and keys never in bodies, logs or spans."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cascade.trust.keys import hash_key, new_key
from tests.fault.harness import Tier, free_port, metric, scrape, wait_for

pytestmark = pytest.mark.integration
BODY = {"task": "documents", "input": {"text": "Shares rose after the central bank cut rates"}}


@pytest.fixture
def keyed(tiers: Callable[..., Tier], tmp_path: Path) -> tuple[Tier, dict[str, str]]:
    """An endpoint with five keys, /metrics protected too, spans written to a file."""
    keys = {name: new_key() for name in ("app", "ops", "off", "burst", "daily")}
    entries = [
        {"name": "app", "sha256": hash_key(keys["app"])},
        {"name": "ops", "sha256": hash_key(keys["ops"]), "scopes": ["api", "metrics"]},
        {"name": "off", "sha256": hash_key(keys["off"]), "disabled": True},
        # One token a thousand seconds: the third request is refused whatever the machine's speed.
        {"name": "burst", "sha256": hash_key(keys["burst"]), "rate_per_s": 0.001, "burst": 2},
        {"name": "daily", "sha256": hash_key(keys["daily"]), "quota": 2, "quota_period_s": 86400},
    ]
    endpoint = tiers("endpoint", trace_dir=str(tmp_path / "traces"),
                     clients={"keys": entries, "protect": ["api", "metrics"]})
    return endpoint, keys


def infer(url: str, key: str | None = None, *, header: str = "bearer") -> httpx.Response:
    headers = {}
    if key is not None:
        headers = ({"Authorization": f"Bearer {key}"} if header == "bearer"
                   else {"X-API-Key": key})
    return httpx.post(f"{url}/v1/infer", json=BODY, headers=headers, timeout=10)


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_keys_admit_refuse_and_limit_each_client(keyed: tuple[Tier, dict[str, str]],
                                                 tmp_path: Path) -> None:
    endpoint, keys = keyed
    url = endpoint.url
    missing = infer(url)
    assert error_of(missing) == (401, "missing_api_key")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert error_of(infer(url, "ck_not-a-key")) == (401, "invalid_api_key")
    assert infer(url, keys["app"]).status_code == 200
    assert infer(url, keys["app"], header="x-api-key").status_code == 200
    assert error_of(infer(url, keys["off"])) == (403, "api_key_disabled")
    # /metrics needs a key with its scope; /healthz and /readyz are not protected here.
    assert error_of(httpx.get(f"{url}/metrics", headers={"X-API-Key": keys["app"]})) == \
        (403, "api_key_not_allowed")
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").json()["security"]["clients"]["protect"] == \
        ["api", "metrics"]

    statuses = [infer(url, keys["burst"]) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].json()["error"]["code"] == "rate_limited"
    assert 900 <= int(statuses[2].headers["Retry-After"]) <= 1000  # one token per 1000 s
    daily = [infer(url, keys["daily"]) for _ in range(3)]
    assert [r.status_code for r in daily] == [200, 200, 429]
    assert daily[2].json()["error"]["code"] == "quota_exceeded"
    assert 40_000 <= int(daily[2].headers["Retry-After"]) <= 43_200  # half a day: 2 per day

    samples = scrape(url, headers={"Authorization": f"Bearer {keys['ops']}"})
    accepted = {k: metric(samples, "cascade_client_requests_total", tier="endpoint", key=k)
                for k in ("app", "burst", "daily", "ops")}
    assert accepted == {"app": 2, "burst": 2, "daily": 2, "ops": 1}
    refused = {c: metric(samples, "cascade_client_refusals_total", tier="endpoint", code=c)
               for c in ("missing_api_key", "invalid_api_key", "api_key_disabled",
                         "api_key_not_allowed", "rate_limited", "quota_exceeded")}
    assert refused == {"missing_api_key": 2, "invalid_api_key": 1, "api_key_disabled": 1,
                       "api_key_not_allowed": 1, "rate_limited": 1, "quota_exceeded": 1}

    # The key's name is in the access line; no key (nor its hash) is in any log or span.
    wait_for(lambda: '"cascade.client.key":"app"' in endpoint.log(), 30, "the access line with the name")
    traces = tmp_path / "traces"
    written = endpoint.log() + "".join(p.read_text() for p in traces.glob("*.jsonl"))
    for key in (*keys.values(), "ck_not-a-key"):
        assert key not in written
        assert hash_key(key).split(":")[1] not in written
    for response in (missing, *statuses, *daily):
        assert "ck_" not in response.text


def test_a_key_is_named_on_the_server_span(tiers: Callable[..., Tier], tmp_path: Path,
                                           hard_images: list[Any]) -> None:
    key = new_key()
    # An escalating request is always traced (its upstream is not there: provisional).
    endpoint = tiers("endpoint", trace_dir=str(tmp_path / "traces"),
                     upstream=f"http://127.0.0.1:{free_port()}",
                     clients={"keys": [{"name": "checkout", "sha256": hash_key(key)}]})
    r = httpx.post(f"{endpoint.url}/v1/infer", timeout=10,
                   json={"task": "vision", "input": {"image": hard_images[0]}},
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    from cascade.observability.export import read_span_records

    def server_span() -> dict[str, Any] | None:
        path = tmp_path / "traces" / "endpoint.jsonl"
        if not path.exists():
            return None
        records, _ = read_span_records(path)
        return next((s for s in records if s["trace_id"] == r.json()["trace_id"]
                     and s["kind"] == "SERVER"), None)

    span = wait_for(server_span, 60, "the endpoint's SERVER span")
    assert span["attrs"]["cascade.client.key"] == "checkout"
    assert key not in str(span)
