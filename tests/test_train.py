import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_config

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.train.checkpointing import checkpoint_dirs, latest_checkpoint
from lmforge.train.config import TrainConfig, load_config, parse_overrides
from lmforge.train.loop import lr_at, pretrain


def read_log(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_training_lowers_the_validation_loss(data_dir, tmp_path):
    # float32: `auto` picks bf16 autocast where the probe measures it faster, and this test checks the recorded dtype
    summary = pretrain(train_config(data_dir, tmp_path / "run", max_steps=60, eval_interval=30, dtype="float32"),
                       progress=False)
    train, val = read_log(tmp_path / "run")
    assert [r["step"] for r in train] == list(range(1, 61))
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5  # from ln(1024) = 6.93 at initialisation
    assert summary["val_loss"] == val[-1]["val_loss"]
    assert val[-1]["val_perplexity"] == pytest.approx(2.718281828 ** val[-1]["val_loss"], rel=1e-6)
    assert 0 < val[-1]["val_bits_per_byte"] < val[0]["val_bits_per_byte"]
    assert train[-1]["tokens"] == 60 * 4 * 32
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_steps"] == 60 and saved["n_embd"] == 32
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["parameters"] > 0 and run["dtype"] == "float32"


def test_checkpoints_are_hf_folders_with_training_state_beside_and_only_the_last_k_kept(data_dir, tmp_path):
    pretrain(train_config(data_dir, tmp_path / "run", max_steps=30, checkpoint_interval=10, keep_checkpoints=2), progress=False)
    dirs = checkpoint_dirs(tmp_path / "run")
    assert [d.name for d in dirs] == ["step_0000020", "step_0000030"]
    assert sorted(p.name for p in dirs[-1].iterdir()) == ["manifest.json", "model", "trainer.pt"]
    assert (dirs[-1] / "model" / "model.safetensors").exists() and (dirs[-1] / "model" / "tokenizer.json").exists()
    state = torch.load(dirs[-1] / "trainer.pt", weights_only=True)
    assert state["step"] == 30 and state["loader"]["batch_index"] == 30 and "optimizer" in state


def test_a_failed_save_never_breaks_the_latest_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=10), progress=False)
    good = latest_checkpoint(run)

    def crash(*args, **kwargs):  # simulate the process dying half-way through writing trainer.pt
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(train_config(data_dir, run, max_steps=20), resume=True, progress=False)
    assert latest_checkpoint(run) == good
    assert [p.name for p in (run / "checkpoints").iterdir()] == [good.name]
    # A temporary folder left by a SIGKILL is ignored too.
    (run / "checkpoints" / ".tmp-step_0000020").mkdir()
    assert latest_checkpoint(run) == good


def _run_cli_training(config: dict, extra: list[str] = ()) -> subprocess.Popen:
    path = Path(config["out"] + ".yaml")
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--config", str(path), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_gives_identical_losses(data_dir, tmp_path):
    steps = 300
    kw = dict(max_steps=steps, checkpoint_interval=40, eval_interval=50, dropout=0.1)
    straight = tmp_path / "straight"
    pretrain(train_config(data_dir, straight, **kw), progress=False)

    killed = tmp_path / "killed"
    proc = _run_cli_training(train_config(data_dir, killed, **kw))
    deadline = time.time() + 120
    while time.time() < deadline:
        log = killed / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) > 100 and latest_checkpoint(killed) is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = int(latest_checkpoint(killed).name.split("_")[1])
    assert 40 <= resumed_from < steps, "the run must be killed part-way"
    proc = _run_cli_training(train_config(data_dir, killed, **kw), ["--resume"])
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    a, b = read_log(straight), read_log(killed)
    assert [r["loss"] for r in a[0]] == [r["loss"] for r in b[0]]  # bit-identical, step for step
    assert [r["step"] for r in b[0]] == list(range(1, steps + 1))
    assert [r["val_loss"] for r in a[1]] == [r["val_loss"] for r in b[1]]


def test_grad_accumulation_matches_a_larger_batch(data_dir, tmp_path):
    # float32: under bf16 autocast (`auto` where it is faster) sums in another order differ by more than 1e-5
    kw = dict(dtype="float32")
    pretrain(train_config(data_dir, tmp_path / "a", micro_batch_size=4, grad_accum_steps=1, **kw), progress=False)
    pretrain(train_config(data_dir, tmp_path / "b", micro_batch_size=1, grad_accum_steps=4, **kw), progress=False)
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert a[0][-1]["tokens"] == b[0][-1]["tokens"]
    for x, y in zip(a[0], b[0]):  # 1 × 4 equals 4 × 1, step for step
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4
    for x, y in zip(a[1], b[1]):
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5


