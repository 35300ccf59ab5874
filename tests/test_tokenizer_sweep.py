"""Folders whose tokenizer_config.json or special_tokens_map.json say more about the added tokens than tokenizer.json:
lmforge reads them as transformers' AutoTokenizer reads them (ids, decoded text, what it saves)."""

import json

import pytest
from test_tokenizer import byte_level_folder, llama2_style_folder
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from lmforge.infer.detokenize import Detokenizer
from lmforge.tokenizer import Tokenizer


def flags(content, special=True, **kw):
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": special, **kw}


def rewrite(folder, change):
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    change(hf)
    hf.save(str(folder / "tokenizer.json"))


CASES = {
    # tokens the config names that tokenizer.json lacks: new special tokens, as transformers adds them
    "extra": ({"eos_token": "<|im_end|>", "extra_special_tokens": ["<|new|>"], "pad_token": "<|pad|>"}, None),
    "additional": ({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|tool|>"]}, None),
    # added_tokens_decoder's flags win over tokenizer.json's (an lstrip/rstrip end of turn)
    "decoder-flags": ({"eos_token": "<|im_end|>", "added_tokens_decoder": {
        "0": flags("<s>"), "1": flags("</s>"), "2": flags("<|im_start|>", special=False),
        "3": flags("<|im_end|>", lstrip=True, rstrip=True)}}, None),
    # an eos token added as a plain token: named, it is special (left out of text decoded without special tokens)
    "plain-eos": ({"eos_token": "<|eot|>"}, lambda hf: hf.add_tokens([AddedToken("<|eot|>", normalized=False)])),
}
TEXTS = ["the answer", "x <|im_end|> y", "a  <|im_start|>  b<|new|>c", "fox<|eot|>z <s> ok<|tool|>", "<|pad|> "]


@pytest.mark.parametrize("case", CASES)
def test_added_tokens_are_what_transformers_makes_of_the_config(tmp_path, case):
    """lmforge read only tokenizer.json's added tokens: "<|new|>" in a text was eight byte tokens (one token there),
    the end of turn kept the spaces around it that transformers strips, and an eos token not flagged special stayed
    in text decoded with skip_special_tokens."""
    from transformers import AutoTokenizer

    config, change = CASES[case]
    folder = byte_level_folder(tmp_path / case, config, specials=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    if change:
        rewrite(folder, change)
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.vocab_size == len(theirs) and ours.eos_id == theirs.eos_token_id
    for text in TEXTS:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            detok = Detokenizer(ours, [], skip_special=skip)
            streamed = "".join(detok.add(i)[0] for i in ids) + detok.finish()
            assert streamed == theirs.decode(ids, skip_special_tokens=skip), (text, skip)


def test_special_tokens_of_the_model_vocabulary_are_added_tokens(tmp_path):
    """A Llama-style tokenizer.json without added tokens: "</s>" in a text is one token there (the model's id)."""
    from transformers import AutoTokenizer

    folder = llama2_style_folder(tmp_path / "llama", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                      "tokenizer_class": "PreTrainedTokenizerFast"})
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "added_tokens": []}))
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    text = "Hello</s> world<s>"
    assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"] == [1, 272, 2, 276, 1]
    assert ours.decode([1, 272, 2]) == theirs.decode([1, 272, 2])


def test_a_special_tokens_map_with_flags_is_saved_so_transformers_loads_it(tmp_path):
    """special_tokens_map.json names tokens as {"content": ..., "lstrip": ...}: lmforge wrote them so into
    tokenizer_config.json, which transformers 5 refuses ("Special token eos_token has to be either str or
    AddedToken")."""
    from transformers import AutoTokenizer

    folder = byte_level_folder(tmp_path / "t", {}, specials=("<s>",))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {k: v for k, v in flags("<|im_end|>", lstrip=True, rstrip=True).items() if k != "special"},
        "additional_special_tokens": ["<|x|>"]}))
    theirs = AutoTokenizer.from_pretrained(str(folder))
    Tokenizer.load(folder).save(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    text = "a <|im_end|> b<|x|>c"
    assert again(text)["input_ids"] == theirs(text)["input_ids"] == Tokenizer.load(folder).encode(text)
    assert again.eos_token == theirs.eos_token == "<|im_end|>"
