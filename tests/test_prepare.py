import io
import json
import re
import sys

import numpy as np
import pytest

from lmforge.data.corpus import CorpusStats, clean_text, default_corpus_files, read_clean_documents
from lmforge.data.prepare import prepare, validation_draw
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer


def read_split(folder, split):
    meta = json.loads((folder / "meta.json").read_text())
    arrays = [np.fromfile(folder / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.array([], dtype=meta["dtype"])


def documents_of(folder, split, tok):
    """Decode a split back into its documents (they are separated by end-of-text)."""
    text = tok.decode(read_split(folder, split).tolist())
    return [d for d in text.split("<|endoftext|>") if d]


def test_default_corpus_is_the_stdlib_without_tests_or_site_packages():
    files = default_corpus_files()
    assert len(files) > 300
    assert sum(f.stat().st_size for f in files) > 5_000_000
    for f in files:
        assert f.suffix == ".py"
        assert not {"site-packages", "test", "tests", "idle_test"} & set(f.parts)


def test_clean_text_nfc_newlines_and_control_characters():
    text, removed = clean_text("cafe\u0301\r\nline\rtab\there\x00\x07\x1b[0m\x7f\u200dok")
    assert text == "caf\u00e9\nline\ntab\there[0m\u200dok"  # ZWJ (a format char, used in emoji) is kept
    assert removed == 4


def test_duplicates_and_short_documents_are_dropped_and_counted(tmp_path):
    body = "x = 1\n" * 20
    (tmp_path / "a.txt").write_text(body)
    (tmp_path / "b.txt").write_text(body)  # exact duplicate
    (tmp_path / "c.txt").write_text(body.replace("\n", "\r\n"))  # duplicate after cleaning
    (tmp_path / "d.txt").write_text("short")
    (tmp_path / "e.txt").write_text("y = 2\n" * 20)
    stats = CorpusStats()
    docs = list(read_clean_documents([tmp_path], min_chars=64, stats=stats))
    assert [d.text for d in docs] == [body, "y = 2\n" * 20]
    assert (stats.documents, stats.dropped_duplicates, stats.dropped_short, stats.kept) == (5, 2, 1, 2)


def test_prepare_writes_shards_that_decode_back_to_the_cleaned_documents(corpus_dir, tokenizer_dir, data_dir):
    tok = Tokenizer.load(tokenizer_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"]["sha256"] == tok.sha256
    expected = {d.text for d in read_clean_documents([corpus_dir])}
    got = documents_of(data_dir, "train", tok) + documents_of(data_dir, "val", tok)
    assert sorted(got) == sorted(expected)
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["tokens"] == len(read_split(data_dir, split)) > 0
        assert info["documents"] == len(documents_of(data_dir, split, tok))
    assert (data_dir / "tokenizer.json").exists()


def test_split_is_deterministic_by_seed_and_independent_of_input_order(corpus_dir, tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    files = sorted(corpus_dir.iterdir())
    a = prepare(files, tokenizer_dir, tmp_path / "a", val_fraction=0.2, seed=1, workers=0, progress=False)
    b = prepare(files[::-1], tokenizer_dir, tmp_path / "b", val_fraction=0.2, seed=1, workers=0, progress=False)
    prepare(files, tokenizer_dir, tmp_path / "c", val_fraction=0.2, seed=2, workers=0, progress=False)
    val = lambda name: sorted(documents_of(tmp_path / name, "val", tok))  # noqa: E731
    assert val("a") == val("b")
    assert val("a") != val("c")
    assert a["splits"]["val"]["tokens"] == b["splits"]["val"]["tokens"]
    assert 0 < a["splits"]["val"]["documents"] < len(files)


def test_validation_draw_depends_on_text_and_seed():
    assert validation_draw("abc", 0) == validation_draw("abc", 0)
    assert validation_draw("abc", 0) != validation_draw("abc", 1)
    assert 0 <= validation_draw("abc", 0) < 1


def test_worker_processes_give_byte_identical_shards(corpus_dir, tokenizer_dir, tmp_path):
    prepare([corpus_dir], tokenizer_dir, tmp_path / "inline", workers=0, progress=False)
    prepare([corpus_dir], tokenizer_dir, tmp_path / "pool", workers=2, shard_tokens=50_000, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "inline", split), read_split(tmp_path / "pool", split))
    meta = json.loads((tmp_path / "pool" / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 1  # small shard_tokens → several shard files


def test_jsonl_parquet_and_stdin_inputs(tokenizer_dir, tmp_path, monkeypatch):
    rows = [{"body": f"document number {i} " * 10, "id": i} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [r["body"] for r in rows[:3]]}), tmp_path / "in.parquet")
    meta = prepare([tmp_path / "in.jsonl", tmp_path / "in.parquet"], tokenizer_dir, tmp_path / "d", text_field="body",
                   workers=0, val_fraction=0.3, progress=False)
    assert meta["cleaning"]["documents"] == 9
    assert meta["cleaning"]["dropped_duplicates"] == 3  # the Parquet rows repeat the first JSONL rows
    # stdin: one document, cut into line-aligned pieces so it can still be split.
    text = "".join(f"line {i} of a long text piped on stdin\n" for i in range(2000))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    meta = prepare(["-"], tokenizer_dir, tmp_path / "s", workers=0, progress=False)
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] > 1
    tok = Tokenizer.load(tokenizer_dir)
    pieces = documents_of(tmp_path / "s", "train", tok) + documents_of(tmp_path / "s", "val", tok)
    assert sorted("".join(pieces).splitlines()) == sorted(text.splitlines())


def test_non_utf8_bytes_are_replaced_and_counted(tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 30 + b"\xff\xfe end")
    (tmp_path / "in" / "ok.txt").write_text("plain text " * 20)
    meta = prepare([tmp_path / "in"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)
    assert meta["cleaning"]["non_utf8_bytes"] == 32
    assert meta["cleaning"]["kept"] == 2


@pytest.mark.parametrize("values, kind", [([1, 2], "int64"), ([["a"], ["b"]], "list<"), ([{"a": "x"}], "struct<a: string>"),
                                          ([1.5, None], "double"), ([True], "bool")],
                         ids=["ints", "lists", "structs", "floats", "booleans"])
def test_a_parquet_text_column_that_is_not_strings_is_refused_by_name_and_type(tokenizer_dir, tmp_path, values, kind):
    """Each value was tokenized as its Python repr ("1", "['a']", "{'a': 'x'}"): a corpus of numbers and brackets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": values, "body": ["real text " * 10] * len(values)}), tmp_path / "in.parquet")
    with pytest.raises(LmforgeError) as e:
        prepare([tmp_path / "in.parquet"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'in.parquet'}: column 'text' holds {kind}")
    assert "not text (strings); pass --text-field to name the column of text (columns: text, body)" in str(e.value)
    assert not (tmp_path / "d").exists()


def test_null_texts_are_skipped_and_counted_in_parquet_and_jsonl_and_other_types_are_named(tokenizer_dir, tmp_path,
                                                                                          capsys):
    """A Parquet null was skipped without a word and a JSONL null stopped the run saying "found 'text'": both are
    missing values now, skipped and counted; a JSONL text of another type says which type it is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.cli import main

    docs = [f"document number {i} " * 10 for i in range(4)]
    pq.write_table(pa.table({"text": pa.array([docs[0], None, docs[1]]).dictionary_encode()}), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [docs[2], None, docs[3], None]))
    meta = prepare([tmp_path / "in.parquet", tmp_path / "in.jsonl"], tokenizer_dir, tmp_path / "d", workers=0,
                   val_fraction=0, progress=False)
    assert (meta["cleaning"]["documents"], meta["cleaning"]["null_texts"]) == (4, 3)
    capsys.readouterr()
    assert main(["tokenizer", "train", str(tmp_path / "in.parquet"), str(tmp_path / "in.jsonl"), "--out",
                 str(tmp_path / "t"), "--vocab-size", "300", "--quiet"]) == 0
    assert "dropped 0 exact duplicates and 0 too short, skipped 3 rows whose text is null;" in capsys.readouterr().out
    for value, kind in [(5, "a number (5)"), (["a"], "a list"), ({"a": 1}, "an object"), (True, "a boolean (true)")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n" + json.dumps({"text": value}) + "\n")
        with pytest.raises(LmforgeError, match=re.escape(f"bad.jsonl:2: field 'text' is {kind}, not a string")):
            prepare([tmp_path / "bad.jsonl"], tokenizer_dir, tmp_path / "e", workers=0, progress=False)


def test_the_non_utf8_warning_names_the_files(tokenizer_dir, tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "in").mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / "in" / name).write_bytes(f"text of {name} ".encode() * 10 + b"\xff\xfe")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "bad.txt").write_bytes(b"some text \xff " * 10)
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                 "--workers", "0", "--quiet"]) == 0
    assert (f"warning: 8 bytes were not valid UTF-8 and were replaced by U+FFFD, in 4 files: {tmp_path / 'in' / 'a.txt'} "
            f"(2), {tmp_path / 'in' / 'b.txt'} (2), {tmp_path / 'in' / 'c.txt'} (2) and 1 more files") in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "one"), "--out", str(tmp_path / "t"), "--vocab-size", "300",
                 "--quiet"]) == 0
    assert (f"warning: {tmp_path / 'one' / 'bad.txt'}: 10 bytes were not valid UTF-8 and were replaced by U+FFFD"
            in capsys.readouterr().err)


def test_malformed_jsonl_names_the_line(tokenizer_dir, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine fine fine"}\n{"text": oops}\n')
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([tmp_path / "bad.jsonl"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(LmforgeError, match=r"nofield.jsonl:1: expected a 'text' string field, found 'content'"):
        prepare([tmp_path / "nofield.jsonl"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)


def test_bad_inputs(tokenizer_dir, tmp_path, data_dir):
    with pytest.raises(LmforgeError, match="does not exist"):
        prepare([tmp_path / "missing"], tokenizer_dir, tmp_path / "d", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(LmforgeError, match="empty after cleaning"):
        prepare([tmp_path / "empty"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)
    assert not (tmp_path / "d").exists()  # nothing half-written is left behind
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LmforgeError, match="unsupported file type .csv"):
        prepare([tmp_path / "x.csv"], tokenizer_dir, tmp_path / "d", progress=False)
    with pytest.raises(LmforgeError, match="not empty; pass --overwrite"):
        prepare(None, tokenizer_dir, data_dir, progress=False)
