"""Mistakes a new user makes, command by command: each gets a clear answer, never a silent wrong one
(issue 10: metrics over zero items, one reader of text, help that lists every key, results that are kept)."""

import json
import re
import shutil

import pytest
import torch
from conftest import make_hf_gpt2

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import accuracy, macro_f1, pearson, rouge, squad_metrics
from lmforge.train.config import FinetuneConfig, TrainConfig, config_keys, load_config


def one_error_line(capsys, argv, match):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: ") and match in lines[0], err
    return lines[0]


# -- evaluation never scores nothing --------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"   \n\t\n"])
def test_eval_of_an_empty_text_is_an_error_and_keeps_the_earlier_results(hf_gpt2, tmp_path, capsys, content):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(hf_gpt2), "--tasks", "brackets", "--limit", "4", "--quiet", "--out", str(out)]) == 0
    before = out.read_bytes()
    (tmp_path / "empty.txt").write_bytes(content)
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--text", str(tmp_path / "empty.txt"), "--out", str(out)],
                   "is empty")
    assert out.read_bytes() == before


def test_a_text_too_short_to_predict_a_token_is_an_error_not_perplexity_one(hf_gpt2, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a")
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--text", str(tmp_path / "one.txt"), "--quiet"],
                   "no token to predict")


def test_eval_on_an_empty_split_or_no_examples_is_an_error(hf_gpt2, tmp_path, capsys, data_dir):
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--data", str(data_dir), "--max-tokens", "1"], "--max-tokens 1")
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--tasks", "brackets", "--limit", "0"], "--limit 0")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "t.yaml").write_text(f"task: t\ntype: generate\ndata: {tmp_path / 'empty.jsonl'}\nprompt: '{{{{q}}}}'\n"
                                     "target: '{{a}}'\n")
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--tasks", str(tmp_path / "t.yaml")], "no examples")


def test_metrics_over_zero_items_raise():
    for metric in (lambda: accuracy([], []), lambda: macro_f1([], []), lambda: pearson([], []),
                   lambda: squad_metrics([], []), lambda: rouge([], [])):
        with pytest.raises(ValueError, match="zero examples"):
            metric()


def test_eval_results_of_a_run_accumulate_and_a_replacement_is_said(hf_gpt2, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval.json"
    base = ["eval", "--model", str(hf_gpt2), "--limit", "4", "--quiet", "--out", str(out)]
    assert main(base + ["--tasks", "brackets"]) == 0
    (tmp_path / "t.txt").write_text("some text to score " * 20)
    capsys.readouterr()
    assert main(base + ["--text", str(tmp_path / "t.txt")]) == 0
    assert "kept the earlier results" in capsys.readouterr().out and "brackets" in json.loads(out.read_text())["tasks"]
    assert set(json.loads(out.read_text())["tasks"]) == {"brackets", "t.txt"}
    monkeypatch.chdir(hf_gpt2.parent)  # the same model spelt another way is still the same model
    assert main(["eval", "--model", hf_gpt2.name, "--tasks", "copy", "--limit", "2", "--quiet", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["tasks"]) == {"brackets", "t.txt", "copy"}
    other = make_hf_gpt2(tmp_path / "other", tokenizer_dir=hf_gpt2, seed=1)
    assert main(["eval", "--model", str(other), "--tasks", "copy", "--limit", "2", "--quiet", "--out", str(out)]) == 0
    assert f"which were of {hf_gpt2}" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["tasks"]) == {"copy"}
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--tasks", "copy", "--out", str(tmp_path / "mine.json")],
                   "is not lmforge evaluation results")
    assert json.loads((tmp_path / "mine.json").read_text()) == {"my": "notes"}


# -- one reader of text: non-UTF-8 bytes are replaced and counted by every command ----------------------


