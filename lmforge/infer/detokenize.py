"""Streamed text: token ids in, text out as soon as it is decided.

A streamed answer must add up to the answer: the pieces, joined, are ``tokenizer.decode(ids)`` (cut
before the first stop string), character for character, whatever the ids are.
"""

from __future__ import annotations

import re

# SentencePiece-style byte-fallback tokens ("<0xE4>"): a run of them is decoded as one UTF-8 sequence,
# and a run that is not valid UTF-8 becomes one U+FFFD per byte, so text already decoded from the run
# ("&" from <0x26>) can still turn into U+FFFD until a token that is not a byte closes the run.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Detokenizer:
    """Decodes a growing list of token ids and hands out the text that can no longer change.

    Three things are held back. A tail of U+FFFD: the last tokens end inside a multi-byte character
    (byte-level BPE) that the next token may complete. An open run of byte-fallback tokens (Llama's
    ``<0xE4>``), decoded as a whole once it ends. And the last ``len(longest stop) - 1`` characters,
    which could still begin a stop string. ``finish()`` releases everything, an unfinished character as
    the U+FFFD that ``decode`` writes for it.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decode(ids), cut before a stop string once one is reached
        self.emitted = 0  # characters of text handed out so far
        self.stopped = False
        self._token_name = getattr(getattr(tokenizer, "hf", None), "id_to_token", None)

    def add(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string was reached; the text then ends before it)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        if self._token_name is not None and _BYTE_TOKEN.fullmatch(self._token_name(token) or ""):
            return "", False  # the run of byte tokens is still open: nothing new is decided
        # Otherwise decoding is stable but for trailing U+FFFD: the next bytes may make them a character.
        decided = self.text.rstrip("\ufffd")
        return self._advance(decided, len(decided) - self.hold)

    def finish(self) -> str:
        """Everything still held back (the sequence ended): text is then exactly what decode gives."""
        if self.stopped:
            return ""
        return self._advance(self.text, len(self.text))[0]

    def _advance(self, decided: str, safe: int) -> tuple[str, bool]:
        # A stop string that ends in new text starts at most `hold` characters before what was handed out.
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (decided.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = decided[: min(hits)], True
            safe = len(self.text)
        piece = self.text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(piece)
        return piece, self.stopped
