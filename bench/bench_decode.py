"""Decode speed: lmforge's engine vs transformers' generate, at batch 1 and batch 16.

    python bench/bench_decode.py                 # tiny and gpt2 shapes
    python bench/bench_decode.py --shapes tiny

Each measurement generates 128 new tokens after a 32-token prompt (greedy, every token forced), and
alternates the systems so that drifting machine state hits all alike. Also: the same figure as a
fraction of the memory-bandwidth bound (the model's own matrix-vector products, timed), and
lmforge with int8 weights (PyTorch's dynamic quantisation), what `--dtype auto` runs for a bf16
checkpoint, and the perplexity cost of bf16, fp16 and int8 against fp32, measured on a
tiny model trained for a few minutes on the standard library (random weights have no perplexity to keep).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpt import decode_bound_tokens_per_s, hf_model  # noqa: E402

from lmforge.infer.engine import Engine, perplexity, quantize_int8  # noqa: E402
from lmforge.infer.generate import SamplingParams  # noqa: E402
from lmforge.model.config import Config  # noqa: E402
from lmforge.model.gpt import build_model, use_fast_kernels  # noqa: E402
from lmforge.precision import describe_probe  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402

PROMPT, NEW = 32, 128


class _Ids:
    eos_id = None

    def decode(self, ids):
        return ""


def decode_rates(config: Config, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    hf = hf_model(config).eval()
    ours = build_model(config).eval()
    int8 = quantize_int8(ours)
    # What `lmforge generate --dtype auto` runs for a checkpoint stored in bf16 (as most published ones are).
    default = copy.deepcopy(ours).to(bf16_checkpoint_default(config))
    # fp32 weights as `lmforge generate` and `serve` run them: through the kernel (BLAS as stored, BLAS transposed,
    # oneDNN) this machine's products of 1 to `batch` rows are measured fastest with (gpt.use_fast_kernels)
    kernels = use_fast_kernels(ours, batch)
    print(f"  {config.n_embd}-wide, batch {batch}: fp32 products: {kernels}", flush=True)
    kernels = use_fast_kernels(default, batch)  # bf16: packed for oneDNN where measured faster
    print(f"  {config.n_embd}-wide, batch {batch}: {next(default.parameters()).dtype} products: {kernels}", flush=True)
    prompts = torch.randint(0, config.vocab_size, (batch, PROMPT))
    params = SamplingParams(max_new_tokens=NEW, temperature=0, stop_token_ids=[])

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(prompts, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                          attention_mask=torch.ones_like(prompts))
        assert out.shape == (batch, PROMPT + NEW)

    def run(model):
        def go():
            engine = Engine(model, _Ids(), max_batch=batch)
            requests = [engine.add(p.tolist(), params) for p in prompts]
            engine.run(requests)
            assert all(len(r.sequences[0].tokens) == NEW for r in requests)
        return go

    systems = {"HF generate": run_hf, "lmforge fp32": run(ours), "lmforge int8": run(int8),
               "lmforge default, bf16 checkpoint": run(default)}
    for fn in systems.values():
        fn()  # warm up
    times = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: batch * NEW / statistics.median(ts) for name, ts in times.items()}


def bf16_checkpoint_default(config: Config) -> torch.dtype:
    from lmforge.precision import choose_weights

    return choose_weights(torch.device("cpu"), "auto", "bfloat16", config.n_embd, config.vocab_size).torch_dtype


def precision_perplexity_cost() -> dict[str, float]:
    from lmforge.data.loader import TokenSplit
    from lmforge.data.prepare import prepare
    from lmforge.model.checkpoint import load_model
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.loop import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(None, tmp / "tok", vocab_size=8192, progress=False)
        prepare(None, tmp / "tok", tmp / "data", progress=False)
        run = pretrain(data=str(tmp / "data"), out=str(tmp / "run"), model="tiny", max_steps=300, micro_batch_size=16,
                       lr=2e-3, warmup_steps=30, eval_interval=300, tensorboard=False, progress=False)
        model = load_model(run["checkpoint"] + "/model")
        val = TokenSplit(tmp / "data", "val")
        ids = [int(t) for t in val.shards[0][:20_000]]
        costs = {"fp32": perplexity(model, ids)}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            costs[name] = perplexity(copy.deepcopy(model).to(dtype), ids)
        costs["int8"] = perplexity(quantize_int8(model), ids)
        return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,gpt2")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-perplexity", action="store_true")
    args = p.parse_args()
    print(f"machine: {hardware_description(torch.device('cpu'))}")
    bounds = {}
    for shape in args.shapes.split(","):
        config = Config.from_preset(shape)
        print(f"{shape}: {describe_probe(config.n_embd, 4 * config.n_embd, 256, config.vocab_size)}")
        bounds[shape], bandwidth = decode_bound_tokens_per_s(config)
        print(f"{shape}: one matrix-vector product per weight matrix reads {bandwidth:.1f} GB/s: batch-1 fp32 "
              f"decoding is bound at {bounds[shape]:,.0f} tokens/s", flush=True)
    print()
    print("| shape | batch | HF generate tok/s | lmforge fp32 tok/s | vs HF | lmforge int8 tok/s | vs HF | "
          "lmforge default, bf16 checkpoint | vs HF | fp32 batch-1 share of bandwidth bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        config, bound = Config.from_preset(shape), bounds[shape]
        for batch in map(int, args.batches.split(",")):
            r = decode_rates(config, batch, args.repeats)
            hf, fp32, int8 = r["HF generate"], r["lmforge fp32"], r["lmforge int8"]
            default = r["lmforge default, bf16 checkpoint"]
            name = str(bf16_checkpoint_default(config)).removeprefix("torch.")
            share = f"{fp32 / bound:.0%} of {bound:.0f}" if batch == 1 else ""
            print(f"| {shape} | {batch} | {hf:,.1f} | {fp32:,.1f} | {fp32 / hf:.2f}x | {int8:,.1f} | {int8 / hf:.2f}x | "
                  f"{default:,.1f} ({name}) | {default / hf:.2f}x | {share} |", flush=True)
    if not args.skip_perplexity:
        costs = precision_perplexity_cost()
        base = costs.pop("fp32")
        print(f"\nquality cost of each precision (tiny model trained 300 steps on the stdlib, 20,000 validation "
              f"tokens): perplexity {base:.3f} fp32; " + "; ".join(f"{value:.3f} {name} ({(value - base) / base:+.2%})"
                                                             for name, value in costs.items()))


if __name__ == "__main__":
    main()
