"""`lmforge prepare`: clean documents, split them, tokenise in worker processes, write shards.

Output folder::

    meta.json               tokenizer hash, dtype, token/byte/document counts per split, cleaning counts
    tokenizer.json          copy of the tokenizer, so the folder is all `pretrain` needs
    train_0000.bin ...      flat uint16 (or uint32) token ids; every document ends with <|endoftext|>
    val_0000.bin ...

Shards are written as the documents stream through, so a corpus far larger than memory works.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from lmforge.data.corpus import CorpusStats, Document, corpus_inputs, read_clean_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.utils import atomic_dir, atomic_write_json, check_output_dir, refuse_overwriting_sources

META_FORMAT = "lmforge-tokens-v1"
SPLITS = ("train", "val")
# A lone document (say, one book piped on stdin) is cut into pieces of about this many
# characters at line breaks, so that it can still be split into train and validation.
SINGLE_DOCUMENT_PIECE_CHARS = 4096


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def validation_draw(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by the document's text and the seed: the split is order-free."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


# -- worker processes ---------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _tokenize_batch(texts: list[str], splits: list[int], dtype_str: str) -> list[tuple[np.ndarray, int, int]]:
    """Per split: (token ids with end-of-text after each document, n_documents, n_utf8_bytes)."""
    tok = _worker_tokenizer
    encoded = tok.encode_batch(texts)
    out = []
    for split in range(len(SPLITS)):
        ids = [e + [tok.eos_id] for e, s in zip(encoded, splits) if s == split]
        flat = np.fromiter((t for doc in ids for t in doc), dtype=dtype_str, count=sum(map(len, ids)))
        n_bytes = sum(len(t.encode("utf-8")) for t, s in zip(texts, splits) if s == split)
        out.append((flat, len(ids), n_bytes))
    return out


def _mp_context():
    """Fork where the platform has it: unlike spawn, it works from scripts without a
    ``__main__`` guard and from notebooks. The workers use only ``tokenizers`` and NumPy."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


class _InlineExecutor:
    """Runs the worker function in this process (``workers=0``), for debugging and tiny inputs."""

    def __init__(self, tokenizer_path: str):
        _init_worker(tokenizer_path)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, cancel_futures: bool = False):
        pass


# -- writing ------------------------------------------------------------------------------------


class ShardWriter:
    """Appends token arrays to ``{split}_NNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.documents = self.tokens = self.bytes = 0

    def write(self, tokens: np.ndarray, n_documents: int, n_bytes: int) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self.file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]
        self.tokens = sum(s["tokens"] for s in self.shards)
        self.documents += n_documents
        self.bytes += n_bytes

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


def _split_lone_document(docs: Iterator[Document]) -> Iterator[Document]:
    """Pass documents through; if there turns out to be exactly one, cut it into line-aligned pieces."""
    first = next(docs, None)
    if first is None:
        return
    second = next(docs, None)
    if second is not None:
        yield first
        yield second
        yield from docs
        return
    piece: list[str] = []
    size = 0
    for line in _short_lines(first.text):
        piece.append(line)
        size += len(line)
        if size >= SINGLE_DOCUMENT_PIECE_CHARS:
            yield Document("".join(piece), first.source)
            piece, size = [], 0
    if piece:
        yield Document("".join(piece), first.source)


def _short_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` (with their line breaks), a line longer than ``SINGLE_DOCUMENT_PIECE_CHARS`` cut after
    the last space before that length (anywhere where it has none): a text of one long line can be split too."""
    for line in text.splitlines(keepends=True):
        while len(line) > SINGLE_DOCUMENT_PIECE_CHARS:
            cut = line.rfind(" ", 0, SINGLE_DOCUMENT_PIECE_CHARS) + 1 or SINGLE_DOCUMENT_PIECE_CHARS
            yield line[:cut]
            line = line[cut:]
        yield line


def _assign_splits(docs: Iterator[Document], seed: int, val_fraction: float) -> Iterator[tuple[str, int]]:
    """(text, split) pairs: split 1 (validation) when the document's draw is below ``val_fraction``.

    The training document with the smallest draw is held back to the end, so that it can go to
    validation if no other document did: with ``val_fraction > 0`` and at least two documents the
    validation split is never empty.
    """
    held: tuple[float, str] | None = None
    any_val = False
    for doc in docs:
        draw = validation_draw(doc.text, seed)
        if draw < val_fraction:
            any_val = True
            yield doc.text, 1
        elif val_fraction > 0 and (held is None or draw < held[0]):
            if held is not None:
                yield held[1], 0
            held = (draw, doc.text)
        else:
            yield doc.text, 0
    if held is not None:
        yield held[1], 0 if any_val else 1


