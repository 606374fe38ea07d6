"""Helpers shared by the CLI commands: error reporting and output."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console

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
