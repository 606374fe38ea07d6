"""Run one tier process: ``python -m cascade.deploy.process --config edge_nodes/endpoint.yaml``.

This is what ``cascade serve`` and the supervisor (``cascade up``, tests, bench) run. It avoids
importing the CLI stack (typer, rich, every sub-command) so a tier is ready sooner.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

KEEP_ALIVE_S = 30
"""How long a tier keeps an idle client connection open (seconds)."""


def run_tier(config: Path, *, port: int | None = None, host: str | None = None) -> int:
    """Load and serve one tier until SIGTERM/SIGINT; returns the exit code (2: bad config)."""
    import uvicorn

    from cascade.errors import CascadeError
    from cascade.http.app import create_app
    from cascade.observability.logs import configure_logging
    from cascade.observability.telemetry import setup_tracing
    from cascade.tier.compose import build_node
    from cascade.tier.optional_tasks import optional_task_gaps
    from cascade.tier.settings import load_node_settings

    overrides: dict[str, Any] = {}
    if port is not None:
        overrides["port"] = port
    if host is not None:
        overrides["host"] = host
    try:
        settings = load_node_settings(config, **overrides)
        disk = settings.disk
        configure_logging(settings.tier, settings.log_level, fmt=settings.log_format,
                          file=settings.log_file, file_backups=disk.log_backups,
                          file_max_bytes=disk.share_bytes("logs") // (disk.log_backups + 1))
        tracing = setup_tracing(settings.tier, trace_dir=settings.trace_dir,  # + OTEL_* env
                                trace_file_max_bytes=disk.share_bytes("traces") // 2)
        # After every configuration check: a bad setting is the one line a user reads.
        for task, why in optional_task_gaps(settings).items():
            logging.getLogger("cascade.deploy.process").warning(
                "optional task %s not served: %s", task, why)
        node = build_node(settings)  # fail fast, before binding the port
    except CascadeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    app = create_app(node, max_body_bytes=settings.max_body_bytes)
    serving: dict[str, Any] = {"http": "httptools"}
    if node.trust is not None and node.trust.tls is not None:
        from cascade.deploy.tls_server import uvicorn_tls_options

        serving = uvicorn_tls_options(node.trust.tls)  # HTTPS, reloadable, callers identified
    # Everything loaded so far lives as long as the process: exempt it from the cyclic GC, whose
    # full collections would otherwise rescan it and stall requests (p99) under per-request
    # allocations such as spans.
    gc.freeze()
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully; with handlers of ours
    # in place that re-raise returns here instead of killing the process before spans are flushed.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning" if settings.log_level == "info" else settings.log_level,
            log_config=None,  # uvicorn's records go through our JSON handler
            access_log=False,
            loop="uvloop",
            **serving,
            timeout_graceful_shutdown=5,
            # Idle connections are kept longer than clients keep theirs (httpx: 5 s, like
            # uvicorn's default): with equal timers a client can reuse a connection the tier is
            # closing at that moment, and its POST fails with a ReadError (the keep-alive race).
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    finally:
        tracing.shutdown()  # bounded: a dead collector does not delay the stop
    return 0


def main(argv: list[str] | None = None) -> None:
    """Command-line entry of a tier process (see ``cascade serve --help`` for the knobs)."""
    parser = argparse.ArgumentParser(prog="python -m cascade.deploy.process", description=__doc__)
    parser.add_argument("--config", "-c", type=Path, required=True, help="node config YAML")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default=None)
    args = parser.parse_args(argv)
    sys.exit(run_tier(args.config, port=args.port, host=args.host))


if __name__ == "__main__":
    main()
