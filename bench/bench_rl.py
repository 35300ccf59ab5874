"""GRPO, lmforge against TRL: samples/s of whole steps (rollout + update) on the same model, prompts and settings.

    python bench/bench_rl.py                  # tiny and gpt2 shapes (about 9 minutes on 2 cores)
    python bench/bench_rl.py --shapes tiny    # quick

Both systems start from one model folder (a random-weight GPT2LMHeadModel saved with save_pretrained, and a
byte-level BPE trained here on the standard library: 8,192 tokens for the tiny shape; for the gpt2 shape the
whole merge list the standard library gives, so that every sampled id decodes) and train on the same prompts
"A + B =" (64 of them, all of one token length). Each optimizer step samples G = 8 completions of 4 prompts
(32 completions, at most 32 new tokens, temperature 1, no top-k/top-p), scores them with ``reward`` below
(plain Python both call: 1 if the first number is A + B, 0.5 if there is a number, else 0), and makes one
update of 4 micro-batches of 8 completions: GRPO, beta 0 (no reference model), loss "grpo" (mean over each
completion's tokens), one pass over each rollout, AdamW alike (lr 1e-5, betas 0.9/0.95, no weight decay,
clipping at 1, constant lr), no dropout, no evaluation, no checkpoint while timed.

  * TRL: GRPOTrainer, bf16=False (fp32), use_vllm False (transformers' generate), gradient checkpointing off
    (TRL turns it on by default; off, both do the same arithmetic), report_to none.
  * lmforge: `lmforge rl --algo grpo` through its Python API, with ``dtype: auto`` (the precision probe's
    choice; it applies to the log-prob pass and training, the engine samples in the weights' fp32) and with
    ``dtype: float32``. The reward is passed as MODULE:FUNCTION (bench_rl:reward), the way a user passes one.

Timing. The three runs are three processes that take turns, one optimizer step each (TRL, lmforge default,
lmforge fp32, TRL, ...), so that whatever else runs on the machine falls on all alike. A step runs from the
start of its rollout to the start of the next rollout (lmforge), or from ``on_step_begin`` to ``on_step_end``
(TRL; its generation happens inside the step). The first ``--warmup`` steps are left out; each figure is the
median over the timed steps, and samples/s = 32 / the median step. The split: generation (TRL: ``_generate``,
i.e. tokenising, ``model.generate`` and decoding; lmforge: its ``generation_seconds``, the engine), scoring
(TRL: ``_calculate_rewards``; lmforge: ``scoring_seconds``), preparation (the rest of the rollout: TRL's
padding and advantages, lmforge's ``preparation_seconds``: a no-grad log-prob pass over the rollout (pi_old)
and the advantages) and training (the rest of the step: forward, backward, optimizer).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
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

from lmforge.model.config import Config  # noqa: E402
from lmforge.precision import describe_probe  # noqa: E402

PROMPTS_PER_STEP, G, MAX_NEW_TOKENS, MICRO_BATCH = 4, 8, 32, 8
ACCUM = PROMPTS_PER_STEP * G // MICRO_BATCH  # micro-batches per optimizer step
SAMPLES_PER_STEP = PROMPTS_PER_STEP * G
N_PROMPTS = 64
THREADS = 2
LR, BETAS = 1e-5, (0.9, 0.95)
SYSTEMS = ("TRL fp32", "lmforge default", "lmforge fp32")
PARTS = ("generation", "scoring", "preparation", "training")


# -- the reward both systems call ------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+")


def reward(prompt: str, completion: str, **_) -> float:
    """1 if the completion's first number is A + B of the prompt "A + B =", 0.5 if it has another number, else 0
    (a random model writes numbers now and then, so the groups' rewards differ and the advantages are not all 0)."""
    a, b = map(int, re.match(r"\s*(\d+) \+ (\d+) =", prompt).groups())
    first = _NUMBER.search(completion)
    return 0.0 if first is None else 1.0 if int(first.group()) == a + b else 0.5


def trl_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """``reward`` in TRL's signature (all completions of a rollout at once)."""
    return [reward(p, c) for p, c in zip(prompts, completions)]


# -- the shared model folder and prompts -----------------------------------------------------------


def make_model_folder(shape: str, folder: Path) -> Config:
    """A random-weight GPT2LMHeadModel of lmforge's ``shape`` preset, its vocabulary the tokenizer's, saved with
    save_pretrained next to the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.tokenizer import train_tokenizer

    # tiny: 8,192 tokens; gpt2: as many as the stdlib's merges give (GPT-2's own 50,257 would leave ids no text has)
    tokenizer = train_tokenizer(None, folder, vocab_size=8192 if shape == "tiny" else 50257, progress=False)
    config = Config.from_preset(shape, vocab_size=tokenizer.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    ))
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return config


def make_prompts(folder: Path) -> list[dict]:
    """N_PROMPTS prompts "A + B =" of two-digit numbers, all of the most common token length, so that every
    step does the same work whichever prompts each trainer draws."""
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(folder)
    candidates = [f"{a} + {b} =" for a in range(10, 100, 3) for b in range(11, 100, 7)]
    by_length: dict[int, list[str]] = {}
    for text in candidates:
        by_length.setdefault(len(tokenizer.encode(text)), []).append(text)
    common = max(by_length.values(), key=len)
    if len(common) < N_PROMPTS:
        raise SystemExit(f"only {len(common)} prompts of one token length")
    return [{"prompt": text} for text in common[:: len(common) // N_PROMPTS][:N_PROMPTS]]


def run_trl(spec: dict, turns: Turns) -> list[dict]:
    """Each step of TRL's GRPOTrainer: its seconds, the split, and the completions' mean length."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    folder = Path(spec["folder"])
    steps: list[dict] = []
    current: dict = {}

    class TakeTurns(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            turns.wait()
            current.clear()
            current.update(generation=0.0, scoring=0.0, rollout=0.0, start=time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - current["start"]
            rest = current["rollout"] - current["generation"] - current["scoring"]
            steps.append({"seconds": seconds, "generation": current["generation"], "scoring": current["scoring"],
                          "preparation": rest, "training": seconds - current["rollout"], "length": current["length"]})
            turns.done()

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer.add_special_tokens({k: config[k] for k in ("eos_token", "bos_token", "pad_token")})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"), per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUM, num_generations=G, max_completion_length=MAX_NEW_TOKENS, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", num_iterations=1, max_steps=spec["steps"], learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        lr_scheduler_type="constant", warmup_steps=0, disable_dropout=True, gradient_checkpointing=False, bf16=False,
        use_vllm=False, logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_list(json.loads(spec["prompts"])), processing_class=tokenizer)
    theirs = tokenizer(text=[r["prompt"] for r in json.loads(spec["prompts"])])["input_ids"]  # as _tokenize_prompts
    if [list(ids) for ids in theirs] != spec["prompt_ids"]:
        raise RuntimeError("TRL and lmforge tokenise the prompts differently; the comparison would not be fair")

    def timed(name: str, fn, after=None):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            current[name] += time.perf_counter() - start
            if after:
                after(out)
            return out
        return wrapper

    def lengths(out):  # _generate returns (prompt_ids, completion_ids, ...)
        current["length"] = statistics.mean(len(ids) for ids in out[1])

    trainer._generate = timed("generation", trainer._generate, lengths)
    trainer._calculate_rewards = timed("scoring", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    trainer.add_callback(TakeTurns())
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's closing summary
        trainer.train()
    return steps


def run_lmforge(spec: dict, turns: Turns) -> tuple[list[dict], str]:
    """Each step of `lmforge rl --algo grpo`: its seconds, the split (the rollout's logged timings), the mean length."""
    from lmforge.train.config import RLConfig
    from lmforge.train.loop import resolve_config, train
    from lmforge.train.rl import RL, read_prompts

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # where bench_rl:reward is imported from
    out = Path(spec["tmp"]) / "lmforge"
    prompts_file = Path(spec["tmp"]) / "prompts.jsonl"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in json.loads(spec["prompts"])), encoding="utf-8")
    values = {
        "model": spec["folder"], "train": str(prompts_file), "out": str(out), "algo": "grpo",
        "reward": "bench_rl:reward", "num_generations": G, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0,
        "kl_coef": 0.0, "loss_norm": "grpo", "micro_batch_size": MICRO_BATCH, "grad_accum_steps": ACCUM,
        "minibatches": 1, "ppo_epochs": 1, "max_steps": spec["steps"], "lr": LR, "min_lr": LR, "warmup_steps": 0,
        "beta1": BETAS[0], "beta2": BETAS[1], "weight_decay": 0.0, "grad_clip": 1.0, "dropout": 0.0,
        "eval_interval": 10**6, "checkpoint_interval": 10**6, "sample_interval": 10**6, "tensorboard": False,
        "dtype": "float32" if "fp32" in spec["system"] else "auto", "threads": THREADS, "seed": 0,
    }
    config = resolve_config(values, False, {}, cls=RLConfig)
    rows = read_prompts(config.train)
    steps: list[dict] = []

    def make_objective(c, device, checkpoint):
        objective = RL(c, device, checkpoint, rows)
        if len({len(p["ids"]) for p in objective.prompts}) != 1:
            raise RuntimeError("lmforge's prompts are not all of one length")
        make_stream = objective.batches

        def batches(rank, world_size):
            # A step runs from the start of its rollout to the start of the next rollout.
            stream = make_stream(rank, world_size)
            fetch, start = stream.next_batch, []

            def next_batch(device):
                if stream.buffer is None or stream.served == stream.per_rollout:  # this call makes a rollout
                    if start:
                        seconds = time.perf_counter() - start.pop()
                        s = objective.rollout_stats
                        rollout = s["generation_seconds"] + s["scoring_seconds"] + s["preparation_seconds"]
                        steps.append({"seconds": seconds, "generation": s["generation_seconds"],
                                      "scoring": s["scoring_seconds"], "preparation": s["preparation_seconds"],
                                      "training": seconds - rollout, "length": s["completion_length"]})
                        turns.done()
                    turns.wait()
                    start.append(time.perf_counter())
                return fetch(device)

            stream.next_batch = next_batch
            return stream

        objective.batches = batches
        return objective

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config, make_objective, progress=False)  # its last step is not timed (no next rollout starts)
    turns.done()
    chosen = next((line.split(":", 1)[1].strip() for line in printed.getvalue().splitlines()
                   if line.startswith("precision:")), "?")
    return steps, chosen


