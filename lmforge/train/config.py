"""`TrainConfig`: everything a training run needs, from a YAML file and/or ``--key value`` overrides."""

from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from lmforge.errors import LmforgeError


def setting(default, meaning: str, choices: tuple[str, ...] | None = None):
    """A config key: its default, a one-line meaning (``--help`` shows it) and, for a fixed set, its choices
    (``validate`` checks them). The meaning and the choices live here once, next to the default."""
    return field(default=default, metadata={"help": meaning, "choices": choices})


# The largest model shapes and thread count a config may ask for: far past any model trained, still far below what
# overflows a tensor's size (the largest models have about 130 layers, a width of 16,384, contexts of ~10M tokens).
SHAPE_LIMITS = (("n_layer", 10_000, "Transformer blocks"), ("n_embd", 1 << 20, "model width"),
                ("n_head", 1 << 16, "attention heads"), ("n_kv_head", 1 << 16, "key/value heads"),
                ("block_size", 1 << 24, "context length in tokens"), ("micro_batch_size", 1 << 20, "sequences"))
MAX_SEQUENCES_A_STEP = 1 << 24  # per process (the largest batches are a few thousand)
MAX_THREADS = 1024


@dataclass
class TrainConfig:
    # Keys a command accepts but does nothing with: refused by name, with the reason, and left out of --help.
    IGNORED: ClassVar[dict[str, str]] = {}

    # where things are
    data: str = setting("data", "a folder written by `lmforge prepare`")
    out: str = setting("runs/pretrain", "the run folder: config, metrics, checkpoints, report")
    # model: a preset name, or a model folder to continue training from; shape overrides below
    model: str = setting("tiny", "a preset (tiny, gpt2, llama-1b, ...) or a model folder to continue training from")
    block_size: int | None = setting(None, "context length in tokens (default: the preset's)")
    n_layer: int | None = setting(None, "Transformer blocks (default: the preset's)")
    n_head: int | None = setting(None, "attention heads (default: the preset's)")
    n_embd: int | None = setting(None, "model width (default: the preset's)")
    n_kv_head: int | None = setting(None, "key/value heads for grouped-query attention (Llama-style presets)")
    dropout: float = setting(0.0, "dropout probability in [0, 1)")
    # what is learned: the objective picks the model shape (clm: decoder; mlm: encoder)
    objective: str = setting("clm", "clm (next token, decoder), mlm (masked tokens, BERT-style encoder) or mlm+nsp "
                                    "(masked tokens and next-sentence prediction, BERT), plm (permutation LM, XLNet) or span "
                                    "(span corruption, a T5 encoder-decoder)", choices=("clm", "mlm", "mlm+nsp", "plm", "span"))
    mlm_probability: float = setting(0.15, "mlm: share of tokens chosen for prediction each step")
    mask_replace_prob: float = setting(0.8, "mlm: share of chosen tokens replaced by the mask token")
    random_replace_prob: float = setting(0.1, "mlm: share of chosen tokens replaced by a random token (the rest "
                                              "stay themselves)")
    whole_word_mask: bool = setting(False, "mlm: choose whole words rather than single tokens")
    plm_probability: float = setting(1 / 6, "plm: share of tokens predicted (in spans)")
    max_span_length: int = setting(5, "plm: longest span of predicted tokens")
    noise_density: float = setting(0.15, "span: share of tokens corrupted")
    mean_span_length: float = setting(3.0, "span: mean length of a corrupted span")
    # batch: micro_batch_size sequences per process per forward, summed over grad_accum_steps and processes
    micro_batch_size: int = setting(8, "sequences per process per forward pass")
    grad_accum_steps: int = setting(1, "forward/backward passes summed into one optimizer step")
    max_steps: int = setting(1000, "optimizer steps in the whole run (with --resume: the step to stop at)")
    # AdamW with linear warmup then cosine decay to min_lr (default lr / 10)
    lr: float = setting(1e-3, "peak learning rate of AdamW")
    min_lr: float | None = setting(None, "learning rate at the end of the cosine decay (default: lr / 10)")
    warmup_steps: int = setting(100, "steps of linear warmup from 0 to lr")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices and embeddings (not biases or norm gains)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "max gradient norm; 0 turns clipping off")
    max_bad_steps: int = setting(5, "stop after this many steps in a row with a NaN/inf loss or gradient (each is skipped)")
    # evaluation, checkpoints, samples
    eval_interval: int = setting(100, "evaluate on the validation split every N steps")
    eval_windows: int = setting(64, "validation windows of block_size tokens, the same ones each time")
    checkpoint_interval: int = setting(500, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = setting(2, "checkpoints kept in the run folder; older ones are deleted")
    sample_prompt: str = setting("", "print a continuation of this prompt at the start and the end (empty: none)")
    sample_tokens: int = setting(64, "tokens in each sample")
    # hardware
    seed: int = setting(1337, "seed of the initial weights, the data order and dropout")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    dtype: str = setting("auto", "auto (bf16 autocast where it is measured faster here), float32 or bfloat16",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool = setting(False, "torch.compile the model")
    threads: int = setting(0, "CPU threads for torch; 0 keeps torch's default")
    tensorboard: bool = setting(True, "also log to TensorBoard when it is installed")
    # several processes (torchrun)
    parallel: str = setting("auto", "with several processes: ddp (each holds the whole model), fsdp (FSDP2: "
                                    "parameters, gradients and optimizer state sharded over processes) or auto "
                                    "(fsdp when the training state would not fit one device)", choices=("auto", "ddp", "fsdp"))
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass "
                                                    "instead of keeping them (less memory, about 1/3 more compute)")
    async_save: bool = setting(False, "under FSDP: write each checkpoint's shards in a background thread "
                                      "(dcp.async_save) while training goes on; it becomes the latest checkpoint "
                                      "at the end of the first step after they are written")
    dist_timeout: float = setting(600.0, "seconds a process waits for the others before the run ends with an "
                                         "error (a rank that died)")

    def validate(self) -> None:
        checks = [
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be at least 1"),
            (self.max_steps >= 1, "max_steps must be at least 1"),
            (self.dist_timeout > 0, "dist_timeout must be positive (seconds)"),
            (self.lr > 0, "lr must be positive"),
            (self.warmup_steps >= 0, "warmup_steps must be 0 or more"),
            (self.eval_interval >= 1, "eval_interval must be at least 1"),
            (self.checkpoint_interval >= 1, "checkpoint_interval must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.max_bad_steps >= 1, "max_bad_steps must be at least 1"),
            (self.dropout is None or 0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.min_lr is None or 0 <= self.min_lr <= self.lr, "min_lr must be in [0, lr]"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be 0 or more"),
            (self.grad_clip >= 0, "grad_clip must be 0 (off) or more"),
            (self.eval_windows >= 1, "eval_windows must be at least 1"),
            (self.sample_tokens >= 1, "sample_tokens must be at least 1"),
            (self.threads >= 0, "threads must be 0 (torch's default) or more"),
            (0 < self.mlm_probability < 1, "mlm_probability must be in (0, 1)"),
            (0 < self.noise_density < 1 and self.mean_span_length >= 1,
             "noise_density must be in (0, 1) and mean_span_length at least 1"),
            (0 < self.plm_probability < 1 and self.max_span_length >= 1,
             "plm_probability must be in (0, 1) and max_span_length at least 1"),
            (0 <= self.mask_replace_prob <= 1 and 0 <= self.random_replace_prob <= 1
             and self.mask_replace_prob + self.random_replace_prob <= 1,
             "mask_replace_prob and random_replace_prob must be in [0, 1] and add up to at most 1"),
            (all(v is None or v >= 1 for v in (self.block_size, self.n_layer, self.n_head, self.n_embd, self.n_kv_head)),
             "block_size, n_layer, n_head, n_embd and n_kv_head must be at least 1"),
        ]
        # NaN passes every comparison's negation, and no setting means anything at infinity: refuse both by name.
        checks += [(not (isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))),
                    f"{f.name} must be a finite number, not {getattr(self, f.name)}") for f in fields(self)]
        # Whole numbers reach torch and NumPy as 64-bit integers (a larger one was an OverflowError deep inside), and
        # the model's shape is allocated (a huge one hung building layers, or overflowed a tensor's size).
        checks += [(not (isinstance(getattr(self, f.name), int) and abs(getattr(self, f.name)) >= 2**63),
                    f"{f.name} {getattr(self, f.name)} is too large for a 64-bit integer") for f in fields(self)]
        checks += [
            (0 <= self.seed < 2**63, f"seed must be from 0 to {2**63 - 1}, not {self.seed}"),
            (self.micro_batch_size * self.grad_accum_steps <= MAX_SEQUENCES_A_STEP,
             f"micro_batch_size × grad_accum_steps must be at most {MAX_SEQUENCES_A_STEP:,} sequences a step, not "
             f"{self.micro_batch_size * self.grad_accum_steps:,}"),
            (self.threads <= MAX_THREADS, f"threads must be at most {MAX_THREADS:,} (this machine has {os.cpu_count()} "
                                          f"CPUs), not {self.threads}"),
            *((getattr(self, key) is None or getattr(self, key) <= most, f"{key} must be at most {most:,} ({what}), "
               f"not {getattr(self, key)}") for key, most, what in SHAPE_LIMITS),
        ]
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                checks.append((False, f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}"))
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")
        # a setting of another objective, changed from its default, would be silently ignored: refuse it
        for f in fields(self):
            objectives = OBJECTIVE_ONLY.get(f.name)
            if objectives and self.objective not in objectives and getattr(self, f.name) != f.default:
                raise LmforgeError(f"bad config: {f.name} applies to --objective {' or '.join(objectives)} only, not "
                                   f"{self.objective}; leave it out")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.IGNORED}

    @classmethod
    def from_saved(cls, saved: dict) -> dict:
        """A config saved by a run (perhaps by an older lmforge) as this version's keys: the keys this
        command ignores, which older versions saved too, are dropped."""
        return {k: v for k, v in saved.items() if k not in cls.IGNORED}


_SHAPE_FROM_MODEL = "the model's shape comes from --model"


@dataclass
class FinetuneConfig(TrainConfig):
    """`lmforge finetune`: the pretraining keys (same loop) plus what adapting a model needs."""

    IGNORED: ClassVar[dict[str, str]] = {
        "data": "the examples come from --train (and --val)",
        "block_size": "the context is the model's; --max-length sets tokens per example",
        "n_layer": _SHAPE_FROM_MODEL, "n_head": _SHAPE_FROM_MODEL, "n_embd": _SHAPE_FROM_MODEL,
        "n_kv_head": _SHAPE_FROM_MODEL,
        "eval_windows": "the validation examples are evaluated whole",
        "sample_prompt": "fine-tuning prints no samples; try the result with `lmforge chat` or `generate`",
        "sample_tokens": "fine-tuning prints no samples",
        **{key: "pretraining objectives are chosen in `lmforge pretrain`" for key in
           ("objective", "mlm_probability", "mask_replace_prob", "random_replace_prob", "whole_word_mask",
            "plm_probability", "max_span_length", "noise_density", "mean_span_length")},
    }

    out: str = setting("runs/finetune", "the run folder: config, metrics, checkpoints, the final model or adapter")
    model: str = setting("", "the model folder (or run folder) to adapt (required)")
    train: str = setting("", "JSONL/CSV/Parquet examples (required); the task comes from their fields")
    val: str = setting("", "held-out examples; empty: val_fraction of train, split by seed")
    val_fraction: float = setting(0.1, "share of train held out when --val is not given, in [0, 1)")
    task: str = setting("auto", "auto (from the examples' fields), chat, instruction, classification, tagging, qa, "
                                "seq2seq or retrieval", choices=("auto", "chat", "instruction", "classification",
                                                                 "tagging", "qa", "seq2seq", "retrieval"))
    method: str = setting("full", "full (every weight), linear-probe (the head only) or lora (low-rank adapters)",
                      choices=("full", "linear-probe", "lora"))
    freeze_layers: int = setting(0, "keep the embeddings and the first N blocks frozen")
    train_layers: int = setting(0, "train only the last N blocks (and the head); 0: all")
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: float = setting(16.0, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch's input")
    lora_targets: str = setting("q,v", "comma-separated: q, k, v, o (attention) and fc, proj (MLP), or PEFT's "
                                       "names (q_proj,v_proj; GPT-2's c_attn; all-linear)")
    max_length: int = setting(0, "tokens per example (longer ones are truncated); 0: the model's context")
    packing: bool = setting(False, "SFT: pack examples into full rows, attention kept inside each example")
    labels: str = setting("", "classification: label names in index order (default: sorted labels of the data)")
    epochs: float = setting(0.0, "when > 0, max_steps = this many passes over the training examples")
    skip_bad_lines: bool = setting(False, "count and skip malformed examples instead of stopping at the first")
    pooling: str = setting("auto", "encoder classification: auto (the model's), first or mean",
                       choices=("auto", "first", "mean"))
    dropout: float | None = setting(None, "dropout probability in [0, 1) while fine-tuning (default: the model's own)")
    # fine-tuning defaults differ from pretraining's
    lr: float = setting(5e-5, "peak learning rate of AdamW")
    warmup_steps: int = setting(10, "steps of linear warmup from 0 to lr")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_steps: int = setting(200, "optimizer steps in the whole run (with --resume: the step to stop at)")
    eval_interval: int = setting(50, "evaluate on the validation examples every N steps")
    checkpoint_interval: int = setting(100, "save a checkpoint every N steps (and at the end)")
    micro_batch_size: int = setting(8, "examples per process per forward pass")

    @classmethod
    def from_saved(cls, saved: dict) -> dict:
        saved = super().from_saved(saved)
        if "max_bad_steps" not in saved:  # saved before finetune honoured dropout: its 0.0 meant "the model's own"
            saved.pop("dropout", None)
        return saved

    def validate(self) -> None:
        super().validate()
        checks = [
            (bool(self.model), "model (the folder to fine-tune) is required"),
            (bool(self.train), "train (a JSONL, CSV or Parquet file of examples) is required"),
            (1 <= self.lora_r <= 1 << 16, f"lora_r must be from 1 to {1 << 16:,} (a rank above the model's width "
                                          f"adds nothing), not {self.lora_r}"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.lora_alpha > 0, "lora_alpha must be positive (the update is scaled by alpha / r: 0 trains nothing)"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (0 <= self.epochs < math.inf, "epochs must be 0 (use max_steps) or a positive number of passes"),
            (self.freeze_layers >= 0 and self.train_layers >= 0, "freeze_layers and train_layers must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")


_PAIRS = "preference pairs are not chat, instruction, classification or QA examples"


@dataclass
class RewardConfig(FinetuneConfig):
    """`lmforge reward`: a reward model from preference pairs (Bradley-Terry), through the same loop."""

    IGNORED: ClassVar[dict[str, str]] = {
        **FinetuneConfig.IGNORED,
        "task": _PAIRS, "labels": "a reward model has one output, the reward",
        "packing": "each pair is scored whole",
    }

    out: str = setting("runs/reward", "the run folder: config, metrics, checkpoints, the reward model")
    train: str = setting("", "JSONL/CSV/Parquet preference pairs {prompt, chosen, rejected[, margin]} (required)")
    val: str = setting("", "held-out pairs; empty: val_fraction of train, split by seed")
    method: str = setting("full", "full (every weight), linear-probe (the reward head only, trunk frozen) or lora",
                      choices=("full", "linear-probe", "lora"))
    center_rewards: float = setting(0.0, "weight c of the centring term c * mean((r_chosen + r_rejected)^2); 0: off")
    truncation: str = setting("left", "pairs over max_length: left (cut the prompt's start) or drop",
                          choices=("left", "drop"))
    dropout: float | None = setting(0.0, "dropout while training (TRL turns it off too); none: the model's own")
    lr: float = setting(1e-4, "peak learning rate of AdamW (TRL's default for reward models)")

    def validate(self) -> None:
        super().validate()
        if self.center_rewards < 0:
            raise LmforgeError("bad config: center_rewards must be 0 or more")


@dataclass
class DPOConfig(FinetuneConfig):
    """`lmforge dpo`: direct preference optimisation of a causal LM against a frozen reference."""

    IGNORED: ClassVar[dict[str, str]] = {
        **FinetuneConfig.IGNORED,
        "task": _PAIRS, "labels": "DPO trains a language model, not a classifier",
        "packing": "each pair is scored whole", "pooling": "DPO trains a language model, not a classifier",
    }

    out: str = setting("runs/dpo", "the run folder: config, metrics, checkpoints, the policy model or adapter")
    train: str = setting("", "JSONL/CSV/Parquet preference pairs {prompt, chosen, rejected} (required)")
    val: str = setting("", "held-out pairs; empty: val_fraction of train, split by seed")
    method: str = setting("full", "full (every weight) or lora (low-rank adapters)", choices=("full", "lora"))
    loss: str = setting("sigmoid", "sigmoid (DPO), ipo (IPO) or cdpo (conservative DPO, label_smoothing)",
                    choices=("sigmoid", "ipo", "cdpo"))
    beta: float = setting(0.1, "DPO's beta (IPO's tau): how far the policy may move from the reference")
    label_smoothing: float = setting(0.0, "cdpo: the probability epsilon that a pair's preference is flipped")
    reference: str = setting("auto", "the frozen reference: auto (adapter with lora, else copy), copy, adapter "
                             "(the policy with its LoRA switched off) or precomputed (log-probs cached once)",
                         choices=("auto", "copy", "adapter", "precomputed"))
    reference_model: str = setting("", "a model folder to be the frozen reference (TRL's ref_model; with the "
                                   "policy's tokenizer): default, the model the run starts from")
    truncation: str = setting("left", "pairs over max_length: left (cut the prompt's start) or drop",
                          choices=("left", "drop"))
    dropout: float | None = setting(0.0, "dropout while training (TRL turns it off too); none: the model's own")
    lr: float = setting(1e-6, "peak learning rate of AdamW (TRL's default, for large pretrained models; small "
                        "models such as the demo's need 1e-5 to 1e-4)")

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.beta > 0, "beta must be positive"),
            (0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)"),
            (self.label_smoothing == 0 or self.loss == "cdpo", "label_smoothing applies to --loss cdpo only"),
            (self.reference != "adapter" or self.method == "lora", "reference adapter needs --method lora"),
            (not self.reference_model or self.reference != "adapter",
             "--reference-model is a model of its own; --reference adapter is the policy with its adapters off"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")


@dataclass
class RLConfig(FinetuneConfig):
    """`lmforge rl`: reinforcement learning from a reward (PPO, GRPO, RLOO, REINFORCE), through the same loop.

    One rollout (per process) is ``minibatches x grad_accum_steps x micro_batch_size`` completions,
    ``num_generations`` per prompt; it serves ``ppo_epochs x minibatches`` optimizer steps."""

    IGNORED: ClassVar[dict[str, str]] = {
        **FinetuneConfig.IGNORED,
        "task": "the prompts file holds prompts", "labels": "RL trains a language model",
        "packing": "completions are scored whole", "pooling": "RL trains a language model",
        "max_length": "prompts keep their last (context - max_new_tokens) tokens",
        "val_fraction": "held-out prompts come from --val",
        "epochs": "RL runs max_steps optimizer steps (each rollout serves ppo_epochs x minibatches of them)",
    }

    out: str = setting("runs/rl", "the run folder: config, metrics, samples, checkpoints, the policy")
    train: str = setting("", 'JSONL/CSV/Parquet prompts {"prompt": text or messages, other fields...} (required)')
    val: str = setting("", "held-out prompts, scored with greedy completions at each evaluation")
    val_fraction: float = setting(0.0, "(not used: held-out prompts come from --val)")
    method: str = setting("full", "full (every weight) or lora (adapters; the reference is the base)",
                      choices=("full", "lora"))
    algo: str = setting("grpo", "ppo, grpo, rloo or reinforce", choices=("ppo", "grpo", "rloo", "reinforce"))
    reward: str = setting("", "exact, arithmetic, regex:PATTERN, model:DIR or MODULE:FUNCTION (runs your code, "
                          "called as FUNCTION(prompt=..., completion=..., **row_fields) -> float for each "
                          "completion); several joined with ;")
    reward_weights: str = setting("", "weights of the rewards, joined with ; (default: 1 each)")
    reward_errors: str = setting("stop", "a reward that raises or is NaN/inf: stop, or penalty (scored error_penalty)",
                             choices=("stop", "penalty"))
    error_penalty: float = setting(-1.0, "the reward of a completion whose reward failed (reward_errors penalty)")
    missing_eos_penalty: float = setting(0.0, "subtracted from the reward of a completion cut at max_new_tokens")
    num_generations: int = setting(4, "completions per prompt (G): GRPO's group, RLOO's leave-one-out set")
    max_new_tokens: int = setting(64, "most tokens in a completion")
    temperature: float = setting(1.0, "sampling temperature of the rollouts")
    top_k: int = setting(0, "rollouts sample from the k most likely tokens (0: all)")
    top_p: float = setting(1.0, "rollouts' nucleus sampling")
    stop: str = setting("", "stop strings joined with ; (\\; is one; \\n a newline, \\t a tab); the end-of-turn / "
                            "end-of-text token always stops")
    minibatches: int = setting(1, "optimizer steps per pass over a rollout")
    ppo_epochs: int = setting(0, "passes over each rollout (0: 4 for ppo, 1 otherwise)")
    kl_coef: float = setting(-1.0, "beta of the KL penalty to the reference (-1: 0.05 for ppo and rloo, 0 for grpo "
                             "and reinforce)")
    kl_estimator: str = setting("k1", "ppo/rloo/reinforce: the per-token KL in the reward, k1 (log ratio: its policy "
                                "gradient is the KL's) or k3 (a lower-variance estimate of the KL's value, but as a "
                                "reward its gradient nearly vanishes near the reference: prefer k1). The logged kl "
                                "is this estimate: k1's can be below 0 on a rollout",
                            choices=("k1", "k3"))
    target_kl: float = setting(0.0, "adaptive KL controller (Ziegler et al.): its target KL per completion; 0: off")
    kl_horizon: int = setting(10000, "adaptive KL controller's horizon, in completions")
    clip_eps: float = setting(0.2, "PPO/GRPO clip range: ratio kept in [1 - eps, 1 + eps_high]")
    clip_eps_high: float = setting(0.0, "the upper clip range (clip-higher, DAPO); 0: clip_eps")
    loss_norm: str = setting("grpo", "GRPO's loss normalisation: grpo (mean per completion, then over completions), "
                             "bnpo / dapo (mean over the step's tokens), dr_grpo (sum / max_new_tokens)",
                         choices=("grpo", "bnpo", "dapo", "dr_grpo"))
    scale_rewards: str = setting("group", "GRPO: divide advantages by the std of the group, of the batch, or none",
                             choices=("group", "batch", "none"))
    gamma: float = setting(1.0, "PPO: discount")
    lam: float = setting(0.95, "PPO: GAE lambda")
    vf_coef: float = setting(0.1, "PPO: weight of the value loss")
    value_clip: float = setting(0.2, "PPO: values kept within this of the rollout's values")
    whiten_advantages: bool = setting(True, "PPO: advantages to mean 0, std 1 over the rollout")
    critic: str = setting("auto", "PPO's critic: reward (a copy of the reward model), policy (a copy of the policy "
                          "with a value head), shared (a value head on the policy's trunk); auto: reward if one "
                          "reward is a model, else policy", choices=("auto", "reward", "policy", "shared"))
    baseline_decay: float = setting(0.9, "REINFORCE: the moving-average baseline's decay")
    sample_interval: int = setting(10, "write some prompts, completions and rewards to samples.jsonl every N steps")
    dropout: float | None = setting(0.0, "dropout while training (off, so the rollout's log-probs are the policy's)")
    lr: float = setting(1e-5, "peak learning rate of AdamW")
    micro_batch_size: int = setting(8, "completions per process per forward pass")
    eval_interval: int = setting(20, "score greedy completions of the --val prompts every N steps")

    def validate(self) -> None:
        super().validate()
        rows = self.micro_batch_size * self.grad_accum_steps * self.minibatches
        checks = [
            (bool(self.reward), "reward is required: exact, arithmetic, regex:PATTERN, model:DIR or MODULE:FUNCTION"),
            (self.num_generations >= 1, "num_generations must be at least 1"),
            (self.algo not in ("grpo", "rloo") or self.num_generations >= 2,
             f"{self.algo} compares completions of a prompt: num_generations must be at least 2"),
            (self.num_generations < 1 or rows % self.num_generations == 0,  # (below 1: said by the check above)
             f"a rollout of {rows} completions (micro_batch_size x grad_accum_steps x minibatches) must hold whole "
             f"groups of num_generations {self.num_generations}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature > 0, "temperature must be positive (rollouts sample)"),
            (0 < self.top_p <= 1 and self.top_k >= 0, "top_p must be in (0, 1] and top_k 0 or more"),
            (self.minibatches >= 1 and self.ppo_epochs >= 0, "minibatches must be at least 1, ppo_epochs 0 or more"),
            (self.clip_eps > 0 and self.clip_eps_high >= 0, "clip_eps must be positive"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
            (0 <= self.baseline_decay < 1, "baseline_decay must be in [0, 1)"),
            (self.sample_interval >= 1, "sample_interval must be at least 1"),
            (self.kl_coef >= 0 or self.kl_coef == -1, "kl_coef must be 0 or more"),
            (self.target_kl >= 0 and self.kl_horizon >= 1, "target_kl must be 0 or more, kl_horizon at least 1"),
            (self.target_kl == 0 or self.beta > 0,
             f"target_kl {self.target_kl} adapts the KL coefficient by multiplying it, so it cannot move a coefficient "
             f"of 0 ({f'--algo {self.algo}' + chr(39) + 's default' if self.kl_coef < 0 else '--kl-coef 0'}); give "
             f"--kl-coef > 0 as its starting value (PPO's and RLOO's default is 0.05)"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")
        # a setting of another algorithm, changed from its default, would be silently ignored: refuse it
        for f in fields(self):
            algos = self.ALGORITHM_ONLY.get(f.name)
            if algos and self.algo not in algos and getattr(self, f.name) != f.default:
                raise LmforgeError(f"bad config: {f.name} applies to --algo {' or '.join(algos)} only, not "
                                   f"{self.algo}; leave it out")

    # settings that only one algorithm reads
    ALGORITHM_ONLY = {"gamma": ("ppo",), "lam": ("ppo",), "vf_coef": ("ppo",), "value_clip": ("ppo",),
                      "whiten_advantages": ("ppo",), "critic": ("ppo",), "loss_norm": ("grpo",),
                      "scale_rewards": ("grpo",), "baseline_decay": ("reinforce",),
                      # (GRPO's loss penalises k3 of each token, as TRL's; its logged kl is k3's per-token mean)
                      "kl_estimator": ("ppo", "rloo", "reinforce")}

    @property
    def epochs_per_rollout(self) -> int:
        return self.ppo_epochs or (4 if self.algo == "ppo" else 1)

    @property
    def beta(self) -> float:
        return self.kl_coef if self.kl_coef >= 0 else (0.05 if self.algo in ("ppo", "rloo") else 0.0)


# settings that only some pretraining objectives read
OBJECTIVE_ONLY = {**{key: ("mlm", "mlm+nsp") for key in ("mlm_probability", "mask_replace_prob", "random_replace_prob",
                                                        "whole_word_mask")},
                  "plm_probability": ("plm",), "max_span_length": ("plm",), "noise_density": ("span",),
                  "mean_span_length": ("span",)}


_FOLDERS_SAID: set[str] = set()


def means_preset(model: str, out: str | os.PathLike | None = None) -> bool:
    """Whether a config's ``model`` names a preset. A model folder of the same name in the working directory (a
    clone of Hugging Face's ``gpt2``, a run folder named ``tiny``) is taken instead, as transformers'
    ``from_pretrained`` takes a local folder before a Hub name, and that is said once; the run's own ``out`` folder
    is never the model it starts from (``--overwrite`` empties it)."""
    from lmforge.model.config import PRESETS

    if model not in PRESETS:
        return False
    folder = Path(model)
    if not folder.is_dir() or (out is not None and folder.resolve() == Path(out).resolve()):
        return True
    from lmforge.train.checkpointing import latest_checkpoint

    is_model = (folder / "config.json").exists() or (folder / "adapter_config.json").exists()
    if not (is_model or latest_checkpoint(folder)):
        return True  # (a folder of something else: the preset is meant)
    if model not in _FOLDERS_SAID:
        from lmforge.utils import warn

        _FOLDERS_SAID.add(model)
        warn(f"model {model!r}: using the model folder {Path.cwd() / model} here, not the preset {model!r} (for the "
             f"preset, run from another folder or rename that one)")
    return False


def config_keys(cls=TrainConfig) -> list:
    """The dataclass fields of the keys ``cls``'s command takes (ignored ones left out)."""
    return [f for f in fields(cls) if f.name not in cls.IGNORED]


def _types(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, cls=TrainConfig):
    """Turn a YAML or command-line value into the field's type, with a clear error."""
    kind = _types(cls)[key]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = type(None) in typing.get_args(kind)
    base = args[0] if args else kind
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise LmforgeError(f"config key {key!r} needs a value")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer() or isinstance(value, bool):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # ("1e6": a whole number written short; "1e-1" is not)
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return int(value)
        if base is float:
            return float(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return (";" if key in ("reward", "reward_weights") else ",").join(map(str, value))  # (a list's items)
        if not isinstance(value, (str, os.PathLike, int, float)) or isinstance(value, bool):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        shown = repr(value) if isinstance(value, (str, int, float, bool, list, tuple)) else f"a {type(value).__name__}"
        raise LmforgeError(f"config key {key!r} expects {'text (a name or a path)' if base is str else base.__name__}, "
                           f"got {shown}" + (" (pass the model's folder)" if key == "model" else "")) from None


def _check_key(key: str, cls=TrainConfig) -> str:
    key = key.replace("-", "_")
    if key in cls.IGNORED:
        raise LmforgeError(f"--{key.replace('_', '-')} does nothing here: {cls.IGNORED[key]}")
    valid = [f.name for f in config_keys(cls)]
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LmforgeError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")
    return key


def parse_overrides(tokens: list[str], cls=TrainConfig) -> dict:
    """``["--lr", "3e-4", "--compile", "--max-steps=100"]`` → ``{"lr": "3e-4", "compile": "true", ...}``."""
    out: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise LmforgeError(f"unexpected argument {token!r}; config overrides look like --key value")
        key, eq, value = token[2:].partition("=")
        key = _check_key(key, cls)
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            elif _types(cls)[key] is bool:
                value = "true"
            else:
                raise LmforgeError(f"--{key.replace('_', '-')} needs a value")
        out[key] = value
        i += 1
    return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key])
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def read_config_file(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file of ``key: value`` lines (``what`` names it in errors); a key written twice is refused."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise LmforgeError(f"{what} {path} sets {e.key!r} twice (lines {e.first} and {e.line}); keep one") from None
    except IsADirectoryError:
        raise LmforgeError(f"{what} {path} is a folder; give the YAML file") from None
    except FileNotFoundError:
        raise LmforgeError(f"{what} {path} not found") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LmforgeError(f"{what} {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{what} {path} must be a mapping of key: value lines")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, base: dict | None = None,
                cls=TrainConfig) -> TrainConfig:
    """Defaults ← ``base`` (a saved run config) ← YAML file ← ``overrides``; unknown keys are errors."""
    values: dict = {}
    base = cls.from_saved(base or {})
    from_file = read_config_file(path) if path else {}
    ignored = [k for k in from_file if str(k).replace("-", "_") in cls.IGNORED]
    if ignored:  # say so, but take the file: a run's saved config.yaml holds them (as older versions saved them)
        from lmforge.utils import warn

        warn(f"{path}: ignoring {', '.join(map(str, ignored))}, which this command does not use")
        from_file = {k: v for k, v in from_file.items() if k not in ignored}
    for layer in (base, from_file, overrides or {}):
        for key, value in layer.items():
            values[_check_key(str(key), cls)] = value
    config = cls(**{k: _coerce(k, v, cls) for k, v in values.items()})
    config.validate()
    # what this command was given (its file and its options, not a resumed run's saved config): where two settings
    # decide one thing (--epochs and --max-steps), the one given wins
    config.given = frozenset(_check_key(str(k), cls) for k in (*from_file, *(overrides or {})))
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    from lmforge.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
