"""Durable store-and-forward (architecture §6): provisional answers now, final answers later.

A tier whose upstream cannot be reached answers provisionally and commits the answer together
with the escalation it owes (one transaction, group-committed) before the client sees a 200.
The forwarder drains the outbox oldest first once the upstream's breaker lets a probe through,
sending each request's id as ``Idempotency-Key``; the final answer replaces the provisional one
and is POSTed to the client's ``callback_url``. Bounds: TTL → ``expired``, max attempts →
``dead`` (kept, replayable), row/byte caps → 503 ``queue_full``; storage failures → 503
``storage_unavailable``. Operators use ``cascade queue``.

Modules: :mod:`~cascade.outbox.tables` (schema), :mod:`~cascade.outbox.engine` (opening the
database), :mod:`~cascade.outbox.writer` (group commit), :mod:`~cascade.outbox.store` (write
handlers), :mod:`~cascade.outbox.views` (reads), :mod:`~cascade.outbox.rules` (pure logic),
:mod:`~cascade.outbox.forwarder`, :mod:`~cascade.outbox.callbacks`. The outbox knows nothing
of HTTP or of the node: idempotent serving is :mod:`cascade.tier.idempotency`, and the results
routes are :mod:`cascade.http.results`.
"""

from cascade.outbox.config import OutboxSettings
from cascade.outbox.outbox import Outbox
from cascade.outbox.rules import backoff_s, request_hash

__all__ = [
    "Outbox",
    "OutboxSettings",
    "backoff_s",
    "request_hash",
]
