"""`lmforge plan`: size, compute, time, cost and per-GPU memory of a pretraining run, before renting it.

Conventions (all printed with the plan):

* Training FLOPs = 6·N·D (N parameters, D tokens; forward + backward) plus attention scores and
  values, 12·L·s·(heads·head_dim) per token; time = FLOPs / (GPUs × peak bf16 FLOP/s × MFU).
* Chinchilla-optimal tokens: 20 per parameter (Hoffmann et al., 2022).
* Model states, mixed-precision AdamW as in the ZeRO paper (Rajbhandari et al., 2020): bf16 weights
  (2 bytes/param) + bf16 gradients (2) + fp32 master weights, Adam m and v (4 + 4 + 4) = 16 bytes per
  parameter. DDP keeps all of them on every GPU. FSDP / ZeRO-3 shards them over the GPUs and
  all-gathers the bf16 weights of one layer at a time (two in flight with prefetching).
* Activations per layer, bf16, per micro-batch of b sequences of s tokens, with flash attention (no
  s×s scores kept): norm input, q/k/v input, q/k/v, attention output (2·s·b·(4h + 2·kv) when the
  heads span the width); MLP norm
  input, fc input, its outputs and the product fed to the down projection (2·s·b·(2h + 2f) for GELU,
  2·s·b·(2h + 4f) for SwiGLU). Plus the logits in fp32 for the loss, 4·s·b·V. With activation
  checkpointing a layer keeps only its input (2·s·b·h) and one layer's activations are rebuilt at a time.
* GB are 10^9 bytes, as GPU memory is quoted. Fits means the total is at most the GPU's memory; leave
  a few GB for the CUDA context and fragmentation in practice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, Config
from lmforge.utils import human_count


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    memory_gb: float
    bandwidth_tbs: float
    price_per_hour: float  # assumed on-demand price per GPU-hour, USD (override with --price)


GPUS = {
    "h100": GPU("H100 SXM 80 GB", 989e12, 80, 3.35, 2.50),
    "h200": GPU("H200 SXM 141 GB", 989e12, 141, 4.8, 3.50),
    "a100-80gb": GPU("A100 SXM 80 GB", 312e12, 80, 2.04, 1.80),
    "a100-40gb": GPU("A100 SXM 40 GB", 312e12, 40, 1.56, 1.30),
}
# The largest figures a plan takes: each far past the largest runs there are.
MAX_GPUS = 10_000_000
MAX_MICRO_BATCH = 1_000_000
MAX_SEQ_LEN = 1 << 24
MAX_TOKENS = 1e16
MAX_PRICE = 10_000.0
MIN_MFU = 0.001
BYTES_PER_PARAM_STATES = 16  # bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + Adam v 4
GB = 1e9


@dataclass
class MemoryRow:
    strategy: str
    states: float  # bytes: weights, gradients, optimizer (and gathered layers for FSDP)
    activations: float  # bytes
    capacity: float

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class Plan:
    name: str
    config: Config
    params: int
    tokens: float
    chinchilla_tokens: float
    flops_6nd: float
    flops_attention: float
    gpu: GPU
    gpus: int
    mfu: float
    seq_len: int
    micro_batch: int
    price: float
    memory: list[MemoryRow]
    price_assumed: bool = True  # the GPU table's price, not one given with --price

    @property
    def flops(self) -> float:
        return self.flops_6nd + self.flops_attention

    @property
    def seconds(self) -> float:
        return self.flops / (self.gpus * self.gpu.bf16_flops * self.mfu)

    @property
    def cost(self) -> float:
        return self.seconds / 3600 * self.gpus * self.price


def activation_bytes_per_layer(c: Config, seq_len: int, micro_batch: int) -> float:
    s, b, h, f = seq_len, micro_batch, c.n_embd, c.hidden
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size
    attention = 2 * s * b * (2 * h + 2 * q + 2 * kv)  # norm input, q/k/v input, q, k, v, attention output
    mlp = 2 * s * b * (2 * h + (4 * f if c.mlp == "swiglu" else 2 * f))
    return attention + mlp


def memory_rows(c: Config, gpu: GPU, gpus: int, seq_len: int, micro_batch: int) -> list[MemoryRow]:
    n = c.num_params()
    states = BYTES_PER_PARAM_STATES * n
    per_layer = activation_bytes_per_layer(c, seq_len, micro_batch)
    logits = 4 * seq_len * micro_batch * c.vocab_size
    full = c.n_layer * per_layer + logits
    checkpointed = c.n_layer * 2 * seq_len * micro_batch * c.n_embd + per_layer + logits
    layer_weights = 2 * (n - c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)) / c.n_layer
    sharded = states / gpus + 2 * layer_weights  # two bf16 layers gathered at once (prefetch)
    cap = gpu.memory_gb * GB
    return [
        MemoryRow("DDP", states, full, cap),
        MemoryRow("DDP + activation checkpointing", states, checkpointed, cap),
        MemoryRow(f"FSDP / ZeRO-3 over {gpus} GPUs", sharded, full, cap),
        MemoryRow(f"FSDP / ZeRO-3 over {gpus} GPUs + act. ckpt", sharded, checkpointed, cap),
    ]


def resolve_config(model: str) -> tuple[str, Config]:
    from lmforge.train.config import means_preset

    if means_preset(model):
        return model, Config.from_preset(model)
    path = Path(model)
    if path.exists():
        from lmforge.model.checkpoint import resolve_model_dir
        from lmforge.model.hf import config_from_hf
        from lmforge.utils import read_json

        if path.is_dir():
            folder = resolve_model_dir(path)  # a run folder: its latest checkpoint's model
            if not (folder / "config.json").exists():
                raise LmforgeError(f"{folder} is a LoRA adapter; plan its base model (named in adapter_config.json)")
            return path.name, config_from_hf(read_json(folder / "config.json", "model config"), str(folder))
        if path.suffix.lower() != ".json":
            raise LmforgeError(f"--model {model} is a file; give a preset, a model folder or its config.json")
        return path.name, config_from_hf(read_json(path, "model config"), str(path))
    raise LmforgeError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")


def plan(model: str | os.PathLike, gpus: int = 8, gpu: str = "h100", tokens: float | None = None, mfu: float = 0.4,
         seq_len: int | None = None, micro_batch: int = 1, price: float | None = None) -> Plan:
    """Plan pretraining ``model`` (a preset or a model folder) on ``gpus`` GPUs of kind ``gpu``."""
    if gpu.lower() not in GPUS:
        raise LmforgeError(f"--gpu {gpu!r} is not in the table; choose one of: {', '.join(GPUS)}")
    if gpus < 1 or micro_batch < 1:
        raise LmforgeError("--gpus and --micro-batch must be at least 1")
    if (tokens is not None and not 0 < tokens < math.inf) or (seq_len is not None and seq_len < 1) \
            or (price is not None and not 0 <= price < math.inf):
        raise LmforgeError("--tokens and --seq-len must be positive (and finite) and --price a finite 0 or more")
    if not 0 < mfu <= 1:
        raise LmforgeError(f"--mfu {mfu} must be in (0, 1]; 0.4 (40%) is typical for well-tuned dense training")
    # Beyond these no run is planned (they are far past the largest ones), and the figures would stop meaning anything.
    for flag, value, most, what in (
            ("--gpus", gpus, MAX_GPUS, "GPUs (the largest clusters have a few hundred thousand)"),
            ("--micro-batch", micro_batch, MAX_MICRO_BATCH, "sequences per GPU"),
            ("--seq-len", seq_len, MAX_SEQ_LEN, "tokens (the longest contexts are ~10M)"),
            ("--tokens", tokens, MAX_TOKENS, "tokens (the largest runs train on tens of trillions)"),
            ("--price", price, MAX_PRICE, "USD per GPU-hour (on-demand GPUs rent for a few dollars)")):
        if value is not None and value > most:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise LmforgeError(f"{flag} {shown} is beyond any run: at most {most:,.0f} {what}")
    if mfu < MIN_MFU:
        raise LmforgeError(f"--mfu {mfu} is below {MIN_MFU} (0.1%); 0.4 (40%) is typical for well-tuned dense training")
    name, config = resolve_config(str(model))
    spec = GPUS[gpu.lower()]
    if seq_len and config.pos_embedding == "learned" and seq_len > config.block_size:
        raise LmforgeError(f"--seq-len {seq_len}: {name}'s learned positions stop at {config.block_size}; plan "
                           f"{config.block_size} or fewer")
    seq_len = seq_len or min(config.block_size, 4096)
    n = config.num_params()
    chinchilla = 20.0 * n
    tokens = float(tokens) if tokens else chinchilla
    attention_per_token = 12 * config.n_layer * seq_len * config.n_head * config.head_size
    result = Plan(
        name=name, config=config, params=n, tokens=tokens, chinchilla_tokens=chinchilla,
        flops_6nd=6.0 * n * tokens, flops_attention=attention_per_token * tokens,
        gpu=spec, gpus=gpus, mfu=mfu, seq_len=seq_len, micro_batch=micro_batch,
        price=spec.price_per_hour if price is None else price, price_assumed=price is None,
        memory=memory_rows(config, spec, gpus, seq_len, micro_batch),
    )
    figures = [result.flops, result.seconds, result.cost, *(row.total for row in result.memory)]
    if not all(math.isfinite(float(x)) for x in figures):  # (a model folder's config.json can be any shape)
        raise LmforgeError(f"the plan for {name} ({human_count(n)} parameters) overflows floating point: check the "
                           f"model's shape, --tokens and --seq-len")
    return result


def _duration(seconds: float) -> str:
    """In a unit that shows the figure: a tiny model's run is seconds, not "0.0 hours"."""
    hours = seconds / 3600
    if hours >= 48:
        return f"{hours / 24:.1f} days ({hours:,.1f} hours)"
    if hours >= 1:
        return f"{hours:,.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    if seconds >= 1:
        return f"{seconds:.1f} seconds"
    return f"{seconds:.3f} seconds" if seconds >= 0.001 else "under a millisecond"


