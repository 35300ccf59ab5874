"""A knowledge base to answer from: documents cut into passages, embedded by an encoder, searched by meaning
(inner product of normalised vectors), by words (BM25, from bm25s) or by both (reciprocal-rank fusion).

    INDEX/manifest.json        format, the encoder (folder, SHA-256 of its weights), passage settings, each
                               source file's SHA-256 with its passages' range (re-indexing embeds only what changed),
                               and the SHA-256 of each file below (a file damaged or edited since is refused)
    INDEX/passages.jsonl       one passage a line: text, source ("file:line"), and for FAQ rows the answer
    INDEX/vectors.safetensors  "vectors": (passages, width) float32, L2-normalised
    INDEX/bm25/                the BM25 index of the same passages
    INDEX/ann.faiss            with --ann: an approximate (HNSW, from FAISS) index of the vectors, for collections
                               too large to search exactly at interactive speed

Documents: ``.txt`` and ``.md`` files (cut into passages of ``passage_tokens`` encoder tokens, ``overlap``
tokens shared between neighbours), and ``.jsonl`` files whose rows are FAQ pairs ``{"question", "answer"}``
(one passage each, the question and its answer) or ``{"text"}`` (cut like a file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.utils import (atomic_dir, atomic_write_json, refuse_file_on_path, refuse_overwriting_sources, sha256_file,
                           warn)

FORMAT = "lmforge-index-v1"
SUFFIXES = (".txt", ".md", ".jsonl")
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al., 2009): score = sum over lists of 1 / (k + rank)
BM25_TOKENS = r"(?u)\b\w+\b"  # every word, single letters and digits too: product codes and error numbers


@dataclass
class Passage:
    text: str
    source: str  # file:line where the passage starts
    answer: str | None = None  # an FAQ row's answer (the text holds its question and answer)

    def to_dict(self) -> dict:
        return {"text": self.text, "source": self.source, **({"answer": self.answer} if self.answer else {})}


@dataclass
class Hit:
    score: float
    passage: Passage
    rank: int = 0
    scores: dict = field(default_factory=dict)  # each method's score (hybrid)


# -- reading documents --------------------------------------------------------------------------------


def document_files(paths: list[str | os.PathLike], skip: Path | None = None) -> list[Path]:
    """The files to index: the files named, and the .txt/.md/.jsonl files under the folders named (sorted), but
    none under ``skip`` (the index itself, when it is kept among its documents)."""
    files: list[Path] = []
    skip = skip.resolve() if skip is not None else None
    others: set[Path] = set()  # other indexes kept among the documents: their passages.jsonl is no document
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise LmforgeError(f"{path} does not exist; give files or folders of .txt, .md or .jsonl documents")
        if path.is_dir() and skip is not None and path.resolve() == skip:
            raise LmforgeError(f"--out {path} is the documents' own folder: an index is a folder of its own; give "
                               f"another --out (it may lie inside the documents' folder)")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and not (skip is not None and skip in p.resolve().parents))
            indexes = {m.parent.resolve() for m in path.rglob("manifest.json") if _is_index(m)}
            others |= {i for i in indexes if i != skip}
            files += [p for p in found if not any(i in p.resolve().parents for i in indexes)]
        elif path.suffix.lower() in SUFFIXES:
            files.append(path)
        else:
            raise LmforgeError(f"{path}: documents are .txt, .md or .jsonl files (FAQ rows {{\"question\", \"answer\"}} "
                               f"or {{\"text\"}})")
    if others:
        warn(f"left out {len(others)} other index folder(s) among the documents: {', '.join(sorted(map(str, others))[:3])}")
    if not files:
        raise LmforgeError(f"no .txt, .md or .jsonl documents in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(files))


def _is_index(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def split_passages(text: str, tokenizer, size: int, overlap: int, source: str, first_line: int | None = 1) -> list[Passage]:
    """Windows of ``size`` tokens of ``text``, each starting ``size - overlap`` tokens after the last, as
    spans of the original text (cut at token boundaries, so nothing is re-detokenised). Each is sourced
    ``source:line``, the line it starts on counted from ``first_line``; with ``first_line`` None, ``source``
    as given (a JSONL row: its text's line breaks are not the file's)."""
    offsets = tokenizer.hf.encode(text, add_special_tokens=False).offsets
    if not offsets:
        return []
    out, step = [], max(1, size - overlap)
    for first in range(0, len(offsets), step):
        last = min(first + size, len(offsets)) - 1
        start, end = offsets[first][0], offsets[last][1]
        piece = text[start:end].strip()
        if piece:
            where = source if first_line is None else f"{source}:{first_line + text.count(chr(10), 0, start)}"
            out.append(Passage(piece, where))
        if last == len(offsets) - 1:
            break
    return out


def read_passages(path: Path, tokenizer, size: int, overlap: int, name: str) -> list[Passage]:
    """The passages of one document file (``name``: how sources call it)."""
    from lmforge.data.corpus import jsonl_objects, read_text_file

    if path.suffix.lower() != ".jsonl":
        return split_passages(read_text_file(path), tokenizer, size, overlap, name)
    passages = []
    for lineno, row in jsonl_objects(path):
        if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
            question, answer = row["question"].strip(), row["answer"].strip()
            if question and answer:
                passages.append(Passage(f"{question}\n{answer}", f"{name}:{lineno}", answer))
                continue
        if isinstance(row.get("text"), str):
            passages += split_passages(row["text"], tokenizer, size, overlap, f"{name}:{lineno}", None)
            continue
        raise LmforgeError(f"{path}:{lineno} has neither a non-empty \"question\" and \"answer\" nor a \"text\" "
                           f"field (it has {', '.join(map(repr, row)) or 'none'})")
    return passages


# -- building an index -----------------------------------------------------------------------------------


def load_encoder(model_dir: str | os.PathLike, device="cpu", what: str = "an index embeds"):
    """An encoder and its tokenizer, for ``what`` (said when the folder holds another kind of model)."""
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.encoder import Encoder

    model = load_model(model_dir, device)
    if not isinstance(model, Encoder):
        raise LmforgeError(f"{model_dir} is not an encoder; {what} with an encoder (bert) model folder such as "
                           f"all-MiniLM-L6-v2")
    return model, load_tokenizer_for(model)


def encoder_fingerprint(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the encoder's weight files: an index is only searched with the encoder that made it."""
    from hashlib import sha256

    from lmforge.model.checkpoint import resolve_model_dir
    from lmforge.model.hf import weight_files

    digest = sha256()
    for path in weight_files(resolve_model_dir(model_dir)):
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _embed(model, tokenizer, texts: list[str], max_length: int | None, progress: bool, dtype: str = "float32",
           batch_size: int = 32):
    """Vectors of ``texts``; ``dtype`` "bfloat16" runs the encoder's matrix products in bf16 autocast (the
    weights and the pooling stay fp32)."""
    from contextlib import nullcontext

    from lmforge.model.encoder import embed

    device = model.wte.weight.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    with autocast:
        return embed(model, tokenizer, texts, max_length=max_length, batch_size=batch_size, progress=progress).cpu()


