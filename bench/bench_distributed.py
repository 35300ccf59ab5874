"""Memory and speed of training layouts on this machine, beside what `lmforge plan` predicts for them.

    python bench/bench_distributed.py                # one process with and without activation checkpointing,
                                                     # then 2 processes under DDP and under FSDP
    python bench/bench_distributed.py --quick        # a smaller model

Every run is a real `lmforge pretrain` (in a subprocess, under `torchrun` for 2 processes) of the same model,
fp32, on standard-library text, for a few steps; each reads back the run's throughput.json (tokens/s since the
last evaluation, MFU against the matmul peak measured at start, every rank's peak resident memory) and prints
it beside the plan's per-process memory for that layout (`lmforge plan --measured RUN`: model states plus
activations, the plan's conventions with fp32 activations). Two measurements: exact counts from the run's
first step (the bytes of the tensors autograd keeps for the backward pass; the bytes of parameters, gradients
and optimizer state), and the peak resident set above what the process held before it built the model, where
the allocator's slack and every temporary count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.utils import hardware_description  # noqa: E402

SHAPES = {
    "default": dict(n_layer=8, n_head=8, n_embd=512, block_size=256, micro_batch_size=8),
    "quick": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, micro_batch_size=8),
}


def prepare(tmp: Path) -> Path:
    from lmforge.data.prepare import prepare as prepare_data
    from lmforge.tokenizer import train_tokenizer

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)[:40]
    train_tokenizer([str(p) for p in files], tmp / "tok", vocab_size=4096, progress=False)
    prepare_data([str(p) for p in files], tmp / "tok", tmp / "data", val_fraction=0.05, workers=0, progress=False)
    return tmp / "data"


def run(tmp: Path, name: str, shape: dict, data: Path, processes: int, parallel: str, checkpointing: bool) -> dict:
    out = tmp / name
    args = ["pretrain", "--data", str(data), "--out", str(out), "--model", "tiny", "--max-steps", "6",
            "--eval-interval", "6", "--eval-windows", "2", "--checkpoint-interval", "1000", "--warmup-steps", "1",
            "--dtype", "float32", "--tensorboard", "false", "--quiet", "--parallel", parallel,
            "--activation-checkpointing", str(checkpointing).lower()]
    for key, value in shape.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    if processes == 1:
        command = [sys.executable, "-m", "lmforge", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "-m", "lmforge", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // processes))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    from lmforge.train.plan import compare_measured

    speed = json.loads((out / "throughput.json").read_text())
    return {"speed": speed, "plan": compare_measured(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model")
    args = parser.parse_args()
    shape = SHAPES["quick" if args.quick else "default"]
    print(f"machine: {hardware_description()}")
    print(f"model: {shape} (vocabulary 4096), fp32, 6 steps; figures over steps 1-6")
    layouts = [("one", 1, "ddp", False), ("one_ckpt", 1, "ddp", True), ("ddp", 2, "ddp", False),
               ("fsdp", 2, "fsdp", False), ("fsdp_ckpt", 2, "fsdp", True)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp)
        for name, processes, parallel, checkpointing in layouts:
            result = run(tmp, name, shape, data, processes, parallel, checkpointing)
            s = result["speed"]
            print(f"\n== {processes} process(es), {parallel if processes > 1 else 'no parallelism'}, activation "
                  f"checkpointing {'on' if checkpointing else 'off'}: {s['tokens_per_second']:,.0f} tokens/s, "
                  f"MFU {s.get('mfu', 0):.1%}, peak memory per rank {', '.join(f'{m:,.0f}' for m in s['peak_memory_mb'])} MB")
            print(result["plan"])


if __name__ == "__main__":
    main()