def run_system(spec: dict, turns: Turns) -> tuple[list[dict], str]:
    if spec["system"].startswith("TRL"):
        return run_trl(spec, turns), "fp32 (bf16=False)"
    return run_lmforge(spec, turns)


def run_systems(spec: dict) -> dict[str, tuple[list[dict], str]]:
    """Every system's run, in processes taking turns step by step (TRL first)."""
    return run_in_turns(run_system, list(SYSTEMS), spec, THREADS)


# -- the bench -------------------------------------------------------------------------------------


def bench_shape(shape: str, warmup: int, timed: int, tmp: Path) -> list[tuple]:
    from lmforge.tokenizer import Tokenizer

    folder = tmp / f"model-{shape}"
    config = make_model_folder(shape, folder)
    prompts = make_prompts(folder)
    prompt_ids = [Tokenizer.load(folder).encode(r["prompt"]) for r in prompts]
    prompt_tokens = len(prompt_ids[0])
    n_params = 12 * config.n_layer * config.n_embd ** 2 + (config.vocab_size + config.block_size) * config.n_embd
    print(f"{shape}: {config.n_layer} layers x {config.n_embd} wide, vocab {config.vocab_size:,}, context "
          f"{config.block_size}, about {n_params / 1e6:.0f}M parameters; prompts of {prompt_tokens} tokens",
          flush=True)
    rows_per_micro = MICRO_BATCH * (prompt_tokens + MAX_NEW_TOKENS)
    print(f"{shape}: {describe_probe(config.n_embd, 4 * config.n_embd, rows_per_micro, config.vocab_size)}",
          flush=True)
    spec = {"folder": str(folder), "prompts": json.dumps(prompts), "prompt_ids": prompt_ids,
            "steps": warmup + timed + 1, "tmp": str(tmp / shape)}  # +1: lmforge's last step is never timed
    start = time.perf_counter()
    results = run_systems(spec)
    print(f"  ({time.perf_counter() - start:.0f} s for the {shape} runs)", flush=True)
    medians = {}
    for system in SYSTEMS:
        steps, note = results[system]
        kept = steps[warmup:warmup + timed]
        seconds = ", ".join(f"{s['seconds']:.2f}" for s in steps)
        print(f"  {shape}: {system} ({note}): steps {seconds} s", flush=True)
        medians[system] = {k: statistics.median(s[k] for s in kept) for k in ("seconds", *PARTS, "length")}
    trl = medians["TRL fp32"]["seconds"]
    out = []
    for system in SYSTEMS:
        m = medians[system]
        note = results[system][1]
        label = system if system.startswith("TRL") else f"{system} ({'bf16' if note.startswith('bf16') else 'fp32'})"
        out.append((shape, label, SAMPLES_PER_STEP / m["seconds"], trl / m["seconds"], m))
    return out


