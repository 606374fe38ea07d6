"""What a tier run as several replicas adds to the process tier (no Ray here: the Serve
module, :mod:`cascade.deploy.ray_serve`, hands these the replica's identity).

* :class:`ReplicaHeaderMiddleware`: every response names the replica that served it
  (``X-Cascade-Replica``), so an answer, a 409 or a ``/readyz`` body can be tied to the
  replica whose drift window, decision log file and metrics saw it.
* :class:`MetricsMirror`: one replica's ``/metrics`` registry copied, sample by sample, into
  gauges of a cluster-wide metrics system (Ray's ``ray.util.metrics``, which every node's
  metrics agent serves to Prometheus), each sample tagged with the replica, so one scrape
  holds every replica's counts (``infra/README.md``, "Metrics of a tier on Ray Serve").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry

__all__ = ["METRIC_PREFIX", "REPLICA_HEADER", "MetricsMirror", "ReplicaHeaderMiddleware",
           "Sample", "registry_samples"]

log = logging.getLogger("cascade.deploy.replicas")

METRIC_PREFIX: Final[str] = "cascade_"
"""Only cascade's own samples are mirrored (each replica's process_* are Ray's business)."""

REPLICA_HEADER: Final[str] = "X-Cascade-Replica"
"""Response header naming the replica that served the request (tiers run on Ray Serve)."""

ASGIApp = Any


class ReplicaHeaderMiddleware:
    """Pure ASGI middleware adding ``X-Cascade-Replica: <replica>`` to every response."""

    def __init__(self, app: ASGIApp, *, replica: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass the request on; add the header to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample of the registry: its wire name (``cascade_answers_total``, ``..._bucket``),
    its family's help text, its labels and value."""

    name: str
    description: str
    labels: dict[str, str]
    value: float


def registry_samples(registry: CollectorRegistry) -> Iterator[Sample]:
    """Every ``cascade_*`` sample of ``registry`` as it would be scraped now (counters'
    ``_created`` timestamps left out)."""
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(METRIC_PREFIX) and not sample.name.endswith("_created"):
                yield Sample(sample.name, family.documentation or family.name,
                             dict(sample.labels), float(sample.value))


MakeGauge = Callable[[str, str, tuple[str, ...]], Any]
"""``(name, description, tag_keys) -> gauge`` with ``set(value, tags=...)`` (ray.util.metrics)."""


class MetricsMirror:
    """Copies a registry into gauges made by ``make_gauge``, tagging each with ``replica``.

    Every sample becomes a gauge of the same name holding its current value: a counter's
    total, a histogram's ``_bucket``/``_sum``/``_count`` (``le`` kept as a tag), so
    ``rate()``, ``sum by`` and ``histogram_quantile`` work on the mirrored series as on the
    tier's own ``/metrics``. Never raises: a sample the sink refuses is skipped and counted.
    """

    def __init__(self, make_gauge: MakeGauge, *, replica: str) -> None:
        self._make_gauge = make_gauge
        self.replica = replica
        self._gauges: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self.exports = 0
        self.skipped = 0

    def export(self, registry: CollectorRegistry) -> None:
        """Set every mirrored gauge to the registry's current value."""
        for sample in registry_samples(registry):
            keys = (*sorted(sample.labels), "replica")
            try:
                known = self._gauges.get(sample.name)
                if known is None:
                    known = (self._make_gauge(sample.name, sample.description, keys), keys)
                    self._gauges[sample.name] = known
                gauge, gauge_keys = known
                if gauge_keys != keys:  # the sink's tag keys are fixed at creation
                    self.skipped += 1
                    continue
                gauge.set(sample.value, tags={**sample.labels, "replica": self.replica})
            except Exception as exc:  # noqa: BLE001 - telemetry never fails the tier
                self.skipped += 1
                log.debug("metric %s not mirrored: %s", sample.name, exc)
        self.exports += 1