@pytest.mark.slow
def test_two_processes_with_half_the_batch_match_one_process(data_dir, tmp_path):
    kw = dict(max_steps=12, eval_interval=6, checkpoint_interval=6, dtype="float32")
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    cfg = train_config(data_dir, tmp_path / "two", micro_batch_size=2, **kw)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lmforge", "pretrain", "--config", str(tmp_path / "two.yaml"), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    # Only rank 0 writes: every step is logged exactly once.
    assert [r["step"] for r in two[0]] == list(range(1, 13))
    assert [r["step"] for r in two[1]] == [0, 6, 12]
    for x, y in zip(one[0], two[0]):
        assert abs(x["loss"] - y["loss"]) < 1e-5
    for x, y in zip(one[1], two[1]):
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5
    assert [d.name for d in checkpoint_dirs(tmp_path / "two")] == ["step_0000006", "step_0000012"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(60, c) == pytest.approx(0.55)
    assert lr_at(110, c) == pytest.approx(0.1)


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3.0e-4\nmax_steps: 50\ncompile: false\n")
    config = load_config(path, parse_overrides(["--max-steps", "70", "--compile", "--min_lr=1e-5"]))
    assert (config.lr, config.max_steps, config.compile, config.min_lr) == (3e-4, 70, True, 1e-5)


def test_config_errors_name_the_valid_keys(tmp_path):
    with pytest.raises(LmforgeError, match=r"unknown config key 'lrr' \(did you mean 'lr'\?\); valid keys: data, out"):
        load_config(None, {"lrr": 1})
    with pytest.raises(LmforgeError, match="'max_steps' expects int, got 'many'"):
        load_config(None, {"max_steps": "many"})
    path = tmp_path / "c.yaml"
    path.write_text("lr: [1\n")
    with pytest.raises(LmforgeError, match="not valid YAML at line"):
        load_config(path)
    # a file where a folder is wanted, or in the way of one
    (tmp_path / "afile").write_text("x")
    for config, message in [(dict(data=str(tmp_path / "afile")), "is a file; give the folder `lmforge prepare` wrote"),
                            (dict(out=str(tmp_path / "afile" / "sub")), "lies under .*afile, which is a file")]:
        with pytest.raises(LmforgeError, match=message):
            pretrain({**train_config(tmp_path, tmp_path / "r", max_steps=1), **config}, progress=False)
    path.write_text("lr: 0.1\nmax_steps: 4\nlr: 0.2\n")  # (YAML would keep the last one silently)
    with pytest.raises(LmforgeError, match=r"sets 'lr' twice \(lines 1 and 3\); keep one"):
        load_config(path)
    with pytest.raises(LmforgeError, match="is a folder; give the YAML file"):
        load_config(tmp_path)
    with pytest.raises(LmforgeError, match="micro_batch_size must be at least 1"):
        load_config(None, {"micro_batch_size": 0})


def test_run_folder_protection(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=2), progress=False)
    with pytest.raises(LmforgeError, match="not empty; pass --resume to continue it or --overwrite"):
        pretrain(train_config(data_dir, run, max_steps=2), progress=False)
    with pytest.raises(LmforgeError, match="nothing to resume"):
        pretrain(train_config(data_dir, tmp_path / "fresh", max_steps=2), resume=True, progress=False)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.txt").write_text("do not delete")
    with pytest.raises(LmforgeError, match="not an lmforge run folder"):
        pretrain(train_config(data_dir, other, max_steps=2), overwrite=True, progress=False)
    assert (other / "thesis.txt").exists()


def test_resume_with_only_the_out_folder_reuses_the_saved_config(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=10), progress=False)
    capsys.readouterr()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:  # a line a killed run left cut short
        f.write('{"step": 11, "tokens": 99, "lo')
    summary = pretrain(out=str(run), max_steps=14, resume=True, progress=False)
    assert capsys.readouterr().out.startswith(f"resuming from step 10 of {run}\n")
    assert summary["steps"] == 14
    assert [r["step"] for r in read_log(run)[0]] == list(range(1, 15))


