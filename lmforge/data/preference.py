"""Preference pairs: which of two answers to a prompt people preferred (JSONL, CSV or Parquet).

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       standard (strings)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}       conversational
    {"chosen": "...", "rejected": "..."}                                       implicit prompt (Anthropic
    {"chosen": [messages], "rejected": [messages]}                             HH): the text or messages
                                                                               both begin with
An optional ``margin`` (a number) says how much better the chosen answer is (reward models use it).
These are TRL's "preference" formats; a conversational pair is rendered through the model's chat
template.

Tokenising: the prompt's tokens are exactly what `lmforge generate` / `chat` feed the model, and the
answer's tokens are those the model would produce after them, ending with the end-of-turn (chat) or
end-of-text token, so the model learns to stop. Where byte-level BPE would merge a token across the
prompt/answer boundary (a prompt ending in a space), the answer is tokenised on its own instead (as text
that follows other text: without the word-start "▁" a SentencePiece tokenizer puts before a text), since
the model at inference time continues from the prompt's own tokens. Text a chat template adds after
the end-of-turn token (a newline) is not part of the answer: generation stops before it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.corpus import json_type
from lmforge.data.examples import _raw_rows, messages_problem
from lmforge.errors import LmforgeError

EXPECTED = ('{"prompt": "...", "chosen": "...", "rejected": "..."} (strings, or lists of '
            '{"role", "content"} messages; optionally "margin")')


@dataclass
class Pairs:
    rows: list[dict]
    path: str
    task: str = "preference"
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # each kept row's line (or row) number in the file, where known


def _messages_problem(value, name: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"{name!r} must be a string or a non-empty list of messages, not {json_type(value)}"
    return messages_problem(value, name)


def split_implicit_prompt(row: dict) -> dict:
    """A pair without ``prompt``: what both answers begin with (characters of strings, or messages) becomes the
    prompt, split as TRL's ``extract_prompt`` splits it: at the first difference, a space just before it left to
    the answers; where one answer begins with the whole other, the last shared item stays in the answers. Answers
    that differ from their first item get an empty prompt (TRL's split would then go wrong, taking the whole
    chosen answer but its last character as the prompt when that character is a space)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen or not rejected or chosen[0] != rejected[0]:
        return {**row, "prompt": chosen[:0]}
    # (TRL's loop, line for line)
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {**row, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def check_pair(row) -> str | None:
    """What is wrong with a preference row (None when it is fine); fills in an implicit prompt."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {json_type(row)}"
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        return f"missing field {', '.join(map(repr, missing))}"
    for name in ("prompt", "chosen", "rejected"):  # (a value of neither kind is named as what it is)
        if name in row and not isinstance(row[name], (str, list)):
            return f"{name!r} must be a string or a list of messages, not {json_type(row[name])}"
    conversational = isinstance(row["chosen"], list)
    if "prompt" not in row:
        if not conversational:
            for name in ("chosen", "rejected"):
                if not isinstance(row[name], str):
                    return "'chosen' and 'rejected' must both be strings or both be message lists"
                if not row[name].strip():
                    return f"{name!r} is empty"
            if row["chosen"] == row["rejected"]:
                return "'chosen' and 'rejected' are the same answer, so there is no preference to learn"
            # the text both begin with is the prompt (none: each answer is scored, or learned, on its own)
            row.update(split_implicit_prompt(row))
            for name in ("chosen", "rejected"):
                if not row[name].strip():
                    return (f"{name!r} adds only white space to the text it shares with the other answer (the implicit "
                            f"prompt); add a 'prompt' field")
        else:
            for name in ("chosen", "rejected"):
                if (problem := _messages_problem(row[name], name)) is not None:
                    return problem
            if row["chosen"] == row["rejected"]:
                return "'chosen' and 'rejected' are the same answer, so there is no preference to learn"
            row.update(split_implicit_prompt(row))
            if not row["prompt"]:
                return "'chosen' and 'rejected' share no leading messages, so there is no prompt; add a 'prompt' field"
    kinds = {name: isinstance(row[name], str) for name in ("prompt", "chosen", "rejected")}
    if len(set(kinds.values())) > 1:
        return "'prompt', 'chosen' and 'rejected' must all be strings or all be message lists"
    if not kinds["chosen"]:
        for name in ("prompt", "chosen", "rejected"):
            if name == "prompt" and row[name] == []:
                return "'prompt' is an empty message list"
            if (problem := _messages_problem(row[name], name)) is not None:
                return problem
        for name in ("chosen", "rejected"):
            if not any(m["role"] == "assistant" for m in row[name]):
                return f"{name!r} needs an assistant message"
            if not "".join(m["content"] for m in row[name]).strip():
                return f"{name!r} is empty"
    else:
        for name in ("chosen", "rejected"):
            if not row[name].strip():
                return f"{name!r} is empty"
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are the same answer, so there is no preference to learn"
    margin = row.get("margin", 0.0)
    if isinstance(margin, str):
        try:
            margin = float(margin)
        except ValueError:
            return f"'margin' must be a number, not {margin!r}"
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return f"'margin' must be a finite number, not {json_type(margin) if margin is None else repr(margin)}"
    row["margin"] = float(margin)
    return None


def read_pairs(path: str | os.PathLike, skip_bad_lines: bool = False) -> Pairs:
    """Read and check every preference pair; a bad one stops with file:line, or is counted and skipped."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"preference file {path} " + ("is a folder: give the .jsonl, .csv or .parquet file in it"
                                                      if path.is_dir() else "does not exist"))
    where = "line" if path.suffix.lower() != ".parquet" else "row"
    out = Pairs([], str(path))
    for number, row in _raw_rows(path):
        if isinstance(row, dict):
            row = _parse_nested_pair(row)
        problem = row if isinstance(row, str) else check_pair(row)
        if problem is None:
            out.rows.append(row)
            continue
        if not skip_bad_lines:
            place = f"{path}:{number}" if where == "line" else f"{path} row {number}"
            raise LmforgeError(f"{place}: {problem}; expected {EXPECTED} (or pass --skip-bad-lines)")
        out.skipped += 1
        out.skipped_lines.append(number)
    if not out.rows:
        raise LmforgeError(f"{path} holds no usable preference pairs"
                           + (f" ({out.skipped} skipped as malformed)" if out.skipped else ""))
    return out