def embedding_precision(encoder, requested: str):
    """The precision an index embeds in: ``requested``, or for "auto" bf16 autocast where this machine's
    matrix products of the encoder's shape are measured faster in it (``precision.choose_autocast``)."""
    from lmforge.precision import choose_autocast

    if requested not in ("auto", "float32", "bfloat16"):
        raise LmforgeError(f"--dtype {requested}: expected auto, float32 or bfloat16")
    c = encoder.config
    return choose_autocast(encoder.wte.weight.device, requested, c.n_embd, c.mlp_hidden, 32 * 128)


def _max_length(model) -> int:
    """The tokens the encoder reads: its declared max_seq_length (sentence-transformers'), within its positions."""
    from lmforge.model.encoder import declared_max_length

    return min(declared_max_length(model.source) or model.config.block_size, model.config.block_size)


ANN_NEIGHBOURS = 32  # HNSW's M: links per vector (FAISS's default for IndexHNSWFlat is 32 too)
ANN_SEARCH_DEPTH = 128  # HNSW's efSearch floor


def _faiss():
    try:
        import faiss
    except ImportError:
        raise LmforgeError("--ann needs FAISS: pip install 'lmforge[ann]' (or faiss-cpu)") from None
    return faiss


def build_ann(vectors: torch.Tensor, path: Path) -> None:
    """An HNSW graph over the (normalised) vectors, by inner product, written to ``path``."""
    faiss = _faiss()
    graph = faiss.IndexHNSWFlat(vectors.size(1), ANN_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 200
    graph.add(vectors.float().numpy())
    faiss.write_index(graph, str(path))


def build_index(paths: list[str | os.PathLike], model: str | os.PathLike, out: str | os.PathLike, *,
                passage_tokens: int = 200, overlap: int = 40, ann: bool = False, progress: bool = True,
                dtype: str = "auto", device: str = "cpu") -> dict:
    """Index the documents under ``paths`` with the encoder folder ``model`` into the folder ``out``.

    When ``out`` is an index made with the same encoder, passage settings and precision, the passages of
    files whose contents did not change keep their vectors; only new and changed files are embedded.
    ``dtype``: the precision of the passages' matrix products ("auto": bf16 autocast where measured faster
    here; queries are embedded in fp32). The encoder runs on ``device`` ("auto": CUDA when present). Returns
    counts and the precision's one-line reason.
    """
    import bm25s
    from safetensors.torch import save_file

    if ann:
        _faiss()  # before any work: a missing library is said at once
    if passage_tokens < 8 or not 0 <= overlap < passage_tokens:
        raise LmforgeError("--passage-tokens must be at least 8 and --overlap in [0, passage-tokens)")
    out = Path(out)
    refuse_file_on_path(out)  # (a file at --out or above it: said now, not after the embedding)
    files = document_files(paths, skip=out)
    previous = {}  # an index already there is built again, keeping what did not change; anything else is refused
    if out.exists() and any(out.iterdir()):
        previous = _previous_manifest(out)
        refuse_overwriting_sources(out, model, *files)  # (the index is replaced whole)
    from lmforge.utils import pick_device

    encoder, tokenizer = load_encoder(model, pick_device(device))
    reads = _max_length(encoder) - 2  # (less [CLS] and [SEP])
    if passage_tokens > reads:
        raise LmforgeError(f"--passage-tokens {passage_tokens} is more than the encoder reads ({reads} tokens of text): "
                           f"dense search would never see the rest of each passage; pass --passage-tokens {reads} or "
                           f"fewer")
    precision = embedding_precision(encoder, dtype)
    fingerprint = encoder_fingerprint(model)
    settings = {"passage_tokens": passage_tokens, "overlap": overlap}
    reusable = (previous and previous.get("encoder_sha256") == fingerprint and previous.get("passages") == settings
                and previous.get("dtype", "float32") == precision.dtype)
    old_passages, old_vectors = [], None
    if reusable:  # (only what passes every check is reused: a damaged index is embedded again whole)
        try:
            old_passages, old_vectors = _stored(out, previous)
        except DamagedIndex as e:
            warn(f"the index at {out} is damaged ({e.problem}): building it again from scratch")
            reusable = False
    common = os.path.commonpath([str(f.resolve().parent) for f in files])
    passages: list[Passage] = []
    vectors: list[torch.Tensor | None] = []
    entries, reused, to_embed = {}, 0, []
    for path in files:
        name = str(path.resolve().relative_to(common)) if len(files) > 1 else path.name
        digest = sha256_file(path)
        before = (previous.get("files") or {}).get(name) if reusable else None
        start = len(passages)
        if before and before["sha256"] == digest:
            kept = old_passages[before["first"] : before["first"] + before["count"]]
            passages += kept
            vectors += list(old_vectors[before["first"] : before["first"] + before["count"]])
            reused += len(kept)
        else:
            new = read_passages(path, tokenizer, passage_tokens, overlap, name)
            to_embed += range(len(passages), len(passages) + len(new))
            passages += new
            vectors += [None] * len(new)
        entries[name] = {"sha256": digest, "first": start, "count": len(passages) - start}
    if not passages:
        raise LmforgeError(f"the documents in {', '.join(map(str, paths))} hold no text to index")
    long = [passages[i].source for i in to_embed if len(tokenizer.encode(passages[i].text)) > reads]
    if long:  # (an FAQ row is one passage whatever its length)
        warn(f"{len(long)} passage(s) longer than the {reads} tokens of text the encoder reads ({', '.join(long[:3])}"
             f"{' ...' if len(long) > 3 else ''}): dense search sees their start only (keyword search reads them all)")
    fresh = _embed(encoder, tokenizer, [passages[i].text for i in to_embed], _max_length(encoder), progress,
                   precision.dtype)
    for i, vector in zip(to_embed, fresh):
        vectors[i] = vector
    gone = sorted(set(previous.get("files") if isinstance(previous.get("files"), dict) else {}) - set(entries))
    if gone:  # (the index holds what it was given this time: files not given again leave it)
        warn(f"{len(gone)} file(s) of the earlier index at {out} are not among the documents given now, and leave it: "
             f"{', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''} (give them too to keep them)")
    matrix = torch.stack(vectors).contiguous()
    with atomic_dir(out) as tmp:
        save_file({"vectors": matrix}, tmp / "vectors.safetensors")
        (tmp / "passages.jsonl").write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in passages),
                                            encoding="utf-8")
        lexical = bm25s.BM25()
        lexical.index(_bm25_tokens([p.text for p in passages]), show_progress=False)
        lexical.save(str(tmp / "bm25"))
        if ann:
            build_ann(matrix, tmp / "ann.faiss")
        written = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        checksums = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in written}
        stats = {f.relative_to(tmp).as_posix(): _file_stat(f) for f in written}  # (moving the folder keeps them)
        atomic_write_json(tmp / "manifest.json", {
            "format": FORMAT, "encoder": str(Path(model).resolve()), "encoder_sha256": fingerprint,
            "passages": settings, "dtype": precision.dtype, "count": len(passages), "dim": matrix.size(1), "files": entries,
            **({"ann": {"kind": "hnsw", "neighbours": ANN_NEIGHBOURS}} if ann else {}), "sha256": checksums,
            "stat": stats,
        })
    return {"out": str(out), "files": len(files), "passages": len(passages), "embedded": len(to_embed), "reused": reused,
            "precision": precision.reason}