def test_continue_training_from_a_model_folder(data_dir, tmp_path):
    pretrain(train_config(data_dir, tmp_path / "a", max_steps=10), progress=False)
    model_dir = latest_checkpoint(tmp_path / "a") / "model"
    cfg = train_config(data_dir, tmp_path / "b", max_steps=5)
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        cfg.pop(key)
    cfg["model"] = str(model_dir)
    pretrain(cfg, progress=False)
    a_val, b_val = read_log(tmp_path / "a")[1], read_log(tmp_path / "b")[1]
    assert b_val[0]["val_loss"] == pytest.approx(a_val[-1]["val_loss"], abs=1e-6)
    with pytest.raises(LmforgeError, match=r"n_layer 3 \(the model's: 2\) cannot change when continuing"):
        pretrain({**cfg, "n_layer": 3, "out": str(tmp_path / "c")}, progress=False)
    # the model's own values, given again, are no change
    pretrain({**cfg, "n_layer": 2, "block_size": 32, "max_steps": 1, "out": str(tmp_path / "d")}, progress=False)


def test_a_model_folder_named_like_a_preset_is_the_model_and_that_is_said(data_dir, tmp_path, monkeypatch, capsys):
    """`--model tiny` beside a folder `tiny` built the preset without a word, while the tokenizer check read the
    folder. A model (or run) folder of a preset's name in the working directory is taken, as transformers takes a
    local folder before a Hub name, and said; a folder of something else, or the run's own --out, is not a model."""
    from lmforge.train import config as config_module
    from lmforge.train.plan import plan

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_module, "_FOLDERS_SAID", set())
    (tmp_path / "mini").mkdir()  # (not a model: `mini` is the preset)
    assert config_module.means_preset("mini") and not config_module.means_preset("./tiny")
    pretrain(train_config(data_dir, "tiny", max_steps=10), progress=False)  # a run folder named like the preset
    assert config_module.means_preset("tiny", out="tiny")  # (--overwrite of it starts the preset again)
    capsys.readouterr()
    pretrain(train_config(data_dir, "b", max_steps=1), progress=False)
    err = capsys.readouterr().err
    assert (f"warning: model 'tiny': using the model folder {tmp_path / 'tiny'} here, not the preset 'tiny' (for the "
            f"preset, run from another folder or rename that one)") in err
    # it continued the folder's model: its first evaluation is the folder's last
    assert read_log(tmp_path / "b")[1][0]["val_loss"] == pytest.approx(read_log(tmp_path / "tiny")[1][-1]["val_loss"],
                                                                       abs=1e-6)
    assert plan("tiny", gpus=1).params == json.loads((tmp_path / "tiny" / "run.json").read_text())["parameters"]
    assert err.count("warning: model 'tiny'") == 1  # said once


def test_a_llama_layout_model_trains_and_saves_a_llama_folder(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, model="tiny-llama", n_kv_head=1, max_steps=30, eval_interval=30), progress=False)
    val = read_log(run)[1]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.5
    folder = latest_checkpoint(run) / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 1
    from lmforge.model.checkpoint import load_model

    idx = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(idx), hf(idx).logits, atol=1e-4, rtol=0)


