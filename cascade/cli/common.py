"""Helpers shared by the CLI commands: error reporting and output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from rich.console import Console, RenderableType

from cascade.errors import CascadeError

console = Console(soft_wrap=True)  # never break a message (file paths, key paths) mid-line
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error in red on stderr and exit with ``code`` (2: usage/config, 1: failure)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    sys.exit(code)


def fail_on(exc: CascadeError) -> NoReturn:
    """Exit cleanly on a cascade error: the message, no traceback."""
    fail(exc.message, 2)


def print_json(data: Any) -> None:
    """One JSON document on stdout, unstyled (for scripts: ``--json``)."""
    sys.stdout.write(json.dumps(data, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_json_lines(rows: Iterable[Any]) -> None:
    """One JSON document per line on stdout (for scripts: ``--json`` of a stream of records)."""
    for row in rows:
        sys.stdout.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_whole(out: Console, renderable: RenderableType) -> None:
    """Print ``renderable`` at its natural width, even past the console's.

    Output to a file or pipe is 80 columns wide, and a table squeezed into that wraps or cuts
    its cells (``make run > run.log`` split the URLs in two). A URL must stay whole to be
    copied, so the table is laid out as wide as its content and written without wrapping.
    """
    from rich.measure import Measurement
    from rich.segment import Segments

    options = out.options
    needed = Measurement.get(out, options.update_width(1 << 16), renderable).maximum
    lines = out.render_lines(renderable, options.update_width(max(options.max_width, needed)),
                             pad=False, new_lines=True)
    out.print(Segments([segment for line in lines for segment in line]), soft_wrap=True)


def print_table(table: RenderableType, out: Console | None = None) -> None:
    """A table on stdout: fitted to a terminal's width, at its natural width (no wrapped or
    cut cells) when stdout is a file or a pipe, where a script or a log reads it."""
    from rich.table import Table

    out = out or console
    if out.is_terminal:
        out.print(table)
        return
    if isinstance(table, Table) and table.title:
        # A title wraps at the table's width: print it whole on its own line instead.
        out.print(table.title, soft_wrap=True, highlight=False)
        table.title = None
    print_whole(out, table)
