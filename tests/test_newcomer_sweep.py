"""The README's commands with a newcomer's mistakes: each is one line, exit status 2, said before anything is
written or computed (flags that contradict each other, stdin with nothing piped in, an --out under a file)."""

import io
import sys

import pytest
from conftest import train_config
from test_usability import one_error_line

from lmforge.cli import main
from lmforge.train.loop import pretrain


def test_resume_and_overwrite_together_are_refused_and_the_run_is_kept(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(train_config(data_dir, out, max_steps=2, checkpoint_interval=2, eval_interval=2), progress=False)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_bytes()
    # (which was meant, continue or start over? Before, --overwrite was passed over and the run continued.)
    one_error_line(capsys, ["pretrain", "--out", str(out), "--resume", "--overwrite", "--max-steps", "4", "--quiet"],
                   "give one of them")
    one_error_line(capsys, ["finetune", "--out", str(out), "--resume", "--overwrite"], "give one of them")
    one_error_line(capsys, ["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", str(out), "--resume",
                            "--overwrite"], "give one of them")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "metrics.jsonl").read_bytes() == metrics


class _Terminal(io.TextIOWrapper):
    """Standard input that is the terminal: nothing piped in (reading it would wait for the user to type)."""

    def __init__(self):
        super().__init__(io.BytesIO(b"typed"))

    def isatty(self):
        return True


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "MODEL", "-"],
    ["tokenizer", "train", "-", "--out", "OUT"],
    ["prepare", "-", "--tokenizer", "MODEL", "--out", "OUT"],
    ["embed", "--model", "MODEL", "-"],
    ["search", "INDEX", "-"],
])
def test_dash_with_nothing_piped_in_is_an_error_not_a_silent_wait(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Terminal())
    argv = [str(tmp_path / a) if a in ("MODEL", "OUT", "INDEX") else a for a in argv]
    one_error_line(capsys, argv, "nothing is piped in")
    assert not (tmp_path / "OUT").exists()


def test_generate_from_an_empty_pipe_is_an_error_and_an_empty_prompt_still_generates(hf_gpt2, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    one_error_line(capsys, ["generate", "--model", str(hf_gpt2), "--max-new-tokens", "2", "-"], "empty prompt")
    assert main(["generate", "--model", str(hf_gpt2), "--max-new-tokens", "2", ""]) == 0  # (a generation from nothing)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def main():")))
    assert main(["generate", "--model", str(hf_gpt2), "--max-new-tokens", "2", "-"]) == 0


def test_eval_out_under_a_file_is_refused_before_the_model_runs(hf_gpt2, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    import lmforge.eval.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    one_error_line(capsys, ["eval", "--model", str(hf_gpt2), "--tasks", "brackets", "--limit", "2", "--out",
                            str(tmp_path / "notes.txt" / "eval.json")], "which is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_python_api_refuses_resume_and_overwrite_together(tmp_path, data_dir):
    """pretrain(resume=True, overwrite=True) ignored overwrite and continued, as the command did."""
    from lmforge.errors import LmforgeError

    pretrain(train_config(data_dir, tmp_path / "run", max_steps=2), progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(LmforgeError, match="give one of them"):
        pretrain(train_config(data_dir, tmp_path / "run", max_steps=4), resume=True, overwrite=True, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_run_resumed_by_another_command_says_which_command_trained_it(tmp_path, data_dir, capsys):
    """`lmforge finetune --out <a pretraining run> --resume` said "train ... is required"; it now names the command
    that trained the run, and nothing in it changes."""
    pretrain(train_config(data_dir, tmp_path / "run", max_steps=2), progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    for command in ("finetune", "dpo", "rl"):
        one_error_line(capsys, [command, "--out", str(tmp_path / "run"), "--resume"],
                       "is a run of `lmforge pretrain`; resume it with `lmforge pretrain --resume")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
