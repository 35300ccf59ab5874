"""Preference training, lmforge against TRL: DPO and reward-model pairs/s on the same model, pairs and batch.

    python bench/bench_preference.py                 # tiny and gpt2 shapes (about 9 minutes on 2 cores)
    python bench/bench_preference.py --shapes tiny   # quick

Both systems start from one model folder (a random-weight GPT-2-family transformers model, saved with
save_pretrained, and a byte-level BPE trained here on standard-library source) and train on the same pairs:
a 64-token prompt and two 64-token answers (end-of-text included), cut from standard-library source, every
one exactly that long, so every step does the same work whatever order each trainer draws the pairs in
(the script checks that TRL's tokens are lmforge's). 8 pairs per step (16 rows of 128 tokens), fused AdamW
in both (lr, betas, weight decay and clipping alike), no dropout, no evaluation, no checkpoint while timed.

  * DPO (sigmoid, beta 0.1) against a frozen reference: TRL's DPOTrainer with ``ref_model`` a second copy
    against `lmforge dpo` with reference "copy"; and both with the reference log-probs precomputed.
  * Reward model (Bradley-Terry): TRL's RewardTrainer (AutoModelForSequenceClassification, one label)
    against `lmforge reward`.

Precision. "TRL fp32" is ``bf16=False``: on a machine without a GPU TRL's configs default to bf16 and refuse
it unless told ``bf16=False`` or ``use_cpu=True``. "TRL bf16" is ``use_cpu=True`` (bf16 autocast).
"lmforge default" is ``dtype: auto`` (the precision probe; the table says what it chose), "lmforge fp32"
``dtype: float32``. TRL's gradient checkpointing (on by default) is off, so both do the same arithmetic.

Timing. Each comparison runs its two systems in two processes that take turns, one optimizer step each
(TRL, lmforge, TRL, ...), so that whatever else runs on the machine falls on both alike; a step is timed
from its start to the optimizer's update (TRL: ``on_step_begin`` to ``on_step_end``; lmforge: from one
batch handed to the loop to the loop asking for the next), the collation of the batch left out of both.
The first ``--warmup`` steps are left out; a system's figure is the median of its timed steps, and
pairs/s = 8 / that median. "vs its pair" is the ratio to the TRL run it alternated with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is made here; nothing comes from the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from turns import Turns, begin, run_in_turns  # noqa: E402

from lmforge.model.config import Config
from lmforge.precision import describe_probe

PROMPT_TOKENS, ANSWER_TOKENS, PAIRS_PER_STEP = 64, 64, 8
THREADS = 2
LR = {"dpo": 1e-6, "reward": 1e-5}  # lmforge's and TRL's DPO default; one value for both reward models
BETAS = (0.9, 0.95)  # lmforge's; TRL is told the same

# Each comparison: a TRL run and the lmforge run that alternates with it, step by step.
PAIRS = {
    "dpo": [("TRL fp32", "lmforge fp32"), ("TRL bf16", "lmforge default"),
            ("TRL bf16, reference precomputed", "lmforge default, reference precomputed")],
    "reward": [("TRL fp32", "lmforge fp32"), ("TRL bf16", "lmforge default")],
}


# -- the shared model folder and pairs -------------------------------------------------------------


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 20_000)[:40]


def make_tokenizer(folder: Path):
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([str(p) for p in stdlib_files()], folder, vocab_size=8192, progress=False)


def make_model_folder(shape: str, tokenizer, folder: Path) -> Config:
    """A random-weight GPT2LMHeadModel of lmforge's ``shape`` preset, saved with save_pretrained, with the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = Config.from_preset(shape)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    ))
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return config


