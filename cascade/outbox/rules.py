"""Pure decisions of the outbox: request identity, backoff, stored-answer views.

(Merging an upstream's answer into a tier's own is :func:`cascade.contract.answer.merge_upstream`,
shared with the online path.)

No I/O here, so each rule is tested with plain data (tests/unit/test_outbox_rules.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import orjson

_IDENTITY_KEYS = ("task", "input")
"""What makes two requests "the same" for an idempotency key. ``deadline_ms`` changes on every
retry and ``callback_url`` says where to deliver, not what to compute, so neither counts."""

_VIEW_KEYS = ("escalation", "callback")
"""Keys the outbox adds to a stored answer when showing it; never stored themselves."""


def to_json(value: Any) -> str:
    """Serialize an answer for storage; numpy scalars (model outputs) become plain numbers."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_plain).decode()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalar types orjson does not know natively
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in an answer")


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` passes, then clear it.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11, ``wait_for`` can
    swallow a cancellation that races with the event, and a background loop would then never
    stop.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass
    event.clear()


def request_hash(task: str, input_: Any) -> str:
    """A stable hash of what a request asks (its task and input), key order independent."""
    canonical = orjson.dumps({"task": task, "input": input_}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` after ``attempt`` failures (``attempt`` >= 1).

    Exponential with "equal jitter": half the step is fixed, half random. Full jitter can draw
    near-zero delays, which would let thousands of rows hammer a failing upstream in lockstep;
    equal jitter still spreads them while guaranteeing a floor.
    """
    step = min(max_s, initial_s * (2.0 ** max(0, attempt - 1)))
    return float(step / 2 + (rng or random).uniform(0, step / 2))


def strip_view(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored answer without the outbox's view keys: what goes back into the results table."""
    return {k: v for k, v in stored.items() if k not in _VIEW_KEYS and not k.startswith("_")}
