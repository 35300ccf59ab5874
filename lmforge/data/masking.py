"""Corruptions the pretraining objectives learn to undo: masked LM (BERT), permutation LM's targets and
factorisation order (XLNet), span corruption (T5). Each is a function of tensors that a test can call.

Masked LM: which tokens a step predicts, and what the model sees in their place.

``mask_tokens`` is ``transformers.DataCollatorForLanguageModeling``'s masking with the same random
draws in the same order: given a generator in the same state it returns the same inputs and labels,
bit for bit. Of the tokens that may be chosen (not special, not padding), each is chosen with
probability ``mlm_probability`` (BERT: 15%); a chosen token becomes the mask token with probability
``mask_replace_prob`` (80%), else a random token with probability
``random_replace_prob / (1 - mask_replace_prob)`` (so 10% of all chosen), else stays itself (10%).
Labels are the original token at chosen positions and -100 (ignored) elsewhere.

Whole-word masking chooses words instead of tokens: a word is chosen with ``mlm_probability`` (the
draw at its first token) and all its tokens are then predicted, each replaced as above.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import LmforgeError


def mask_tokens(ids: torch.Tensor, no_mask: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                mlm_probability: float = 0.15, mask_replace_prob: float = 0.8, random_replace_prob: float = 0.1,
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels), both like ``ids`` (B, T). ``no_mask`` (B, T) bool: tokens never chosen (special
    tokens, padding). ``word_starts`` (B, T) bool turns on whole-word masking: True where a word begins."""
    if mask_id is None:  # (as transformers' collator refuses it: chosen tokens would have nothing to become)
        raise LmforgeError("the tokenizer has no mask token ([MASK] or <mask>), which masked-LM pretraining needs; "
                           "train one with `lmforge tokenizer train --encoder` (or use a BERT tokenizer)")
    ids = ids.clone()
    labels = ids.clone()
    probability = torch.full(ids.shape, mlm_probability).masked_fill_(no_mask, 0.0)
    chosen = torch.bernoulli(probability, generator=generator).bool()
    if word_starts is not None:
        chosen = spread_to_words(chosen & word_starts, word_starts) & ~no_mask
    labels[~chosen] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, mask_replace_prob), generator=generator).bool() & chosen
    ids[replaced] = mask_id
    if mask_replace_prob == 1 or random_replace_prob == 0:
        return ids, labels
    scaled = random_replace_prob / (1 - mask_replace_prob)
    randomised = torch.bernoulli(torch.full(ids.shape, scaled), generator=generator).bool() & chosen & ~replaced
    random_words = torch.randint(vocab_size, ids.shape, dtype=torch.long, generator=generator)
    ids[randomised] = random_words[randomised]
    return ids, labels


def spread_to_words(first_chosen: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """Every token of a word whose first token is chosen: (B, T) bool → (B, T) bool."""
    word = word_starts.long().cumsum(1)  # each token's word, numbered from 1 in its row (0: before the first)
    chosen_words = torch.zeros(word.size(0), (int(word.max()) if word.numel() else 0) + 1, dtype=torch.bool)
    rows = torch.arange(word.size(0))[:, None].expand_as(word)
    chosen_words[rows[first_chosen], word[first_chosen]] = True
    return chosen_words.gather(1, word)


def _high_byte_chars() -> set[str]:
    """The characters byte-level BPE (GPT-2's) writes for the bytes 0x80-0xFF, those of multi-byte UTF-8
    characters: its 256-character alphabet less the characters of the ASCII bytes."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ascii_chars = {c for b in range(128) for piece, _ in byte_level.pre_tokenize_str(chr(b)) for c in piece}
    return set(pre_tokenizers.ByteLevel.alphabet()) - ascii_chars


class WordStarts:
    """Where words begin in token ids, from the vocabulary's token strings. WordPiece (BERT) marks a
    word's later pieces with "##". Byte-level BPE marks a space before a token with "Ġ" (a newline or
    tab with "Ċ"/"ĉ"); a token then continues the word before it when neither carries such a mark and
    the previous token ends, and this one begins, with a letter or digit. Special tokens are words."""

    def __init__(self, tokenizer):
        vocab = tokenizer.hf.get_vocab_size(with_added_tokens=True)
        names = [tokenizer.hf.id_to_token(i) or "" for i in range(vocab)]
        special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values()}
        self.wordpiece = type(tokenizer.hf.model).__name__ == "WordPiece"
        self.continues = torch.tensor([n.startswith("##") for n in names])
        marked = torch.tensor([n[:1] in ("Ġ", "Ċ", "ĉ") or n in special or not n for n in names])
        # (a character that stands for a byte of a multi-byte UTF-8 character, "Ã" and "©" of "é", is part of a
        # word: a letter outside ASCII is split across such bytes, and tokens may cut it between them)
        high = _high_byte_chars()

        def wordy(c: str) -> bool:
            return c.isalnum() or c in high

        self.opens = marked | ~torch.tensor([wordy(n[:1]) for n in names])  # cannot continue a word
        # nothing continues a special token, or a token that ends in anything but a letter, digit or such a byte
        self.closes = torch.tensor([n in special or not wordy(n[-1:]) for n in names])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T) bool, True at the first token of each word."""
        if self.wordpiece:
            return ~self.continues[ids]
        starts = self.opens[ids].clone()
        starts[:, 1:] |= self.closes[ids[:, :-1]]
        starts[:, 0] = True
        return starts


