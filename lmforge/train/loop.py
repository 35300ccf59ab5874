"""`lmforge pretrain`: the one training loop.

    batch → forward → loss / grad_accum_steps → backward → clip → AdamW step → log
    every eval_interval: validation loss, perplexity, bits per byte
    every checkpoint_interval: an atomic checkpoint with everything needed to resume exactly

It runs unchanged on one CPU, one GPU, or several processes under ``torchrun`` (DDP: gloo on CPU,
NCCL on GPU). Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.data.loader import TokenSplit, TrainBatches, eval_windows, window_batch
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_decoder
from lmforge.model.config import PRESETS, Config
from lmforge.model.gpt import GPT, build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import latest_checkpoint, load_trainer_state, save_checkpoint
from lmforge.train.config import TrainConfig, load_config, read_config_file, save_config
from lmforge.utils import atomic_write_json, atomic_write_text, bf16_is_fast, hardware_description, human_count, pick_device


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group when started by ``torchrun`` with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_name != "cpu"
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update after ``step`` completed updates: linear warmup, cosine decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.final_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.final_lr)


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel runs on CPU and CUDA in torch >= 2.4: one kernel per step instead of many.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=fused)


@torch.no_grad()
def evaluate(model: GPT, split: TokenSplit, windows, batch_size: int, device, autocast, dist_: Distributed) -> float:
    """Mean cross-entropy over the fixed validation windows (shared out across ranks)."""
    was_training = model.training
    model.eval()
    mine = windows[dist_.rank :: dist_.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(mine), batch_size):
        x, y = window_batch(split, mine[i : i + batch_size], model.config.block_size)
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=device)
    if dist_.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


class MetricsLog:
    """Rank 0's JSON-lines log (one object per line) and, when installed, TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Lines after the checkpoint belong to steps that will run again.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _resolve_config(config, resume: bool, overrides: dict) -> TrainConfig:
    if isinstance(config, TrainConfig):
        path, values = None, config.to_dict()
    elif isinstance(config, dict):
        path, values = None, dict(config)
    else:
        path, values = config, {}
    base = {}
    if resume:
        # `--resume --out RUN` alone is enough: the run's saved config is the starting point.
        out = overrides.get("out") or values.get("out") or (read_config_file(path).get("out") if path else None)
        saved = Path(out or TrainConfig.out) / "config.yaml"
        if saved.exists():
            base = read_config_file(saved)
    return load_config(path, {**values, **overrides}, base=base)


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the run folder; returns the checkpoint to resume from (None to start fresh)."""
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise LmforgeError(f"nothing to resume: {out} has no checkpoints; run without --resume to start")
        return ckpt
    if out.exists() and any(out.iterdir()):
        is_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
        if not overwrite:
            hint = "pass --resume to continue it or --overwrite to start over" if is_run else "choose another --out"
            raise LmforgeError(f"run folder {out} is not empty; {hint}")
        if not is_run:
            raise LmforgeError(f"--overwrite refused: {out} is not an lmforge run folder; choose another --out")
        shutil.rmtree(out)
    return None


def _build_model(config: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> GPT:
    shape = {k: getattr(config, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head")}
    if config.model in PRESETS:
        model_config = Config.from_preset(
            config.model,
            vocab_size=tokenizer.vocab_size,
            dropout=config.dropout,
            bos_token_id=tokenizer.eos_id,
            eos_token_id=tokenizer.eos_id,
            **shape,
        )
        return build_model(model_config, device)
    if not Path(config.model).exists():
        raise LmforgeError(f"model {config.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    given = [k for k, v in shape.items() if v is not None]
    if given:
        raise LmforgeError(f"{', '.join(given)} cannot change when continuing from the model folder {config.model}")
    model = load_decoder(config.model, device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise LmforgeError(
            f"the data's tokenizer has {tokenizer.vocab_size} tokens but {config.model} has {model.config.vocab_size}; "
            f"prepare the data with that model's tokenizer"
        )
    return model.train()


def pretrain(config: TrainConfig | dict | str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool = True, **overrides) -> dict:
    """Train a model; ``config`` is a ``TrainConfig``, a dict or a YAML path, ``overrides`` win over it.

    Returns a summary: the run folder, steps, tokens, final validation loss.
    """
    from tqdm.auto import tqdm

    config = _resolve_config(config, resume, overrides)
    dist_ = setup_distributed(config.device)
    try:
        return _train(config, dist_, resume, overwrite, progress and dist_.is_main, tqdm)
    finally:
        if dist_.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, dist_: Distributed, resume: bool, overwrite: bool, progress: bool, tqdm) -> dict:
    out = Path(config.out)
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    use_bf16 = config.dtype == "bfloat16" or (config.dtype == "auto" and bf16_is_fast(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    train_split = TokenSplit(config.data, "train")
    val_split = TokenSplit(config.data, "val") if train_split.meta["splits"]["val"]["tokens"] else None
    tokenizer = Tokenizer.load(config.data)
    if tokenizer.sha256 != train_split.meta["tokenizer"]["sha256"]:
        raise LmforgeError(f"{config.data}/tokenizer.json does not match the one the data was made with; run prepare again")

    checkpoint = _prepare_run_dir(out, resume, overwrite) if dist_.is_main else (latest_checkpoint(out) if resume else None)
    dist_.barrier()

    torch.manual_seed(config.seed)
    if checkpoint is not None:
        model = load_decoder(checkpoint / "model", device).train()
    else:
        model = _build_model(config, tokenizer, device)
    block_size = model.config.block_size
    optimizer = make_optimizer(model, config, device)
    batches = TrainBatches(train_split, block_size, config.micro_batch_size, config.seed, dist_.rank,
                           dist_.world_size, config.grad_accum_steps)
    step, tokens_seen, elapsed = 0, 0, 0.0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]

    train_model: torch.nn.Module = model
    if config.compile:
        train_model = torch.compile(model)
    if dist_.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = config.micro_batch_size * config.grad_accum_steps * dist_.world_size * block_size
    windows = eval_windows(val_split, block_size, config.eval_windows) if val_split else []
    log = None
    if dist_.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        atomic_write_json(out / "run.json", {
            "model": model.config.to_dict(),
            "parameters": model.num_params(),
            "flops_per_token": model.config.flops_per_token(block_size),
            "tokens_per_step": tokens_per_step,
            "device": str(device),
            "dtype": "bfloat16 autocast" if use_bf16 else "float32",
            "world_size": dist_.world_size,
            "hardware": hardware_description(device),
            "data": {"train_tokens": train_split.tokens, "val_tokens": val_split.tokens if val_split else 0},
        })
        log = MetricsLog(out, step if checkpoint is not None else None, config.tensorboard)
        print(
            f"model: {human_count(model.num_params())} parameters, {human_count(model.config.flops_per_token(block_size))} "
            f"training FLOPs/token; {human_count(tokens_per_step)} tokens/step on {dist_.world_size}×{device} "
            f"({'bf16 autocast' if use_bf16 else 'fp32'}); train split {human_count(train_split.tokens)} tokens",
            flush=True,
        )

    def run_eval() -> dict | None:
        if val_split is None:
            return None
        loss = evaluate(model, val_split, windows, config.micro_batch_size, device, autocast, dist_)
        record = {
            "step": step,
            "tokens": tokens_seen,
            "val_loss": loss,
            "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bits_per_byte": loss / math.log(2) / val_split.bytes_per_token,
        }
        if log:
            log.write(record)
        return record

    def sample(bar) -> None:
        if not (config.sample_prompt and dist_.is_main):
            return
        from lmforge.infer.generate import SamplingParams, stream_generate

        params = SamplingParams(
            max_new_tokens=min(config.sample_tokens, block_size - 1), temperature=0.8, top_k=40, seed=0, truncate=True
        )
        model.eval()
        text = "".join(stream_generate(model, tokenizer, config.sample_prompt, params))
        model.train()
        bar.write(f"--- sample at step {step} ---\n{config.sample_prompt}{text}\n---")
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": config.sample_prompt, "text": text}) + "\n")

    bar = tqdm(total=config.max_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    last_eval = None
    if step == 0:
        last_eval = run_eval()
        if last_eval:
            bar.write(f"step 0: val loss {last_eval['val_loss']:.4f}")
        sample(bar)
    model.train()
    while step < config.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum_steps):
            x, y = batches.next_batch(device)
            last_micro = micro == config.grad_accum_steps - 1
            # Gradients are all-reduced across ranks only on the last micro-batch.
            sync = nullcontext() if last_micro or not dist_.enabled else train_model.no_sync()
            with sync:
                with autocast:
                    _, loss = train_model(x, y)
                # Each backward() adds to .grad, so scale to get the mean over micro-batches.
                (loss / config.grad_accum_steps).backward()
            loss_sum += loss.detach()
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        train_loss = dist_.all_mean(loss_sum / config.grad_accum_steps).item()
        dt = time.perf_counter() - t0
        elapsed += dt
        if log:
            log.write({
                "step": step, "tokens": tokens_seen, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_second": tokens_per_step / dt, "elapsed": elapsed,
            })
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
        bar.update()
        if step % config.eval_interval == 0 or step == config.max_steps:
            last_eval = run_eval()
            if last_eval:
                bar.write(
                    f"step {step}: train loss {train_loss:.4f}, val loss {last_eval['val_loss']:.4f}, "
                    f"ppl {last_eval['val_perplexity']:.2f}, {last_eval['val_bits_per_byte']:.3f} bits/byte"
                )
        if step % config.checkpoint_interval == 0 or step == config.max_steps:
            if dist_.is_main:
                state = {
                    "step": step,
                    "tokens": tokens_seen,
                    "elapsed": elapsed,
                    "optimizer": optimizer.state_dict(),
                    "loader": batches.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                }
                save_checkpoint(out, step, model, tokenizer, state, config.keep_checkpoints)
            dist_.barrier()
    bar.close()
    sample(bar)
    if log:
        log.close()
    return {
        "out": str(out),
        "steps": step,
        "tokens": tokens_seen,
        "elapsed": elapsed,
        "val_loss": last_eval["val_loss"] if last_eval else None,
        "checkpoint": str(latest_checkpoint(out)) if dist_.is_main else None,
    }
