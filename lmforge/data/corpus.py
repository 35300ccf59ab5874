"""Read documents from files, folders or stdin, and clean them.

A document is one ``.txt``/``.md``/``.py`` file, one JSONL line (its ``text`` field), one Parquet
row, or all of standard input. With no input, the corpus is the Python standard library of the
running interpreter: about 12 MB of real code and prose that every machine running lmforge has.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.utils import first_line

TEXT_SUFFIXES = {".txt", ".md", ".py"}
SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
# Folders of the standard library left out of the default corpus.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# C0 and C1 control characters except tab and newline (carriage returns become newlines first).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line" or "<stdin>"


@dataclass
class CorpusStats:
    """What reading and cleaning saw and dropped; printed by `prepare` and saved in its metadata."""

    files: int = 0
    skipped_files: int = 0  # files in folders with a suffix lmforge does not read
    documents: int = 0
    non_utf8_bytes: int = 0  # undecodable bytes, each replaced by U+FFFD
    non_utf8_files: dict[str, int] = field(default_factory=dict)  # those bytes by file
    control_chars_removed: int = 0
    dropped_duplicates: int = 0
    dropped_short: int = 0
    null_texts: int = 0  # JSONL/Parquet rows whose text is null (a missing value): skipped
    kept: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        nulls = f", skipped {self.null_texts} rows whose text is null" if self.null_texts else ""
        return (
            f"{self.documents} documents from {self.files} files: kept {self.kept}, "
            f"dropped {self.dropped_duplicates} exact duplicates and {self.dropped_short} too short{nulls}; "
            f"removed {self.control_chars_removed} control characters; "
            f"replaced {self.non_utf8_bytes} non-UTF-8 bytes"
        )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """The ``.py`` files of the running Python's standard library, test folders excluded."""
    files = []
    for folder, dirs, names in os.walk(stdlib_root()):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return files


_undecodable = [0]  # bytes replaced by the handler below since the last reset