class SentenceStarts:
    """Where sentences begin in a stream of token ids, from the vocabulary's token strings: after a token that
    holds a newline (byte-level BPE writes it "Ċ"), after one ending in ".", "!" or "?" when the next token
    begins a word with a space ("Ġ"; WordPiece keeps no spaces, so there any "." that is a token of its own
    ends a sentence), and after the end-of-text token (a new document)."""

    def __init__(self, tokenizer):
        vocab = tokenizer.hf.get_vocab_size(with_added_tokens=True)
        names = [tokenizer.hf.id_to_token(i) or "" for i in range(vocab)]
        wordpiece = type(tokenizer.hf.model).__name__ == "WordPiece"
        self.line = np.array([("Ċ" in n and not wordpiece) or i == tokenizer.eos_id for i, n in enumerate(names)])
        self.stop = np.array([n[-1:] in (".", "!", "?") for n in names])
        self.spaced = np.array([not n.startswith("##") if wordpiece else n[:1] in ("Ġ", "Ċ", "ĉ") for n in names])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Positions (ascending) in ``ids`` where a sentence begins, after its first token."""
        ids = np.asarray(ids)
        before, after = ids[:-1], ids[1:]
        return np.flatnonzero(self.line[before] | (self.stop[before] & self.spaced[after])) + 1


# -- permutation LM (XLNet) -------------------------------------------------------------------------


def plm_targets(shape: tuple[int, int], no_mask: torch.Tensor, plm_probability: float = 1 / 6,
                max_span_length: int = 5, generator: torch.Generator | None = None) -> torch.Tensor:
    """The tokens permutation LM predicts, (B, T) bool, by ``DataCollatorForPermutationLanguageModeling``'s
    spans with the same draws in the same order: along each row, a span of 1 to ``max_span_length`` tokens
    is placed at random inside a stretch of ``span / plm_probability`` tokens, stretch after stretch. Tokens
    in ``no_mask`` (special, padding) are never predicted."""
    rows, width = shape
    targets = torch.zeros(shape, dtype=torch.bool)
    for i in range(rows):
        position = 0
        while position < width:
            span = int(torch.randint(1, max_span_length + 1, (1,), generator=generator))
            stretch = int(span / plm_probability)
            start = position + int(torch.randint(stretch - span + 1, (1,), generator=generator))
            targets[i, start : start + span] = True
            position += stretch
    return targets & ~no_mask


def factorization_order(targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each token's place in a random factorisation order, (B, T) long; -1 for the tokens that are not
    predicted (context, which every token sees). The order is the collator's: positions split into two
    halves, pairs (i, i + T/2) shuffled together, so an order never runs from one half into the other
    before it has to (XLNet's choice for memory reuse; it needs T even)."""
    rows, width = targets.shape
    if width % 2:
        raise ValueError(f"permutation LM needs rows of an even length, not {width}")
    order = torch.empty(targets.shape, dtype=torch.long)
    for i in range(rows):
        index = torch.arange(width).reshape(-1, width // 2).transpose(0, 1)
        index = index[torch.randperm(width // 2, generator=generator)]
        order[i] = index.transpose(0, 1).flatten()
    return order.masked_fill(~targets, -1)


def plm_attention(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(content, query) attention masks (B, 1, T, T), True where a token may attend, from ``order``:

    query stream, which predicts: a token sees the context and the predicted tokens before it in the order,
    never its own content nor a later one's. Content stream: the same plus itself. Context tokens (-1) see
    only the context, so no predicted token's content reaches anyone through them."""
    seen = order[:, None, :]  # the key's place, broadcast over queries
    query = (seen == -1) | (seen < order[:, :, None])
    content = query | torch.eye(order.size(1), dtype=torch.bool, device=order.device)
    return content[:, None], query[:, None]


# -- span corruption (T5) ---------------------------------------------------------------------------


def span_lengths(tokens: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int, int]:
    """(noise tokens, noise spans, kept tokens) of a row of ``tokens``, as T5's reference rounds them: at least
    one noise token and one kept token, at least one span."""
    noise = min(max(int(round(tokens * noise_density)), 1), tokens - 1)
    spans = max(min(int(round(noise / mean_span_length)), tokens - noise), 1)  # (a span needs kept tokens before it)
    return noise, spans, tokens - noise


def span_input_lengths(tokens: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(encoder input length, decoder target length) once a row of ``tokens`` is corrupted: the kept tokens and
    one sentinel per span, the noise and one sentinel per span, each with the end-of-text token."""
    noise, spans, kept = span_lengths(tokens, noise_density, mean_span_length)
    return kept + spans + 1, noise + spans + 1


def span_raw_length(input_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> int:
    """The longest row of raw tokens whose corrupted input fits ``input_length`` (the reference's
    ``compute_input_and_target_lengths``), so that every row's input is exactly that long."""
    tokens = 2  # the shortest row that has a kept and a noise token
    while span_input_lengths(tokens + 1, noise_density, mean_span_length)[0] <= input_length:
        tokens += 1
    # The reference's "minor hack": at noise density 0.5, a token less where that makes the targets no longer than the
    # inputs (a round number, more likely), here only where the inputs stay ``input_length`` long.
    if (noise_density == 0.5 and span_input_lengths(tokens, noise_density, mean_span_length)[1] > input_length
            and span_input_lengths(tokens - 1, noise_density, mean_span_length)[0] == input_length):
        tokens -= 1
    return tokens


def _segments(items: int, segments: int, rng) -> list[int]:
    """``items`` cut at random into ``segments`` parts, each at least 1 long."""
    cuts = np.sort(rng.choice(np.arange(1, items), segments - 1, replace=False)) if segments > 1 else np.empty(0, int)
    return np.diff(np.concatenate([[0], cuts, [items]])).tolist()


def span_noise_mask(tokens: int, rng, noise_density: float = 0.15, mean_span_length: float = 3.0) -> np.ndarray:
    """(tokens,) bool, True on the noise: kept and noise spans alternate, starting with kept tokens and ending
    with noise, their lengths random with the exact totals of ``span_lengths``."""
    noise, spans, kept = span_lengths(tokens, noise_density, mean_span_length)
    mask = np.zeros(tokens, dtype=bool)
    position = 0
    for keep, drop in zip(_segments(kept, spans, rng), _segments(noise, spans, rng)):
        position += keep
        mask[position : position + drop] = True
        position += drop
    return mask


def corrupt_spans(ids: list[int], noise: np.ndarray, sentinel: int, eos: int) -> tuple[list[int], list[int]]:
    """(input, target): each noise span in the input replaced by a sentinel, ``sentinel``, ``sentinel - 1``, ...
    (<extra_id_0>, <extra_id_1>, ... counting down from the end of the vocabulary), and the target each
    sentinel followed by the span it stands for; both end with ``eos``."""
    source, target, k = [], [], 0
    for i, token in enumerate(ids):
        if not noise[i]:
            source.append(token)
        elif i == 0 or not noise[i - 1]:
            source.append(sentinel - k)
            target += [sentinel - k, token]
            k += 1
        else:
            target.append(token)
    return source + [eos], target + [eos]