def print_table(rows: list[tuple]) -> None:
    print("\n| shape | system | samples/s | ratio vs TRL | generation s | scoring s | preparation s | training s | "
          "step s | mean completion tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape, system, rate, ratio, m in rows:
        print(f"| {shape} | {system} | {rate:.2f} | {ratio:.2f}x | " + " | ".join(f"{m[k]:.3f}" for k in PARTS)
              + f" | {m['seconds']:.3f} | {m['length']:.1f} |")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,gpt2")
    p.add_argument("--warmup", type=int, default=1, help="steps left out at the start of each run")
    p.add_argument("--steps", default="tiny=8,gpt2=4", help="timed steps of each run, by shape")
    args = p.parse_args()
    steps = begin(args.steps, THREADS)
    print(f"GRPO: {PROMPTS_PER_STEP} prompts x G={G} = {SAMPLES_PER_STEP} completions of at most {MAX_NEW_TOKENS} "
          f"tokens per step, {ACCUM} micro-batches of {MICRO_BATCH}, one update per rollout; {args.warmup} warm-up "
          f"step(s) left out of each run; load average {os.getloadavg()[0]:.2f}\n", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        for shape in args.shapes.split(","):
            results += bench_shape(shape, args.warmup, int(steps.get(shape, 3)), Path(tmp))
            print_table(results)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
