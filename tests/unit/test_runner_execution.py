"""Blocking models off the event loop: a slow model does not block /healthz or other requests,
fast models stay inline, a full pool waits at most until the deadline (503 model_busy), and
every wait is reported."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from cascade.contract.deadline import Deadline
from cascade.contract.inputs import DECODERS
from cascade.errors import ServiceUnavailable
from cascade.http.app import create_app
from cascade.policy import load_policy
from cascade.runners.execution import BlockingCalls
from cascade.runners.onnx import OnnxRunner
from cascade.tier.node import Node, TaskRuntime
from cascade.tier.settings import NodeSettings
from tests.unit.otel_fixtures import serving

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper

SLOW_MATMULS = 6
"""Chained 768x768 float MatMuls: tens to hundreds of ms on one thread, a deliberately slow
model, far above the 2 ms offload line."""


def slow_vision_model() -> bytes:
    """A real ONNX classifier of 8x8 images (10 classes) that burns CPU before answering: its
    output is softmax(x @ W + 0 * sum(B^k)) with B = A * (1 + 0 * sum(x)); B depends on the
    input, so onnxruntime cannot fold the MatMul chain into a constant when it loads."""
    rng = np.random.default_rng(0)
    a = helper.make_tensor("A", TensorProto.FLOAT, [768, 768],
                           (rng.random((768, 768), dtype=np.float32) / 768).ravel())
    w = helper.make_tensor("W", TensorProto.FLOAT, [64, 10],
                           rng.random((64, 10), dtype=np.float32).ravel())
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
        helper.make_node("Mul", ["xs", "zero"], ["xs0"]),
        helper.make_node("Add", ["xs0", "one"], ["scale"]),
        helper.make_node("Mul", ["A", "scale"], ["B"]),
        helper.make_node("MatMul", ["B", "B"], ["m1"]),
    ]
    for k in range(2, SLOW_MATMULS + 1):
        nodes.append(helper.make_node("MatMul", [f"m{k - 1}", "B"], [f"m{k}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"m{SLOW_MATMULS}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["s0"]),
        helper.make_node("MatMul", ["x", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "s0"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
        initializer=[a, w, zero, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


POLICY = """\
version: 1
name: slow
tasks:
  vision:
    deadline_ms: 60000
    tiers:
      endpoint: {signal: max_prob, threshold: 0.0}
"""


def slow_node(tmp_path: Path, calls: BlockingCalls) -> tuple[Node, OnnxRunner]:
    runner = OnnxRunner.from_bytes(slow_vision_model(), task="vision",
                                   classes=[str(i) for i in range(10)],
                                   model_name="vision/endpoint:slow", input_kind="image8x8",
                                   calls=calls)
    runner.warmup()
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    settings = NodeSettings(tier="endpoint", tasks={"vision": "endpoint"}, policy=path)
    node = Node(settings, tasks={"vision": TaskRuntime("vision", runner, DECODERS["image8x8"])},
                policy=load_policy(path))
    return node, runner


async def wait_until(check, what: str, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.005)


async def test_a_slow_model_runs_off_the_loop_and_healthz_answers_meanwhile(tmp_path):
    waits: list[float] = []
    node, runner = slow_node(tmp_path, BlockingCalls(name="slow", on_wait=waits.append))
    # auto mode measured the warm-up and chose threads for this model
    assert runner.calls.measured_ms is not None and runner.calls.measured_ms >= 2.0
    assert not runner.calls.inline
    async with serving(create_app(node)) as client:
        body = {"task": "vision", "input": {"image": [[8] * 8] * 8}}
        slow = asyncio.create_task(client.post("/v1/infer", json=body))
        await wait_until(lambda: runner.calls.in_flight == 1, "the model running")
        health = await client.get("/healthz")
        metrics = await client.get("/metrics")
        # Answered while the model was still computing: the loop was free.
        assert health.status_code == 200 and metrics.status_code == 200
        assert not slow.done() and runner.calls.in_flight == 1
        answer = await slow
    assert answer.status_code == 200 and answer.json()["status"] == "final"
    assert len(waits) == 1  # one request, one measured wait for the worker slot


def test_fast_models_stay_inline():
    calls = BlockingCalls(name="fast")
    calls.calibrate(0.05)  # the built-in ONNX models measure 0.05-0.42 ms
    assert calls.inline
    calls.calibrate(2.5)
    assert not calls.inline
    forced = BlockingCalls(name="forced", mode="thread")
    forced.calibrate(0.05)
    assert not forced.inline


async def test_a_full_pool_waits_until_the_deadline_then_503_model_busy():
    waits: list[float] = []
    calls = BlockingCalls(name="busy", mode="thread", max_concurrency=1, on_wait=waits.append)
    release = threading.Event()
    first = asyncio.create_task(calls.call(release.wait, 30))
    await wait_until(lambda: calls.in_flight == 1, "the first call holding the only slot")
    with pytest.raises(ServiceUnavailable) as refused:
        await calls.call(lambda: "never", deadline=Deadline.from_ms(30))
    assert refused.value.code == "model_busy" and refused.value.status == 503
    assert "busy" in refused.value.message
    release.set()
    assert await first is True
    assert calls.in_flight == 0
    assert await calls.call(lambda: "ran") == "ran"  # the slot is free again
    assert len(waits) == 3
    calls.close()


async def test_pinned_calls_refuse_beyond_max_waiting_at_once_with_a_retry_hint():
    calls = BlockingCalls(name="llm", mode="auto")
    calls.pin_to_threads(max_concurrency=1, max_waiting=1)
    assert not calls.inline and calls.mode == "thread"
    release = threading.Event()
    running = asyncio.create_task(calls.call(release.wait, 30))
    await wait_until(lambda: calls.in_flight == 1, "the only worker busy")
    waiting = asyncio.create_task(calls.call(lambda: "second"))
    await wait_until(lambda: calls.waiting == 1, "one call waiting")
    with pytest.raises(ServiceUnavailable) as refused:  # no deadline: refused, not queued
        await calls.call(lambda: "never")
    assert (refused.value.status, refused.value.code) == (503, "model_busy")
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
    assert "max_waiting=1" in refused.value.message
    release.set()
    assert await running is True and await waiting == "second"
    assert calls.waiting == 0 and calls.in_flight == 0
    with pytest.raises(RuntimeError, match="after the first call"):
        calls.pin_to_threads(max_concurrency=2)
    calls.close()