def test_non_utf8_input_is_counted_and_warned_by_classify_finetune_and_eval(hf_gpt2, tmp_path, capsys):
    rows = [json.dumps({"text": f"sample {i}", "label": "yes" if i % 2 else "no"}).encode() for i in range(6)]
    rows[1] = rows[1].replace(b"sample", b"sam\xffple")
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(rows) + b"\n")
    capsys.readouterr()
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no"]) == 0
    assert f"warning: {data}: 1 bytes were not valid UTF-8 and were replaced by U+FFFD" in capsys.readouterr().err
    (tmp_path / "t.txt").write_bytes(b"some text \xfe\xfe to score " * 10)
    assert main(["eval", "--model", str(hf_gpt2), "--text", str(tmp_path / "t.txt"), "--quiet"]) == 0
    assert "20 bytes were not valid UTF-8" in capsys.readouterr().err
    assert main(["finetune", "--model", str(hf_gpt2), "--train", str(data), "--out", str(tmp_path / "ft"),
                 "--max-steps", "1", "--quiet", "--tensorboard", "false"]) == 0
    assert "1 bytes were not valid UTF-8" in capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"lr: 0.1\nsample_prompt: caf\xe9\n")
    one_error_line(capsys, ["pretrain", "--config", str(tmp_path / "c.yaml")], "is not UTF-8 text")


# -- classify shows what the model answered ------------------------------------------------------------


def test_classify_prints_the_confusion_counts_and_flags_a_one_label_model(hf_gpt2, tmp_path, capsys, monkeypatch):
    import lmforge.eval.fewshot as fewshot

    rows = [{"text": f"sample {i}", "label": "yes" if i % 2 else "no"} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A model that always prefers the first label: "yes" scores higher on every example.
    monkeypatch.setattr(fewshot, "loglikelihoods", lambda m, t, requests: [0.0 if c.endswith("yes") else -1.0
                                                                          for _, c in requests])
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "d.jsonl"), "--model", str(hf_gpt2), "--labels", "yes,no"]) == 0
    out, err = capsys.readouterr()
    assert "accuracy 0.5000" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("true / predicted"))
    assert lines[header].split()[-2:] == ["yes", "no"]
    assert lines[header + 1].split() == ["yes", "4", "0"] and lines[header + 2].split() == ["no", "4", "0"]
    assert "answered 'yes' for every example" in err


# -- help that answers the question ---------------------------------------------------------------------