# -- every check before anything in the run folder is written --------------------------------------


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder, to check that a refused command changed nothing."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_data(corpus_dir, tmp_path_factory) -> Path:
    """The same corpus prepared with another tokenizer, of twice the vocabulary."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    train_tokenizer([corpus_dir], root / "tokenizer", vocab_size=2048, progress=False)
    prepare([corpus_dir], root / "tokenizer", root / "data", val_fraction=0.1, workers=0, progress=False)
    return root / "data"


def test_resume_on_data_of_another_tokenizer_is_refused_and_leaves_the_run_as_it_was(data_dir, other_data, tmp_path,
                                                                                    capsys, corpus_dir):

    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=4), progress=False)
    before = run_files(run)
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--data", str(other_data), "--max-steps", "6", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error == (f"lmforge: error: {other_data} was prepared with a different tokenizer than the one {run} was "
                     f"trained with; resume with data prepared by that tokenizer, or start a new run (--out) for this data\n")
    assert run_files(run) == before
    # so a plain --resume still works
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "6", "--quiet"]) == 0
    # continuing the run's model (--model) on data of another tokenizer (of no more tokens) is refused too, before
    # any run folder is made
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    some = [str(p) for p in sorted(Path(corpus_dir).rglob("*.py"))[:3]]
    train_tokenizer(some, tmp_path / "tok", vocab_size=600, progress=False)
    prepare(some, tmp_path / "tok", tmp_path / "small", val_fraction=0.3, min_chars=0, workers=0, progress=False)
    assert main(["pretrain", "--model", str(run), "--data", str(tmp_path / "small"), "--out", str(tmp_path / "more"),
                 "--max-steps", "2", "--quiet"]) == 2
    assert f"{tmp_path / 'small'} was prepared with another tokenizer than {run}'s" in capsys.readouterr().err
    assert not (tmp_path / "more").exists()
    assert [r["step"] for r in read_log(run)[0]] == list(range(1, 7))


def test_a_model_with_fewer_embeddings_than_the_data_has_token_ids_is_refused(data_dir, tmp_path, capsys):
    from conftest import make_hf_gpt2


    small = make_hf_gpt2(tmp_path / "small", vocab_size=101)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": str(data_dir), "out": str(tmp_path / "run"),
                                                      "model": str(small), "max_steps": 2}))
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"lmforge: error: {data_dir} has token ids up to 1023 but the model of {small} has only 101 embeddings; "
        f"prepare the data with that model's tokenizer\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_steps", [6, 10])
def test_resume_to_a_step_already_reached_says_so_and_changes_nothing(max_steps, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=10), progress=False)
    before = run_files(run)
    capsys.readouterr()
    summary = pretrain(out=str(run), max_steps=max_steps, resume=True, progress=False)
    assert capsys.readouterr().out == (f"{run} is already at step 10 ≥ --max-steps {max_steps}; nothing to do "
                                       f"(pass a larger --max-steps to continue)\n")
    assert summary["steps"] == 10 and summary["checkpoint"] == str(run / "checkpoints" / "step_0000010")
    assert run_files(run) == before
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", str(max_steps)]) == 0
    assert "nothing to do" in (out := capsys.readouterr().out) and "done:" not in out  # nothing was done
    assert run_files(run) == before


def test_resume_refuses_to_change_what_shapes_the_model(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=4), progress=False)
    before = run_files(run)
    with pytest.raises(LmforgeError, match=r"--n-layer cannot change when resuming \(.* was trained with 2, not 3\)"):
        pretrain(out=str(run), n_layer=3, max_steps=6, resume=True, progress=False)
    assert run_files(run) == before


def test_overwrite_removes_the_old_run_only_once_the_new_one_passed_its_checks(data_dir, tmp_path):
    from lmforge.eval.baselines import train_lstm

    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=2), progress=False)
    before = run_files(run)
    with pytest.raises(LmforgeError, match="data folder .* does not exist"):
        pretrain(train_config(tmp_path / "no-data", run, max_steps=2), overwrite=True, progress=False)
    assert run_files(run) == before
    # The LSTM baseline runs through the same loop.
    lstm = tmp_path / "lstm"
    shape = dict(n_embd=16, hidden=16, n_layer=1, block_size=32, max_steps=2, threads=1, tensorboard=False)
    train_lstm(str(data_dir), str(lstm), progress=False, **shape)
    before = run_files(lstm)
    with pytest.raises(LmforgeError, match="data folder .* does not exist"):
        train_lstm(str(tmp_path / "no-data"), str(lstm), progress=False, overwrite=True, **shape)
    assert run_files(lstm) == before


def test_a_run_goes_on_when_the_reader_of_its_output_goes_away(data_dir, tmp_path):
    """`lmforge pretrain ... | head -1`: the run trains to its end and saves, writing its progress nowhere."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(train_config(data_dir, tmp_path / "run", max_steps=8, eval_interval=2)))
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    process.stdout.readline()
    process.stdout.close()  # the reader has gone
    assert process.wait(timeout=120) == 0
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")][-1] == "step_0000008"


