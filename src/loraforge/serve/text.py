"""Incremental detokenization with stop strings, for streaming.

Each new token costs O(1) decoding work, whatever the length of the output: only a short window of
the latest tokens is decoded. Text is released only once it is final: a trailing partial UTF-8
character, or a tail that could be the start of a stop string, is held back until later tokens
decide it.
"""

from __future__ import annotations

MAX_HELD_TOKENS = 16
"""Tokens past the last complete cut after which the decoding window is cut short (see ``IncrementalDecoder``)."""


class IncrementalDecoder:
    """The text of a growing list of token ids, piece by piece; the pieces join to ``tokenizer.decode``
    of all ids (special tokens skipped, no clean-up of spaces).

    Each ``push`` decodes a window ``ids[prefix:]`` and subtracts the text of ``ids[prefix:read]``, which
    is already released: starting the window a few tokens early keeps tokenizers that drop a leading
    space at the start of a decode (SentencePiece) from dropping it between pieces. When the window ends
    in an incomplete character (U+FFFD, a UTF-8 sequence split over tokens), the text before it is
    released and the window stays open. Once ``MAX_HELD_TOKENS`` tokens are open, the window moves up to
    its last token boundary with complete text, so its length stays bounded whatever comes; only if there
    is none (a long run of undecodable bytes) is the text released as it is, U+FFFD included.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        """Start of the decoding window."""
        self.read = 0
        """The text of ``ids[:read]`` is released; ``ids[prefix:read]`` only give the window its context."""
        self.sent = 0
        """Characters released past the text of ``ids[prefix:read]`` (the complete part of an open window)."""

    def push(self, token_ids: list[int]) -> str:
        """Add ``token_ids``; returns the newly final text."""
        self.ids += token_ids
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text, an incomplete last character included (as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        window = self._decode(self.ids[self.prefix :])
        done = len(self._decode(self.ids[self.prefix : self.read])) + self.sent
        if final or not window.endswith("\ufffd"):
            self.prefix, self.read, self.sent = self.read, len(self.ids), 0
            return window[done:]
        new = window[done : max(done, len(window.rstrip("\ufffd")))]
        self.sent += len(new)
        if len(self.ids) - self.read > MAX_HELD_TOKENS:
            new += self._cut(window, done + len(new))
        return new

    def _cut(self, window: str, released: int) -> str:
        """Move the window up to its last token boundary whose text is complete; if there is none, release
        the rest of ``window`` (of which ``released`` characters are out) and start afresh after it."""
        for cut in range(len(self.ids) - 1, self.read, -1):
            text = self._decode(self.ids[self.prefix : cut])
            if not text.endswith("\ufffd"):
                self.prefix, self.read, self.sent = self.read, cut, released - len(text)
                return ""
        self.prefix, self.read, self.sent = self.read, len(self.ids), 0
        return window[released:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """The text of one request's output tokens with stop strings, released piece by piece.

    ``push(token_ids)`` takes the new tokens and returns the newly final text and whether a stop string
    was hit; when it was, the text ends just before the stop string, which is never released.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.held = ""
        """Decoded text not released yet because it may begin a stop string."""

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        return self._release(self.held + self.decoder.push(token_ids), final=False)

    def flush(self) -> tuple[str, bool]:
        """The rest of the text once generation has ended; and whether it holds a stop string."""
        return self._release(self.held + self.decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> tuple[str, bool]:
        # Released text never ends with the start of a stop string, so a stop string can only begin in
        # ``text``: searching it alone is enough.
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0 if final else self._held_back(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        for n in range(min(len(text), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