def test_help_lists_every_key_with_its_meaning_and_choices(capsys):
    for command, cls in (("pretrain", TrainConfig), ("finetune", FinetuneConfig)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        for f in config_keys(cls):
            line = next(line for line in out.splitlines() if line.strip().startswith(f"--{f.name.replace('_', '-')} "))
            assert len(line.split(")", 1)[1].strip()) > 5, line  # a meaning, not just the default
        for key in cls.IGNORED:
            assert f"--{key.replace('_', '-')} " not in out
    method = next(line for line in out.splitlines() if line.strip().startswith("--method "))
    assert "lora" in method and "linear-probe" in method
    assert "--data " not in out and "--n-layer " not in out
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--help"])
    assert "tokens in the vocabulary" in capsys.readouterr().out


def test_keys_finetune_ignores_are_refused_by_name_and_old_saved_configs_still_load(capsys):
    one_error_line(capsys, ["finetune", "--n-layer", "4", "--model", "x", "--train", "y"], "--n-layer does nothing here")
    one_error_line(capsys, ["finetune", "--method", "qlora", "--model", "x", "--train", "y"],
                   "method must be one of full, linear-probe, lora")
    # A run saved before these keys were left out still resumes.
    config = load_config(base={"model": "m", "train": "t", "data": "data", "n_layer": None}, cls=FinetuneConfig)
    assert "data" not in config.to_dict()


# -- prepare and plan ---------------------------------------------------------------------------------


def test_prepare_of_one_short_document_says_what_helps(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a single short document, long enough to keep. " * 3)
    line = one_error_line(capsys, ["prepare", str(tmp_path / "one.txt"), "--tokenizer", str(tokenizer_dir),
                                   "--out", str(tmp_path / "d"), "--val-fraction", "0.01", "--workers", "0", "--quiet"],
                          "single document")
    assert "--val-fraction 0" in line and "lower --val-fraction" not in line
    assert main(["prepare", str(tmp_path / "one.txt"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                 "--val-fraction", "0", "--workers", "0", "--quiet"]) == 0
    assert "val: no documents" in capsys.readouterr().out


def test_plan_reads_a_run_folder_and_shows_small_figures_in_units_that_show_them(tmp_path, capsys, data_dir):
    from conftest import train_config

    from lmforge.train.loop import pretrain

    pretrain(None, progress=False, **train_config(data_dir, tmp_path / "run", max_steps=2, checkpoint_interval=2))
    capsys.readouterr()
    assert main(["plan", "--model", str(tmp_path / "run"), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "0.0 hours" not in out and "$0 " not in out and " 0.00 " not in out
    assert "seconds at 40% MFU" in out and "memory per GPU (MB;" in out


# -- options outside their range are refused before any work (they crashed, hung or were ignored) -------


def test_out_of_range_options_are_one_line_errors(capsys, tmp_path, tokenizer_dir, corpus_dir, data_dir, hf_gpt2):
    out = str(tmp_path / "out")
    cases = [
        (["tokenizer", "train", str(corpus_dir), "--out", out, "--min-frequency", "-1"], "--min-frequency -1"),
        # --shard-tokens 0 looped forever
        (["prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", out, "--shard-tokens", "0"], "--shard-tokens"),
        (["prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", out, "--workers", "-2"], "--workers"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--threads", "-1"], "threads must be 0"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--lr", "nan"], "lr must be"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--beta1", "2"], "beta1 and beta2"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--n-head", "0"], "must be at least 1"),
        (["plan", "--model", "tiny", "--tokens", "-1"], "--tokens"),
        (["plan", "--model", "tiny", "--seq-len", "0"], "--seq-len"),
        (["plan", "--model", "tiny", "--price", "-1"], "--price"),
        (["convert", str(hf_gpt2), out, "--max-shard-size", "0"], "at least one byte"),
        (["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", out, "--hidden", "0"], "--hidden"),
    ]
    for argv, match in cases:
        one_error_line(capsys, argv, match)
    assert not (tmp_path / "out").exists()


BIG = str(2**64)  # one more than any 64-bit integer holds


def test_whole_numbers_too_large_or_negative_are_one_line_errors(capsys, tmp_path, corpus_dir, tokenizer_dir, data_dir,
                                                                 hf_gpt2):
    """Integers past 64 bits reached the Rust tokenizer trainer, torch and NumPy (OverflowError, TypeError, ValueError
    tracebacks), hung (an n-gram order's key range, a model of 2**64 layers, 2**64 built-in examples) or allocated
    without end (a vocabulary of 2**32): each is refused by name, before anything is written."""
    out = str(tmp_path / "out")
    cases = [
        (["tokenizer", "train", str(corpus_dir), "--out", out, "--vocab-size", BIG], "--vocab-size 18446744073709551616 is too large"),
        (["tokenizer", "train", str(corpus_dir), "--out", out, "--vocab-size", str(2**32)], "at most 2,097,152 tokens"),
        (["tokenizer", "train", str(corpus_dir), "--out", out, "--min-frequency", BIG], "--min-frequency 18446744073709551616 must be"),
        (["tokenizer", "train", str(corpus_dir), "--out", out, "--sentinels", BIG], "--sentinels 18446744073709551616 leaves no room"),
        (["prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", out, "--workers", BIG], "--workers"),
        (["prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir), "--out", out, "--seed", "1" + "0" * 70], "--seed"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--seed", BIG], "seed 18446744073709551616 is too large"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--seed", "-1"], "seed must be from 0"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--n-layer", BIG], "n_layer 18446744073709551616 is too large"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--n-layer", str(2**40)], "n_layer must be at most 10,000"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--threads", BIG], "threads 18446744073709551616"),
        (["pretrain", "--data", str(data_dir), "--out", out, "--grad-accum-steps", str(2**62)], "sequences a step"),
        (["finetune", "--model", str(hf_gpt2), "--train", str(tmp_path / "x.jsonl"), "--out", out, "--method", "lora",
          "--lora-r", str(2**62)], "lora_r must be from 1"),
        (["baseline", "--kind", "ngram", "--data", str(data_dir), "--out", out, "--order", BIG], "does not fit 64-bit keys"),
        (["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", out, "--hidden", BIG], "--hidden 18446744073709551616"),
        (["eval", "--model", str(hf_gpt2), "--tasks", "arithmetic", "--limit", BIG], "more examples than a built-in"),
        (["generate", "hi", "--model", str(hf_gpt2), "-n", BIG], "n and num_beams must be at most"),
        (["generate", "hi", "--model", str(hf_gpt2), "--num-beams", BIG], "n and num_beams must be at most"),
        (["serve", "--model", str(hf_gpt2), "--max-batch", BIG], "--max-batch 18446744073709551616"),
        (["plan", "--model", "tiny", "--gpus", BIG], "--gpus 18446744073709551616 is beyond any run"),
    ]
    for argv, match in cases:
        one_error_line(capsys, argv, match)
    assert not (tmp_path / "out").exists()
    # a batch larger than the examples is fine: the engine is given the rows there are (it allocated 2**64)
    assert main(["eval", "--model", str(hf_gpt2), "--tasks", "arithmetic", "--limit", "2", "--batch-size", BIG,
                 "--quiet"]) == 0


def test_running_out_of_memory_is_one_line_that_says_what_to_ask_less_of(capsys, monkeypatch):
    """A model, batch or cache too large for this machine was a page of allocator traceback."""
    import lmforge.cli

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 13194139533312 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(lmforge.cli, "cmd_plan", allocate)
    line = one_error_line(capsys, ["plan", "--model", "tiny"], "out of memory (13,194.1 GB asked for): ask for less")
    assert "--micro-batch-size" in line
    with pytest.raises(RuntimeError):  # (--debug: the traceback)
        main(["plan", "--model", "tiny", "--debug"])

    def bug(args):
        raise RuntimeError("an error of lmforge's own")

    monkeypatch.setattr(lmforge.cli, "cmd_plan", bug)
    with pytest.raises(RuntimeError):  # another RuntimeError is a bug: it stays a traceback
        main(["plan", "--model", "tiny"])


def test_classify_tells_an_encoder_what_classifies_with_it(tmp_path, capsys, tokenizer_dir):
    """An encoder given to `classify` (label log-likelihood: no generation) was told it "cannot generate text"."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    rows = tmp_path / "c.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(4)))
    line = one_error_line(capsys, ["classify", str(rows), "--model", str(folder), "--labels", "a,b"],
                          "is an encoder (bert): `lmforge classify` scores each label by a decoder language model's")
    assert "cannot generate" not in line and f"lmforge finetune --model {folder}" in line and "lmforge embed" in line
    line = one_error_line(capsys, ["eval", "--model", str(folder), "--tasks", "brackets", "--limit", "2"],
                          "is an encoder (bert): it predicts no next token, which tasks score")


def test_finetune_dropout_is_applied_and_saved(hf_gpt2, tmp_path):
    from lmforge.train.finetune import finetune

    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for dropout, expected in ((0.25, 0.25), (None, 0.1)):  # None keeps the model's own (GPT-2's 0.1)
        out = tmp_path / f"ft{dropout}"
        finetune(None, progress=False, model=str(hf_gpt2), train=str(tmp_path / "t.jsonl"), out=str(out), max_steps=1,
                 tensorboard=False, **({} if dropout is None else {"dropout": dropout}))
        from lmforge.model.checkpoint import resolve_model_dir

        saved = json.loads((resolve_model_dir(out) / "config.json").read_text())
        assert saved["resid_pdrop"] == saved["attn_pdrop"] == expected


def test_configs_saved_by_older_versions_still_work(tmp_path, capsys):
    # finetune's config.yaml used to hold every pretraining key, and dropout 0.0 that meant "the model's own"
    old = {"data": "data", "n_layer": None, "sample_prompt": "", "dropout": 0.0, "model": "m", "train": "t.jsonl"}
    assert load_config(base=old, cls=FinetuneConfig).dropout is None  # resuming keeps the model's dropout
    (tmp_path / "old.yaml").write_text("".join(f"{k}: {'null' if v is None else repr(v)}\n" for k, v in old.items()))
    config = load_config(tmp_path / "old.yaml", cls=FinetuneConfig)
    assert config.train == "t.jsonl" and config.dropout == 0.0  # given in a file it is taken (and now honoured)
    assert "ignoring data, n_layer, sample_prompt" in capsys.readouterr().err


def test_text_that_is_not_utf8_on_the_command_line_or_stdin_is_replaced_and_counted(hf_gpt2, capsys, monkeypatch):
    import io
    import sys

    capsys.readouterr()
    # what Python makes of the argument bytes b"def \xff" (surrogateescape)
    assert main(["generate", "def \udcff", "--model", str(hf_gpt2), "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "prompt: 1 bytes were not valid UTF-8" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def \xfe\xff")))
    assert main(["generate", "-", "--model", str(hf_gpt2), "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "<stdin>: 2 bytes were not valid UTF-8" in capsys.readouterr().err


def test_tokenizer_train_does_not_replace_a_tokenizer_by_accident(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", str(corpus_dir / "textwrap.py"), "--vocab-size", "300", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = (out / "tokenizer.json").read_bytes()
    one_error_line(capsys, argv[:-5] + [str(corpus_dir / "string.py")] + argv[-5:], "pass --overwrite")
    assert (out / "tokenizer.json").read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_every_command_that_runs_a_model_takes_device(hf_gpt2, tmp_path, capsys):
    """`--device` on each command that runs a model (eval and index took none: they ran on the CPU even on a
    GPU machine); asking for a GPU that is not there is one line, before any work."""
    text = tmp_path / "t.txt"
    text.write_text("def main():\n    return 1\n")
    for argv in (["eval", "--model", str(hf_gpt2), "--text", str(text)],
                 ["generate", "--model", str(hf_gpt2), "hi"],
                 ["index", str(text), "--model", str(hf_gpt2), "--out", str(tmp_path / "ix")],
                 ["search", str(tmp_path / "ix"), "hi"]):
        one_error_line(capsys, [*argv, "--device", "cuda"], "no CUDA GPU is visible")
    assert main(["eval", "--model", str(hf_gpt2), "--text", str(text), "--device", "cpu", "--quiet"]) in (0, None)
    assert "| perplexity |" in capsys.readouterr().out


def test_chat_checks_its_options_at_start(hf_gpt2, capsys, monkeypatch):
    """--max-new-tokens 0 was replaced by the default, --temperature inf sampled noise, and a --max-new-tokens that
    fills the context was only said as "too long" at every message: each is one line before the first turn."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    for argv, message in [(["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
                          (["--temperature", "inf"], "temperature must be a finite number"),
                          (["--top-p", "nan"], "top_p must be a finite number"),
                          (["--max-new-tokens", "5000"], "--max-new-tokens 5000 leaves no room for a message"),
                          (["--system", "be brief " * 400], "--system leaves no room for a message and the answer")]:
        one_error_line(capsys, ["chat", "--model", str(hf_gpt2), *argv], message)