def _dollars(amount: float) -> str:
    if amount >= 1e15:  # (a figure no one reads digit by digit)
        return f"${amount:.3g}"
    if amount >= 100:
        return f"${amount:,.0f}"
    return f"${amount:.2f}" if amount >= 0.01 else "under $0.01"


def format_plan(p: Plan) -> str:
    c = p.config
    # Megabytes when every figure is below a gigabyte, so that a small model's memory is not "0.00 GB".
    unit, size = ("GB", GB) if max(row.total for row in p.memory) >= GB else ("MB", GB / 1000)
    lines = [
        f"model            {p.name}: {p.params:,} parameters ({human_count(p.params)}); {c.n_layer} layers, width {c.n_embd}, "
        f"{c.n_head} heads ({c.kv_heads} key/value), vocabulary {c.vocab_size:,}",
        f"tokens           {human_count(p.tokens)}" + (" (Chinchilla-optimal: 20 per parameter)" if p.tokens == p.chinchilla_tokens
                                               else f" (Chinchilla-optimal would be {human_count(p.chinchilla_tokens)})"),
        f"training FLOPs   {p.flops:.3g} = 6·N·D {p.flops_6nd:.3g} + attention {p.flops_attention:.3g} (sequence {p.seq_len:,})",
        f"hardware         {p.gpus} × {p.gpu.name}: {p.gpu.bf16_flops / 1e12:,.0f} TFLOP/s bf16 dense, "
        f"{p.gpu.bandwidth_tbs} TB/s each",
        f"time             {_duration(p.seconds)} at {p.mfu:.0%} MFU",
        f"cost             {_dollars(p.cost)} at ${p.price:.2f} per GPU-hour" + (" (assumed; set --price)"
                                                                             if p.price_assumed else ""),
        "",
        f"memory per GPU ({unit}; 16 bytes/parameter of model states: bf16 weights and grads, fp32 master weights "
        f"and AdamW m, v; micro-batch {p.micro_batch} × {p.seq_len:,} tokens)",
    ]
    # Columns as wide as their widest figure: a huge micro-batch's activations do not push the table apart.
    cells = [(row.strategy, f"{row.states / size:,.2f}", f"{row.activations / size:,.2f}", f"{row.total / size:,.2f}",
              "yes" if row.fits else "no") for row in p.memory]
    header = ("strategy", "states", "activations", "total", f"fits in {p.gpu.memory_gb:g} GB?")
    widths = [max(least, *(len(c[i]) + 2 for c in cells)) for i, least in enumerate((46, 9, 13, 9))]
    for row in [header, *cells]:
        lines.append(f"  {row[0]:<{widths[0]}}" + "".join(f"{row[i]:>{widths[i]}}" for i in (1, 2, 3)) + f"   {row[4]}")
    return "\n".join(lines)


