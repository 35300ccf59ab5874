"""`lmforge report` on RL runs: rl.png (reward, per reward function, KL, completion length, the share cut at
max_new_tokens, validation reward points) and a first/last table, read from metrics.jsonl."""

import json

import pytest
from conftest import make_hf_gpt2

from lmforge.eval.report import read_metrics, write_report

FAST = dict(micro_batch_size=8, num_generations=4, max_new_tokens=6, max_steps=4, eval_interval=2, lr=1e-3,
            dtype="float32", threads=1, tensorboard=False, progress=False)


@pytest.fixture
def prompts(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    for path, n in ((train, 12), (val, 4)):
        rows = [{"prompt": f"{a} + {a + 1} =", "answer": str(2 * a + 1)} for a in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, val


def series(panel):
    return {label: (xs, ys) for label, xs, ys, _ in panel[2]}


def run_rl(tmp_path, tokenizer_dir, prompts, **kw):
    from lmforge.train.rl import rl

    model = make_hf_gpt2(tmp_path / "m", tokenizer_dir=tokenizer_dir)
    run = tmp_path / "rl"
    rl(model=str(model), train=str(prompts[0]), val=str(prompts[1]), out=str(run), **{**FAST, **kw})
    return run


def test_rl_records_are_split_into_training_steps_and_evaluations(tmp_path, tokenizer_dir, prompts):
    run = run_rl(tmp_path, tokenizer_dir, prompts, algo="grpo", reward="exact")
    train, val = read_metrics(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all("loss" in r for r in train)
    assert [r["step"] for r in val] == [0, 2, 4] and all("val_reward" in r and "loss" not in r for r in val)


def test_rl_report_plots_reward_kl_length_and_cut_share(tmp_path, tokenizer_dir, prompts, panels):
    # two rewards, so each has its own curve; a KL coefficient, so a reference runs and the KL is logged
    run = run_rl(tmp_path, tokenizer_dir, prompts, algo="grpo", reward="exact;regex:[0-9]", reward_weights="1;0.5",
                 kl_coef=0.05)
    text = write_report(run).read_text()
    train, val = read_metrics(run)

    png = (run / "rl.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20000
    assert "## Reinforcement learning" in text and "![reinforcement learning curves](rl.png)" in text
    [(_, plotted)] = [c for c in panels if c[0] == "rl.png"]
    assert [p[0] for p in plotted] == ["Reward", "KL to the reference", "Completion length",
                                       "Completions cut at max_new_tokens (6)"]
    reward, kl, length, cut = map(series, plotted)
    steps = [r["step"] for r in train]
    # four steps smooth over a window of 1: the plotted curves are the logged values
    assert reward["mean reward, rollouts"] == (steps, [r["reward_mean"] for r in train])
    assert reward["exact, rollouts"] == (steps, [r["reward_exact"] for r in train])
    assert reward["0_9, rollouts"] == (steps, [r["reward_0_9"] for r in train])
    assert reward["reward, validation (greedy)"] == ([0, 2, 4], [r["val_reward"] for r in val])
    assert reward["exact, validation (greedy)"] == ([0, 2, 4], [r["val_reward_exact"] for r in val])
    assert kl["KL, rollouts"] == (steps, [r["kl"] for r in train])
    assert length["length, rollouts"] == (steps, [r["completion_length"] for r in train])
    assert length["length, validation (greedy)"][1] == [r["val_completion_length"] for r in val]
    assert cut["cut, rollouts"] == (steps, [r["truncated_share"] for r in train])

    first, last = train[0], train[-1]
    assert "| | first (step 1) | last (step 4) |" in text
    assert f"| mean reward (rollouts) | {first['reward_mean']:.4f} | {last['reward_mean']:.4f} |" in text
    assert f"| 0_9 (rollouts) | {first['reward_0_9']:.4f} | {last['reward_0_9']:.4f} |" in text
    assert (f"| validation reward, greedy (step 0 → 4) | {val[0]['val_reward']:.4f} | "
            f"{val[-1]['val_reward']:.4f} |") in text
    assert f"| KL to the reference | {first['kl']:.4f} | {last['kl']:.4f} |" in text
    assert f"| share cut at max_new_tokens | {first['truncated_share']:.3f} | {last['truncated_share']:.3f} |" in text
    # the validation table holds the greedy reward at each evaluation
    assert "| step | tokens | reward | completion length | reward exact | reward 0 9 |" in text
    assert f"| 4 | {val[-1]['tokens']:,} | {val[-1]['val_reward']:.4f} |" in text
    # samples.jsonl's RL rows (prompt, completion, reward) are shown, and the loss axis says what the loss is
    assert "At step 0:" in text and "(reward " in text


def test_rl_report_without_a_reference_says_why_there_is_no_kl(tmp_path, tokenizer_dir, prompts, panels):
    run = run_rl(tmp_path, tokenizer_dir, prompts, algo="grpo", reward="exact")  # grpo's default kl_coef is 0
    text = write_report(run).read_text()
    [(_, plotted)] = [c for c in panels if c[0] == "rl.png"]
    assert [p[0] for p in plotted] == ["Reward", "Completion length", "Completions cut at max_new_tokens (6)"]
    assert "mean reward, rollouts" in series(plotted[0]) and "exact, rollouts" not in series(plotted[0])
    assert "No KL: kl_coef is 0" in text and "| mean reward (rollouts) |" in text
