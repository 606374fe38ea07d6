"""From generated token bytes to the texts a client sees: pure logic, no model.

A generative runner hands each token's bytes and log-probability to :class:`TokenText` and
emits what it returns. Three things happen on the way:

- UTF-8 is decoded incrementally: a character split over two tokens belongs to the token that
  completes it (the first one's text is empty), so no character is lost and the emitted texts
  always join to the answer;
- text that may be the beginning of a stop sequence is held back until it is known not to be
  (a client never sees half of a stop sequence);
- once a stop sequence appears, it and everything after it are cut off; the token it starts
  in keeps its text before the cut (and its log-probability).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TokenText"]

Piece = tuple[str, float]
"""One emitted token: its text and its log-probability."""


class TokenText:
    """Turns ``(bytes, logprob)`` per generated token into emitted ``(text, logprob)``."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        """True once a stop sequence appeared (add nothing more)."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far: emitted, then pending
        self._emitted_chars = 0
        self._pending: list[Piece] = []

    def add(self, token_bytes: bytes, logprob: float) -> list[Piece]:
        """Take one token; return the tokens that can be emitted now (maybe none)."""
        piece = self._decoder.decode(token_bytes)
        self._pending.append((piece, logprob))
        self._text += piece
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._text) - self._held_chars())

    def finish(self) -> list[Piece]:
        """The generation ended without a stop sequence: everything held back is real text."""
        return self._release(len(self._text))

    def _stop_at(self) -> int | None:
        """Where the earliest stop sequence starts (it cannot start in emitted text)."""
        found = [self._text.find(s, self._emitted_chars) for s in self.stop]
        starts = [index for index in found if index >= 0]
        return min(starts) if starts else None

    def _held_chars(self) -> int:
        """How many trailing characters could be the beginning of a stop sequence."""
        pending = len(self._text) - self._emitted_chars
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, pending), held, -1):
                if self._text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, upto: int) -> list[Piece]:
        """Emit pending tokens whose text ends by character ``upto``; when stopped, cut the
        token that crosses ``upto`` and drop the rest."""
        released: list[Piece] = []
        position = self._emitted_chars
        while self._pending and not (self.stopped and position >= upto):
            piece, logprob = self._pending[0]
            if position + len(piece) > upto:
                if self.stopped and upto > position:
                    released.append((piece[:upto - position], logprob))
                    position = upto
                break
            released.append(self._pending.pop(0))
            position += len(piece)
        if self.stopped:
            self._pending.clear()
            self._text = self._text[:upto]
        self._emitted_chars = position
        return released