# -- a plan beside a measured run -----------------------------------------------------------------------


def run_memory(c: Config, micro_batch: int, seq_len: int, world: int, parallel: str, checkpointing: bool,
               bytes_per_activation: int, trainable: int | None = None, total: int | None = None) -> tuple[float, float]:
    """(model states, activations) in bytes per process that the plan's conventions predict for a run:
    fp32 master weights, gradients and AdamW's moments are 16 bytes a trained parameter in fp32 and in bf16
    autocast alike, and a frozen one (LoRA's base, a linear probe's body) is its fp32 weight alone, 4 bytes;
    activations are kept in the training precision. ``trainable``: the parameters trained (default: all);
    ``total``: all the run's parameters, LoRA's adapters included (default: the model's)."""
    n = c.num_params()
    trained = n if trainable is None else trainable
    states = BYTES_PER_PARAM_STATES * trained + 4 * max((total or n) - trained, 0)
    if parallel == "fsdp":
        layer = (n - c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)) / c.n_layer
        states = states / world + 2 * 4 * layer  # two fp32 layers gathered at once
    per_layer = activation_bytes_per_layer(c, seq_len, micro_batch) / 2 * bytes_per_activation
    logits = 4 * seq_len * micro_batch * c.vocab_size
    if checkpointing:
        activations = c.n_layer * bytes_per_activation * seq_len * micro_batch * c.n_embd + per_layer + logits
    else:
        activations = c.n_layer * per_layer + logits
    return states, activations