def test_overwrite_never_deletes_what_the_run_reads(data_dir, tmp_path, corpus_dir, tokenizer_dir):
    """--overwrite empties the run folder: a model, data or prompts inside it are refused, nothing deleted; a run
    that stopped before its first checkpoint is pointed at --overwrite, not at --resume. The other commands that
    replace a folder (prepare, tokenizer train, the n-gram baseline) refuse the same."""
    import shutil

    from lmforge.data.prepare import prepare
    from lmforge.eval.baselines import train_ngram
    from lmforge.tokenizer import train_tokenizer

    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=2), progress=False)
    model = checkpoint_dirs(run)[-1] / "model"
    shutil.copytree(data_dir, run / "data")
    before = run_files(run)
    for config in (train_config(data_dir, run, max_steps=2, model=str(model), n_layer=None, n_head=None, n_embd=None,
                                block_size=None),
                   train_config(run / "data", run, max_steps=2)):
        with pytest.raises(LmforgeError, match=f"--out {run} would replace .*, which this reads from; choose another"):
            pretrain(config, overwrite=True, progress=False)
        assert run_files(run) == before
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("max_steps: 2\n")
    with pytest.raises(LmforgeError, match="holds no checkpoint to resume; pass --overwrite to start over"):
        pretrain(train_config(data_dir, stopped, max_steps=2), progress=False)

    with pytest.raises(LmforgeError, match="which this reads from"):
        prepare([str(run / "data")], tokenizer_dir, run / "data", overwrite=True, progress=False)
    (run / "tokenizer.json").write_text("{}")  # (as if it held a tokenizer: the reading is what is refused)
    with pytest.raises(LmforgeError, match="which this reads from"):
        train_tokenizer([str(run / "data")], run, vocab_size=300, overwrite=True, progress=False)
    (run / "tokenizer.json").unlink()
    assert run_files(run) == before
    # and a folder of something else is never replaced, whatever it holds
    other = tmp_path / "my-notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for make, what in [(lambda: prepare([str(corpus_dir)], tokenizer_dir, other, overwrite=True, progress=False),
                        "a prepared-data folder (it has no meta.json)"),
                       (lambda: train_tokenizer([str(corpus_dir)], other, vocab_size=300, overwrite=True,
                                                progress=False), "a tokenizer folder (it has no tokenizer.json)"),
                       (lambda: train_ngram(data_dir, other, overwrite=True), "an n-gram baseline folder")]:
        with pytest.raises(LmforgeError, match=re.escape(f"--overwrite refused: {other} is not {what}")):
            make()
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1


