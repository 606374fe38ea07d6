"""``cascade disk``: what each local store of a tier takes against its disk budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cascade.cli.common import fail, print_json, print_table
from cascade.errors import CascadeError


def _mib(n: Any) -> str:
    return f"{int(n) / 1024 / 1024:.2f} MiB"


def disk(
    config: Path = typer.Option(..., "--config", "-c", help="Node config YAML of the tier."),
    url: str | None = typer.Option(
        None, help="Ask this running tier (its /readyz) instead of measuring the files; "
        "adds what each store evicted since the tier started."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Bytes used per local store (results, decision log, logs, traces, models) vs its share
    of the tier's disk budget (the disk: block of its node config).

    Examples:
      cascade disk -c edge_nodes/edge-node.yaml
      cascade disk -c edge_nodes/edge-node.yaml --url http://127.0.0.1:8102 --json
    """
    from cascade.tier.disk import measure_stores
    from cascade.tier.settings import load_node_settings

    try:
        settings = load_node_settings(config)
        if url is None:
            view: dict[str, Any] = measure_stores(settings)
        else:
            view = _ask(url)
    except CascadeError as exc:
        fail(exc.message)
    if as_json:
        print_json({"tier": settings.tier, **view})
        return
    from rich.table import Table

    table = Table(title=f"disk of {settings.tier}: {_mib(view['used_bytes'])} of "
                  f"{_mib(view['budget_bytes'])} (disk.budget_mb)", title_justify="left")
    columns = ["store", "used", "share", "used %", "evicted" if url else "files"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("store", "files", "evicted") else "right")
    for store, info in view["stores"].items():
        fraction = info.get("used_fraction")
        last = (", ".join(f"{k}: {v}" for k, v in sorted(info.get("evictions", {}).items()))
                if url else ", ".join(info.get("files", []))) or "-"
        table.add_row(store, _mib(info["used_bytes"]), _mib(info["budget_bytes"]),
                      "-" if fraction is None else f"{fraction:.0%}", last)
    print_table(table)


def _ask(url: str) -> dict[str, Any]:
    import httpx

    ca = Path("var/certs/ca.pem")  # a chain `cascade up` started here serves HTTPS with it
    verify: Any = True
    if url.startswith("https://") and ca.is_file():
        import ssl

        verify = ssl.create_default_context(cafile=str(ca))
    try:
        ready = httpx.get(f"{url.rstrip('/')}/readyz", timeout=5, verify=verify).json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"cannot read {url}/readyz: {exc}", 1)
    if not ready.get("disk"):
        fail(f"{url} reports no disk usage (an older cascade?)", 1)
    disk_view: dict[str, Any] = ready["disk"]
    return disk_view