def compare_measured(run_dir: str | os.PathLike) -> str:
    """The plan's per-process memory and the speed for a run, beside what the run measured
    (``throughput.json``, written at each evaluation)."""
    import yaml

    from lmforge.utils import read_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"--measured {run_dir} " + ("is a file; give a run folder" if run_dir.exists()
                                                      else "does not exist; give a run folder"))
    if not (run_dir / "throughput.json").exists():
        raise LmforgeError(f"{run_dir} has no throughput.json; --measured takes a run folder that reached an evaluation")
    run = read_json(run_dir / "run.json", "run description")
    speed = read_json(run_dir / "throughput.json", "throughput record")
    try:  # (an encoder's, an encoder-decoder's or the LSTM baseline's config is no decoder's)
        c = Config.from_dict(run["model"]) if isinstance(run.get("model"), dict) else None
    except LmforgeError:
        c = None
    if c is None:
        raise LmforgeError(f"{run_dir} did not train a decoder; the plan's memory model is a decoder's")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    world, parallel = int(run.get("world_size", 1)), speed.get("parallel", "none")
    micro, seq = int(config.get("micro_batch_size", 1)), c.block_size
    checkpointing = bool(speed.get("activation_checkpointing"))
    def count(key):
        value = run.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    trainable, total = count("trainable_parameters"), count("parameters")
    states, activations = run_memory(c, micro, seq, world, parallel, checkpointing,
                                     2 if "bfloat16" in run.get("dtype", "") else 4, trainable, total)
    baseline = float(speed.get("baseline_memory_mb", 0.0)) * 2**20
    measured = max(speed["peak_memory_mb"]) * 2**20 - baseline
    predicted = states + activations
    mb = 2**20
    exact = ""
    if "activation_mb" in speed:  # counted in the run's first step: autograd's saved tensors, the training state
        kept, held = max(speed["activation_mb"]) * mb, max(speed["states_mb"]) * mb
        exact = (f"\nstates           plan {states / mb:,.1f} MB; the run held {held / mb:,.1f} MB of parameters, gradients "
                 f"and optimizer state (plan error {(states - held) / held:+.0%})"
                 f"\nactivations      plan {activations / mb:,.1f} MB; autograd kept {kept / mb:,.1f} MB for the backward pass "
                 f"(plan error {(activations - kept) / kept:+.0%})" if kept > 0 and held > 0 else "")
    lines = [
        f"run              {run_dir}: {c.num_params():,} parameters"
        f"{f' ({trainable:,} trained)' if trainable is not None and trainable != c.num_params() else ''} on {world} "
        f"process(es) ({parallel}), "
        f"{run.get('dtype')}, micro-batch {micro} x {seq} tokens, activation checkpointing {'on' if checkpointing else 'off'}",
        f"memory/process   plan {predicted / mb:,.1f} MB (states {states / mb:,.1f} + activations {activations / mb:,.1f}); "
        f"measured {measured / mb:,.1f} MB above the {baseline / mb:,.0f} MB the process held before the model "
        f"(peak of the {len(speed['peak_memory_mb'])} rank(s)); "
        + (f"plan error {(predicted - measured) / measured:+.0%}" if measured > 0 else "too little to compare") + exact,
    ]
    if speed.get("mfu"):
        lines.append(
            f"speed            {speed['tokens_per_second']:,.0f} tokens/s = {speed['mfu']:.1%} MFU of "
            f"{speed['peak_flops_per_device'] / 1e12:.3g} TFLOP/s per device ({speed.get('peak_source')}); "
            f"plan a run with --mfu {speed['mfu']:.3f} to use it")
    return "\n".join(lines)