def make_pairs(tokenizer, n: int) -> list[dict]:
    """``n`` pairs of standard-library source: a prompt of PROMPT_TOKENS tokens, the code that follows it as the
    chosen answer and code from elsewhere as the rejected one (ANSWER_TOKENS - 1 tokens each, before the end-of-text
    token both trainers add). A cut is kept only if it tokenises to exactly that many tokens and no token spans
    the prompt/answer boundary, so both systems see exactly these lengths."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[::-1])
    enc = tokenizer.hf.encode(text)
    offsets = enc.offsets
    a = ANSWER_TOKENS - 1

    def cut(i: int, length: int) -> str | None:
        piece = text[offsets[i][0]:offsets[i + length - 1][1]]
        return piece if len(tokenizer.encode(piece)) == length else None

    def joins(prompt: str, answer: str) -> bool:
        return tokenizer.encode(prompt + answer) == tokenizer.encode(prompt) + tokenizer.encode(answer)

    rows, i, j = [], 0, len(enc.ids) // 2
    while len(rows) < n and i + PROMPT_TOKENS + 2 * a < len(enc.ids) // 2:
        prompt, chosen, rejected = cut(i, PROMPT_TOKENS), cut(i + PROMPT_TOKENS, a), cut(j, a)
        if prompt and chosen and rejected and chosen != rejected and joins(prompt, chosen) and joins(prompt, rejected):
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            i += PROMPT_TOKENS + a
            j += a
        else:
            i += 1
            j += 1
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} pairs of exact lengths found; the corpus is too small")
    return rows


def check_same_tokens(trl_dataset, folder: Path, rows: list[dict], kind: str) -> None:
    """TRL's tokenised pairs must be lmforge's, token for token (and PROMPT + ANSWER long)."""
    from lmforge.data.preference import tokenize_pairs
    from lmforge.tokenizer import Tokenizer

    ours, _ = tokenize_pairs(Tokenizer.load(folder), rows, 10_000)
    for k, p in enumerate(ours):
        if kind == "dpo":
            theirs = (trl_dataset[k]["prompt_ids"], trl_dataset[k]["chosen_ids"], trl_dataset[k]["rejected_ids"])
            mine = (p.prompt, p.chosen, p.rejected)
        else:
            theirs = (trl_dataset[k]["chosen_ids"], trl_dataset[k]["rejected_ids"])
            mine = (p.prompt + p.chosen, p.prompt + p.rejected)
        if tuple(map(list, theirs)) != mine:
            raise RuntimeError(f"pair {k}: TRL and lmforge tokenise it differently; the comparison would not be fair")
        if len(p.prompt) != PROMPT_TOKENS or {len(p.chosen), len(p.rejected)} != {ANSWER_TOKENS}:
            raise RuntimeError(f"pair {k}: lengths {len(p.prompt)}/{len(p.chosen)}/{len(p.rejected)}, not "
                               f"{PROMPT_TOKENS}/{ANSWER_TOKENS}/{ANSWER_TOKENS}")


def run_trl(spec: dict, turns: Turns) -> tuple[list[float], str]:
    """Seconds of each step of TRL's DPOTrainer or RewardTrainer."""
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    kind, folder, system = spec["kind"], Path(spec["folder"]), spec["system"]
    times: list[float] = []

    class TakeTurns(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            turns.wait()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)
            turns.done()

    rows = [json.loads(line) for line in Path(spec["pairs"]).read_text(encoding="utf-8").splitlines()]
    bf16 = "bf16" in system
    common = dict(
        output_dir=str(Path(spec["tmp"]) / "trl"), per_device_train_batch_size=PAIRS_PER_STEP,
        max_steps=spec["steps"], learning_rate=LR[kind], adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, gradient_checkpointing=False,
        **({"use_cpu": True, "bf16": True} if bf16 else {"bf16": False}),
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    dataset = Dataset.from_list(rows)
    torch.manual_seed(0)
    if kind == "dpo":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        precomputed = "precomputed" in system
        ref = None if precomputed else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=precomputed)
        with contextlib.redirect_stderr(io.StringIO()):  # the precomputation's progress bar
            trainer = DPOTrainer(model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        trainer = RewardTrainer(model, args=RewardConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    check_same_tokens(trainer.train_dataset, folder, rows, kind)
    trainer.add_callback(TakeTurns())
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's closing summary
        trainer.train()
    return times, "bf16 autocast (use_cpu=True)" if bf16 else "fp32 (bf16=False)"


def run_lmforge(spec: dict, turns: Turns) -> tuple[list[float], str]:
    """Seconds of each step of lmforge's DPO or reward model, run by the one training loop."""
    from lmforge.data.preference import read_pairs
    from lmforge.train.config import DPOConfig, RewardConfig
    from lmforge.train.loop import resolve_config, train
    from lmforge.train.preference import DPO, RewardModel

    kind, system = spec["kind"], spec["system"]
    objective_cls, config_cls = (DPO, DPOConfig) if kind == "dpo" else (RewardModel, RewardConfig)
    values = {
        "model": spec["folder"], "train": spec["pairs"], "out": str(Path(spec["tmp"]) / "lmforge"), "val_fraction": 0.0,
        "max_steps": spec["steps"], "micro_batch_size": PAIRS_PER_STEP, "lr": LR[kind], "beta1": BETAS[0],
        "beta2": BETAS[1], "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 0, "eval_interval": 10**6,
        "checkpoint_interval": 10**6, "dtype": "float32" if "fp32" in system else "auto", "threads": THREADS,
        "tensorboard": False, "dropout": 0.0,
    }
    if kind == "dpo":
        values.update(reference="precomputed" if "precomputed" in system else "copy", beta=0.1, loss="sigmoid")
    config = resolve_config(values, False, {}, cls=config_cls)
    pairs = read_pairs(config.train)
    times: list[float] = []

    def make_objective(c, device, checkpoint):
        objective = objective_cls(c, device, checkpoint, pairs)
        make_stream = objective.batches

        def batches(rank, world_size):
            # A step runs from the batch handed to the loop to the loop asking for the next one.
            stream = make_stream(rank, world_size)
            fetch, start = stream.next_batch, []

            def next_batch(device):
                if start:
                    times.append(time.perf_counter() - start.pop())
                    turns.done()
                turns.wait()
                batch = fetch(device)
                start.append(time.perf_counter())
                return batch

            stream.next_batch = next_batch
            return stream

        objective.batches = batches
        return objective

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config, make_objective, progress=False)  # its last step is not timed (no next batch is asked for)
    chosen = next((line.split(":", 1)[1].strip() for line in printed.getvalue().splitlines()
                   if line.startswith("precision:")), "?")
    return times, chosen


def run_system(spec: dict, turns: Turns) -> tuple[list[float], str]:
    return (run_trl if spec["system"].startswith("TRL") else run_lmforge)(spec, turns)


def run_pair(pair: tuple[str, str], spec: dict) -> dict[str, tuple[list[float], str]]:
    """The TRL run and the lmforge run of ``pair``, in two processes taking turns (TRL first)."""
    return run_in_turns(run_system, list(pair), spec, THREADS)


# -- the bench -------------------------------------------------------------------------------------


def bench_shape(shape: str, tokenizer, warmup: int, timed: int, tmp: Path, kinds: list[str]) -> list[tuple]:
    folder = tmp / f"model-{shape}"
    config = make_model_folder(shape, tokenizer, folder)
    pairs_file = tmp / f"pairs-{shape}.jsonl"
    rows = make_pairs(tokenizer, PAIRS_PER_STEP * (warmup + timed + 1))
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rows_per_step = 2 * PAIRS_PER_STEP * (PROMPT_TOKENS + ANSWER_TOKENS)
    print(f"{shape}: {describe_probe(config.n_embd, 4 * config.n_embd, rows_per_step, config.vocab_size)}", flush=True)
    # lmforge's last step is never timed (see run_lmforge): one more step each than is timed
    spec = {"folder": str(folder), "pairs": str(pairs_file), "steps": warmup + timed + 1}
    out = []
    for kind in kinds:
        rates, notes = {}, {}
        for k, pair in enumerate(PAIRS[kind]):
            start = time.perf_counter()
            result = run_pair(pair, {**spec, "kind": kind, "tmp": str(tmp / f"{shape}-{kind}-{k}")})
            for system in pair:
                times, notes[system] = result[system]
                rates[system] = PAIRS_PER_STEP / statistics.median(times[warmup:warmup + timed])
                print(f"  {shape} {kind}: {system}: steps {', '.join(f'{t:.3f}' for t in times)} s", flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s for the pair)", flush=True)
        for trl_system, ours in PAIRS[kind]:
            out.append((shape, kind, trl_system, rates[trl_system], rates[trl_system] / rates["TRL fp32"], None))
            precision = "bf16" if notes[ours].startswith("bf16") else "fp32"
            out.append((shape, kind, f"{ours} ({precision})", rates[ours], rates[ours] / rates["TRL fp32"],
                        rates[ours] / rates[trl_system]))
        for system, note in notes.items():
            if system.startswith("lmforge"):
                print(f"  {shape} {kind}: {system}: {note}")
    return out


def print_table(rows: list[tuple]) -> None:
    print("\n| shape | trainer | system | pairs/s | vs TRL fp32 | vs its pair (the TRL run it alternated with) |")
    print("|---|---|---|---:|---:|---:|")
    for shape, kind, system, rate, ratio, pair in rows:
        print(f"| {shape} | {'DPO' if kind == 'dpo' else 'reward model'} | {system} | {rate:.2f} | "
              f"{ratio:.2f}x | {'' if pair is None else f'{pair:.2f}x'} |")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,gpt2")
    p.add_argument("--trainers", default="dpo,reward")
    p.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each run")
    p.add_argument("--steps", default="tiny=10,gpt2=4", help="timed steps of each run, by shape")
    args = p.parse_args()
    steps = begin(args.steps, THREADS)
    print(f"pairs: prompt {PROMPT_TOKENS} tokens, chosen and rejected {ANSWER_TOKENS} tokens each (end-of-text "
          f"included), {PAIRS_PER_STEP} pairs per step; {args.warmup} warm-up steps left out of each run\n", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_preference_") as tmp:
        tmp = Path(tmp)
        tokenizer = make_tokenizer(tmp / "tok")
        for shape in args.shapes.split(","):
            results += bench_shape(shape, tokenizer, args.warmup, int(steps.get(shape, 4)), tmp, args.trainers.split(","))
            print_table(results)


if __name__ == "__main__":
    main()
