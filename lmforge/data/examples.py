"""Fine-tuning examples: JSONL (one object per line), CSV or Parquet, six formats told apart by their fields.

    chat            {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    instruction     {"prompt": ..., "completion": ...}
    classification  {"text": ..., "label": ...}   (label a string or an integer; "text_pair" optional)
    seq2seq         {"source": ..., "target": ...}   (an encoder-decoder: translation, summarisation)
    qa              {"question": ..., "context": ..., "answers": {"text": [...], "answer_start": [...]}}
    retrieval       {"query": ..., "positive": ...}   (a sentence encoder for search, in-batch negatives)

Other common layouts are read as one of these: ShareGPT's ``{"conversations": [{"from": "human"|"gpt"|"system",
"value": ...}]}`` and Alpaca's ``{"instruction", "input", "output"}`` as chat (the instruction, then the input
after a blank line, as the user's message), TRL's conversational ``{"prompt": [messages], "completion":
[messages]}`` as chat, and TRL's language-modelling ``{"text": ...}`` (no label) as an instruction with an
empty prompt: every token of the text is learned.

A malformed example is an error naming its line (or row) and what was expected; with
``skip_bad_lines`` it is counted and skipped instead. In CSV files, the nested fields
(``messages``, ``answers``) are JSON strings.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.corpus import json_type, read_text_file
from lmforge.errors import LmforgeError

FORMATS = {
    "chat": ("messages",),
    "instruction": ("prompt", "completion"),
    "classification": ("text", "label"),
    "qa": ("question", "context", "answers"),
    "seq2seq": ("source", "target"),
    "retrieval": ("query", "positive"),
    "tagging": ("tokens", "tags"),
}
EXPECTED = {
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "instruction": '{"prompt": "...", "completion": "..."}',
    "classification": '{"text": "...", "label": "positive"} (optionally "text_pair")',
    "qa": '{"question": "...", "context": "...", "answers": {"text": ["..."], "answer_start": [0]}}',
    "seq2seq": '{"source": "...", "target": "..."} (an encoder-decoder also takes prompt/completion)',
    "retrieval": '{"query": "...", "positive": "..."} (a passage that answers the query)',
    "tagging": '{"tokens": ["EU", "rejects", ...], "tags": ["B-ORG", "O", ...]} (one tag a word; or "ner_tags")',
}
ROLES = ("system", "user", "assistant")


@dataclass
class Examples:
    task: str
    rows: list[dict]
    path: str
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)


def detect_task(row: dict) -> str | None:
    for task, keys in FORMATS.items():
        if all(k in row for k in keys):
            return task
    return None


# Fields that hold text wherever a format (or a layout read as one) has them
_TEXT_FIELDS = ("text", "text_pair", "prompt", "completion", "source", "target", "query", "positive", "question",
                "context", "instruction", "input", "output")


def _not_text(row: dict, names=_TEXT_FIELDS) -> str | None:
    """The first of ``names`` that ``row`` has and that is not a string, said with what it is instead."""
    for name in names:
        if name in row and not isinstance(row[name], str):
            return f"{name!r} must be a string, not {json_type(row[name])}"
    return None


def messages_problem(messages, name: str = "messages") -> str | None:
    """What is wrong with a list of chat messages (None when it is fine): the message and the field named."""
    if not isinstance(messages, list) or not messages:
        return f"{name!r} must be a non-empty list of messages, not {json_type(messages)}"
    for i, m in enumerate(messages):
        where = f"message {i}" if name == "messages" else f"{name!r} message {i}"
        if not isinstance(m, dict):
            return (f"{where} must be an object {{\"role\": system|user|assistant, \"content\": string}}, not "
                    f"{json_type(m)}")
        if m.get("role") not in ROLES:
            return f"{where} has role {m.get('role')!r}; roles are system, user and assistant"
        if not isinstance(m.get("content"), str):
            return f"{where}'s 'content' must be a string, not {json_type(m.get('content'))}"
    return None


def _check(task: str, row: dict) -> str | None:
    """What is wrong with ``row`` for ``task`` (None when it is fine)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {json_type(row)}"
    missing = [k for k in FORMATS[task] if k not in row]
    if missing:  # (a text field of the wrong type was not read as its layout: say that, not the fields it lacks)
        return _not_text(row) or f"missing field {', '.join(map(repr, missing))}"
    if task == "chat":
        problem = messages_problem(row["messages"])
        if problem:
            return problem
        if not any(m["role"] == "assistant" for m in row["messages"]):
            return "a conversation needs at least one assistant message to learn from"
    elif task == "seq2seq":
        if problem := _not_text(row, ("source", "target")):
            return problem
        if not row["target"]:
            return "'target' is empty"
    elif task == "instruction":
        if problem := _not_text(row, ("prompt", "completion")):
            return problem
        if not row["completion"]:
            return "'completion' is empty"
    elif task == "retrieval":
        if problem := _not_text(row, ("query", "positive")):
            return problem
        if not row["query"].strip() or not row["positive"].strip():
            return "'query' and 'positive' must not be empty"
    elif task == "tagging":
        words, tags = row["tokens"], row["tags"]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            return "'tokens' must be a non-empty list of words (non-empty strings)"
        if not isinstance(tags, list) or len(tags) != len(words):
            return f"'tags' must be a list of one tag per word ({len(words)} words)"
        if any(isinstance(t, bool) or not isinstance(t, (str, int)) for t in tags):
            return "each tag must be a string or an integer"
    elif task == "classification":
        if problem := _not_text(row, ("text", "text_pair")):
            return problem
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            return f"'label' must be a string or an integer, not {json_type(label)}"
    else:
        if problem := _not_text(row, ("question", "context")):
            return problem
        answers = row["answers"]
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or \
                not isinstance(answers.get("answer_start"), list):
            return "'answers' must be {\"text\": [...], \"answer_start\": [...]}"
        if len(answers["text"]) != len(answers["answer_start"]) or not answers["text"]:
            return "'answers' needs as many answer_start values as texts, and at least one"
        for text, start in zip(answers["text"], answers["answer_start"]):
            if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                return "answer texts must be strings and answer_start integers"
            if row["context"][start : start + len(text)] != text:
                return f"answer {text!r} is not at character {start} of the context"
    return None


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "system": "system"}


