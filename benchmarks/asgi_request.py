"""The ASGI scope of one ``POST /v1/infer``, for benchmarks that call a tier's app in process.

``bench_tracing.py`` runs its probes as ``python -c`` scripts with the project root on
``PYTHONPATH``; they import this instead of each spelling the scope out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def infer_scope(body: bytes, headers: Sequence[tuple[bytes, bytes]] = (), **extra: Any) -> dict[str, Any]:
    """An HTTP/1.1 scope for ``POST /v1/infer`` with a JSON ``body``, plus ``headers`` and
    ``extra`` keys (e.g. ``app``)."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/infer", "raw_path": b"/v1/infer", "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), (b"host", b"t"), *headers],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), **extra,
    }
