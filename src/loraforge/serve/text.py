"""Incremental detokenization with stop strings, for streaming.

Text is released only once it is final: a trailing partial UTF-8 character, or a tail that could be
the start of a stop string, is held back until the next tokens decide it.
"""

from __future__ import annotations


class TextStream:
    """The text of one request's output tokens, released piece by piece.

    ``push(token_ids)`` returns the newly final text and whether a stop string was hit; when it was,
    the text ends just before the stop string, which is never released.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        """All text released so far."""

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """``token_ids`` are all output tokens so far; returns (new final text, stopped)."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hit = self._first_stop(full)
        if hit is not None:
            return self._release(full[:hit]), True
        safe = len(full) - self._held_back(full)
        if full[:safe].endswith("\ufffd"):
            safe -= 1
        return self._release(full[:safe]), False

    def flush(self, token_ids: list[int]) -> str:
        """The rest of the text once generation has ended for another reason than a stop string."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hit = self._first_stop(full)
        return self._release(full if hit is None else full[:hit])

    def _release(self, final: str) -> str:
        new = final[len(self.text) :]
        self.text += new
        return new

    def _first_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest tail of ``full`` that begins some stop string."""
        for n in range(min(len(full), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(full[-n:]) for s in self.stop):
                return n
        return 0
