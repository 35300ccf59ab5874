"""Training throughput and MFU on a GPU: lmforge's own `pretrain` beside a hand-written transformers loop.

    python bench/bench_gpu.py                       # builds a 50,257-token tokenizer and data from the stdlib
    python bench/bench_gpu.py --data DIR            # a folder written by `lmforge prepare`
    python bench/bench_gpu.py --quick --device cpu  # tiny shapes: checks this script, measures nothing useful

Every lmforge figure is a real `lmforge pretrain` run (a subprocess; under `torchrun --nproc-per-node 1
--parallel ddp|fsdp` for the layouts, which with one GPU run DDP's wrapper and FSDP2's sharding into one shard
and measure their cost, not scaling), bf16 autocast, flash attention through scaled_dot_product_attention. Each
reads the run's throughput.json for the steps after its first evaluation, so compilation and warm-up are left
out: tokens/s, MFU (lmforge's FLOPs per token, 6N + 12·L·T·d, over the GPU's data-sheet bf16 peak) and peak
memory. The reference is transformers' GPT2LMHeadModel (sdpa attention) in the loop people write by hand: bf16
autocast, fused AdamW, gradient clipping, torch.compile, same batch, timed the same way.

Runs go in order of importance and stop being started once --budget-s is spent; results are written to
--out as each finishes (results.json), and a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name: (pretrain flags, micro-batch, block size)
    "gpt2-124M": (["--model", "gpt2"], 32, 1024),
    "llama-1B": (["--model", "llama-1b"], 8, 2048),  # llama-1b's body (16 x 2048, GQA 32/8) with this vocabulary
    "quick-gpt2": (["--model", "tiny", "--n-layer", "2", "--n-embd", "64", "--n-head", "2"], 4, 64),
    "quick-llama": (["--model", "tiny-llama", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--n-kv-head", "1"],
                    4, 64),
}

# (label, shape, layout, compile, activation checkpointing), most important first
RUNS = [
    ("gpt2-124M", "gpt2-124M", "single", True, False),
    ("HF gpt2-124M", "gpt2-124M", "hf", True, False),
    ("llama-1B", "llama-1B", "single", True, False),
    ("gpt2-124M", "gpt2-124M", "fsdp", True, False),
    ("llama-1B", "llama-1B", "fsdp", True, False),
    ("gpt2-124M", "gpt2-124M", "ddp", True, False),
    ("decode gpt2-124M", "gpt2-124M", "decode", False, False),
    ("llama-1B", "llama-1B", "single", True, True),
    ("gpt2-124M", "gpt2-124M", "single", False, False),
    ("HF gpt2-124M", "gpt2-124M", "hf", False, False),
]


def shape_config(shape: str, vocab: int):
    """lmforge's Config of a shape: the preset with the flags' overrides, this vocabulary and block size."""
    from dataclasses import replace

    from lmforge.model.config import PRESETS

    flags, _, block = SHAPES[shape]
    overrides = {flag[2:].replace("-", "_"): int(value) for flag, value in zip(flags[2::2], flags[3::2])}
    return replace(PRESETS[flags[1]], vocab_size=vocab, block_size=block, **overrides)


def build_data(tmp: Path) -> Path:
    from lmforge.data.prepare import prepare as prepare_data
    from lmforge.tokenizer import train_tokenizer

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if p.stat().st_size > 5_000)
    train_tokenizer([str(p) for p in files], tmp / "tok", vocab_size=50257, progress=False)
    prepare_data([str(p) for p in files[::4]], tmp / "tok", tmp / "data", val_fraction=0.02, workers=0, progress=False)
    return tmp / "data"


def lmforge_run(out: Path, data: Path, shape: str, layout: str, compiled: bool, checkpointing: bool, device: str,
                steps: int, timeout: float) -> dict:
    flags, micro, block = SHAPES[shape]
    args = ["pretrain", "--data", str(data), "--out", str(out), *flags, "--block-size", str(block),
            "--micro-batch-size", str(micro), "--max-steps", str(2 * steps), "--eval-interval", str(steps),
            "--eval-windows", "2", "--checkpoint-interval", str(10 * steps), "--keep-checkpoints", "1",
            "--warmup-steps", "2", "--dtype", "bfloat16", "--device", device, "--tensorboard", "false", "--quiet",
            "--compile", str(compiled).lower(), "--activation-checkpointing", str(checkpointing).lower()]
    if layout == "single":
        command = [sys.executable, "-m", "lmforge", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   "-m", "lmforge", *args, "--parallel", layout]
    started = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": path})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {result.stderr[-1500:]}")
    speed = json.loads((out / "throughput.json").read_text())
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in losses if "val_loss" in r]
    return {"tokens_per_second": speed["tokens_per_second"], "mfu": speed.get("mfu"),
            "peak_memory_gb": max(speed["peak_memory_mb"]) / 1024, "wall_s": wall, "val_loss": val,
            "parallel": speed.get("parallel"), "log_tail": result.stdout[-600:]}


def hf_run(data: Path, shape: str, compiled: bool, device: str, steps: int) -> dict:
    """GPT2LMHeadModel in the training loop people write with transformers, timed over `steps` steps after
    as many warm-up steps (compilation included in those)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _, micro, block = SHAPES[shape]
    meta = json.loads((data / "meta.json").read_text())
    vocab = meta["tokenizer"]["vocab_size"]
    shaped = shape_config(shape, vocab)
    config = GPT2Config(vocab_size=vocab, n_positions=block, n_layer=shaped.n_layer, n_head=shaped.n_head,
                        n_embd=shaped.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa").to(device)
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    tokens = np.memmap(sorted(data.glob("train_*.bin"))[0], dtype=np.dtype(meta["dtype"]), mode="r")
    rng = np.random.default_rng(0)
    train = torch.compile(model) if compiled else model

    def step():
        starts = rng.integers(0, len(tokens) - block - 1, micro)
        x = torch.from_numpy(np.stack([tokens[s:s + block + 1].astype(np.int64) for s in starts])).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = train(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if fused:
            torch.cuda.synchronize()

    for _ in range(steps):
        step()
    sync()
    if fused:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - started
    from lmforge.train.distributed import peak_flops

    flops = shaped.flops_per_token()
    peak, _ = peak_flops(torch.device(device), True)
    rate = micro * block * steps / seconds
    memory = torch.cuda.max_memory_allocated() / 2**30 if fused else float("nan")
    return {"tokens_per_second": rate, "mfu": flops * rate / peak if peak else None, "peak_memory_gb": memory,
            "final_loss": float(loss)}


class _Ids:  # the engine's tokenizer, for token ids only
    eos_id = None

    def decode(self, ids):
        return ""


def decode_run(data: Path, shape: str, device: str, repeats: int = 3) -> dict:
    """Greedy decoding of 128 tokens after a 32-token prompt at batch 1 and 16, bf16 weights, random model:
    lmforge's engine against transformers' generate (sdpa, its default cache), alternated, median of
    `repeats`."""
    import statistics

    import torch

    from lmforge.infer.engine import Engine
    from lmforge.infer.generate import SamplingParams
    from lmforge.model.gpt import build_model

    vocab = json.loads((data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    from dataclasses import replace

    config = shape_config(shape, vocab)
    config = replace(config, block_size=max(config.block_size, 160))  # (--quick's shapes are shorter)
    block = config.block_size
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = build_model(config).to(device, torch.bfloat16).eval()
    hf = GPT2LMHeadModel._from_config(GPT2Config(vocab_size=vocab, n_positions=block, n_embd=config.n_embd,
                                                 n_layer=config.n_layer, n_head=config.n_head),
                                      attn_implementation="sdpa").to(device, torch.bfloat16).eval()
    prompt, new = 32, 128
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=[])
    result = {}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for batch in (1, 16):
        prompts = torch.randint(0, vocab, (batch, prompt), device=device)

        @torch.inference_mode()
        def run_hf():
            out = hf.generate(prompts, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                              attention_mask=torch.ones_like(prompts))
            assert out.shape == (batch, prompt + new)

        def run_ours():
            engine = Engine(ours, _Ids(), max_batch=batch)
            requests = [engine.add(p.tolist(), params) for p in prompts]
            engine.run(requests)
            assert all(len(r.sequences[0].tokens) == new for r in requests)

        systems = {"hf": run_hf, "lmforge": run_ours}
        times = {name: [] for name in systems}
        for fn in systems.values():
            fn()
        for _ in range(repeats):
            for name, fn in systems.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
        for name, ts in times.items():
            result[f"{name}_b{batch}_tokens_per_second"] = batch * new / statistics.median(ts)
    result["tokens_per_second"] = result["lmforge_b1_tokens_per_second"]
    result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return result


def child(args) -> None:
    """One run in a process of its own (a CUDA error must not end the others), its result as the last line."""
    label, shape, layout, compiled, _ = RUNS[args.child - 1] if not args.quick else _quick(RUNS)[args.child - 1]
    if layout == "hf":
        row = hf_run(args.data, shape, compiled, args.device, args.steps)
    else:
        row = decode_run(args.data, shape, args.device)
    print(json.dumps(row))


def _quick(runs):
    return [(label.replace("gpt2-124M", "quick-gpt2").replace("llama-1B", "quick-llama"),
             shape.replace("gpt2-124M", "quick-gpt2").replace("llama-1B", "quick-llama"), *rest)
            for label, shape, *rest in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared data folder (default: build one from the stdlib)")
    parser.add_argument("--out", type=Path, default=None, help="where runs and results.json go (default: a temp folder)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check this script")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after as many warm-up steps)")
    parser.add_argument("--budget-s", type=float, default=480, help="start no run after this many seconds")
    parser.add_argument("--only", default="", help="comma-separated run numbers (1-based) to run")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from lmforge.utils import hardware_description

    print(hardware_description(args.device), flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or build_data(out)
    runs = _quick(RUNS) if args.quick else RUNS
    chosen = {int(i) for i in args.only.split(",") if i} or set(range(1, len(runs) + 1))
    started, results = time.perf_counter(), []
    for number, (label, shape, layout, compiled, checkpointing) in enumerate(runs, 1):
        if number not in chosen:
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"budget spent: run {number} ({label} {layout}) and later not started", flush=True)
            break
        name = f"{number}-{shape}-{layout}{'-compile' if compiled else ''}{'-ckpt' if checkpointing else ''}"
        row = {"run": name, "label": label, "layout": layout, "compile": compiled, "checkpointing": checkpointing}
        t0 = time.perf_counter()
        try:
            if layout in ("hf", "decode"):
                command = [sys.executable, __file__, "--child", str(number), "--data", str(data), "--device",
                           args.device, "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
                done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
                if done.returncode != 0:
                    raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                left = max(60.0, args.budget_s + 120 - (time.perf_counter() - started))
                row.update(lmforge_run(out / name, data, shape, layout, compiled, checkpointing, args.device,
                                       args.steps, left))
        except Exception as e:  # one broken configuration must not cost the others' figures
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
        row["seconds"] = time.perf_counter() - t0
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        shown = {k: v for k, v in row.items() if k != "log_tail"}
        print(json.dumps(shown), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    print(f"\n{hardware_description(args.device)}")
    print(f"{'run':<42} {'tokens/s':>11} {'MFU':>6} {'peak GB':>8} {'seconds':>8}")
    for row in results:
        if "error" in row:
            print(f"{row['run']:<42} error: {row['error'].splitlines()[-1][:80] if row['error'] else ''}")
            continue
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        if row["layout"] == "decode":
            print(f"{row['run']:<42} decode tokens/s, lmforge vs transformers generate: " + ", ".join(
                f"batch {b} {row[f'lmforge_b{b}_tokens_per_second']:,.0f} vs {row[f'hf_b{b}_tokens_per_second']:,.0f}"
                for b in (1, 16)))
            continue
        print(f"{row['run']:<42} {row['tokens_per_second']:>11,.0f} {mfu:>6} {row['peak_memory_gb']:>8.1f} "
              f"{row['seconds']:>8.0f}")
    by = {(r["label"], r["layout"], r["compile"]): r for r in results if "error" not in r}
    for compiled in (True, False):
        ours, theirs = by.get((runs[0][0], "single", compiled)), by.get((runs[1][0], "hf", compiled))
        if ours and theirs:
            print(f"lmforge / transformers, {runs[0][1]}{' compiled' if compiled else ' eager'}: "
                  f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
