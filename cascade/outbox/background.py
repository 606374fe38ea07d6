"""The one way the outbox runs a background loop: a named asyncio task, stopped cooperatively."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class BackgroundLoop:
    """Owns one asyncio task running a loop that checks ``self._stopping`` between steps."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def _start_loop(self, loop: Coroutine[Any, Any, None], name: str) -> None:
        self._task = asyncio.create_task(loop, name=name)

    async def _stop_loop(self) -> None:
        """Ask the loop to stop, cancel whatever step it is in, and wait for it to end."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
