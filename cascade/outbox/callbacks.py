"""Delivers final answers to the clients' ``callback_url``: retried, recorded, never lost.

A callback row is armed in the same transaction that marks an escalation ``done``. This task
POSTs the latest answer (the body of ``GET /v1/results/{id}``) with an ``Idempotency-Key``
header equal to the request id, so a receiver can discard a repeat after a lost response, and,
with the tier's signing key, ``X-Cascade-Signature`` (:mod:`cascade.trust.callbacks`). It
connects only to addresses the tier's callback policy allows, checked on the address connected
to; redirects are not followed. A 2xx is ``delivered``; anything else is retried with backoff and becomes ``failed`` after
``callback_max_attempts``, kept with its last error (``cascade queue replay ID`` re-arms it).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import httpx
import orjson

from cascade.errors import CascadeError, ServiceUnavailable
from cascade.outbox.background import BackgroundLoop
from cascade.outbox.rules import backoff_s, wait_event
from cascade.outbox.store import ClaimedCallback

if TYPE_CHECKING:  # pragma: no cover
    from cascade.outbox.outbox import Outbox

log = logging.getLogger("cascade.outbox.callbacks")

_CONCURRENCY = 8


class CallbackSender(BackgroundLoop):
    """One background task per tier that owes callbacks."""

    def __init__(self, outbox: Outbox, *, rng: random.Random | None = None) -> None:
        self.outbox = outbox
        self.settings = outbox.settings
        self._rng = rng or random.Random()
        super().__init__()
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Run the delivery loop as a background task of the current event loop."""
        guard = self.outbox.callback_guard
        self._client = httpx.AsyncClient(
            timeout=self.settings.callback_timeout_ms / 1000.0, follow_redirects=False,
            headers={"User-Agent": f"cascade-callbacks/{self.outbox.tier}"},
            transport=guard.transport() if guard is not None else None, trust_env=False,
        )
        self._start_loop(self._run(), f"outbox-callbacks-{self.outbox.tier}")

    async def stop(self) -> None:
        """Stop delivering; an interrupted POST is retried after its lease (or at restart)."""
        await self._stop_loop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while not self._stopping:
            try:
                due = await self.outbox.claim_callbacks(_CONCURRENCY)
                if due:
                    await asyncio.gather(*(self._deliver(cb) for cb in due))
                    continue
                await self._idle()
            except asyncio.CancelledError:
                raise
            except ServiceUnavailable as exc:
                log.error("callbacks of %s: %s", self.outbox.tier, exc.message)
                await asyncio.sleep(self.settings.idle_poll_s)
            except Exception:
                log.exception("callbacks of %s: unexpected error", self.outbox.tier)
                await asyncio.sleep(self.settings.idle_poll_s)

    async def _idle(self) -> None:
        next_due = await self.outbox.next_callback_due_at()
        timeout = self.settings.idle_poll_s
        if next_due is not None:
            timeout = min(timeout, max(0.005, next_due - self.outbox.clock()))
        event = self.outbox.callbacks_ready
        if event is None:
            await asyncio.sleep(timeout)
            return
        await wait_event(event, timeout)

    async def _deliver(self, cb: ClaimedCallback) -> None:
        assert self._client is not None
        error: str | None = None
        guard = self.outbox.callback_guard
        refusal = guard.url_refusal(cb.url) if guard is not None else None
        try:
            if refusal is not None:  # the policy changed since the request was accepted
                raise CascadeError(f"callback refused by policy: {refusal}")
            payload = await self.outbox.result(cb.id)
            payload.pop("callback", None)
            body = orjson.dumps(payload)
            response = await self._client.post(
                cb.url, content=body,
                headers={"Content-Type": "application/json", "Idempotency-Key": cb.id,
                         "X-Cascade-Tier": self.outbox.tier,
                         "X-Cascade-Callback-Attempt": str(cb.attempts + 1),
                         **(guard.headers(body) if guard is not None else {})},
            )
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code} from {cb.url}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__} posting to {cb.url}: {exc or 'no detail'}"
        except CascadeError as exc:
            error = exc.message
        delay = backoff_s(cb.attempts + 1, self.settings.callback_retry_initial_s,
                          self.settings.callback_retry_max_s, self._rng)
        try:
            await self.outbox.record_callback(cb.id, error is None, error, delay)
        except ServiceUnavailable as exc:
            log.error("cannot record callback outcome of %s: %s", cb.id, exc.message)
