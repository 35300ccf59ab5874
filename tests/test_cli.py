"""Every bad input gets one line that says what is wrong and how to fix it, and exit status 2."""

import json
import pathlib

import pytest
from conftest import make_hf_gpt2, run_cli, train_config

from lmforge.cli import main
from lmforge.infer.generate import generate


def fails_cleanly(capsys, argv, match):
    capsys.readouterr()  # drop what fixtures printed (transformers' own progress bars)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


def test_missing_input_path(capsys, tokenizer_dir, tmp_path):
    fails_cleanly(capsys, ["prepare", str(tmp_path / "nope.txt"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d")],
                  "nope.txt does not exist")


def test_unreadable_input_path(capsys, tokenizer_dir, tmp_path, monkeypatch):
    (tmp_path / "secret.txt").write_text("x" * 100)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)  # root ignores chmod, so simulate it
    fails_cleanly(capsys, ["prepare", str(tmp_path / "secret.txt"), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "d"), "--workers", "0"], "permission denied")


def test_empty_corpus(capsys, tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.md").write_text("   \n")
    fails_cleanly(capsys, ["prepare", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                           "--workers", "0"], "empty after cleaning")
    fails_cleanly(capsys, ["tokenizer", "train", str(tmp_path / "in"), "--out", str(tmp_path / "t"), "--quiet"], "no documents")


def test_non_utf8_bytes_are_a_warning_not_an_error(capsys, tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"good text \xff\xfe here " * 10)
    (tmp_path / "in" / "b.txt").write_text("other text " * 10)
    code = main(["prepare", str(tmp_path / "in"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                 "--workers", "0", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    # (naming the file: a corpus of many files is otherwise searched by hand)
    assert f"warning: {tmp_path / 'in' / 'a.txt'}: 20 bytes were not valid UTF-8 and were replaced by U+FFFD" in captured.err
    assert "train:" in captured.out


def test_prompt_longer_than_the_context(capsys, hf_gpt2):
    fails_cleanly(capsys, ["generate", "--model", str(hf_gpt2), "--max-new-tokens", "10", "word " * 100],
                  "exceeds the model's context of 64")
    capsys.readouterr()
    code = main(["generate", "--model", str(hf_gpt2), "--truncate", "--max-new-tokens", "5", "--temperature", "0", "word " * 100])
    captured = capsys.readouterr()
    assert code == 0 and "warning: prompt of 200 tokens left-truncated to its last 59" in captured.err


def test_checkpoint_vocabulary_smaller_than_the_tokenizer(capsys, tmp_path, tokenizer_dir):
    folder = make_hf_gpt2(tmp_path / "small-vocab", vocab_size=512, tokenizer_dir=tokenizer_dir)
    line = fails_cleanly(capsys, ["generate", "--model", str(folder), "hi"], "has 1024 tokens but the model's embedding has only 512")
    assert "use the tokenizer the model was trained with" in line


def test_unknown_config_key(capsys, data_dir, tmp_path):
    fails_cleanly(capsys, ["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--learning-rate", "1e-3"],
                  "unknown config key 'learning_rate'")
    (tmp_path / "c.yaml").write_text("max_step: 10\n")
    line = fails_cleanly(capsys, ["pretrain", "--config", str(tmp_path / "c.yaml")], "did you mean 'max_steps'")
    assert "valid keys:" in line


def test_corrupt_config_json_and_safetensors(capsys, hf_gpt2):
    good = (hf_gpt2 / "config.json").read_text()
    (hf_gpt2 / "config.json").write_text(good[:40])
    fails_cleanly(capsys, ["generate", "--model", str(hf_gpt2), "hi"], "config.json is not valid JSON")
    (hf_gpt2 / "config.json").write_text(good)
    data = (hf_gpt2 / "model.safetensors").read_bytes()
    (hf_gpt2 / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails_cleanly(capsys, ["generate", "--model", str(hf_gpt2), "hi"], "model.safetensors")


def test_missing_model_folder_and_data_folder(capsys, tmp_path):
    fails_cleanly(capsys, ["generate", "--model", str(tmp_path / "none"), "hi"], "does not exist")
    fails_cleanly(capsys, ["pretrain", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
                  "create it with `lmforge prepare")


def test_debug_shows_the_traceback(tmp_path):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError):
        main(["generate", "--debug", "--model", str(tmp_path / "none"), "hi"])


def test_real_entry_point_exit_status_and_stderr(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "none"), "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"lmforge: error: model folder {tmp_path / 'none'} does not exist"]
    result = run_cli("--debug", "generate", "--model", str(tmp_path / "none"), "hi")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_generate_streams_the_continuation_without_echo(hf_gpt2):
    expected = generate(hf_gpt2, "def main", max_new_tokens=12, temperature=0).text
    result = run_cli("generate", "--model", str(hf_gpt2), "--max-new-tokens", "12", "--temperature", "0", "def main")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    result = run_cli("generate", "--model", str(hf_gpt2), "--max-new-tokens", "12", "--temperature", "0", "--echo", "-",
                     stdin="def main")
    assert result.stdout == "def main" + expected + "\n"


def test_stop_strings_typed_on_a_command_line_take_escapes(hf_gpt2, capsys):
    from lmforge.utils import stop_strings

    assert stop_strings(r"\n") == ["\n"] and stop_strings(r"\t\r") == ["\t\r"] and stop_strings(r"a\\n") == ["a\\n"]
    assert stop_strings(r"\q") == [r"\q"] and stop_strings("é;x") == ["é;x"]  # (one string unless several)
    assert stop_strings(r"a\;b;\n;;Ü", several=True) == ["a;b", "\n", "Ü"]
    # `generate --stop '\n'` stops at a newline, as the API given a newline does
    text = generate(hf_gpt2, "def main", max_new_tokens=40, temperature=0).text
    stop = next((c for c in text[1:] if c in "\n\t"), text[3:5])  # (a newline or tab the model writes, if it does)
    typed = stop.replace("\n", r"\n").replace("\t", r"\t")
    assert main(["generate", "--model", str(hf_gpt2), "--max-new-tokens", "40", "--temperature", "0", "--stop", typed,
                 "def main"]) == 0
    assert capsys.readouterr().out == generate(hf_gpt2, "def main", max_new_tokens=40, temperature=0,
                                               stop=[stop]).text + "\n"


def test_the_whole_pipeline_from_the_command_line(corpus_dir, tmp_path):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert main(["tokenizer", "train", str(corpus_dir), "--vocab-size", "600", "--out", str(tok), "--quiet"]) == 0
    assert main(["prepare", str(corpus_dir), "--tokenizer", str(tok), "--out", str(data), "--quiet"]) == 0
    config = train_config(data, run, max_steps=6, eval_interval=3, sample_prompt="def ", sample_tokens=8)
    args = [f"--{k}={v}" for k, v in config.items()]
    assert main(["pretrain", "--quiet", *args]) == 0
    assert main(["generate", "--model", str(run), "--max-new-tokens", "5", "--seed", "1", "import"]) == 0
    assert main(["report", str(run)]) == 0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 6]
