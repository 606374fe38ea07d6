"""Shared helpers for the telemetry and metrics unit tests: real spans, a tiny node.

The global tracer provider can be set once per process, so the first test that asks for
``spans`` installs an SDK provider whose processor forwards to the exporter of the test
running now (and drops spans between tests). ``tests/conftest.py`` registers this module as a
plugin, so every test can ask for ``spans``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cascade.contract.answer import Answer, Hop
from cascade.contract.inputs import DECODERS
from cascade.contract.outputs import Classification
from cascade.policy import load_policy
from cascade.tier.node import CallContext, Node, TaskRuntime
from cascade.tier.settings import NodeSettings
from cascade.upstream.breaker import CircuitBreaker


class _Switch(SpanProcessor):
    """Forwards ended spans to the current test's processor, if any."""

    target: SpanProcessor | None = None

    def on_end(self, span: ReadableSpan) -> None:
        if self.target is not None:
            self.target.on_end(span)


_SWITCH = _Switch()


def _install_provider() -> None:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "cascade-test",
                                                            "cascade.tier": "test"}))
        provider.add_span_processor(_SWITCH)
        trace.set_tracer_provider(provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Real SDK spans of this test, in memory (httpx instrumented for the test's duration)."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    from cascade.observability.telemetry import instrument_httpx

    _install_provider()
    instrument_httpx()
    exporter = InMemorySpanExporter()
    _SWITCH.target = SimpleSpanProcessor(exporter)
    try:
        yield exporter
    finally:
        _SWITCH.target = None
        # Later tests (integration ones too) must not find their own httpx calls traced.
        HTTPXClientInstrumentor().uninstrument()


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """Finished spans called ``name``."""
    return [s for s in exporter.get_finished_spans() if s.name == name]


class StandInClassifier:
    """What the node needs of a runner, over a synchronous ``predict_proba`` (stand-ins below)."""

    task = "documents"
    classes: tuple[str, ...] = ()

    def predict_proba(self, inputs: Any) -> Any:
        raise NotImplementedError

    async def run(self, inputs: Any, deadline: Any = None) -> list[Classification]:
        return [Classification(np.asarray(row), self.classes)
                for row in self.predict_proba(inputs)]

    def warmup(self) -> None:
        return None

    def close(self) -> None:
        return None


class FixedRunner(StandInClassifier):
    """A stand-in model with fixed output probabilities (the gate is what these tests drive)."""

    def __init__(self, task: str, probs: list[float], name: str = "fixed") -> None:
        self.task = task
        self.model_name = f"{task}/{name}"
        self.classes = tuple(str(i) for i in range(len(probs)))
        # Plain floats: the node's answer path serialises what the gate returns as-is.
        self._probs = [list(map(float, probs))]

    def predict_proba(self, inputs: Any) -> Any:
        return self._probs


class TextRunner(StandInClassifier):
    """A stand-in model whose output is chosen by the input text: 'p=0.9' -> [0.9, 0.1]."""

    model_name = "documents/test-model"
    classes = ("a", "b")

    def predict_proba(self, x: Any) -> Any:
        p = float(str(x[0] if isinstance(x, list) else x).split("p=")[1].split()[0])
        return [[p, 1.0 - p]]


class AnsweringCloud:
    """A stand-in upstream: the cloud, always answering 'b' (with the breaker and stats that
    /metrics reads)."""

    base_url = "http://cloud.invalid"

    def __init__(self) -> None:
        self.breaker = CircuitBreaker()
        self.stats: dict[str, int] = {}

    async def escalate(self, body: dict[str, Any], *, idempotency_key: str,
                       **_: Any) -> Answer:
        return Answer(id=idempotency_key, task=body["task"], label="b", confidence=0.99,
                      status="final", answered_by="cloud",
                      hops=[Hop(tier="cloud", model="cloud-model", label="b", confidence=0.99,
                                decision="answer", ms=0.1)])

    async def aclose(self) -> None:
        return None


def text_node(tmp_path: Path, policy: str) -> Node:
    """An endpoint for ``documents`` under the ``policy`` YAML text, its model a
    :class:`TextRunner` and its upstream an :class:`AnsweringCloud`."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    settings = NodeSettings(tier="endpoint", tasks={"documents": "endpoint"}, policy=path,
                            upstream_url=AnsweringCloud.base_url)
    runtime = TaskRuntime("documents", TextRunner(), DECODERS["text"])
    return Node(settings, tasks={"documents": runtime}, policy=load_policy(path),
                upstream=AnsweringCloud())


async def send_texts(node: Node, probs: list[float], start: int = 0) -> list[dict[str, Any]]:
    """One request per confidence in ``probs`` (ids ``req-<start>``...), in order."""
    from cascade.contract.schemas import InferRequest

    out = []
    for i, p in enumerate(probs, start):
        req = InferRequest.model_validate({"task": "documents", "input": {"text": f"p={p} doc"}})
        out.append((await node.infer(req, CallContext(request_id=f"req-{i}"))).to_wire())
    return out


POLICY = """\
version: 1
name: test
tasks:
  documents:
    deadline_ms: 2000
    tiers:
      endpoint: {signal: max_prob, threshold: 0.9}
      cloud: {signal: max_prob, threshold: 0.0}
"""


def make_node(tmp_path: Path, *, tier: str = "endpoint", confident: bool = True,
              upstream: Any = None, escalations: Any = None) -> Node:
    """A documents node whose model is sure (answers) or unsure (escalates)."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY)
    settings = NodeSettings(tier=tier, tasks={"documents": tier}, policy=policy_path,
                            upstream_url=getattr(upstream, "base_url", None))
    probs = [0.97, 0.01, 0.01, 0.01] if confident else [0.4, 0.3, 0.2, 0.1]
    runtime = TaskRuntime("documents", FixedRunner("documents", probs), DECODERS["text"])
    return Node(settings, tasks={"documents": runtime}, policy=load_policy(policy_path),
                upstream=upstream, escalations=escalations)


DOC = {"task": "documents", "input": {"text": "The central bank cut interest rates"}}


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to ``app`` in process, with the app's lifespan run around it."""
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://tier") as client:
        yield client
