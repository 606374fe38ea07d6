"""Server-Sent Events of a streamed generative answer (architecture §2, contract).

With ``"stream": true`` (or ``Accept: text/event-stream``) ``POST /v1/infer`` answers with these
events, in order:

- ``token`` ``{"tier", "text"}``: one generated token, as the tier's model produces it;
- ``escalate`` ``{"tier", "model", "confidence", "threshold", "reason"}``: that tier's gate sent
  the request up after its local answer; the next tier's tokens follow;
- ``answer``: the whole answer (the same JSON as the non-streamed 200 body), once, last;
- ``error`` ``{"error": {"code", "message", "field"?}}`` instead of ``answer`` when the request
  fails after the stream has started (errors before it are plain HTTP errors).

An upstream tier's ``token`` and ``escalate`` events are relayed as they arrive, so a client sees
one stream across the whole chain. Each event is one ``event:`` line and one ``data:`` line of
JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson

__all__ = ["EVENT_ANSWER", "EVENT_ERROR", "EVENT_ESCALATE", "EVENT_TOKEN", "EventSink",
           "SseParser", "sse_event"]

EVENT_TOKEN, EVENT_ESCALATE, EVENT_ANSWER, EVENT_ERROR = "token", "escalate", "answer", "error"

EventSink = Callable[[str, dict[str, Any]], None]
"""Where a tier puts the events of a streamed answer as they happen (must not block)."""


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: ``event: NAME`` and a JSON ``data:`` line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class SseParser:
    """Incremental Server-Sent Events parser: feed it text as it arrives, get whole events.

    Handles ``event:``/``data:`` fields (multi-line data joined by newlines), comments and
    blank-line dispatch, per the HTML living standard's event-stream format.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._event = "message"
        self._data: list[str] = []

    def feed(self, chunk: str) -> Iterator[tuple[str, str]]:
        """The ``(event, data)`` pairs completed by ``chunk``."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split("\n")
        for raw in lines:
            line = raw.rstrip("\r")
            if not line:
                if self._data:
                    yield self._event, "\n".join(self._data)
                self._event, self._data = "message", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