def _parse_nested_pair(row: dict) -> dict:
    """CSV cells are text: message lists arrive as JSON strings."""
    import json

    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, str) and value.startswith("[{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, list):
                row[key] = parsed
    return row


# -- tokens ---------------------------------------------------------------------------------------


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0


@dataclass
class TokenizeStats:
    truncated: int = 0  # prompts cut from the left to fit max_length
    dropped: int = 0  # pairs left out (too long with truncation "drop", or no room for an answer)
    boundary: int = 0  # answers tokenised on their own because BPE merged across the prompt boundary
    diverged: int = 0  # chat pairs whose template renders the prompt alone otherwise than before an answer

    def summary(self, max_length: int) -> str | None:
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} prompt(s) cut from the left to fit {max_length} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} pair(s) longer than {max_length} tokens dropped")
        if self.boundary:
            parts.append(f"{self.boundary} answer(s) tokenised apart from their prompt, where a token would have "
                         f"spanned the boundary (end prompts on a word boundary to avoid it)")
        if self.diverged:
            parts.append(f"{self.diverged} chat pair(s) whose template renders the prompt alone otherwise than before "
                         f"an answer (a thinking block, say): the answers start where the two part, as TRL's do, and "
                         f"the model learns from a prompt that differs from the one it is given at inference")
        return "; ".join(parts) or None


def _answer_ids(tokenizer, prompt_text: str, prompt_ids: list[int], answer_text: str, stats: TokenizeStats,
                chat: bool) -> list[int]:
    full = (tokenizer.encode if chat else tokenizer.encode_prompt)(prompt_text + answer_text)
    if full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    stats.boundary += 1
    return _continuation_ids(tokenizer, answer_text)


def _continuation_ids(tokenizer, text: str) -> list[int]:
    """``text``'s tokens as they follow other text: tokenised after a newline whose tokens are then dropped (a
    SentencePiece tokenizer, Llama 2's or Mistral's, starts a text of its own with a word-start "▁": a space the
    answer lacks, "Hello " + "world" learned as "Hello  world")."""
    newline = tokenizer.encode("\n")
    ids = tokenizer.encode("\n" + text)
    return ids[len(newline):] if ids[: len(newline)] == newline else tokenizer.encode(text)


def _chat_answer_text(tokenizer, prompt: list[dict], prompt_text: str, answer: list[dict]) -> str | None:
    """The text the template writes for ``answer`` after ``prompt_text``; None where it does not render the prompt as
    a prefix of the conversation with its answer."""
    text = tokenizer.apply_chat_template(prompt + answer)
    if not text.startswith(prompt_text):
        return None
    return text[len(prompt_text):].rstrip()  # what follows the end-of-turn token is not generated


