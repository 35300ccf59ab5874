"""Streamed text: token ids in, text out as soon as it is decided.

A streamed answer must add up to the answer: the pieces, joined, are ``tokenizer.decode(ids)`` (cut
before the first stop string), character for character, whatever the ids are.
"""

from __future__ import annotations

import re

# SentencePiece-style byte-fallback tokens ("<0xE4>"): a run of them is decoded as one UTF-8 sequence,
# and a run that is not valid UTF-8 becomes one U+FFFD per byte, so text already decoded from the run
# ("&" from <0x26>) can still turn into U+FFFD until a token that is not a byte closes the run.
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Detokenizer:
    """Decodes a growing list of token ids and hands out the text that can no longer change.

    Three things are held back. A tail of U+FFFD: the last tokens end inside a multi-byte character
    (byte-level BPE) that the next token may complete. An open run of byte-fallback tokens (Llama's
    ``<0xE4>``), decoded as a whole once it ends. And the last ``len(longest stop) - 1`` characters,
    which could still begin a stop string (at least 5 where the tokenizer cleans decoded text up: " n '"
    may yet become "n't"). ``finish()`` releases everything, an unfinished character as
    the U+FFFD that ``decode`` writes for it.
    """

    # Decoding all the ids again at every token costs time in proportion to their number (0.42 ms at 4,096 ids
    # of a GPT-2 tokenizer, 21 us at 32): every SETTLE ids, the text so far is kept as settled, and from then on
    # only the ids after it are decoded again, with CONTEXT ids before them whose text is cut off again (so that
    # what a decoder does at the start of a text, such as SentencePiece's dropped leading space, falls on ids
    # already decoded). Text is settled only where it is final: no trailing U+FFFD, no open run of byte tokens.
    SETTLE = 64
    CONTEXT = 4

    def __init__(self, tokenizer, stops: list[str], lazy: bool = False, skip_special: bool = False):
        """``lazy``: nobody reads the text before the end and there are no stop strings to find: ``add`` only
        keeps the ids (``text`` stays empty) and ``finish`` decodes them once, handing out the whole text.
        ``skip_special``: special tokens add no text (as ``decode(ids, skip_special_tokens=True)``, which drops
        them before decoding)."""
        self.tokenizer = tokenizer
        self.skipped = set(getattr(tokenizer, "special_ids", ())) if skip_special else set()
        self.lazy = lazy and not any(stops)
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        if getattr(tokenizer, "cleans_up", False):  # "do n '" may yet become "don't": 5 characters may change
            self.hold = max(self.hold, 5)
        self.ids: list[int] = []
        self.text = ""  # decode(ids), cut before a stop string once one is reached
        self.emitted = 0  # characters of text handed out so far
        self.stopped = False
        self._token_name = getattr(getattr(tokenizer, "hf", None), "id_to_token", None)
        self._settled = 0  # ids[:_settled] decode to _settled_text, the start of the text of all the ids
        self._settled_text = ""
        self._overlap = ""  # decode(ids[_settled - CONTEXT : _settled])
        self._windowed = True  # False once a decoder proves not to decode a window as the whole does

    def add(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string was reached; the text then ends before it)."""
        if token in self.skipped:
            return self._stop_at_special(token)
        self.ids.append(token)
        if self.lazy:
            return "", False
        self.text = self._decode()
        if self._token_name is not None and BYTE_TOKEN.fullmatch(self._token_name(token) or ""):
            return "", False  # the run of byte tokens is still open: nothing new is decided
        # Otherwise decoding is stable but for trailing U+FFFD: the next bytes may make them a character.
        decided = self.text.rstrip("\ufffd")
        if self._windowed and len(self.ids) - self._settled >= self.SETTLE and len(decided) == len(self.text):
            self._settled, self._settled_text = len(self.ids), self.text
            self._overlap = self.tokenizer.decode(self.ids[max(0, self._settled - self.CONTEXT):])
        return self._advance(decided, len(decided) - self.hold)

    def _stop_at_special(self, token: int) -> tuple[str, bool]:
        """A special token left out of the text still ends it where a stop string ends in its text ("<|im_end|>",
        "\n</s>"), as it would with the token written: the text then ends before the stop string."""
        name = self._token_name(token) if self._token_name is not None else None
        if not self.stops or not name:
            return "", False
        joined = self.text + name
        hits = [i for i in (joined.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0]
        if not hits:
            return "", False
        self.text, self.stopped = self.text[: min(min(hits), len(self.text))], True
        piece = self.text[self.emitted :]
        self.emitted += len(piece)
        return piece, True

    def _decode(self) -> str:
        """decode(ids): the settled text, then the ids after it decoded with their CONTEXT ids before them."""
        if self._settled:
            window = self.tokenizer.decode(self.ids[max(0, self._settled - self.CONTEXT):])
            if window.startswith(self._overlap):
                return self._settled_text + window[len(self._overlap):]
            self._windowed, self._settled = False, 0  # (not seen with byte-level BPE, SentencePiece, WordPiece)
        return self.tokenizer.decode(self.ids)

    def finish(self) -> str:
        """Everything still held back (the sequence ended): text is then exactly what decode gives."""
        if self.stopped:
            return ""
        if self.lazy:
            self.text = self.tokenizer.decode(self.ids)
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
