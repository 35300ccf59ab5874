"""`TrainConfig`: everything a training run needs, from a YAML file and/or ``--key value`` overrides."""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError


@dataclass
class TrainConfig:
    # where things are
    data: str = "data"  # a folder written by `lmforge prepare`
    out: str = "runs/pretrain"  # the run folder: config, metrics, checkpoints, report
    # model: a preset name, or a model folder to continue training from; shape overrides below
    model: str = "tiny"
    block_size: int | None = None  # context length; default: the preset's
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    n_kv_head: int | None = None  # grouped-query attention (Llama-style presets)
    dropout: float = 0.0
    # batch: micro_batch_size sequences per process per forward, summed over grad_accum_steps and processes
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    # AdamW with linear warmup then cosine decay to min_lr (default lr / 10)
    lr: float = 1e-3
    min_lr: float | None = None
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    # evaluation, checkpoints, samples
    eval_interval: int = 100
    eval_windows: int = 64  # validation windows of block_size tokens, the same ones each time
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    sample_prompt: str = ""  # printed continuation at the start and the end (empty: none)
    sample_tokens: int = 64
    # hardware
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bf16 where it is faster), float32, bfloat16
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def validate(self) -> None:
        checks = [
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be at least 1"),
            (self.max_steps >= 1, "max_steps must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (self.warmup_steps >= 0, "warmup_steps must be 0 or more"),
            (self.eval_interval >= 1, "eval_interval must be at least 1"),
            (self.checkpoint_interval >= 1, "checkpoint_interval must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneConfig(TrainConfig):
    """`lmforge finetune`: the pretraining keys (same loop) plus what adapting a model needs."""

    out: str = "runs/finetune"
    model: str = ""  # the model folder to adapt (required)
    train: str = ""  # JSONL/CSV/Parquet examples (required)
    val: str = ""  # held-out examples; empty: val_fraction of train, split by seed
    val_fraction: float = 0.1
    task: str = "auto"  # auto (from the fields), chat, instruction, classification, qa
    method: str = "full"  # full, linear-probe, lora
    freeze_layers: int = 0  # keep the embeddings and the first N blocks frozen
    train_layers: int = 0  # train only the last N blocks (and the head); 0: all
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"  # q, k, v, o (attention) and fc, proj (MLP), comma-separated
    max_length: int = 0  # tokens per example; 0: the model's context
    packing: bool = False  # SFT: pack examples into full rows, attention kept inside each example
    labels: str = ""  # classification: label names in index order (default: sorted labels of the data)
    epochs: float = 0.0  # when > 0, max_steps = epochs over the training examples
    skip_bad_lines: bool = False
    pooling: str = "auto"  # encoder classification: auto (the model's), first, mean
    # fine-tuning defaults differ from pretraining's
    lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_steps: int = 200
    eval_interval: int = 50
    checkpoint_interval: int = 100
    micro_batch_size: int = 8

    def validate(self) -> None:
        super().validate()
        checks = [
            (bool(self.model), "model (the folder to fine-tune) is required"),
            (bool(self.train), "train (a JSONL, CSV or Parquet file of examples) is required"),
            (self.task in ("auto", "chat", "instruction", "classification", "qa"), "task must be auto, chat, instruction, classification or qa"),
            (self.method in ("full", "linear-probe", "lora"), "method must be full, linear-probe or lora"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (self.pooling in ("auto", "first", "mean"), "pooling must be auto, first or mean"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.freeze_layers >= 0 and self.train_layers >= 0, "freeze_layers and train_layers must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad config: {message}")


def _types(cls) -> dict:
    return typing.get_type_hints(cls)


_TYPES = _types(TrainConfig)
VALID_KEYS = [f.name for f in fields(TrainConfig)]


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
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise LmforgeError(f"config key {key!r} expects {base.__name__}, got {value!r}") from None


def _check_key(key: str, cls=TrainConfig) -> str:
    key = key.replace("-", "_")
    valid = [f.name for f in fields(cls)]
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


def read_config_file(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file of ``key: value`` lines (``what`` names it in errors)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{what} {path} not found") from None
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
    for layer in (base or {}, read_config_file(path) if path else {}, overrides or {}):
        for key, value in layer.items():
            values[_check_key(str(key), cls)] = value
    config = cls(**{k: _coerce(k, v, cls) for k, v in values.items()})
    config.validate()
    return config


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    from lmforge.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