def _diverging_chat(tokenizer, prompt: list[dict], answers: list, prompt_ids: list[int],
                    end: int | None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each answer's ids) of a chat prompt whose template renders it alone otherwise than before an
    answer (Qwen3's or DeepSeek-R1's thinking blocks): as TRL's DPOTrainer splits such pairs, the prompt is what the
    prompt alone and every conversation begin with, token for token, and each answer the rest, up to its end of
    turn."""
    fulls = [tokenizer.encode(tokenizer.apply_chat_template(prompt + answer)) for answer in answers]
    common = min(next((i for i, (a, b) in enumerate(zip(prompt_ids, f)) if a != b), min(len(prompt_ids), len(f)))
                 for f in fulls)
    out = []
    for full in fulls:
        answer = full[common:]
        if end is not None and end in answer:  # (what the template writes after the end of turn is not generated)
            answer = answer[: len(answer) - answer[::-1].index(end)]
        out.append(answer if end is None or answer[-1:] == [end] else answer + [end])
    return prompt_ids[:common], out


def encode_prompt(tokenizer, prompt) -> tuple[str, list[int], int | None]:
    """(rendered text, token ids, the token that ends an answer) of a prompt: a string, or messages
    rendered through the chat template with the assistant's header appended, as `lmforge chat` does."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        end = tokenizer.end_of_turn_id if tokenizer.end_of_turn_id is not None else tokenizer.eos_id
        ids = tokenizer.encode(text)
    else:  # (as generate encodes a plain prompt: with the tokenizer's leading special tokens, Llama's <s>)
        text, end = prompt, tokenizer.eos_id
        ids = tokenizer.encode_prompt(text)
    if not ids and tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id]  # an empty prompt: the answer is predicted from <|endoftext|>, as generate does
    return text, ids, end


def encode_answers(tokenizer, prompt, answers: list, stats: TokenizeStats) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each answer's after them, ending with the end-of-turn (chat) or end-of-text token.
    A chat template that renders the prompt alone otherwise than before an answer: split as ``_diverging_chat``."""
    prompt_text, prompt_ids, end = encode_prompt(tokenizer, prompt)
    chat = isinstance(prompt, list)
    texts = [_chat_answer_text(tokenizer, prompt, prompt_text, answer) if chat else answer for answer in answers]
    if None in texts:
        stats.diverged += 1
        return _diverging_chat(tokenizer, prompt, answers, prompt_ids, end)
    return prompt_ids, [_ended(tokenizer, _answer_ids(tokenizer, prompt_text, prompt_ids, text, stats, chat), end, chat)
                        for text in texts]


def _ended(tokenizer, ids: list[int], end: int | None, chat: bool) -> list[int]:
    """``ids`` ending with ``end`` (end-of-turn or end-of-text), unless the template ended the turn itself."""
    if chat and ids and ids[-1] in tokenizer.special_ids:
        return ids  # the template ended the turn with its own special token (<|im_end|>, <|eot_id|>, </s>)
    return ids if end is None or (ids and ids[-1] == end) else ids + [end]


def tokenize_pair(tokenizer, row: dict, stats: TokenizeStats) -> TokenizedPair:
    """The prompt's and both answers' token ids (answers end with the end-of-turn or end-of-text token)."""
    prompt_ids, (chosen, rejected) = encode_answers(tokenizer, row["prompt"], [row["chosen"], row["rejected"]], stats)
    return TokenizedPair(prompt_ids, chosen, rejected, float(row.get("margin", 0.0)))


def fit_pair(pair: TokenizedPair, max_length: int, truncation: str, stats: TokenizeStats) -> TokenizedPair | None:
    """The pair within ``max_length`` tokens (prompt + the longer answer): the prompt cut from the left
    (``truncation`` "left", keeping at least one prompt token), or None (``drop``, or no room left)."""
    longest = max(len(pair.chosen), len(pair.rejected))
    excess = len(pair.prompt) + longest - max_length
    if excess <= 0:
        return pair
    if truncation == "drop" or excess >= len(pair.prompt):
        stats.dropped += 1
        return None
    stats.truncated += 1
    return TokenizedPair(pair.prompt[excess:], pair.chosen, pair.rejected, pair.margin)


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, truncation: str = "left"
                   ) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats()
    out = []
    for row in rows:
        pair = fit_pair(tokenize_pair(tokenizer, row, stats), max_length, truncation, stats)
        if pair is not None:
            out.append(pair)
    return out, stats