def test_finetune_resume_refuses_another_method_and_leaves_the_run_as_it_was(hf_gpt2, tmp_path):
    from lmforge.train.finetune import finetune

    rows = [{"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(6) for b in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(model=str(hf_gpt2), train=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "run"), eval_interval=2,
                    checkpoint_interval=2, micro_batch_size=4, threads=1, tensorboard=False)
    finetune(max_steps=2, progress=False, **settings)
    before = run_files(tmp_path / "run")
    with pytest.raises(LmforgeError, match="--method cannot change when resuming .* was trained with 'full', not 'lora'"):
        finetune(max_steps=4, method="lora", resume=True, progress=False, **settings)
    assert run_files(tmp_path / "run") == before


def test_training_flushes_subnormal_floats_to_zero_and_gives_the_setting_back(data_dir, tmp_path, monkeypatch):
    """AdamW's moments of parameters with zero gradient (unused embedding rows) decay into subnormal floats, on
    which CPUs compute ~20x slower: training flushes them to zero (measured: an untied T5 step went 3x slower by
    step 500 without it), and the process's float behaviour is as before once training returns."""
    import lmforge.train.loop as loop

    tiny = torch.tensor([1e-39])
    seen = []
    real_loop = loop._train

    def spy(*args):
        seen.append((tiny * 1.0).item())  # inside training
        return real_loop(*args)

    monkeypatch.setattr(loop, "_train", spy)
    assert (tiny * 1.0).item() > 0  # subnormal arithmetic, before
    pretrain(train_config(data_dir, tmp_path / "run", max_steps=1), progress=False)
    assert seen == [0.0] and (tiny * 1.0).item() > 0


def test_training_keeps_freed_memory_for_the_next_step_and_puts_glibcs_settings_back(data_dir, tmp_path, monkeypatch):
    """glibc maps allocations over 32 MB afresh and unmaps them when freed (a page fault per 4 KB of every large
    tensor, each step): the training steps tell it to keep freed memory (mmap off, no trimming), once however
    deeply nested, and the defaults are put back and the free memory returned when training returns. Setting up
    (loading, sharding) runs with glibc's defaults: the whole tensors it frees go back to the system."""
    import lmforge.precision as precision
    import lmforge.train.loop as loop

    calls, seen = [], []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    real_glibc = precision._glibc
    monkeypatch.setattr(precision, "_glibc", lambda: FakeLibc())
    real_optimizer, real_lr = loop.make_optimizer, loop.lr_at
    monkeypatch.setattr(loop, "make_optimizer", lambda *args: seen.append(("setup", list(calls))) or real_optimizer(*args))
    monkeypatch.setattr(loop, "lr_at", lambda *args: seen.append(("step", list(calls))) or real_lr(*args))
    with precision.keeping_freed_memory():  # an outer block: training inside it changes nothing more
        pretrain(train_config(data_dir, tmp_path / "nested", max_steps=1), progress=False)
        assert calls == [(-4, 0), (-1, 2**31 - 1)]
    assert calls[2:] == [(-4, 65536), (-1, 128 * 1024), ("trim", 0)]
    calls.clear()
    pretrain(train_config(data_dir, tmp_path / "run", max_steps=1), progress=False)
    assert seen[-2:] == [("setup", []), ("step", [(-4, 0), (-1, 2**31 - 1)])]  # set while the steps run
    assert calls[2:] == [(-4, 65536), (-1, 128 * 1024), ("trim", 0)]
    libc = real_glibc()  # the real lookup: glibc on Linux, None elsewhere (where training leaves malloc alone)
    assert libc is None or libc.gnu_get_libc_version


def test_in_bf16_a_step_casts_the_weights_once_however_many_micro_batches(data_dir, tmp_path, monkeypatch):
    """autocast keeps the bf16 copies of the weights it makes until its outermost region ends: the loop holds one
    region (autocast off) over a step's micro-batches and one over an evaluation, so 4 micro-batches cast the
    weights once, as 1 does (an autocast region that ends empties the cache: counted here), with the same losses
    and gradient norms as 4 micro-batches each casting them afresh."""
    ends, real = [], torch.clear_autocast_cache
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: ends.append(1) or real())
    kw = dict(max_steps=2, eval_interval=100, dtype="bfloat16")
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=2, **kw), progress=False)  # (eval alike)
    once = len(ends)
    ends.clear()
    pretrain(train_config(data_dir, tmp_path / "four", micro_batch_size=2, grad_accum_steps=4, **kw), progress=False)
    assert len(ends) == once  # (with a region per micro-batch: 6 more)
    held = [(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / "four")[0]]

    import lmforge.train.loop as loop

    monkeypatch.setattr(loop.torch, "autocast", _autocast_without_nesting(loop.torch.autocast))
    pretrain(train_config(data_dir, tmp_path / "afresh", micro_batch_size=2, grad_accum_steps=4, **kw), progress=False)
    assert held == [(r["loss"], r["grad_norm"]) for r in read_log(tmp_path / "afresh")[0]]


def _autocast_without_nesting(autocast):
    """torch.autocast whose regions each empty the cache when they end (as one region per micro-batch did)."""

    class Afresh(autocast):
        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            torch.clear_autocast_cache()
            return out

    return Afresh


def test_a_resumed_run_uses_its_new_optimizer_settings_and_says_when_the_lr_jumps(data_dir, tmp_path, capsys):
    """--weight-decay and --beta2 given to --resume went into config.yaml while the saved optimizer state put the
    old ones back; a larger --max-steps stretches the cosine, so the lr jumps where the run goes on: said."""
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=6, warmup_steps=2, checkpoint_interval=6), progress=False)
    capsys.readouterr()
    pretrain(out=str(run), max_steps=8, weight_decay=0.5, beta2=0.99, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "weight_decay 0.1 -> 0.5, betas (0.9, 0.95) -> (0.9, 0.99)" in err
    assert "the learning-rate schedule changed (max_steps 6 -> 8)" in err
    groups = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.9, 0.99)), (0.0, (0.9, 0.99))]
    # the same settings again: nothing to say
    pretrain(out=str(run), max_steps=9, resume=True, progress=False)
    assert "optimizer" not in capsys.readouterr().err


def test_an_interrupted_run_names_its_last_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C said only "interrupted": which checkpoint --resume would go on from (what was lost) is said."""
    from lmforge.train import loop

    save = loop.save_checkpoint

    def save_then_interrupt(run, step, *args, **kwargs):
        result = save(run, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(loop, "save_checkpoint", save_then_interrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pretrain(train_config(data_dir, run, max_steps=8, checkpoint_interval=2), progress=False)
    err = capsys.readouterr().err
    assert "lmforge: stopped; the last checkpoint is " in err and "--resume goes on from it" in err
    assert err.split("the last checkpoint is ")[1].split(";")[0] == str(latest_checkpoint(run))