def _common_layout(row, task: str) -> dict:
    """``row`` in one of FORMATS' layouts, when it is in another common one (see the module docstring)."""
    if not isinstance(row, dict) or any(k in row for k in ("messages", "label")):
        return row
    turns = row.get("conversations")
    if isinstance(turns, list) and all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        rest = {k: v for k, v in row.items() if k != "conversations"}
        return {**rest, "messages": [{"role": _SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]}
                                     for t in turns]}
    if isinstance(row.get("instruction"), str) and "output" in row and "prompt" not in row:
        extra = row.get("input")
        user = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
        return {**rest, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        return {**rest, "messages": row["prompt"] + row["completion"]}
    if task in ("auto", "instruction") and isinstance(row.get("text"), str) \
            and not any(k in row for k in ("text_pair", "prompt", "completion")):
        rest = {k: v for k, v in row.items() if k != "text"}
        return {**rest, "prompt": "", "completion": row["text"]}
    return row


def _parse_nested(row: dict) -> dict:
    """CSV cells are strings: the nested fields arrive as JSON text."""
    for key in ("messages", "answers", "tokens", "tags", "ner_tags", "conversations"):
        value = row.get(key)
        if isinstance(value, str) and value[:1] in "[{":
            try:
                row[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    if "label" in row and isinstance(row["label"], str) and row["label"].lstrip("-").isdigit():
        row["label"] = int(row["label"])
    return row


def _raw_rows(path: Path):
    """(line or row number, object or an error message) for every record of the file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, f"not valid JSON ({e.msg})"
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
        read = 0  # (lines read by the last whole record: the broken one starts on the next)
        try:
            reader.fieldnames  # noqa: B018 (reads the header line)
            read = reader.line_num
            for i, row in enumerate(reader, 2):  # 1: header
                read = reader.line_num
                yield i, _parse_nested({k: v for k, v in row.items() if k is not None and v != ""})
        except csv.Error as e:
            hint = " (a quoted field that is never closed?)" if "end of data" in str(e) else ""
            raise LmforgeError(f"{path}:{read + 1}: not readable as CSV: {e}{hint}") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a corrupt file
            raise LmforgeError(f"{path} is not a readable Parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, _parse_nested({k: v for k, v in row.items() if v is not None})
    else:
        raise LmforgeError(f"cannot read examples from {path}: use a .jsonl, .csv or .parquet file")


# Every field name a format above reads (and the common layouts _common_layout rewrites)
_KNOWN_FIELDS = {name for names in FORMATS.values() for name in names} | {
    "text_pair", "ner_tags", "conversations", "instruction", "input", "output", "chosen", "rejected", "answer"}


@functools.lru_cache(maxsize=256)
def _misspelled(fields: tuple[str, ...]) -> str | None:
    """A field that is no format's but close to one's that the row lacks ("lable" for "label"): read as it is, the
    row would fall into another format (text alone: language-model fine-tuning) without a word."""
    for name in fields:
        if name in _KNOWN_FIELDS:
            continue
        close = difflib.get_close_matches(name, sorted(_KNOWN_FIELDS - set(fields)), n=1, cutoff=0.8)
        if close:
            return f"field {name!r} is no format's field; did you mean {close[0]!r}?"
    return None


def read_examples(path: str | os.PathLike, task: str = "auto", skip_bad_lines: bool = False) -> Examples:
    """Read and check every example; ``task`` "auto" takes the format of the first valid record."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"examples file {path} " + ("is a folder: give the .jsonl, .csv or .parquet file in it"
                                                      if path.is_dir() else "does not exist"))
    where = "row" if path.suffix.lower() == ".parquet" else "line"
    out = Examples(task, [], str(path))
    for number, row in _raw_rows(path):
        problem = row if isinstance(row, str) else None
        if isinstance(row, dict) and detect_task(row) is None:  # (a row that fits no format as it is)
            problem = _misspelled(tuple(row))
        if isinstance(row, dict) and "ner_tags" in row and "tokens" in row and "tags" not in row:
            row["tags"] = row.pop("ner_tags")  # (the datasets library's CoNLL layout)
        row = _common_layout(row, out.task)
        if problem is None and out.task == "auto":
            out.task = detect_task(row) if isinstance(row, dict) else None
            if out.task is None:
                fields = ", ".join(map(repr, row)) if isinstance(row, dict) else json_type(row)
                problem = (isinstance(row, dict) and _not_text(row)) or \
                    f"fields {fields} match no format; expected one of: " + "; ".join(EXPECTED.values())
                out.task = "auto"
        if problem is None:
            problem = _check(out.task, row)
        if problem is None:
            out.rows.append(row)
            continue
        if not skip_bad_lines:
            expected = f"; expected {EXPECTED[out.task]}" if out.task in EXPECTED and "expected one of" not in problem else ""
            raise LmforgeError(f"{path}:{number}: {problem}{expected} (or pass --skip-bad-lines)" if where == "line"
                               else f"{path} {where} {number}: {problem}{expected} (or pass --skip-bad-lines)")
        out.skipped += 1
        out.skipped_lines.append(number)
    if not out.rows:
        raise LmforgeError(f"{path} holds no usable examples" + (f" ({out.skipped} skipped as malformed)" if out.skipped else ""))
    return out