def _count_and_replace(err: UnicodeDecodeError):
    _undecodable[0] += err.end - err.start
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("lmforge-count-replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(UTF-8 text of ``data``, number of undecodable bytes, each replaced by U+FFFD). A byte-order mark at the
    start (Windows editors write one) is dropped: it is no text, and a JSON line that starts with it is refused."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _undecodable[0] = 0
        text = data.decode("utf-8", errors="lmforge-count-replace")
        return text, _undecodable[0]


def warn_non_utf8(n_bytes: int, where: str = "") -> None:
    """The one warning every reader of text gives for bytes that were not UTF-8."""
    if n_bytes:
        from lmforge.utils import warn

        warn(f"{where + ': ' if where else ''}{n_bytes} bytes were not valid UTF-8 and were replaced by U+FFFD")


def warn_non_utf8_files(by_file: dict[str, int]) -> None:
    """``warn_non_utf8`` for a corpus: the files the bytes were in, named (the first three, and how many more)."""
    if not by_file:
        return
    if len(by_file) == 1:
        (path, n_bytes), = by_file.items()
        warn_non_utf8(n_bytes, path)
        return
    from lmforge.utils import warn

    shown = [f"{path} ({n})" for path, n in list(by_file.items())[:3]]
    more = f" and {len(by_file) - 3} more files" if len(by_file) > 3 else ""
    warn(f"{sum(by_file.values())} bytes were not valid UTF-8 and were replaced by U+FFFD, in {len(by_file)} files: "
         f"{', '.join(shown)}{more}")


def json_type(value) -> str:
    """What a value read from JSON (or a CSV/Parquet cell) is, for messages: "a number (5)", "null", "a list"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "bytes" if isinstance(value, bytes) else f"a {type(value).__name__}"


def read_text_file(path: str | os.PathLike) -> str:
    """A text file as UTF-8, undecodable bytes replaced by U+FFFD and counted in one warning (as `prepare`
    and `tokenizer train` do for a corpus): every command reads text the same way."""
    text, bad = decode_utf8(Path(path).read_bytes())
    warn_non_utf8(bad, str(path))
    return text


def jsonl_objects(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a line that is not a JSON object is an
    error naming ``path:line``."""
    rows = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LmforgeError(f"{path}:{lineno}: each line must be a JSON object")
        rows.append((lineno, row))
    return rows


def text_from_os(value: str, where: str) -> str:
    """Text from the command line, the terminal or stdin read as ``str``: bytes that were not UTF-8 arrive as
    lone surrogates (Python's surrogateescape), which no tokenizer takes. They become U+FFFD, counted in the
    one warning every reader gives."""
    if not any("\ud800" <= c <= "\udfff" for c in value):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that stand for no byte
        raw = value.encode("utf-8", "replace")
    text, bad = decode_utf8(raw)
    warn_non_utf8(bad, where)
    return text


def read_stdin_text() -> str:
    text, bad = decode_utf8(sys.stdin.buffer.read())
    warn_non_utf8(bad, "<stdin>")
    return text


def _decode(data: bytes, stats: CorpusStats, source: str) -> str:
    """UTF-8 text of ``data``; undecodable bytes become U+FFFD and are counted in ``stats``, by ``source`` file."""
    text, bad = decode_utf8(data)
    if bad:
        stats.non_utf8_bytes += bad
        stats.non_utf8_files[source] = stats.non_utf8_files.get(source, 0) + bad
    return text


def _expand(inputs: Sequence[str | os.PathLike], stats: CorpusStats) -> Iterator[Path | str]:
    for item in inputs:
        if str(item) == "-":
            yield "-"
            continue
        path = Path(item)
        if not path.exists():
            raise LmforgeError(f"input {path} does not exist; pass files or folders of {_suffix_list()}, or - for stdin")
        if path.is_dir():
            found, skipped = False, []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    p = Path(folder) / name
                    if p.suffix.lower() in SUFFIXES:
                        found = True
                        yield p
                    else:
                        skipped.append(p)
            if not found:
                raise LmforgeError(f"folder {path} holds no {_suffix_list()} files")
            stats.skipped_files += len(skipped)
            _warn_skipped(path, skipped)
        elif path.suffix.lower() in SUFFIXES:
            yield path
        else:
            raise LmforgeError(f"cannot read {path}: unsupported file type {path.suffix or '(none)'}; use {_suffix_list()}")


def _warn_skipped(folder: Path, skipped: list[Path]) -> None:
    """One warning naming the files of ``folder`` left out for their suffix (the first three, and how many more):
    text in a ``.csv`` or ``.rst`` file is not read, and the user is told so."""
    if not skipped:
        return
    from lmforge.utils import warn

    shown = ", ".join(str(p.relative_to(folder)) for p in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warn(f"{folder}: skipped {len(skipped)} file(s) that are not {_suffix_list()}: {shown}{more}")


def _suffix_list() -> str:
    return ", ".join(sorted(SUFFIXES))


def corpus_inputs(inputs) -> list[str | os.PathLike] | None:
    """The inputs of ``prepare`` and ``train_tokenizer``, as a list: one file or folder alone is a list of one;
    None means the standard library; an empty list (a pattern that matched nothing) is an error, never the
    standard library by default."""
    if inputs is None:
        return None
    if isinstance(inputs, (str, os.PathLike)):
        return [inputs]
    inputs = list(inputs)
    if not inputs:
        raise LmforgeError("no inputs given (an empty list): give files or folders of text, or leave the inputs out "
                           "for the Python standard library")
    bad = [i for i in inputs if not isinstance(i, (str, os.PathLike))]
    if bad:
        raise LmforgeError(f"inputs are file or folder paths, not {type(bad[0]).__name__} {bad[0]!r}")
    return inputs


def read_documents(
    inputs: Sequence[str | os.PathLike] | None, text_field: str = "text", stats: CorpusStats | None = None
) -> Iterator[Document]:
    """Yield raw documents from ``inputs`` (default: the standard library)."""
    stats = stats if stats is not None else CorpusStats()
    # List every file first, so a bad path fails before any work starts.
    sources = list(_expand(inputs, stats)) if inputs else default_corpus_files()
    for src in sources:
        stats.files += 1
        if src == "-":
            yield Document(_decode(sys.stdin.buffer.read(), stats, "<stdin>"), "<stdin>")
            continue
        try:
            if src.suffix.lower() == ".jsonl":
                yield from _read_jsonl(src, text_field, stats)
            elif src.suffix.lower() == ".parquet":
                yield from _read_parquet(src, text_field, stats)
            else:
                yield Document(_decode(src.read_bytes(), stats, str(src)), str(src))
        except PermissionError:
            raise LmforgeError(f"cannot read {src}: permission denied") from None
        except IsADirectoryError:
            raise LmforgeError(f"cannot read {src}: it is a folder") from None


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, stats, str(path)).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmforgeError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object with a {text_field!r} string"
                ) from None
            if not isinstance(row, dict):
                raise LmforgeError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} string, got "
                                   f"{json_type(row)}")
            if text_field not in row:
                fields = ", ".join(map(repr, row))
                raise LmforgeError(
                    f"{path}:{lineno}: expected a {text_field!r} string field, found {fields or 'no fields'}; "
                    f"pass --text-field to name the field that holds the text"
                )
            value = row[text_field]
            if value is None:  # a missing value, as a Parquet null: skipped and counted
                stats.null_texts += 1
                continue
            if not isinstance(value, str):
                raise LmforgeError(f"{path}:{lineno}: field {text_field!r} is {json_type(value)}, not a string; the "
                                   f"text to train on must be a string (or pass --text-field to name another field)")
            yield Document(value, f"{path}:{lineno}")


def _read_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a corrupt file
        raise LmforgeError(f"{path} is not a readable Parquet file ({first_line(e)})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise LmforgeError(
            f"{path} has no column {text_field!r} (columns: {', '.join(columns)}); pass --text-field to choose one"
        )
    kind = pf.schema_arrow.field(text_field).type
    if pa.types.is_dictionary(kind):  # (a categorical column: its values are what it holds)
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        # (each value's Python repr would be tokenized as if it were the text)
        raise LmforgeError(f"{path}: column {text_field!r} holds {kind} values, not text (strings); pass --text-field "
                           f"to name the column of text (columns: {', '.join(columns)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:  # a missing value: skipped and counted
                stats.null_texts += 1
                continue
            yield Document(value, f"{path}:{row}")


def clean_text(text: str) -> tuple[str, int]:
    """Normalise newlines, apply Unicode NFC, drop control characters; returns (text, n_removed)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text, removed = _CONTROL.subn("", text)
    return text, removed


def read_clean_documents(
    inputs: Sequence[str | os.PathLike] | None,
    text_field: str = "text",
    min_chars: int = 64,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Documents after cleaning, exact de-duplication (by hash) and the minimum-length filter."""
    stats = stats if stats is not None else CorpusStats()
    seen: set[bytes] = set()
    for doc in read_documents(inputs, text_field, stats):
        stats.documents += 1
        text, removed = clean_text(doc.text)
        stats.control_chars_removed += removed
        if len(text.strip()) < min_chars:
            stats.dropped_short += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats.dropped_duplicates += 1
            continue
        seen.add(digest)
        stats.kept += 1
        yield Document(text, doc.source)