# -- reading an index back ---------------------------------------------------------------------------------

INDEX_FILES = ("manifest.json", "passages.jsonl", "vectors.safetensors", "bm25", "ann.faiss")


class DamagedIndex(LmforgeError):
    """A file of an index folder missing, unreadable, or out of step with the others (``problem`` says which)."""

    def __init__(self, folder: Path, problem: str, encoder: str | None = None):
        self.folder, self.problem = folder, problem
        super().__init__(f"{folder} is damaged: {problem}; build it again with `lmforge index DOCUMENTS --model "
                         f"{encoder or 'ENCODER'} --out {folder}` (it rebuilds a damaged index)")


def _read_manifest(folder: Path) -> dict:
    """The manifest of an index folder, its fields checked (format aside: an object of another format is no index
    of ours, for the caller to refuse)."""
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedIndex(folder, "manifest.json is missing") from None
    except (OSError, ValueError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise DamagedIndex(folder, f"manifest.json is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict):
        raise DamagedIndex(folder, f"manifest.json holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        return manifest
    encoder = manifest.get("encoder") if isinstance(manifest.get("encoder"), str) else None
    wrong = [key for key, ok in (
        ("encoder", encoder is not None), ("encoder_sha256", isinstance(manifest.get("encoder_sha256"), str)),
        ("count", _whole(manifest.get("count", 0))), ("dim", _whole(manifest.get("dim", 1)) and manifest.get("dim") != 0),
        ("files", isinstance(manifest.get("files", {}), dict)),
        ("sha256", isinstance(manifest.get("sha256", {}), dict)
         and all(isinstance(v, str) for v in manifest.get("sha256", {}).values())),
        ("ann", isinstance(manifest.get("ann", {}), dict))) if not ok]
    if wrong:
        raise DamagedIndex(folder, f"manifest.json has no valid {', '.join(wrong)}", encoder)
    return manifest


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _previous_manifest(out: Path) -> dict:
    """The manifest of the index at ``out`` (a folder, not empty), to build it again keeping what did not change;
    one that keeps nothing when the manifest is damaged but the folder holds only an index's files (it is built again
    whole); refused when ``out`` is anything else (replacing it would lose what it holds)."""
    only_index_files = all(p.name in INDEX_FILES for p in out.iterdir())
    if not (out / "manifest.json").is_file():
        lost = " (it has no manifest.json: if it is an index that lost its manifest, delete the folder and index " \
               "again)" if only_index_files else ""
        raise LmforgeError(f"--out {out} exists and is not an lmforge index; choose another --out{lost}")
    try:
        previous = _read_manifest(out)
    except DamagedIndex as e:
        if not only_index_files:
            raise LmforgeError(f"--out {out} has a damaged manifest.json ({e.problem}) and files an index does not "
                               f"hold, which building it again would delete: choose another --out") from None
        warn(f"the index at {out} is damaged ({e.problem}): building it again from scratch")
        return {"format": FORMAT}
    if previous.get("format") != FORMAT:
        raise LmforgeError(f"--out {out} exists and is not an lmforge index; choose another --out")
    return previous


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _check_sha256(folder: Path, manifest: dict, names: list[str]) -> None:
    """Each file of ``names`` as it was written (an index from before the manifest kept SHA-256s: not checked). A
    file whose size and modification time are those it was written with is not read again (opening a large
    index hashed every file each time: 3x slower); one copied or edited since is."""
    recorded = manifest.get("sha256")
    if recorded is None:
        return
    stats = manifest.get("stat") if isinstance(manifest.get("stat"), dict) else {}
    for name in names:
        if name not in recorded:
            raise DamagedIndex(folder, f"manifest.json has no SHA-256 of {name}", manifest["encoder"])
        try:
            if stats.get(name) == _file_stat(folder / name):
                continue
        except OSError:
            pass  # (said below, where the file is read)
        try:
            digest = sha256_file(folder / name)
        except FileNotFoundError:
            raise DamagedIndex(folder, f"{name} is missing", manifest["encoder"]) from None
        except OSError as e:
            raise DamagedIndex(folder, f"{name} cannot be read ({e.strerror})", manifest["encoder"]) from None
        if digest != recorded[name]:
            raise DamagedIndex(folder, f"{name} changed since the index was built (its SHA-256 is not the one "
                                       f"manifest.json records)", manifest["encoder"])


def _stored(folder: Path, manifest: dict) -> tuple[list[Passage], torch.Tensor]:
    """The passages and (float32) vectors of an index folder, checked against each other and the manifest (the
    counts, the width, unit length, each source file's range, the SHA-256s): what search and re-indexing rely on."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def damaged(problem: str) -> DamagedIndex:
        return DamagedIndex(folder, problem, manifest["encoder"])

    passages = []
    try:
        lines = (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise damaged("passages.jsonl is missing") from None
    except (OSError, ValueError) as e:
        raise damaged(f"passages.jsonl cannot be read ({str(e).splitlines()[0]})") from None
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise damaged(f"passages.jsonl line {lineno} is not JSON") from None
        if not (isinstance(row, dict) and {"text", "source"} <= set(row) <= {"text", "source", "answer"}
                and all(isinstance(v, str) for v in row.values())):
            raise damaged(f"passages.jsonl line {lineno} is not a passage {{\"text\", \"source\"[, \"answer\"]}}")
        passages.append(Passage(**row))
    try:
        vectors = load_file(folder / "vectors.safetensors")["vectors"]
    except FileNotFoundError:
        raise damaged("vectors.safetensors is missing") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise damaged(f"vectors.safetensors cannot be read ({str(e).splitlines()[0]})") from None
    except KeyError:
        raise damaged("vectors.safetensors holds no \"vectors\"") from None
    if vectors.dim() != 2 or not vectors.is_floating_point():
        raise damaged(f"vectors.safetensors holds a {tuple(vectors.shape)} {vectors.dtype} tensor, not a matrix of "
                      f"floats")
    vectors = vectors.float()
    if vectors.size(0) != len(passages):
        raise damaged(f"passages.jsonl holds {len(passages)} passages, vectors.safetensors {vectors.size(0)} vectors")
    if manifest.get("count", len(passages)) != len(passages):
        raise damaged(f"manifest.json counts {manifest['count']} passages, passages.jsonl holds {len(passages)}")
    if manifest.get("dim", vectors.size(1)) != vectors.size(1):
        raise damaged(f"vectors.safetensors holds vectors of width {vectors.size(1)}, manifest.json says "
                      f"{manifest['dim']}")
    if len(passages) and not ((vectors.norm(dim=1) - 1).abs() < 1e-3).all():  # (NaN fails too)
        raise damaged("vectors.safetensors holds vectors that are not of unit length (overwritten?)")
    first = 0  # each source file's passages, in order, one range after another, covering them all
    for name, entry in manifest.get("files", {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and entry.get("first") == first
                and _whole(entry.get("count")) and first + entry["count"] <= len(passages)):
            raise damaged(f"manifest.json's range of {name} does not follow the ranges before it within the "
                          f"{len(passages)} passages")
        stray = next((i for i in range(first, first + entry["count"]) if not passages[i].source.startswith(name + ":")),
                     None)
        if stray is not None:
            raise damaged(f"passages.jsonl line {stray + 1} is not from {name}, as manifest.json says")
        first += entry["count"]
    if "files" in manifest and first != len(passages):
        raise damaged(f"manifest.json's files cover {first} passages, passages.jsonl holds {len(passages)}")
    _check_sha256(folder, manifest, ["passages.jsonl", "vectors.safetensors"])
    return passages, vectors


def _bm25_tokens(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, lower=True, token_pattern=BM25_TOKENS, stopwords="en", show_progress=False)


# -- searching -------------------------------------------------------------------------------------------


class Index:
    """An index folder, opened for searching. ``search(query, k, mode)``: ``dense`` (the encoder), ``bm25``
    (words) or ``hybrid`` (both, fused by reciprocal rank)."""

    MODES = ("dense", "bm25", "hybrid")

    def __init__(self, folder: str | os.PathLike, device="cpu", exact: bool = False):
        """``exact``: search every vector even when the index has an approximate (``--ann``) graph. Every file is
        checked when the index is opened (not at the first question): a damaged one is a ``DamagedIndex``."""
        self.folder = Path(folder)
        if not (self.folder / "manifest.json").exists():
            raise LmforgeError(f"{self.folder} is not an index (no manifest.json); build one with `lmforge index`")
        self.manifest = _read_manifest(self.folder)
        if self.manifest.get("format") != FORMAT:
            raise LmforgeError(f"{self.folder}/manifest.json is not an lmforge index")
        passages, vectors = _stored(self.folder, self.manifest)
        self.passages, self.vectors = passages, vectors.to(device)
        self._check_bm25()  # (keyword search's files, loaded at its first query)
        self.device = device
        self._encoder = None
        self._bm25 = None
        self.ann = None
        if self.manifest.get("ann") and not exact:
            try:
                import faiss
            except ImportError:
                raise LmforgeError(f"{self.folder} has an approximate graph (built with --ann): install FAISS (pip "
                                   f"install 'lmforge[ann]') or search it exactly (search --exact)") from None
            self.ann = self._read_ann(faiss)

    def _damaged(self, problem: str) -> DamagedIndex:
        return DamagedIndex(self.folder, problem, self.manifest["encoder"])

    def _check_bm25(self) -> None:
        folder = self.folder / "bm25"
        try:
            params = json.loads((folder / "params.index.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise self._damaged("bm25/ (keyword search's index) is missing its files") from None
        except (OSError, ValueError) as e:
            raise self._damaged(f"bm25/params.index.json is not JSON ({str(e).splitlines()[0]})") from None
        covers = params.get("num_docs") if isinstance(params, dict) else None
        if covers != len(self.passages):
            raise self._damaged(f"bm25/ covers {covers} passages, the index {len(self.passages)}")
        _check_sha256(self.folder, self.manifest, [n for n in self.manifest.get("sha256", {}) if n.startswith("bm25/")])

    def _read_ann(self, faiss):
        path = self.folder / "ann.faiss"
        if not path.is_file():
            raise self._damaged("ann.faiss (its --ann graph) is missing")
        try:
            graph = faiss.read_index(str(path))
        except RuntimeError:  # (FAISS says a truncated or overwritten file this way, in a C++ message)
            raise self._damaged("ann.faiss is not a FAISS index (truncated or overwritten?)") from None
        if not hasattr(graph, "hnsw") or graph.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise self._damaged("ann.faiss is not an HNSW graph by inner product")
        if graph.ntotal != len(self.passages) or graph.d != self.vectors.size(1):
            raise self._damaged(f"ann.faiss covers {graph.ntotal} vectors of width {graph.d}, the index "
                                f"{len(self.passages)} of width {self.vectors.size(1)}")
        if self.manifest.get("sha256") is not None:  # (as written, so its vectors are the index's)
            _check_sha256(self.folder, self.manifest, ["ann.faiss"])
            return graph
        for start in range(0, graph.ntotal, 65536):  # (an older index: its copy of the vectors compared, in blocks)
            block = torch.from_numpy(graph.reconstruct_n(start, min(65536, graph.ntotal - start)))
            if not torch.equal(block, self.vectors[start : start + len(block)].cpu()):
                raise self._damaged("ann.faiss holds other vectors than vectors.safetensors")
        return graph

    def encoder(self):
        if self._encoder is None:
            folder = self.manifest["encoder"]
            if not Path(folder).exists():
                raise LmforgeError(f"the index's encoder {folder} is gone; index again with an encoder that exists")
            if encoder_fingerprint(folder) != self.manifest["encoder_sha256"]:
                raise LmforgeError(f"the encoder {folder} changed since {self.folder} was built; its vectors no longer "
                                   f"match: run `lmforge index` again")
            model, tokenizer = load_encoder(folder, self.device)
            if model.config.n_embd != self.vectors.size(1):
                raise self._damaged(f"vectors.safetensors holds vectors of width {self.vectors.size(1)}, its encoder "
                                    f"makes {model.config.n_embd}")
            self._encoder = model, tokenizer
        return self._encoder

    def embed_queries(self, queries: list[str]) -> torch.Tensor:
        model, tokenizer = self.encoder()
        reads = _max_length(model)
        longest = max((len(tokenizer.encode(q, add_special_tokens=True)) for q in queries), default=0)
        if longest > reads:
            warn(f"a query of {longest} tokens is longer than the encoder reads ({reads}): dense search sees its "
                 f"first {reads} (keyword search reads it all)")
        # (fp32 whatever the passages' precision: one short query gains nothing from bf16 autocast, which
        # measured 3 ms slower a query here, and the two agree within 3e-5 cosine)
        return _embed(model, tokenizer, queries, _max_length(model), False).to(self.vectors.device)

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        return self.nearest(self.embed_queries([query])[0], k)

    def nearest(self, vector: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The ``k`` passages of largest inner product with ``vector``: exact, or by the HNSW graph (``--ann``)."""
        k = min(k, len(self.passages))
        if self.ann is not None:
            # candidates kept while walking the graph: recall against time (bench/RESULTS.md measures both)
            self.ann.hnsw.efSearch = max(ANN_SEARCH_DEPTH, 4 * k)
            scores, ids = self.ann.search(vector.float().cpu().numpy()[None], k)
            return [(int(i), float(v)) for i, v in zip(ids[0], scores[0]) if i >= 0]
        top = torch.topk(self.vectors @ vector, k)
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        import bm25s

        if self._bm25 is None:
            try:
                lexical = bm25s.BM25.load(str(self.folder / "bm25"))
                data, indices, indptr = (lexical.scores[key] for key in ("data", "indices", "indptr"))
                fits = (lexical.scores["num_docs"] == len(self.passages) and len(data) == len(indices) == indptr[-1]
                        and (len(indices) == 0 or 0 <= indices.min() <= indices.max() < len(self.passages)))
            except Exception as e:  # (bm25s reading a damaged file fails in many ways, none of them ours)
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise self._damaged(f"bm25/ cannot be read ({why})") from None
            if not fits:
                raise self._damaged("bm25/ does not match the index's passages")
            self._bm25 = lexical
        tokens = _bm25_tokens([query])
        if not tokens.vocab or not any(tokens.ids):
            return []
        ids, scores = self._bm25.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def search(self, query: str, k: int = 5, mode: str = "dense") -> list[Hit]:
        if mode not in self.MODES:
            raise LmforgeError(f"search mode {mode!r} is not one of {', '.join(self.MODES)}")
        if not query.strip():
            raise LmforgeError("the query is empty")
        if k < 1:
            raise LmforgeError("k must be at least 1")
        if mode != "hybrid":
            found = self.dense(query, k) if mode == "dense" else self.bm25(query, k)
            return [Hit(score, self.passages[i], rank) for rank, (i, score) in enumerate(found, 1)]
        depth = max(k, 50)  # fuse deeper lists than asked: a passage second in both beats one first in one
        fused: dict[int, Hit] = {}
        for method, found in (("dense", self.dense(query, depth)), ("bm25", self.bm25(query, depth))):
            for rank, (i, score) in enumerate(found, 1):
                hit = fused.setdefault(i, Hit(0.0, self.passages[i]))
                hit.score += 1 / (RRF_K + rank)
                hit.scores[method] = score
        ranked = sorted(fused.values(), key=lambda h: -h.score)[:k]
        for rank, hit in enumerate(ranked, 1):
            hit.rank = rank
        return ranked


# -- answering from the index ----------------------------------------------------------------------------

DONT_KNOW = "I don't know: nothing in the knowledge base answers that."


@dataclass
class Grounding:
    """What retrieval made of a conversation: the messages to generate from (the last user turn carries the
    passages), the passages (its sources), or, when none is close enough, the reply that says so."""

    messages: list[dict]
    hits: list[Hit]
    refusal: str | None = None  # the answer to give instead of generating one
    intent: str | None = None  # the label intent routing gave the turn

    def sources(self) -> list[dict]:
        return [{"rank": h.rank, "source": h.passage.source, "score": round(h.score, 6), "text": h.passage.text}
                for h in self.hits]


class Retriever:
    """Retrieval-augmented answers: for each user turn, the top ``k`` passages put before the question.

    The query is the last user turn when some passage is as close to it as ``min_score`` (cosine similarity by
    the encoder). A follow-up that names nothing ("and how much does it cost?") is read together with the user
    turns before it, when it is at least half as close on its own and the turns together reach ``min_score``.
    Otherwise (a new topic the knowledge base does not cover) the answer is ``DONT_KNOW`` instead of whatever
    the model would invent.
    """

    def __init__(self, index: Index, k: int = 3, min_score: float = 0.3, mode: str = "dense", turns: int = 3):
        if k < 1:
            raise LmforgeError("--retrieve-k must be at least 1")
        if not -1 <= min_score <= 1:
            raise LmforgeError("--min-score is a cosine similarity in [-1, 1]")
        self.index, self.k, self.min_score, self.mode, self.turns = index, k, min_score, mode, turns

    def query(self, messages: list[dict]) -> str | None:
        """What to search for, or None when nothing in the index is close enough to the conversation's last turn."""
        asked = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not asked:
            return None

        def closest(text: str) -> float:
            best = self.index.dense(text, 1)
            return best[0][1] if best else -1.0

        alone = closest(asked[-1])
        if alone >= self.min_score:
            return asked[-1]
        together = "\n".join(asked[-self.turns:])
        if len(asked) > 1 and alone >= self.min_score / 2 and closest(together) >= self.min_score:
            return together
        return None

    def ground(self, messages: list[dict]) -> Grounding:
        if not messages or messages[-1]["role"] != "user":
            return Grounding(messages, [])
        query = self.query(messages)
        if query is None:
            return Grounding(messages, [], DONT_KNOW)
        hits = self.index.search(query, self.k, self.mode)
        context = "\n".join(f"[{h.rank}] ({h.passage.source}) {' '.join(h.passage.text.split())}" for h in hits)
        question = messages[-1]["content"]
        grounded = (f"Answer from these passages of the knowledge base, citing them as [1], [2], ...; if they do not "
                    f"hold the answer, say you do not know.\n\n{context}\n\nQuestion: {question}")
        return Grounding(messages[:-1] + [{"role": "user", "content": grounded}], hits)


# -- intent routing --------------------------------------------------------------------------------------


class IntentClassifier:
    """A classification folder from `lmforge finetune` (an encoder or a decoder with a sequence-classification
    head): the label of a text."""

    def __init__(self, folder: str | os.PathLike, device="cpu"):
        from lmforge.model.checkpoint import load_model, load_tokenizer_for

        self.model = load_model(folder, device)
        if getattr(self.model.config, "head", None) != "sequence_classification" \
                or (getattr(self.model.config, "num_labels", 2) or 2) < 2:
            raise LmforgeError(f"{folder} is not a classifier (a reward model scores, it does not label); train one "
                               f'with `lmforge finetune` on {{"text", "label"}} rows')
        self.tokenizer = load_tokenizer_for(self.model)
        labels = self.model.config.labels
        self.labels = list(labels) if labels else [str(i) for i in range(self.model.config.num_labels)]

    @torch.no_grad()
    def label(self, text: str) -> str:
        from lmforge.model.encoder import Encoder

        model, tok = self.model, self.tokenizer
        limit = model.config.block_size
        device = next(model.parameters()).device
        if isinstance(model, Encoder):
            ids = tok.encode(text, add_special_tokens=True)
            ids = ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]
            logits = model(torch.tensor([ids], device=device), torch.ones(1, len(ids), dtype=torch.long, device=device)).logits
        else:
            from lmforge.model.heads import decoder_classifier_ids

            logits = model(torch.tensor([decoder_classifier_ids(tok, text, model)], device=device))
        return self.labels[int(logits[0].argmax())]


class Router:
    """Intent routing: a classifier labels each user turn, and the label's route answers it, from an index of its
    own or with a fixed answer. A routes file (YAML)::

        classifier: runs/intent          # a `lmforge finetune` classification folder
        routes:
          billing: {index: kb/billing.index}
          shipping: {index: kb/shipping.index, k: 2}
          greeting: {answer: "Hello! How can I help?"}
        default: {answer: "I can help with billing and shipping."}   # a label with no route (optional)
    """

    def __init__(self, path: str | os.PathLike, min_score: float = 0.3, mode: str = "dense", k: int = 3, device="cpu"):
        import yaml

        path = Path(path)
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise LmforgeError(f"--route {path} cannot be read ({str(e).splitlines()[0]})") from None
        if not isinstance(spec, dict) or "classifier" not in spec or not isinstance(spec.get("routes"), dict):
            raise LmforgeError(f"--route {path} needs 'classifier: FOLDER' and 'routes: {{label: {{index: INDEX}} or "
                               f"{{answer: TEXT}}}}'")
        extra = sorted(map(str, set(spec) - {"classifier", "routes", "default"}))
        if extra:
            raise LmforgeError(f"--route {path}: unknown key(s) {', '.join(extra)}; it takes classifier, routes and "
                               f"default (min_score and k apply to every route from the command line)")
        if not spec["routes"]:
            raise LmforgeError(f"--route {path} names no route: give routes: {{label: {{index: INDEX}} or "
                               f"{{answer: TEXT}}}}")
        here = path.parent
        self.classifier = IntentClassifier(here / spec["classifier"], device)
        unknown = sorted(set(spec["routes"]) - set(self.classifier.labels))
        if unknown:
            raise LmforgeError(f"--route {path}: {', '.join(unknown)} not among the classifier's labels "
                               f"({', '.join(self.classifier.labels)})")
        self.routes = {label: self._route(here, label, route, min_score, mode, k, device)
                       for label, route in spec["routes"].items()}
        self.default = self._route(here, "default", spec["default"], min_score, mode, k, device) \
            if spec.get("default") else None

    @staticmethod
    def _route(here: Path, label: str, route, min_score: float, mode: str, k: int, device="cpu"):
        if isinstance(route, dict) and set(route) - {"index", "answer", "k"}:
            raise LmforgeError(f"route {label!r}: unknown key(s) {', '.join(sorted(map(str, set(route) - {'index', 'answer', 'k'})))}"
                               f"; a route is {{index: INDEX, k: N}} or {{answer: TEXT}}")
        if isinstance(route, dict) and "index" in route and "answer" in route:
            raise LmforgeError(f"route {label!r} has both index and answer; give one")
        if isinstance(route, dict) and isinstance(route.get("answer"), str):
            return route["answer"]
        if isinstance(route, dict) and isinstance(route.get("index"), str):
            k = route.get("k", k)
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise LmforgeError(f"route {label!r}: k must be a whole number of 1 or more, not {k!r}")
            return Retriever(Index(here / route["index"], device), k=k, min_score=min_score, mode=mode)
        raise LmforgeError(f"route {label!r} must be {{index: INDEX}} or {{answer: TEXT}}, not {route!r}")

    def ground(self, messages: list[dict]) -> Grounding:
        if not messages or messages[-1]["role"] != "user":
            return Grounding(messages, [])
        label = self.classifier.label(messages[-1]["content"])
        route = self.routes.get(label, self.default)
        if route is None:
            return Grounding(messages, [], DONT_KNOW, label)
        if isinstance(route, str):
            return Grounding(messages, [], route, label)
        grounding = route.ground(messages)
        grounding.intent = label
        return grounding
