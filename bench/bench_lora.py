"""LoRA vs full fine-tuning on the same model and batch: step time, peak memory, optimizer state.

    python bench/bench_lora.py                  # gpt2 (124M) shape, batch 4 x 256
    python bench/bench_lora.py --shape tiny

Each method runs in its own process so that the peak resident memory (ru_maxrss) is its own.
The optimizer state is measured exactly: the bytes of every tensor AdamW keeps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(shape: str, method: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model
    from lmforge.model.lora import add_lora, count_trainable
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import make_optimizer

    torch.manual_seed(0)
    config = Config.from_preset(shape)
    model = build_model(config).train()
    if method == "lora":
        add_lora(model, "q,v", r=8, alpha=16)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    x = torch.randint(0, config.vocab_size, (batch, seq))
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    trainable, total = count_trainable(model)
    return {"method": method, "step_seconds": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer_state_mb": state_bytes / 2**20, "trainable": trainable, "total": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.shape, args.one, args.steps, args.batch, args.seq)))
        return
    results = {}
    for method in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--shape", args.shape, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    print(f"{args.shape} shape, batch {args.batch} x {args.seq}, LoRA r=8 on q and v, fp32 AdamW on CPU\n")
    print("| method | trainable parameters | step time (s) | peak RSS (MB) | optimizer state (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in (full, lora):
        print(f"| {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | {r['step_seconds']:.3f} | "
              f"{r['peak_rss_mb']:,.0f} | {r['optimizer_state_mb']:,.2f} |")
    ratio = lora["optimizer_state_mb"] / full["optimizer_state_mb"]
    print(f"\nLoRA / full: step time {lora['step_seconds'] / full['step_seconds']:.2f}x, peak memory "
          f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x, optimizer state {ratio:.2%} (target < 5%) -> "
          f"{'OK' if ratio < 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
