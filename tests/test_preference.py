"""Preference learning: pairs read and tokenised, `lmforge reward`, `lmforge dpo`, `lmforge reward-score`.

Every claim is an exact expectation: the same tokens from every file format, the prompt's tokens as
`generate` and `chat` feed them, DPO's loss of log 2 where the policy is its reference, identical runs
whatever the reference mode, batch layout or interruption."""

import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_hf_gpt2, run_cli
from safetensors import safe_open

from lmforge.cli import main
from lmforge.data.preference import TokenizeStats, read_pairs, tokenize_pair, tokenize_pairs
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.preference import REFERENCE_CACHE, dpo, reward_scores, train_reward

transformers = pytest.importorskip("transformers")

LOG2 = math.log(2)
SYSTEM = {"role": "system", "content": "answer with a number"}


# -- data -----------------------------------------------------------------------------------------


def string_pairs(n=32, seed=0):
    """Sums: the right one chosen; prompts and answers of different lengths, so micro-batches pad differently."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": "please " * rng.randint(0, 3) + f"add {a} {b} =", "chosen": f" {a + b}",
                     "rejected": f" {a + b + rng.randint(1, 5)}" + " maybe" * rng.randint(0, 5)})
    return rows


def chat_pairs(n=12, seed=0):
    """Conversations: a multi-turn prompt (system, user, assistant, user), then one assistant answer each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        prompt = [SYSTEM, {"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b}"},
                  {"role": "user", "content": f"and {c}?"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{a + b + c}"}],
                     "rejected": [{"role": "assistant", "content": f"{a + b + c + 1}, I think"}]})
    return rows


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows):
    """Message lists go in cells as JSON text; a row without a margin leaves its cell empty."""
    fields = [k for k in ("prompt", "chosen", "rejected", "margin") if any(k in r for r in rows)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [k for k in ("prompt", "chosen", "rejected", "margin") if any(k in r for r in rows)]
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return str(path)


def logs(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def final_weights(run) -> dict:
    """Every tensor of the run's latest checkpoint (a model, or an adapter and its head)."""
    from safetensors.torch import load_file

    folder = latest_checkpoint(run) / "model"
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def settings(out, **kw):
    base = dict(out=str(out), max_steps=8, eval_interval=4, checkpoint_interval=4, lr=1e-3, warmup_steps=0,
                micro_batch_size=4, threads=1, tensorboard=False, seed=0, dtype="float32")
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    """A tiny random GPT-2 (2 layers, width 32) with the test tokenizer; tests only read it."""
    return make_hf_gpt2(tmp_path_factory.mktemp("base") / "gpt2", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


# -- 1. formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["strings", "messages"])
def test_jsonl_csv_and_parquet_give_the_same_tokenised_pairs_and_margins(tok, tmp_path, kind):
    rows = string_pairs(12) if kind == "strings" else chat_pairs(12)
    margins = {0: 1.5, 4: 2, 7: -0.25}  # an int margin is read as a float too
    for i, m in margins.items():
        rows[i]["margin"] = m
    files = [jsonl(tmp_path / "p.jsonl", rows), write_csv(tmp_path / "p.csv", rows),
             write_parquet(tmp_path / "p.parquet", rows)]
    tokenised = [tokenize_pairs(tok, read_pairs(f).rows, 64)[0] for f in files]
    assert len(tokenised[0]) == 12
    assert tokenised[1] == tokenised[0] and tokenised[2] == tokenised[0]
    assert [p.margin for p in tokenised[0]] == [float(margins.get(i, 0.0)) for i in range(12)]
    assert len({tuple(p.prompt) for p in tokenised[0]}) > 1  # the rows differ: equality says something


def test_the_implicit_prompt_form_gives_the_same_tokens_as_an_explicit_prompt(tok, tmp_path):
    rows = chat_pairs(12)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    explicit = tokenize_pairs(tok, read_pairs(jsonl(tmp_path / "e.jsonl", rows)).rows, 64)[0]
    for path in (jsonl(tmp_path / "i.jsonl", implicit), write_csv(tmp_path / "i.csv", implicit)):
        read = read_pairs(path).rows
        assert [r["prompt"] for r in read] == [r["prompt"] for r in rows]  # the four shared messages
        assert tokenize_pairs(tok, read, 64)[0] == explicit


HH_PAIRS = [  # Anthropic HH: one text each, the prompt implicit in what both begin with
    {"chosen": "\n\nHuman: add 2 3\n\nAssistant: 5", "rejected": "\n\nHuman: add 2 3\n\nAssistant: six"},
    {"chosen": "\n\nHuman: def?\n\nAssistant: a keyword", "rejected": "\n\nHuman: def?\n\nAssistant: no idea"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
]


def test_string_pairs_with_an_implicit_prompt_are_split_where_they_differ_and_train(base, tok, tmp_path):
    """What both texts begin with is the prompt, the space before the first difference going to the answers (as TRL's
    extract_prompt splits them: tests/test_preference_parity.py compares the two); where one answer is the other's
    start, its last character stays in the answers. The reward model and DPO both train on such a file."""
    rows = read_pairs(jsonl(tmp_path / "hh.jsonl", HH_PAIRS)).rows
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("\n\nHuman: add 2 3\n\nAssistant:", " 5", " six"),
        ("\n\nHuman: def?\n\nAssistant:", " a keyword", " no idea"),
        ("\n\nHuman: hi\n\nAssistant: hell", "o there", "o")]
    explicit = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    assert tokenize_pairs(tok, rows, 64)[0] == tokenize_pairs(tok, explicit, 64)[0]
    # texts that differ from their first character: no prompt (each answer after the end-of-text token, as generate
    # feeds an empty prompt); white space alone after the shared text is no answer
    (row,) = read_pairs(jsonl(tmp_path / "none.jsonl", [{"chosen": "yes", "rejected": "no"}])).rows
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("", "yes", "no")
    with pytest.raises(LmforgeError, match="'chosen' adds only white space to the text it shares with the other"):
        read_pairs(jsonl(tmp_path / "space.jsonl", [{"chosen": "ab ", "rejected": "ab x"}]))
    with pytest.raises(LmforgeError, match="'chosen' and 'rejected' are the same answer"):
        read_pairs(jsonl(tmp_path / "same.jsonl", [{"chosen": "ab", "rejected": "ab"}]))
    data = jsonl(tmp_path / "train.jsonl", HH_PAIRS * 4)
    for command, run in (("reward", train_reward), ("dpo", dpo)):
        run(model=str(base), train=data, progress=False, **settings(tmp_path / command, max_steps=1, val_fraction=0))
        assert latest_checkpoint(tmp_path / command) is not None


# -- 2. tokenisation ------------------------------------------------------------------------------


def test_a_string_pair_is_the_prompt_as_generate_feeds_it_then_the_answer_and_end_of_text(base, tok):
    from lmforge.infer.generate import generate

    stats = TokenizeStats()
    row = {"prompt": "please add 2 3 =", "chosen": " 5", "rejected": " 6 maybe"}
    pair = tokenize_pair(tok, row, stats)
    assert pair.prompt == tok.encode(row["prompt"])
    assert generate(base, row["prompt"], max_new_tokens=1, temperature=0, chat=False).prompt_tokens == len(pair.prompt)
    for answer, ids in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert tok.decode(pair.prompt + ids) == row["prompt"] + answer + "<|endoftext|>"
        assert pair.prompt + ids[:-1] == tok.encode(row["prompt"] + answer)  # the tokens the model would produce
    assert stats.boundary == 0 and stats.summary(64) is None


def test_a_prompt_ending_in_a_space_keeps_its_own_tokens_and_is_counted(tok):
    # byte-level BPE merges " 5" into one token: encode("= 5") does not start with encode("= ")
    prompt = "add 2 3 = "
    for answer in ("5", "the"):
        assert tok.encode(prompt + answer)[: len(tok.encode(prompt))] != tok.encode(prompt)
    stats = TokenizeStats()
    pair = tokenize_pair(tok, {"prompt": prompt, "chosen": "5", "rejected": "the"}, stats)
    assert pair.prompt == tok.encode(prompt)  # what `generate` continues from
    assert pair.chosen == tok.encode("5") + [tok.eos_id] and pair.rejected == tok.encode("the") + [tok.eos_id]
    assert tok.decode(pair.prompt + pair.chosen) == prompt + "5<|endoftext|>"
    assert stats.boundary == 2  # both answers
    assert stats.summary(64).startswith("2 answer(s) tokenised apart from their prompt")


def test_a_chat_pair_is_the_prompt_as_chat_renders_it_then_the_answer_and_end_of_turn(base, tok):
    from lmforge.infer.generate import generate

    row = chat_pairs(1)[0]
    stats = TokenizeStats()
    pair = tokenize_pair(tok, row, stats)
    rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert pair.prompt == tok.encode(rendered)
    # `lmforge generate --chat` with the same system and user message feeds the same number of tokens
    single = {"prompt": [SYSTEM, {"role": "user", "content": "add 1 2"}], "chosen": [{"role": "assistant", "content": "3"}],
              "rejected": [{"role": "assistant", "content": "4"}]}
    gen = generate(base, "add 1 2", system=SYSTEM["content"], chat=True, max_new_tokens=1, temperature=0)
    assert gen.prompt_tokens == len(tokenize_pair(tok, single, stats).prompt)
    for name, ids in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        content = row[name][0]["content"]
        assert ids[-1] == tok.end_of_turn_id and tok.end_of_turn_id not in ids[:-1]
        assert tok.decode(ids) == content + "<|im_end|>"  # not the template's "\n" after it
        whole = tok.encode(tok.apply_chat_template(row["prompt"] + row[name]))
        assert whole == pair.prompt + ids + tok.encode("\n")
        # the same tokens SFT learns for that turn
        sft_ids, mask = tok.encode_chat(row["prompt"] + row[name])
        learned = [t for t, m in zip(sft_ids, mask) if m]
        assert learned[-len(ids):] == ids
    assert stats.boundary == 0


# -- 3. truncation --------------------------------------------------------------------------------


def long_rows():
    short = [{"prompt": f"add {i} 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(5)]
    long = [{"prompt": "please " * 20 + f"add {i} 2 =", "chosen": f" {i + 2}", "rejected": f" {i + 3} maybe"} for i in range(3)]
    too_long_answer = [{"prompt": "add 1 1 =", "chosen": " 2", "rejected": " maybe" * 30}]
    return short + long + too_long_answer


def test_long_prompts_are_cut_from_the_left_keeping_the_answers(tok):
    rows = long_rows()
    full = [tokenize_pair(tok, r, TokenizeStats()) for r in rows]
    pairs, stats = tokenize_pairs(tok, rows, 16)
    assert (stats.truncated, stats.dropped) == (3, 1)  # the last pair's answer alone does not fit
    assert pairs[:5] == full[:5]
    for kept, whole in zip(pairs[5:], full[5:8]):
        assert (kept.chosen, kept.rejected) == (whole.chosen, whole.rejected)
        room = 16 - max(len(whole.chosen), len(whole.rejected))
        assert kept.prompt == whole.prompt[-room:]  # its end: the tokens nearest the answer
    assert stats.summary(16) == ("3 prompt(s) cut from the left to fit 16 tokens; "
                                 "1 pair(s) longer than 16 tokens dropped")
    pairs, stats = tokenize_pairs(tok, rows, 16, "drop")
    assert pairs == full[:5] and (stats.truncated, stats.dropped) == (0, 4)


@pytest.mark.parametrize("truncation, line, kept", [
    ("left", "training pairs: 3 prompt(s) cut from the left to fit 16 tokens; 1 pair(s) longer than 16 tokens dropped", 8),
    ("drop", "training pairs: 4 pair(s) longer than 16 tokens dropped", 5),
])
def test_a_run_says_how_many_pairs_were_cut_or_dropped(base, tmp_path, capsys, truncation, line, kept):
    data = jsonl(tmp_path / "p.jsonl", long_rows())
    dpo(model=str(base), train=data, max_length=16, truncation=truncation, val_fraction=0, progress=False,
        **settings(tmp_path / "run", max_steps=1))
    out = capsys.readouterr().out
    assert line + "\n" in out
    assert f"; {kept} training / 0 validation examples" in out


# -- 4. bad rows ----------------------------------------------------------------------------------

GOOD = {"prompt": "add 1 2 =", "chosen": " 3", "rejected": " 4"}
MESSAGES = [{"role": "assistant", "content": "3"}]
BAD_ROWS = [
    ({"prompt": "add 1 2 =", "chosen": " 3"}, "missing field 'rejected'"),
    ({"prompt": "add 1 2 =", "chosen": " 3", "rejected": " 3"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": "add 1 2 =", "chosen": "  ", "rejected": " 4"}, "'chosen' is empty"),
    ({**GOOD, "margin": "lots"}, "'margin' must be a number, not 'lots'"),
    ({"prompt": "add 1 2 =", "chosen": MESSAGES, "rejected": [{"role": "assistant", "content": "4"}]},
     "'prompt', 'chosen' and 'rejected' must all be strings or all be message lists"),
]


@pytest.mark.parametrize("bad, problem", BAD_ROWS, ids=["missing", "same", "empty", "margin", "mixed"])
def test_a_bad_row_stops_with_its_file_and_line_or_is_counted_and_skipped(tmp_path, bad, problem):
    path = jsonl(tmp_path / "p.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(LmforgeError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:3: {problem}") and "; expected {\"prompt\"" in str(e.value)
    pairs = read_pairs(path, skip_bad_lines=True)
    assert (len(pairs.rows), pairs.skipped, pairs.skipped_lines) == (3, 1, [3])


def test_bad_rows_in_csv_are_named_by_line_and_every_kind_is_skipped(tmp_path):
    path = write_csv(tmp_path / "p.csv", [GOOD, {**GOOD, "margin": "lots"}])
    with pytest.raises(LmforgeError, match=r"p\.csv:3: 'margin' must be a number, not 'lots'"):  # line 1 is the header
        read_pairs(path)
    rows = [GOOD] + [bad for bad, _ in BAD_ROWS] + [GOOD]
    pairs = read_pairs(jsonl(tmp_path / "all.jsonl", rows), skip_bad_lines=True)
    assert (len(pairs.rows), pairs.skipped, pairs.skipped_lines) == (2, 5, [2, 3, 4, 5, 6])


def test_the_command_prints_one_line_for_a_bad_row_and_writes_no_run_folder(base, tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [GOOD, BAD_ROWS[1][0], GOOD])
    for command in ("reward", "dpo"):
        out = tmp_path / f"run-{command}"
        result = run_cli(command, "--model", str(base), "--train", path, "--out", str(out), "--quiet")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"lmforge: error: {path}:2: 'chosen' and 'rejected' are the same answer")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not out.exists()
    # with --skip-bad-lines the run goes on, and says how many it left out
    out = tmp_path / "skipped"
    result = run_cli("reward", "--model", str(base), "--train", path, "--out", str(out), "--skip-bad-lines",
                     "--max-steps", "1", "--val-fraction", "0", "--threads", "1", "--tensorboard", "false", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"warning: skipped 1 malformed pair(s) of {path} (lines [2])\n" in result.stderr
    assert "; 2 training / 0 validation examples" in result.stdout


# -- 5. the command line --------------------------------------------------------------------------


def test_reward_and_dpo_commands_train_and_save_and_reward_score_prints_the_models_scores(base, tok, tmp_path, capsys):
    from lmforge.infer.generate import generate

    common = ["--model", str(base), "--max-steps", "4", "--micro-batch-size", "4", "--lr", "1e-3", "--threads", "1",
              "--dtype", "float32", "--tensorboard", "false", "--quiet"]
    rm, policy = tmp_path / "rm", tmp_path / "policy"
    assert main(["reward", "--out", str(rm), "--train", jsonl(tmp_path / "p.jsonl", string_pairs(32)), *common]) == 0
    assert f"done: 4 steps; latest checkpoint {rm / 'checkpoints' / 'step_0000004'}" in capsys.readouterr().out
    reward_model = load_model(rm)
    assert (reward_model.config.head, reward_model.config.num_labels) == ("sequence_classification", 1)
    chats = chat_pairs(16)
    assert main(["dpo", "--out", str(policy), "--train", jsonl(tmp_path / "c.jsonl", chats), *common]) == 0
    assert "dpo by full" in capsys.readouterr().out
    trained, original = load_model(policy), load_model(base)
    assert trained.score is None  # still a language model
    moved = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), original.state_dict().values()))
    assert moved > 1e-4
    # the template the pairs were rendered with is saved: `generate` and `chat` then feed the prompts DPO trained on
    saved = Tokenizer.load(latest_checkpoint(policy) / "model")
    assert "<|im_start|>" in saved.chat_template
    single = {"prompt": [{"role": "user", "content": "add 1 2"}], "chosen": [{"role": "assistant", "content": "3"}],
              "rejected": [{"role": "assistant", "content": "4"}]}
    prompt_ids = tokenize_pair(saved, single, TokenizeStats()).prompt
    assert len(prompt_ids) > len(tok.encode("add 1 2")) + 4  # the template's markers around the message
    assert generate(policy, "add 1 2", max_new_tokens=1, temperature=0).prompt_tokens == len(prompt_ids)
    # and the end of a turn is an end of its generation (generation_config.json), as after SFT on chats
    ends = json.loads((latest_checkpoint(policy) / "model" / "generation_config.json").read_text())["eos_token_id"]
    assert saved.end_of_turn_id in ends

    prompt, answer = "add 2 3 =", " 5"
    expected = reward_scores(rm, [{"prompt": prompt, "answer": answer}])[0]
    # transformers scores the same tokens (prompt, answer, end of text) with the same number
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(latest_checkpoint(rm) / "model")).eval()
    with torch.no_grad():
        assert hf(torch.tensor([tok.encode(prompt + answer) + [tok.eos_id]])).logits.item() == pytest.approx(expected, abs=1e-5)
    result = run_cli("reward-score", "--model", str(rm), "--prompt", prompt, "--answer", answer)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and float(result.stdout) == pytest.approx(expected, abs=1e-6)
    rows = [{"prompt": "add 2 3 =", "answer": " 5"}, {"prompt": "add 2 3 =", "answer": " 7 maybe maybe"},
            {"prompt": [{"role": "user", "content": "add 1 1"}], "answer": [{"role": "assistant", "content": "2"}]}]
    scores = reward_scores(rm, rows)
    assert scores[0] == pytest.approx(expected, abs=1e-5) and len(set(scores)) == 3
    assert main(["reward-score", "--model", str(rm), "--input", jsonl(tmp_path / "rows.jsonl", rows)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{**row, "reward": score} for row, score in zip(rows, scores)]
    # an empty file, a folder, a prompt cut to fit and a bad row in a file are each said (naming the file)
    (tmp_path / "empty.jsonl").write_text("")
    for argv, message in [(["--input", str(tmp_path / "empty.jsonl")], "holds no rows to score"),
                          (["--input", str(tmp_path)], "is a folder; give the JSONL file in it")]:
        assert main(["reward-score", "--model", str(rm), *argv]) == 2
        assert message in capsys.readouterr().err
    long = [{"prompt": "add 2 3 = " * 200, "answer": " 5"}]
    assert main(["reward-score", "--model", str(rm), "--input", jsonl(tmp_path / "long.jsonl", long)]) == 0
    assert "1 of 1 prompt(s) with their answer exceed the reward model's" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match=r"rows.jsonl row 1: the answer alone is longer"):
        reward_scores(rm, [{"prompt": "p", "answer": " 5" * 2000}], source="rows.jsonl")


def test_rows_in_turns_after_a_first_row_of_strings_still_save_the_chat_template_and_end_of_turn(base, tmp_path):
    """Whichever row comes first: pairs rendered through the chat template save it with the model (and DPO's policy
    ends its generation at the end of a turn), as a file of chats alone does."""
    rows = [string_pairs(1)[0]] + chat_pairs(7)
    data = jsonl(tmp_path / "mixed.jsonl", rows)
    for command, run in (("reward", train_reward), ("dpo", dpo)):
        run(model=str(base), train=data, progress=False, **settings(tmp_path / command, max_steps=1, val_fraction=0))
        folder = latest_checkpoint(tmp_path / command) / "model"
        saved = Tokenizer.load(folder)
        assert saved.chat_template and "<|im_start|>" in saved.chat_template, command
        if command == "dpo":
            ends = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
            assert saved.end_of_turn_id in ends


def nopad_reward_model(folder, tokenizer_dir):
    """A transformers GPT-2 reward model whose config has no pad_token_id (transformers' default), its score scaled so
    that reading the wrong position shows."""
    import shutil

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1024, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0, num_labels=1)
    assert config.pad_token_id is None
    model = transformers.GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def test_a_reward_model_without_a_pad_id_scores_each_row_at_its_own_last_token_and_training_saves_one(
        tok, tmp_path, tokenizer_dir):
    """Rows of different lengths in one batch score as each alone: padding (of any id) is never read. `lmforge reward`
    from such a model saves a pad id (the tokenizer's pad, else end-of-text, as TRL's RewardTrainer sets it), with
    which transformers reads a padded batch where lmforge does."""
    rm = nopad_reward_model(tmp_path / "rm", tokenizer_dir)
    rows = [{"prompt": "def add(a, b):", "answer": "\n    return a + b"}, {"prompt": "x", "answer": " = 1"},
            {"prompt": [{"role": "user", "content": "add 1 1"}], "answer": "2"},
            {"prompt": "The answer is", "answer": " yes"}]
    alone = [reward_scores(rm, [row])[0] for row in rows]
    assert reward_scores(rm, rows, batch_size=4) == pytest.approx(alone, abs=1e-4)
    assert len({round(x, 3) for x in alone}) == 4
    train_reward(model=str(rm), train=jsonl(tmp_path / "p.jsonl", string_pairs(8)), progress=False,
                 **settings(tmp_path / "run", max_steps=1, val_fraction=0))
    folder = latest_checkpoint(tmp_path / "run") / "model"
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == tok.pad_id is not None
    trained = [reward_scores(folder, [row])[0] for row in rows]
    assert reward_scores(folder, rows, batch_size=4) == pytest.approx(trained, abs=1e-4)
    def turn(prompt, text):  # a chat prompt's answer: the assistant's message
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    pairs = [tokenize_pair(tok, {"prompt": r["prompt"], "chosen": turn(r["prompt"], r["answer"]),
                                 "rejected": turn(r["prompt"], r["answer"] + "!")}, TokenizeStats()) for r in rows]
    seqs = [p.prompt + p.chosen for p in pairs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        hf_scores = hf(ids, attention_mask=(ids != tok.pad_id).long()).logits[:, 0].tolist()
    assert hf_scores == pytest.approx(trained, abs=1e-4)


@pytest.fixture(scope="module")
def reward_run(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    train_reward(model=str(base), train=jsonl(root / "p.jsonl", string_pairs(16)), progress=False,
                 **settings(root / "rm", max_steps=2))
    return root / "rm"


@pytest.mark.parametrize("argv, message", [
    (["dpo", "--model", "{rm}"], "DPO trains a causal language model; {rm} is a classifier or reward model"),
    (["reward-score", "--model", "{base}", "--prompt", "p", "--answer", "a"], "is not a reward model"),
    (["reward-score", "--model", "{rm}", "--prompt", "p"], "--prompt and --answer go together"),
    (["dpo", "--model", "{base}", "--loss", "hinge"], "bad config: loss must be one of sigmoid, ipo, cdpo, not 'hinge'"),
    (["dpo", "--model", "{base}", "--label-smoothing", "0.1"], "bad config: label_smoothing applies to --loss cdpo only"),
    (["dpo", "--model", "{base}", "--loss", "cdpo", "--label-smoothing", "0.5"], "label_smoothing must be in [0, 0.5)"),
    (["dpo", "--model", "{base}", "--reference", "adapter"], "bad config: reference adapter needs --method lora"),
    (["reward", "--model", "{base}", "--center-rewards", "-1"], "center_rewards must be 0 or more"),
    (["dpo", "--model", "{base}", "--val-fraction", "0.99"], "--val-fraction 0.99 of 8 example(s) leaves none to train on"),
    (["reward", "--model", "{base}", "--train", "{long}", "--max-length", "8", "--truncation", "drop"],
     "no training pair fits max_length 8 tokens; raise --max-length (the model reads up to 64)"),
    (["dpo", "--model", "{base}", "--train", "{long}", "--max-length", "5000", "--truncation", "drop"],
     "no training pair fits max_length 64 tokens; the model reads at most 64 tokens (--max-length 5000 is more than it "
     "reads): shorten the examples or use a model with a longer context"),
], ids=["dpo-on-reward-model", "score-a-plain-lm", "prompt-without-answer", "unknown-loss", "smoothing-with-sigmoid",
        "smoothing-too-large", "adapter-without-lora", "negative-centring", "nothing-left-to-train", "pairs-too-long",
        "pairs-longer-than-the-model"])
def test_command_mistakes_exit_2_with_one_line_and_write_nothing(base, reward_run, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    long = [{"prompt": "the word again " * 30, "chosen": "yes", "rejected": "no"}] * 4
    fill = {"rm": str(reward_run), "base": str(base), "long": jsonl(tmp_path / "long.jsonl", long)}
    argv = [a.format(**fill) for a in argv]
    if argv[0] != "reward-score":
        if "--train" not in argv:
            argv += ["--train", jsonl(tmp_path / "p.jsonl", string_pairs(8))]
        argv += ["--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: "), err
    assert message.format(**fill) in err
    assert not out.exists()


def test_a_reward_model_is_no_language_model_to_the_commands_that_need_one(reward_run, tmp_path, capsys, data_dir):
    """generate, classify, eval and pretrain refuse a model with a score head in one line (it predicts no token)."""
    model = str(latest_checkpoint(reward_run) / "model")
    for argv in (["generate", "--model", model, "def"],
                 ["classify", jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}]), "--model", model,
                  "--labels", "x,y"],
                 ["eval", "--model", model, "--tasks", "arithmetic", "--limit", "2"],
                 ["pretrain", "--model", model, "--data", str(data_dir), "--out", str(tmp_path / "run"), "--quiet"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a classifier or reward model (a score head, no language-model head)" in err
    assert not (tmp_path / "run").exists()


# -- 6. metrics -----------------------------------------------------------------------------------


def hf_answer_logps(folder, pairs) -> torch.Tensor:
    """log p(answer | prompt) summed over the answer's tokens, by transformers' GPT-2: (pairs, 2)."""
    model = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    out = []
    with torch.no_grad():
        for p in pairs:
            row = []
            for answer in (p.chosen, p.rejected):
                ids = torch.tensor([p.prompt + answer])
                logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
                row.append(logp[len(p.prompt) - 1:].sum().item())
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_dpo_logs_its_metrics_each_step_and_each_evaluation(base, tok, tmp_path):
    train, val = jsonl(tmp_path / "t.jsonl", string_pairs(32)), jsonl(tmp_path / "v.jsonl", string_pairs(6, seed=1))
    beta = 0.5
    dpo(model=str(base), train=train, val=val, beta=beta, progress=False,
        **settings(tmp_path / "run", max_steps=6, eval_interval=3, micro_batch_size=8, lr=3e-3))
    steps, evals = logs(tmp_path / "run")
    names = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected")
    assert [r["step"] for r in steps] == list(range(1, 7)) and [r["step"] for r in evals] == [0, 3, 6]
    for r in steps:
        assert set(names) <= set(r)
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"], abs=1e-5)
        assert (r["reward_accuracy"] * 8) == pytest.approx(round(r["reward_accuracy"] * 8), abs=1e-5)  # of 8 pairs
    assert steps[-1]["loss"] < LOG2 and steps[-1]["reward_margin"] > 0  # it learns the preference
    for r in evals:
        assert {"val_loss", *(f"val_{k}" for k in names)} <= set(r)
    # the step-0 log-probabilities are the base model's, as transformers computes them
    pairs = tokenize_pairs(tok, read_pairs(val).rows, 64)[0]
    reference = hf_answer_logps(base, pairs).mean(0)
    assert evals[0]["val_logp_chosen"] == pytest.approx(reference[0].item(), abs=1e-4)
    assert evals[0]["val_logp_rejected"] == pytest.approx(reference[1].item(), abs=1e-4)
    # rewards are beta times the log-ratio to that fixed reference, at every evaluation
    for r in evals:
        assert r["val_reward_chosen"] == pytest.approx(beta * (r["val_logp_chosen"] - evals[0]["val_logp_chosen"]), abs=1e-4)
        assert r["val_reward_rejected"] == pytest.approx(beta * (r["val_logp_rejected"] - evals[0]["val_logp_rejected"]),
                                                         abs=1e-4)
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"]


def test_the_reward_models_logged_rewards_are_what_reward_score_gives(base, tmp_path):
    train, val_rows = jsonl(tmp_path / "t.jsonl", string_pairs(32)), string_pairs(6, seed=1)
    margins = [0.0, 0.5, 1.0, 0.0, 2.0, 0.25]  # in the loss: -log sigmoid(r_chosen - r_rejected - margin)
    for row, margin in zip(val_rows, margins):
        row["margin"] = margin
    train_reward(model=str(base), train=train, val=jsonl(tmp_path / "v.jsonl", val_rows), progress=False,
                 **settings(tmp_path / "run", max_steps=4, eval_interval=4))
    steps, evals = logs(tmp_path / "run")
    assert all({"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"} <= set(r) for r in steps)
    assert "logp_chosen" not in steps[0]
    chosen = reward_scores(tmp_path / "run", [{"prompt": r["prompt"], "answer": r["chosen"]} for r in val_rows])
    rejected = reward_scores(tmp_path / "run", [{"prompt": r["prompt"], "answer": r["rejected"]} for r in val_rows])
    last = evals[-1]
    assert last["val_reward_chosen"] == pytest.approx(sum(chosen) / 6, abs=1e-5)
    assert last["val_reward_rejected"] == pytest.approx(sum(rejected) / 6, abs=1e-5)
    assert last["val_reward_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 6, abs=1e-6)
    bt = sum(-torch.nn.functional.logsigmoid(torch.tensor(c - r - m)).item() for c, r, m in zip(chosen, rejected, margins))
    assert last["val_loss"] == pytest.approx(bt / 6, abs=1e-5)  # Bradley-Terry with each pair's margin


@pytest.mark.parametrize("kw", [{}, {"family": "llama", "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                      "bias": False, "n_kv_head": 2},
                                {"family": "mistral", "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                 "bias": False, "sliding_window": 4}])
def test_a_packed_pair_scores_each_answer_as_if_it_were_alone(kw):
    """prompt ‖ chosen ‖ rejected in one row gives each answer the reward (and gradient) of its own
    prompt + answer sequence: the rejected answer never sees the chosen one, and sits at its positions;
    the answers' common first tokens go through the model once."""
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model
    from lmforge.model.heads import attach_head
    from lmforge.data.preference import TokenizedPair
    from lmforge.train.preference import RewardModel, packed_pairs

    torch.manual_seed(0)
    model = build_model(Config(vocab_size=60, block_size=40, n_layer=2, n_head=4, n_embd=16, **kw))
    attach_head(model, "sequence_classification", 1, ("reward",), 0)
    rng = random.Random(0)
    draw = lambda n: [rng.randrange(1, 60) for _ in range(n)]  # noqa: E731  (0 is padding)
    pairs = [TokenizedPair(draw(p), draw(c), draw(r)) for p, c, r in [(5, 3, 7), (1, 9, 2), (12, 1, 1), (3, 6, 6)]]
    same_start = draw(4)  # answers with common first tokens (shared too), one of them a prefix of the other
    pairs += [TokenizedPair(draw(3), same_start + draw(3), same_start + draw(2)), TokenizedPair(draw(2), same_start, same_start + draw(3)),
              TokenizedPair(draw(2), same_start + draw(2), same_start)]
    # answers ending in the pad token (GPT-2's end-of-text is its pad): scored, as transformers does, at the
    # last token that is not pad
    pairs += [TokenizedPair(draw(3), draw(2) + [0], draw(4) + [0]), TokenizedPair(draw(3), same_start + [0], same_start + draw(1) + [0])]
    batch = packed_pairs(pairs, 0, 0)
    assert batch["keep"][4].tolist() == [3 + 7 - 1, 3 + 7 + 2 - 1]  # prompt, 4 shared, 3 chosen, 2 rejected: 12 tokens
    packed = RewardModel.rewards(model, batch)
    alone = torch.cat([model(torch.tensor([p.prompt + p.chosen]))[:, 0] for p in pairs]
                      + [model(torch.tensor([p.prompt + p.rejected]))[:, 0] for p in pairs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    weights = [w for w in model.parameters()]
    for a, b in zip(torch.autograd.grad(packed.square().sum(), weights), torch.autograd.grad(alone.square().sum(), weights)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"family": "llama", "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                      "bias": False, "n_kv_head": 2},
                                {"family": "mistral", "pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                 "bias": False, "sliding_window": 4}])
def test_a_packed_pair_gives_each_answer_its_own_log_probability(kw):
    """DPO's packed rows: each answer's summed log-probability (and its gradient) is that of its own
    prompt + answer sequence, with common answer starts shared, a prefix answer, and no prompt at all."""
    from lmforge.data.preference import TokenizedPair
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model
    from lmforge.train.preference import answer_logps, packed_pairs

    torch.manual_seed(0)
    model = build_model(Config(vocab_size=60, block_size=40, n_layer=2, n_head=4, n_embd=16, **kw))
    rng = random.Random(1)
    draw = lambda n: [rng.randrange(1, 60) for _ in range(n)]  # noqa: E731
    start = draw(3)
    pairs = [TokenizedPair(draw(5), draw(3), draw(7)), TokenizedPair(draw(1), draw(9), draw(2)),
             TokenizedPair(draw(4), start + draw(2), start + draw(5)), TokenizedPair(draw(2), start, start + draw(2)),
             TokenizedPair([], draw(4), draw(3)), TokenizedPair([], start + draw(1), start + draw(2))]

    def alone(prompt, answer):
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        return logp[max(len(prompt) - 1, 0):].sum()  # the answer's tokens (the first has no predictor without a prompt)

    packed = answer_logps(model, packed_pairs(pairs, 0, answers=True))
    expected = torch.stack([alone(p.prompt, p.chosen) for p in pairs] + [alone(p.prompt, p.rejected) for p in pairs])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    weights = list(model.parameters())
    for a, b in zip(torch.autograd.grad((packed * torch.arange(1.0, 13.0)).sum(), weights),
                    torch.autograd.grad((expected * torch.arange(1.0, 13.0)).sum(), weights)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method, reference", [("full", "copy"), ("full", "precomputed"), ("full", "auto"),
                                               ("lora", "adapter"), ("lora", "precomputed"), ("lora", "auto")])
def test_at_step_0_the_policy_is_its_reference_loss_log_2_and_rewards_0(base, tmp_path, method, reference):
    data = jsonl(tmp_path / "p.jsonl", string_pairs(32))
    dpo(model=str(base), train=data, method=method, reference=reference, progress=False,
        **settings(tmp_path / "run", max_steps=1))
    steps, evals = logs(tmp_path / "run")
    for r, prefix in ((evals[0], "val_"), (steps[0], "")):
        assert r[f"{prefix}loss"] == pytest.approx(LOG2, abs=1e-6)
        for k in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            assert r[prefix + k] == pytest.approx(0.0, abs=1e-6)
        assert r[f"{prefix}logp_chosen"] < -1  # real log-probabilities, not zeros


@pytest.mark.parametrize("loss, smoothing, expected", [("sigmoid", 0.0, LOG2), ("cdpo", 0.2, LOG2), ("ipo", 0.0, 1.0)])
def test_each_loss_starts_at_its_value_for_a_policy_equal_to_its_reference(base, tmp_path, loss, smoothing, expected):
    # h = 0: sigmoid and cdpo give log 2 whatever the smoothing; ipo gives (0 - 1/(2 beta))^2 = 1 with beta 0.5
    dpo(model=str(base), train=jsonl(tmp_path / "p.jsonl", string_pairs(16)), loss=loss, label_smoothing=smoothing,
        beta=0.5, progress=False, **settings(tmp_path / "run", max_steps=1))
    steps, evals = logs(tmp_path / "run")
    assert evals[0]["val_loss"] == pytest.approx(expected, abs=1e-6)
    assert steps[0]["loss"] == pytest.approx(expected, abs=1e-6)


# -- 7. reference modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, reference", [("full", "copy"), ("lora", "adapter")])
def test_a_precomputed_reference_gives_the_same_run_as_the_live_one(base, tmp_path, method, reference):
    data = jsonl(tmp_path / "p.jsonl", string_pairs(32))
    kw = dict(method=method, lr=1e-2 if method == "lora" else 3e-3, lora_targets="q,v,o,fc")
    dpo(model=str(base), train=data, reference=reference, progress=False, **settings(tmp_path / "live", max_steps=6, **kw))
    dpo(model=str(base), train=data, reference="precomputed", progress=False, **settings(tmp_path / "pre", max_steps=6, **kw))
    live, pre = logs(tmp_path / "live"), logs(tmp_path / "pre")
    assert [r["step"] for r in pre[0] + pre[1]] == [r["step"] for r in live[0] + live[1]] == [1, 2, 3, 4, 5, 6, 0, 4, 6]
    assert live[0][-1]["reward_margin"] > 1e-3  # the policy moved away from the reference
    for a, b in zip(live[0] + live[1], pre[0] + pre[1]):
        for key in a:
            if "loss" in key or "reward" in key or "logp" in key:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert (tmp_path / "pre" / REFERENCE_CACHE).is_file() and not (tmp_path / "live" / REFERENCE_CACHE).exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_precomputed_reference_waits_for_a_model_opened_for_sharding(base, tmp_path, monkeypatch, method):
    """Under torchrun with FSDP the policy is opened without its weights (the meta device) for the loop to shard; a
    precomputed reference then passes over the pairs when first asked, once the model has its weights, and gives
    what the pass in setup gives (the whole model is never loaded to compute it)."""
    from lmforge.train.config import DPOConfig
    from lmforge.train.distributed import materialize
    from lmforge.train.finetune import _to
    from lmforge.train.loop import resolve_config
    from lmforge.train.preference import DPO

    data = jsonl(tmp_path / "p.jsonl", string_pairs(40))
    pairs = read_pairs(data)

    def objective(out):
        config = resolve_config(dict(model=str(base), train=data, reference="precomputed", method=method,
                                     lora_targets="q,v", parallel="fsdp", **settings(out)), False, {}, cls=DPOConfig)
        return DPO(config, torch.device("cpu"), None, pairs)

    eager = objective(tmp_path / "eager")
    monkeypatch.setenv("WORLD_SIZE", "2")  # (what torchrun sets: the folder is opened for sharding)
    lazy = objective(tmp_path / "lazy")
    assert lazy.ref_logps is None and all(p.is_meta for n, p in lazy.model.named_parameters() if "lora" not in n)
    materialize(lazy.model, torch.device("cpu"))
    (tmp_path / "lazy").mkdir()
    for split, rows in (("train", [0, 3, 5]), ("val", [0])):
        got = lazy.reference_logps(_to(lazy.collate(rows, lazy.train_pairs if split == "train" else lazy.val_pairs), "cpu"), split)
        want = eager.reference_logps(_to(eager.collate(rows, eager.train_pairs if split == "train" else eager.val_pairs), "cpu"), split)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (tmp_path / "lazy" / REFERENCE_CACHE).is_file()


def interrupt_after(monkeypatch, step):
    """The process dies right after the checkpoint of ``step`` is saved."""
    from lmforge.train import loop

    save = loop.save_checkpoint

    def save_then_die(run, at, *args):
        save(run, at, *args)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", save)


def test_a_resumed_run_reads_the_precomputed_reference_back(base, tmp_path, monkeypatch):
    from lmforge.train.preference import DPO

    data = jsonl(tmp_path / "p.jsonl", string_pairs(32))
    kw = dict(reference="precomputed", lr=3e-3, dropout=0.1)
    dpo(model=str(base), train=data, progress=False, **settings(tmp_path / "a", **kw))
    restore = interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        dpo(model=str(base), train=data, progress=False, **settings(tmp_path / "b", **kw))
    restore()
    cache = (tmp_path / "b" / REFERENCE_CACHE).read_bytes()

    def no_reference_model(self):
        raise AssertionError("the resumed run computed the reference again")

    monkeypatch.setattr(DPO, "base_model", no_reference_model)
    dpo(model=str(base), train=data, resume=True, progress=False, **settings(tmp_path / "b", **kw))
    assert (tmp_path / "b" / REFERENCE_CACHE).read_bytes() == cache
    a, b = logs(tmp_path / "a"), logs(tmp_path / "b")
    assert [r["step"] for r in b[0]] == list(range(1, 9))
    assert [r["loss"] for r in a[0]] == [r["loss"] for r in b[0]]
    assert [r["val_loss"] for r in a[1]] == [r["val_loss"] for r in b[1]]


# -- 8. exact resume ------------------------------------------------------------------------------


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("elapsed", "tokens_per_second")}


@pytest.mark.parametrize("command, method", [("reward", "full"), ("reward", "lora"), ("dpo", "full"), ("dpo", "lora")])
def test_an_interrupted_run_resumes_exactly(base, tmp_path, monkeypatch, command, method):
    run = {"reward": train_reward, "dpo": dpo}[command]
    data = jsonl(tmp_path / "p.jsonl", string_pairs(32))
    kw = dict(method=method, dropout=0.1, lr=1e-2 if method == "lora" else 3e-3, lora_targets="q,v,o,fc")
    if command == "dpo":
        kw["reference"] = "copy" if method == "full" else "adapter"
    run(model=str(base), train=data, progress=False, **settings(tmp_path / "a", **kw))
    restore = interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(model=str(base), train=data, progress=False, **settings(tmp_path / "b", **kw))
    restore()
    assert latest_checkpoint(tmp_path / "b").name == "step_0000004"
    run(model=str(base), train=data, resume=True, progress=False, **settings(tmp_path / "b", **kw))
    a, b = logs(tmp_path / "a"), logs(tmp_path / "b")
    assert [r["step"] for r in b[0]] == list(range(1, 9)) and [r["step"] for r in b[1]] == [0, 4, 8]
    assert [comparable(r) for r in a[0]] == [comparable(r) for r in b[0]]
    assert a[1] == b[1]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if method == "lora":
        assert any("lora_B" in k and wa[k].abs().max() > 0 for k in wa)  # the adapters trained
        assert any(k.endswith("score.weight") for k in wa) == (command == "reward")  # the reward head trains beside them


# -- 9. batch layouts -----------------------------------------------------------------------------


def sft_rows(n=32, seed=0):
    """Instruction examples whose completions are 1 to 40 tokens long."""
    rng = random.Random(seed)
    return [{"prompt": f"count to {k} =", "completion": " " + " ".join(str(i % 10) for i in range(k))}
            for k in (rng.choice([1, 2, 3, 20, 30, 40]) for _ in range(n))]


def base_weights(base) -> dict:
    from safetensors.torch import load_file

    return {f"model.safetensors:{k}": v for k, v in load_file(base / "model.safetensors").items()}


def layout_settings(command, out, **kw) -> dict:
    # SFT: dropout off (it keeps the model's 0.1), whose masks would differ with the layout.
    # Reward: the Bradley-Terry loss has no gradient along a shift of every reward (ln_f.bias): there
    # AdamW turns the rounding noise of each layout into lr-sized steps. The centring term fixes the shift.
    extra = {"sft": {"dropout": 0.0, "lr": 1e-3}, "reward": {"center_rewards": 0.01, "lr": 1e-3}, "dpo": {"lr": 3e-3}}
    return settings(out, max_steps=4, **{**extra[command], **kw})


def run_layout(command, base, data, out, **kw):
    from lmforge.train.finetune import finetune

    fn = {"reward": train_reward, "dpo": dpo, "sft": finetune}[command]
    fn(model=str(base), train=data, progress=False, **layout_settings(command, out, **kw))
    return logs(out)


def assert_same_run(one, other, a_weights, b_weights, tokens=True):
    """Two runs' logs and final weights agree within 1e-5 (log-probabilities of ~ -70 within 1e-6 relative)."""
    assert [r["step"] for r in one[0]] == [r["step"] for r in other[0]]
    assert [r["step"] for r in one[1]] == [r["step"] for r in other[1]]
    for x, y in zip(one[0], other[0]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], abs=1e-5), x["step"]
        if tokens:
            assert x["tokens"] == y["tokens"], x["step"]
        for key in x:
            if key.startswith(("reward_", "logp_")):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-5), (x["step"], key)
    for x, y in zip(one[1], other[1]):
        for key in x:
            # (DPO before its first step: the policy is its reference, every margin is 0 up to rounding, so which
            # answer "wins" is rounding's choice; the margins themselves are compared)
            tie = key == "val_reward_accuracy" and abs(x.get("val_reward_margin", 1.0)) < 1e-6
            if key.startswith("val_") and not tie:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-5), (x["step"], key)
    assert a_weights.keys() == b_weights.keys()
    worst = max((a_weights[k] - b_weights[k]).abs().max().item() for k in a_weights)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("command", ["reward", "dpo", "sft"])
def test_8_by_1_and_1_by_8_and_2_by_4_give_the_same_steps(base, tmp_path, command):
    rows = sft_rows() if command == "sft" else string_pairs(40)
    data = jsonl(tmp_path / "d.jsonl", rows)
    runs = {}
    for micro, accum in ((8, 1), (1, 8), (2, 4)):
        out = tmp_path / f"{micro}x{accum}"
        runs[micro, accum] = (run_layout(command, base, data, out, micro_batch_size=micro, grad_accum_steps=accum),
                              final_weights(out))
    one, w1 = runs[8, 1]
    assert [r["step"] for r in one[0]] == [1, 2, 3, 4]
    start = base_weights(base)
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1 if k in start)
    assert moved > 1e-3  # the parameters moved measurably: equal parameters are not just the start
    for layout in ((1, 8), (2, 4)):
        assert_same_run(one, runs[layout][0], w1, runs[layout][1])


def torchrun(command, config: dict, tmp_path):
    path = tmp_path / f"{command}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lmforge", command, "--config", str(path), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("command, parallel, extra", [("reward", "ddp", {}), ("dpo", "ddp", {}), ("reward", "fsdp", {}),
                                                      ("dpo", "fsdp", {}), ("dpo", "fsdp", {"reference": "precomputed"})])
def test_two_processes_of_4_match_one_process_of_8(base, tmp_path, command, parallel, extra):
    """(A precomputed reference under FSDP is computed by the sharded model, every rank over every pair.)"""
    data = jsonl(tmp_path / "d.jsonl", string_pairs(40))
    one = run_layout(command, base, data, tmp_path / "one", micro_batch_size=8, **extra)
    torchrun(command, dict(model=str(base), train=data, parallel=parallel,
                           **layout_settings(command, tmp_path / "two", micro_batch_size=4, **extra)), tmp_path)
    if extra:
        with safe_open(tmp_path / "one" / REFERENCE_CACHE, "pt") as a, safe_open(tmp_path / "two" / REFERENCE_CACHE, "pt") as b:
            for name in a.keys():
                torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=0, atol=1e-5)
    two = logs(tmp_path / "two")
    assert [r["step"] for r in two[0]] == [1, 2, 3, 4]  # rank 0 alone logs, once a step
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert_same_run(one, two, final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), tokens=False)
    # the tokens trained on: every rank's, not rank 0's times the number of processes
    assert [r["tokens"] for r in two[0]] == [r["tokens"] for r in one[0]]


@pytest.mark.parametrize("bad, problem", [
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "'chosen' must be a string or a list of messages, not a number (5)"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "'prompt' must be a string or a list of messages, not null"),
    ({"chosen": {"text": "c"}, "rejected": "r"}, "'chosen' must be a string or a list of messages, not an object"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": 3}],
      "rejected": MESSAGES}, "'chosen' message 0's 'content' must be a string, not a number (3)"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": MESSAGES, "rejected": [{"role": "assistant", "content": "4"}]},
     "'prompt' message 0 has role 'human'; roles are system, user and assistant"),
    ({**GOOD, "margin": None}, "'margin' must be a finite number, not null"),
], ids=["number-answer", "null-prompt", "object-answer", "number-content", "unknown-role", "null-margin"])
def test_a_value_of_the_wrong_type_is_named_with_its_type(tmp_path, bad, problem):
    """A number where an answer goes was "'prompt', 'chosen' and 'rejected' must all be strings or all be message
    lists", as though the kinds were mixed."""
    path = jsonl(tmp_path / "p.jsonl", [GOOD, bad])
    with pytest.raises(LmforgeError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: {problem}"), str(e.value)


def test_reward_score_names_the_file_and_line_of_a_bad_row(tokenizer_dir, tmp_path, capsys):
    """A row of the wrong type was "row 2: 'prompt' and 'answer' must be strings...": no file, and its place among
    the rows read rather than its line (a blank line before it was not counted)."""
    rm = nopad_reward_model(tmp_path / "rm", tokenizer_dir)
    good = json.dumps({"prompt": "a", "answer": " b"})
    for row, problem in [({"prompt": 5, "answer": "b"}, "'prompt' must be a string or a list of messages, not a number (5)"),
                         ({"prompt": "a", "answer": None}, "'answer' must be a string"),
                         ({"prompt": "a"}, "missing field 'answer'"),
                         (["a", "b"], "expected a JSON object {\"prompt\": ..., \"answer\": ...}, got a list")]:
        path = tmp_path / "rows.jsonl"
        path.write_text(f"{good}\n\n{json.dumps(row)}\n")
        capsys.readouterr()
        assert main(["reward-score", "--model", str(rm), "--input", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lmforge: error: {path}:3: {problem}"), err
    with pytest.raises(LmforgeError, match=r"^rows.jsonl:7: 'answer' must be a string"):
        reward_scores(rm, [{"prompt": "a", "answer": " b"}, {"prompt": "a", "answer": 1}], source="rows.jsonl",
                      lines=[2, 7])
    with pytest.raises(LmforgeError, match=r"^row 2: 'answer' must be a string"):
        reward_scores(rm, [{"prompt": "a", "answer": " b"}, {"prompt": "a", "answer": 1}])