def _batches(pairs: Iterator[tuple[str, int]], max_chars: int = 1 << 21) -> Iterator[tuple[list[str], list[int]]]:
    """Group (text, split) pairs into batches of about ``max_chars`` characters for the workers."""
    texts: list[str] = []
    splits: list[int] = []
    size = 0
    for text, split in pairs:
        texts.append(text)
        splits.append(split)
        size += len(text)
        if size >= max_chars:
            yield texts, splits
            texts, splits, size = [], [], 0
    if texts:
        yield texts, splits


MAX_WORKERS = 1024  # tokenizer processes at most


def prepare(
    inputs: Sequence[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike = "tokenizer",
    out: str | os.PathLike = "data",
    val_fraction: float = 0.05,
    seed: int = 0,
    min_chars: int = 64,
    workers: int | None = None,
    text_field: str = "text",
    shard_tokens: int = 1 << 28,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Clean, split and tokenise ``inputs`` (default: the Python stdlib) into ``out``; returns the metadata."""
    from tqdm.auto import tqdm

    inputs = corpus_inputs(inputs)
    if not 0 <= val_fraction < 1:
        raise LmforgeError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1 or (workers is not None and workers < 0) or min_chars < 0:
        raise LmforgeError("--shard-tokens must be at least 1, and --workers and --min-chars 0 or more")
    if workers is not None and workers > MAX_WORKERS:  # (each a process; a C int in the executor)
        raise LmforgeError(f"--workers {workers} is too many processes: give at most {MAX_WORKERS} (this machine has "
                           f"{os.cpu_count() or 1} CPUs; the default uses them all)")
    if not -(2**63) <= seed < 2**63:  # (it keys the split's hash, which takes 64 bytes at most)
        raise LmforgeError(f"--seed {seed} is out of range: give a whole number from {-(2**63)} to {2**63 - 1}")
    out = check_output_dir(out, overwrite, ("a prepared-data folder", "meta.json"))
    refuse_overwriting_sources(out, tokenizer, *(i for i in inputs or [] if str(i) != "-"))  # ("-": stdin)
    tok = Tokenizer.load(tokenizer)
    if tok.eos_id is None:
        raise LmforgeError(f"tokenizer {tok.path} has no end-of-text token to separate documents; add <|endoftext|>")
    dtype = token_dtype(tok.vocab_size)
    workers = (os.cpu_count() or 1) if workers is None else workers

    stats = CorpusStats()
    with atomic_dir(out) as tmp:
        writers = [ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS]
        if workers > 0:
            executor = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                                           initargs=(str(tok.path),))
        else:
            executor = _InlineExecutor(str(tok.path))
        bar = None
        try:
            docs = _split_lone_document(read_clean_documents(inputs, text_field, min_chars, stats))
            pairs = _assign_splits(docs, seed, val_fraction)
            first = next(pairs, None)  # reads (and checks) the inputs before the progress bar appears
            if first is None:
                raise LmforgeError(
                    f"the corpus is empty after cleaning ({stats.summary()}); pass more text or lower --min-chars"
                )
            in_flight: deque = deque()
            bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)

            def drain_one():
                for writer, (tokens, n_docs, n_bytes) in zip(writers, in_flight.popleft().result()):
                    writer.write(tokens, n_docs, n_bytes)
                    bar.update(n_docs)

            for texts, splits in _batches(itertools.chain([first], pairs)):
                in_flight.append(executor.submit(_tokenize_batch, texts, splits, dtype.name))
                if len(in_flight) >= 2 * max(workers, 1):  # bound memory: keep only a few batches in flight
                    drain_one()
            while in_flight:
                drain_one()
        finally:
            if bar is not None:
                bar.close()
            executor.shutdown(cancel_futures=True)
            for w in writers:
                w.close()
        if writers[0].tokens == 0:
            if writers[1].documents == 1:  # no fraction can split one piece of text in two
                raise LmforgeError(
                    "the corpus is a single document too short to split into training and validation text; "
                    "add documents, or pass --val-fraction 0 to train on it all without a validation split")
            raise LmforgeError("every document went to validation; lower --val-fraction or add documents")
        tok.save(tmp)
        meta = {
            "format": META_FORMAT,
            "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "dtype": dtype.name,
            "inputs": [str(i) for i in inputs] if inputs else ["<python stdlib>"],
            "seed": seed,
            "val_fraction": val_fraction,
            "min_chars": min_chars,
            "text_field": text_field,
            "cleaning": stats.as_dict(),
            "splits": {split: w.summary() for split, w in zip(SPLITS, writers)},
        }
        atomic_write_json(tmp / "meta.json", meta)
    return meta
