"""`lmforge report` on preference runs: preference.png and the last validation numbers, read from metrics.jsonl."""

import json

import pytest
from conftest import make_hf_gpt2

from lmforge.eval.report import write_report

FAST = dict(micro_batch_size=4, max_steps=3, eval_interval=3, warmup_steps=1, lr=1e-3, dtype="float32", threads=1,
            tensorboard=False, progress=False)


@pytest.fixture
def pairs(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, n in ((train, 16), (val, 6)):
        rows = [{"prompt": f"{a} + {a + 1} =", "chosen": f" {2 * a + 1}", "rejected": f" {2 * a + 3}"}
                for a in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, val


def records(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def series(panel):
    return {label: (xs, ys) for label, xs, ys, _ in panel[2]}


def test_dpo_report_plots_and_tabulates_the_preference_curves(tmp_path, tokenizer_dir, pairs, panels):
    from lmforge.train.preference import dpo

    model = make_hf_gpt2(tmp_path / "m", tokenizer_dir=tokenizer_dir)
    run = tmp_path / "dpo"
    dpo(model=str(model), train=str(pairs[0]), val=str(pairs[1]), out=str(run), **FAST)
    text = write_report(run).read_text()

    png = (run / "preference.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20000
    assert "## Preferences" in text and "![preference curves](preference.png)" in text
    train, val = records(run)
    first, last = val[0], val[-1]
    assert (first["step"], last["step"]) == (0, 3)
    assert "| validation | step 0 | step 3 |" in text
    assert f"| pair accuracy | {first['val_reward_accuracy']:.4f} | {last['val_reward_accuracy']:.4f} |" in text
    assert f"| implicit reward β·log(π/π_ref): margin | 0.0000 | {last['val_reward_margin']:.4f} |" in text
    assert f"| log π(chosen) | {first['val_logp_chosen']:.2f} | {last['val_logp_chosen']:.2f} |" in text
    assert f"| log π(rejected) | {first['val_logp_rejected']:.2f} | {last['val_logp_rejected']:.2f} |" in text
    assert "a tie counts as a wrong pair" in text  # why the step-0 accuracy is 0

    [(_, plotted)] = [c for c in panels if c[0] == "preference.png"]
    titles = [p[0] for p in plotted]
    assert titles == ["Pair accuracy (chosen scored above rejected)", "Margin (chosen minus rejected)",
                      "Chosen vs rejected", "Policy log-probability of the answers"]
    accuracy, margin, rewards, logps = map(series, plotted)
    # three steps smooth over a window of 1: the plotted training curves are the logged values
    assert accuracy["accuracy, train"] == ([1, 2, 3], [r["reward_accuracy"] for r in train])
    assert accuracy["accuracy, validation"] == ([0, 3], [r["val_reward_accuracy"] for r in val])
    assert margin["margin, validation"][1] == [r["val_reward_margin"] for r in val]
    assert rewards["chosen, train"][1] == [r["reward_chosen"] for r in train]
    assert rewards["rejected, validation"][1] == [r["val_reward_rejected"] for r in val]
    assert logps["chosen, train"][1] == [r["logp_chosen"] for r in train]
    assert logps["rejected, validation"][1] == [r["val_logp_rejected"] for r in val]


def test_reward_model_report_has_no_log_probability_panel(tmp_path, tokenizer_dir, pairs, panels):
    from lmforge.train.preference import train_reward

    model = make_hf_gpt2(tmp_path / "m", tokenizer_dir=tokenizer_dir)
    run = tmp_path / "reward"
    train_reward(model=str(model), train=str(pairs[0]), val=str(pairs[1]), out=str(run), **FAST)
    text = write_report(run).read_text()
    _, val = records(run)
    assert (run / "preference.png").read_bytes().startswith(b"\x89PNG")
    assert f"| reward: margin | {val[0]['val_reward_margin']:.4f} | {val[-1]['val_reward_margin']:.4f} |" in text
    assert "log π" not in text and "tie counts" not in text
    [(_, plotted)] = [c for c in panels if c[0] == "preference.png"]
    assert len(plotted) == 3


def test_pretraining_report_has_no_preference_section(tmp_path, panels):
    run = tmp_path / "run"
    run.mkdir()
    steps = [{"step": s, "tokens": 64 * s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_second": 1000.0,
              "elapsed": s / 10} for s in range(1, 6)]
    steps.append({"step": 5, "tokens": 320, "val_loss": 4.5, "val_perplexity": 90.0, "val_bits_per_byte": 1.8})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 1024}
    (run / "run.json").write_text(json.dumps({"model": model, "parameters": 1000, "hardware": "cpu", "device": "cpu",
                                              "dtype": "float32", "world_size": 1}))
    text = write_report(run).read_text()
    assert "Preferences" not in text and not (run / "preference.png").exists() and not panels
    assert "| 5 | 320 | 4.5000 | 90.00 | 1.8000 |" in text
