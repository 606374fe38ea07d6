"""A tier's life around serving: what starts before the first request and stops after the last.

Start: the outbox (writer thread, forwarder when there is an upstream, callbacks, maintenance),
the policy reloader (file watch + SIGHUP), scheduled model bundle pulls and, with TLS, the
certificate watcher (its files change, or the same SIGHUP). Stop, in reverse: the reloader, the outbox (stop
sending, commit pending writes, close the database), then the node (upstream connections, model
threads, decision log). The HTTP layer only calls :func:`run_tier_lifecycle`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cascade.outbox import Outbox
from cascade.policy.reload import PolicyReloader
from cascade.tier.node import Node

__all__ = ["outbox_of", "run_tier_lifecycle"]


def outbox_of(node: Node) -> Outbox | None:
    """The node's durable outbox, if it has one (a tier built by hand in a test may not)."""
    queue = getattr(node, "escalations", None)
    return queue if isinstance(queue, Outbox) else None


@asynccontextmanager
async def run_tier_lifecycle(node: Node) -> AsyncIterator[Node]:
    """Start the node's background parts, yield it ready to serve, stop them in reverse."""
    outbox = outbox_of(node)
    if outbox is not None:
        await outbox.start(node.upstream)
    tls = node.trust.tls if node.trust is not None else None
    reloader = PolicyReloader(node)  # nothing per request
    await reloader.start(also_on_sighup=(lambda: tls.reload("SIGHUP")) if tls else None)
    stop_watch = asyncio.Event()
    watch = asyncio.create_task(tls.watch(stop_watch), name="tls-watch") if tls else None
    # Shadow audits: workers enough for the most demanding task of the policy at start.
    await node.auditor.start(max(t.audit.concurrency for t in node.policy.policy.tasks.values()))
    pulls = _scheduled_pulls(node)
    try:
        yield node
    finally:
        if pulls is not None:
            pulls.cancel()
            await asyncio.gather(pulls, return_exceptions=True)
        stop_watch.set()
        if watch is not None:
            try:
                await asyncio.wait_for(watch, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                watch.cancel()
        await reloader.stop()
        if outbox is not None:
            await outbox.aclose()
        await node.aclose()


def _scheduled_pulls(node: Node) -> asyncio.Task[None] | None:
    """The tier's scheduled bundle pulls (``bundles.pull_interval_s``), if it has them."""
    rollout = node.rollout
    source = getattr(rollout, "source", None)
    if source is None or rollout.config.pull_interval_s <= 0:
        return None
    return asyncio.get_running_loop().create_task(source.run_schedule(), name="bundle-pulls")
