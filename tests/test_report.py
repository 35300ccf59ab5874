import json

import pytest
from conftest import train_config

from lmforge.errors import LmforgeError
from lmforge.eval.report import write_report
from lmforge.train.loop import pretrain


def test_report_numbers_equal_the_metrics_log(data_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=20, eval_interval=10, sample_prompt="import ", sample_tokens=6), progress=False)
    report = write_report(run).read_text()
    for name in ("loss.png", "lr.png", "throughput.png"):
        data = (run / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    last = [r for r in records if "loss" in r][-1]
    for r in val:
        assert (f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_perplexity']:.2f} | "
                f"{r['val_bits_per_byte']:.4f} |") in report
    assert f"| tokens seen | {last['tokens']:,}" in report
    assert f"| steps | {last['step']:,} |" in report
    run_info = json.loads((run / "run.json").read_text())
    assert f"| parameters | {run_info['parameters']:,}" in report
    assert "| step | tokens | loss | perplexity | bits per byte |" in report
    assert "![loss](loss.png)" in report and "At step 0:" in report and "At step 20:" in report


def test_a_report_of_damaged_run_files_is_one_line_and_skipped_updates_are_shown(data_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=4, eval_interval=2), progress=False)
    records = (run / "metrics.jsonl").read_text()
    steps = [json.loads(line) for line in records.splitlines() if '"loss"' in line]
    (run / "metrics.jsonl").write_text(records + json.dumps({**steps[-1], "step": 5, "loss": float("nan"),
                                                             "skipped": True}) + "\n")
    assert "| skipped updates (loss or gradients not finite) | 1 of 5 steps |" in write_report(run).read_text()
    for name, text, message in [("metrics.jsonl", records + "[1, 2]\n", "is no JSON object"),
                                ("metrics.jsonl", records + '{"step": "x", "loss": "abc"}\n', "needs the number\\(s\\) step"),
                                ("config.yaml", ": : bad\n", "is not valid YAML"),
                                ("config.yaml", "- a\n", "must be a mapping of key: value lines"),
                                ("eval.json", '{"model": 5, "tasks": []}', "is not lmforge evaluation results")]:
        broken = tmp_path / "broken"
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(run, broken)
        (broken / "metrics.jsonl").write_text(records)
        (broken / name).write_text(text)
        with pytest.raises(LmforgeError, match=message):
            write_report(broken)


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(LmforgeError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_report_of_a_finetuning_run_shows_its_metrics(hf_gpt2, tmp_path):
    import json as json_

    from lmforge.train.finetune import finetune

    rows = [{"text": f"it was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(40)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json_.dumps(r) + "\n" for r in rows))
    finetune(model=str(hf_gpt2), train=str(data), out=str(tmp_path / "run"), max_steps=4, eval_interval=2, threads=1,
             tensorboard=False, progress=False)
    report = write_report(tmp_path / "run").read_text()
    assert "| step | tokens | loss | accuracy | macro f1 | mcc |" in report
    assert "| task, method | classification, full" in report


def test_a_metrics_log_cut_short_by_a_crash_is_reported_up_to_its_last_whole_record(data_dir, tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves its last line cut off mid-JSON: the report refused the whole
    run ("the metrics log is corrupt"); it reports the records before it and says what it left out. A bad line
    before the last one is still corruption."""
    run = tmp_path / "run"
    pretrain(train_config(data_dir, run, max_steps=4, eval_interval=2), progress=False)
    records = (run / "metrics.jsonl").read_text()
    steps = [json.loads(line) for line in records.splitlines() if '"loss"' in line]
    capsys.readouterr()
    (run / "metrics.jsonl").write_text(records + json.dumps({**steps[-1], "step": 5})[:25])
    report = write_report(run).read_text()
    assert f"| steps | {steps[-1]['step']:,} |" in report
    lineno = len(records.splitlines()) + 1
    assert (f"warning: {run / 'metrics.jsonl'}:{lineno}: the last record is cut short (the run stopped while writing "
            f"it); reporting the {len(steps)} training step(s) before it") in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(records + '{"step": 5, "lo\n' + json.dumps({**steps[-1], "step": 6}) + "\n")
    with pytest.raises(LmforgeError, match=f"metrics.jsonl:{lineno} is not valid JSON; the metrics log is corrupt"):
        write_report(run)