def test_options_of_another_kind_or_reading_stdin_beside_texts_are_refused(data_dir, tmp_path, capsys):
    for argv, message in [(["baseline", "--kind", "ngram", "--data", str(data_dir), "--out", str(tmp_path / "n"),
                            "--n-embd", "32"], "the n-gram baseline takes --order and --discount, not --n-embd"),
                          (["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", str(tmp_path / "l"),
                            "--order", "5"], "--order set the n-gram baseline"),
                          (["embed", "--model", str(tmp_path), "-", "more text"], "- reads the texts from stdin")]:
        one_error_line(capsys, argv, message)
    assert not (tmp_path / "n").exists() and not (tmp_path / "l").exists()


def test_eval_of_an_encoder_on_prepared_data_says_what_it_is(data_dir, capsys):
    from test_retrieval import MINILM

    one_error_line(capsys, ["eval", "--model", str(MINILM), "--data", str(data_dir)],
                   "is an encoder (bert): `lmforge eval` scores decoders and encoder-decoders; an encoder's held-out "
                   "loss and accuracy are in the metrics of the run that trained it")


def test_the_python_api_takes_what_users_pass_and_says_what_it_cannot(hf_gpt2, tmp_path, data_dir):
    """Silent wrong answers and raw Python errors of the Python API, each now right or one LmforgeError."""
    from lmforge import generate
    from lmforge.data.prepare import prepare
    from lmforge.eval.evaluate import evaluate
    from lmforge.model.checkpoint import load_model
    from lmforge.model.encoder import embed
    from lmforge.tokenizer import Tokenizer, train_tokenizer
    from lmforge.train.finetune import finetune
    from test_retrieval import MINILM

    # a string is one text (it was embedded letter by letter)
    encoder, tok = load_model(MINILM), Tokenizer.load(MINILM)
    assert torch.equal(embed(encoder, tok, "hello there"), embed(encoder, tok, ["hello there"]))
    # an empty list of inputs is an error (it meant the whole standard library); one path is a list of one
    with pytest.raises(LmforgeError, match="no inputs given"):
        train_tokenizer([], tmp_path / "tok", vocab_size=300, progress=False)
    with pytest.raises(LmforgeError, match="no inputs given"):
        prepare([], hf_gpt2, tmp_path / "data", progress=False)
    text = tmp_path / "t.txt"
    text.write_text("def main():\n    return 1\n" * 50)
    assert train_tokenizer(str(text), tmp_path / "tok", vocab_size=300, progress=False).vocab_size > 256
    # prompts, tokenizers as folders, options: checked, named
    assert generate(hf_gpt2, "hi", max_new_tokens=3, temperature=0, tokenizer=str(hf_gpt2)).text == \
        generate(hf_gpt2, "hi", max_new_tokens=3, temperature=0).text
    for call, message in [(lambda: generate(hf_gpt2, ["a", None], max_new_tokens=2), "a list holding NoneType, str"),
                          (lambda: generate(hf_gpt2, "a", temprature=0.1), "unknown generation option 'temprature' "
                                                                          "(did you mean 'temperature'?)"),
                          (lambda: generate(hf_gpt2, "a", max_new_tokens="5"), "max_new_tokens must be a whole number"),
                          (lambda: generate(hf_gpt2, "a", stop=5), "stop must be a list of strings"),
                          (lambda: generate(hf_gpt2, "a", system="be brief", chat=False), "system= goes into the chat"),
                          (lambda: evaluate(load_model(hf_gpt2), data=str(data_dir)), "evaluate takes model, run or"),
                          (lambda: finetune(model=load_model(hf_gpt2), train=str(text)), "pass the model's folder"),
                          (lambda: load_model(None), "load_model takes a model, adapter or run folder")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            call()
    assert next(load_model(hf_gpt2, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    scores = evaluate(str(hf_gpt2), tasks=["copy"], progress=False)["tasks"]
    assert "copy" in scores
    # errors of `lmforge.X` name its keyword arguments, not the command line's flags
    import lmforge

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(LmforgeError, match=r"pass overwrite=True to replace it or choose another out$"):
        lmforge.convert(hf_gpt2, tmp_path / "taken")
    with pytest.raises(LmforgeError, match=r"lower max_new_tokens, or pass truncate=True to keep its last"):
        lmforge.generate(hf_gpt2, "word " * 100, max_new_tokens=10)
    import pickle

    assert lmforge.generate is lmforge.generate and pickle.loads(pickle.dumps(lmforge.pretrain)) is lmforge.pretrain
    from lmforge.infer.generate import generate as the_modules_own

    with pytest.raises(LmforgeError, match=r"pass --truncate"):  # (what the command line calls)
        the_modules_own(hf_gpt2, "word " * 100, max_new_tokens=10)


def test_int8_runs_on_the_cpu_and_refuses_another_device(hf_gpt2, capsys):
    from lmforge.utils import pick_device

    assert pick_device("auto", int8=True).type == "cpu"  # (on a GPU machine too: int8 is a CPU kernel)
    one_error_line(capsys, ["generate", "--model", str(hf_gpt2), "--int8", "--device", "cuda", "hi"],
                   "--int8 is for CPU inference, not --device cuda; drop one of them")


# -- a second newcomer's sweep (session 15): each of these crashed, lost a file or trained the wrong thing --------


def test_models_of_the_wrong_kind_are_named_for_what_they_are(hf_gpt2, tmp_path, capsys, data_dir):
    """A T5 folder given to `reward` was a traceback (no pooler), to `dpo` "an encoder", to a classifier "cannot
    attach a head to EncoderDecoder"; an encoder given to `pretrain` (causal LM) said it cannot generate text."""
    from test_encoder_decoder import make_hf_t5
    from test_retrieval import MINILM

    t5 = make_hf_t5(tmp_path / "t5", "v1.0")
    shutil.copy(hf_gpt2 / "tokenizer.json", t5 / "tokenizer.json")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    rows = tmp_path / "c.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    for argv, match in [(["reward", "--model", str(t5), "--train", str(prefs)], "is an encoder-decoder (t5)"),
                        (["dpo", "--model", str(t5), "--train", str(prefs)], "is an encoder-decoder (t5)"),
                        (["finetune", "--model", str(t5), "--train", str(rows)],
                         "an encoder-decoder (t5) takes no sequence classification head"),
                        (["pretrain", "--model", str(MINILM), "--data", str(data_dir)],
                         "--objective clm trains a decoder: pretrain it with --objective mlm")]:
        out = tmp_path / argv[0]
        one_error_line(capsys, [*argv, "--out", str(out), "--max-steps", "1", "--quiet"], match)
        assert not out.exists()


def test_a_run_from_a_merged_adapter_trains_every_weight(hf_gpt2, tmp_path, data_dir):
    """`pretrain --model ADAPTER` crashed after writing its run folder (every weight of the merged model was left
    frozen as the adapter had them); `finetune --method full` from an adapter trained only the adapted products."""
    from lmforge.model.checkpoint import load_model
    from lmforge.model.lora import add_lora, save_adapter

    model = load_model(hf_gpt2)
    add_lora(model, "q,v", r=2)
    save_adapter(model, tmp_path / "adapter", hf_gpt2)
    merged = load_model(tmp_path / "adapter")
    assert all(p.requires_grad for p in merged.parameters())
    assert main(["pretrain", "--model", str(tmp_path / "adapter"), "--data", str(data_dir), "--out",
                 str(tmp_path / "run"), "--max-steps", "2", "--micro-batch-size", "2", "--eval-interval", "2",
                 "--quiet"]) in (0, None)
    trained = load_model(tmp_path / "run")
    changed = [n for (n, p), q in zip(merged.named_parameters(), trained.parameters()) if not torch.equal(p, q)]
    assert "wte.weight" in changed and len(changed) == len(list(merged.parameters()))


def test_overwrite_keeps_the_config_file_and_the_reward_code_the_run_reads(hf_gpt2, tmp_path, capsys, data_dir,
                                                                        monkeypatch):
    run = tmp_path / "run"
    argv = ["--data", str(data_dir), "--out", str(run), "--max-steps", "1", "--micro-batch-size", "2", "--quiet"]
    assert main(["pretrain", "--model", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", *argv]) in (0, None)
    (run / "my.yaml").write_text(f"model: tiny\nn_layer: 1\nn_embd: 32\nn_head: 2\ndata: {data_dir}\n")
    one_error_line(capsys, ["pretrain", "--config", str(run / "my.yaml"), "--out", str(run), "--overwrite", "--quiet"],
                   f"would replace {run / 'my.yaml'}, which this reads from")
    (run / "rw").mkdir()
    (run / "rw" / "myreward.py").write_text("def ok(prompt, completion, **row):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(run / "rw"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    one_error_line(capsys, ["rl", "--model", str(hf_gpt2), "--reward", "myreward:ok", "--train", str(prompts),
                            "--out", str(run), "--overwrite", "--quiet"], "myreward.py, which this reads from")
    assert (run / "my.yaml").exists() and (run / "rw" / "myreward.py").exists()


def test_settings_that_would_train_the_wrong_thing_are_refused(hf_gpt2, tmp_path, capsys, monkeypatch):
    """Duplicate --labels (a head with a class never trained), a misspelled field (a classifier read as
    language-model text), a negative --epochs (ran the default steps), --pooling on a decoder (ignored), a TRL-style
    reward function (every reward a penalty), a chat run whose tokenizer lacks the default template's tokens
    (the model could never learn to stop)."""
    from test_retrieval import MINILM

    rows = tmp_path / "c.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    typo = tmp_path / "typo.jsonl"
    typo.write_text(rows.read_text().replace('"label"', '"lable"'))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    wordpiece = make_hf_gpt2(tmp_path / "wp", vocab_size=30522, tokenizer_dir=MINILM)
    (tmp_path / "trl_reward.py").write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    from lmforge.data.examples import read_examples

    metadata = tmp_path / "meta.jsonl"  # (a column near a field's name, in a row that fits a format: no typo)
    metadata.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                    "prompt_id": "x1", "conversation_id": 3}) + "\n")
    assert read_examples(metadata).task == "chat"
    model = ["--model", str(hf_gpt2)]
    monkeypatch.chdir(tmp_path)  # (a reward module is imported from the working folder)
    for argv, match in [
            (["finetune", *model, "--train", str(rows), "--labels", "a,b,a"], "--labels lists 'a' twice"),
            (["finetune", *model, "--train", str(typo)], "field 'lable' is no format's field; did you mean 'label'?"),
            (["finetune", *model, "--train", str(rows), "--epochs", "-1"], "epochs must be 0"),
            # (a whole number written short is one; 1e-1 ran with 0 warmup steps)
            (["finetune", *model, "--train", str(rows), "--warmup-steps", "1e-1"], "expects int, got '1e-1'"),
            (["finetune", *model, "--train", str(rows), "--pooling", "mean"], "--pooling mean applies to encoders"),
            (["finetune", "--model", str(wordpiece), "--train", str(chat)], "lacks <|im_start|> and <|im_end|>"),
            (["rl", *model, "--reward", "trl_reward:f", "--train", str(prompts), "--max-new-tokens", "8"],
             "lmforge calls it once per completion as f(prompt=..., completion=..., **row_fields)")]:
        out = tmp_path / "out"
        one_error_line(capsys, [*argv, "--out", str(out), "--max-steps", "1", "--quiet"], match)
        assert not out.exists()
