"""lmforge vs Hugging Face transformers on the same model shape, batch and sequence length.

    python bench/bench_gpt.py                  # tiny and gpt2 shapes (about 10 minutes on 2 cores)
    python bench/bench_gpt.py --shapes tiny    # quick

Prints one table with ratios (lmforge / HF), all measured in this one process run:
  * training tokens/s, batch 4 x 256 tokens: lmforge in each CPU mode vs GPT2LMHeadModel fp32 + AdamW;
  * decode tokens/s at batch 1, 128 new tokens after a 32-token prompt, vs HF generate (greedy), and
    as a fraction of the memory-bandwidth bound (the model's own matrix-vector products, timed);
  * bf16 check: loss after a fixed number of steps on real text, bf16 autocast vs fp32 (must be within 2%).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.config import Config  # noqa: E402
from lmforge.model.gpt import build_model  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.loop import make_optimizer  # noqa: E402
from lmforge.precision import describe_probe, median_seconds  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402


def decode_bound_tokens_per_s(config: Config, repeats: int = 7) -> tuple[float, float]:
    """(tokens/s, GB/s): the memory-bandwidth bound of batch-1 fp32 decoding, measured the way decoding
    reads memory: one matrix-vector product with each of the model's own weight matrices (every layer's,
    and the output head), median of ``repeats``, through whichever fp32 kernel reads them fastest here (BLAS
    on the weights as ``nn.Linear`` stores them or stored transposed, oneDNN's: ``gpt.use_fast_kernels``'s
    choices; on a 2-core EPYC BLAS as stored read at 13.4 GB/s, oneDNN at 24). A large copy swung from 24.5 to
    76.9 GB/s between machines and runs; this is what a decode step can at best achieve on its weights."""
    from lmforge.precision import onednn_linear_available

    n, g = config.n_embd, torch.Generator().manual_seed(0)
    layer = [(3 * n, n), (n, n), (4 * n, n), (n, 4 * n)]
    plain = [torch.randn(shape, generator=g) for _ in range(config.n_layer) for shape in layer]
    plain.append(torch.randn(config.vocab_size, n, generator=g))
    inputs = {k: torch.randn(1, k, generator=g) for k in (n, 4 * n)}
    kernels = {"plain": (plain, torch.nn.functional.linear),
               "transposed": ([w.t().contiguous().t() for w in plain], torch.nn.functional.linear)}
    if onednn_linear_available():
        kernels["onednn"] = (plain, lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    seconds = []
    with torch.inference_mode():
        for weights, product in kernels.values():
            seconds.append(median_seconds(lambda: [product(inputs[w.shape[1]], w) for w in weights], repeats))
    return 1 / min(seconds), sum(w.numel() for w in plain) * 4 / min(seconds) / 1e9


def hf_model(config: Config):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(hf_config)


def train_hf(config: Config, inputs: torch.Tensor, warmup: int, steps: int) -> float:
    """Seconds per step of GPT2LMHeadModel (fp32) with torch's AdamW, as a transformers user would train."""
    hf = hf_model(config).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step():
        loss = hf(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, steps, warmup)


def train_lmforge(config: Config, inputs, targets, mode: str, warmup: int, steps: int) -> float:
    """Seconds per step of lmforge's model and optimizer in ``mode`` (fp32/bf16, with or without compile)."""
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    forward = torch.compile(model) if "compile" in mode else model
    bf16 = "bf16" in mode or mode.startswith("default") and default_precision(config, inputs.numel()) == "bfloat16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with autocast:
            _, loss = forward(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, steps, warmup + (2 if "compile" in mode else 0))


def default_precision(config: Config, rows: int) -> str:
    """What `pretrain` with ``dtype: auto`` picks for this shape on this machine (the precision probe)."""
    from lmforge.precision import choose_autocast

    return choose_autocast(torch.device("cpu"), "auto", config.n_embd, 4 * config.n_embd, rows).dtype


def bench_train(config: Config, batch: int, seq: int, warmup: int, steps: int, modes: list[str]) -> dict[str, float]:
    """Training tokens/s of HF (fp32) and of each lmforge mode, on the same random batch."""
    torch.manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    results = {"HF transformers fp32": batch * seq / train_hf(config, inputs, warmup, steps)}
    for mode in modes:
        label = f"default ({default_precision(config, batch * seq)})" if mode == "default" else mode
        results[f"lmforge {label}"] = batch * seq / train_lmforge(config, inputs, targets, mode, warmup, steps)
    return results


@torch.inference_mode()
def bench_decode(config: Config, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    from lmforge.infer.generate import SamplingParams, generate_ids

    torch.manual_seed(0)
    hf = hf_model(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    ours = build_model(config).eval()  # random weights: speed does not depend on their values

    def hf_run():
        out = hf.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=0, attention_mask=torch.ones_like(prompt))
        assert out.shape[1] == prompt_len + new_tokens

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def ours_run():
        n = sum(1 for _ in generate_ids(ours, prompt[0].tolist(), params, set()))
        assert n == new_tokens

    # Alternate the two so that drifting machine state (caches, other load) hits both alike.
    hf_run()
    ours_run()
    hf_times, our_times = [], []
    for _ in range(repeats):
        for run, times in ((hf_run, hf_times), (ours_run, our_times)):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return {
        "HF transformers generate": new_tokens / statistics.median(hf_times),
        "lmforge generate": new_tokens / statistics.median(our_times),
    }


def bf16_loss_check(steps: int) -> tuple[float, float]:
    """Mean loss of the last 10 of ``steps`` steps on real text (stdlib) in fp32 and in bf16 autocast."""
    from lmforge.data.loader import TokenSplit, TrainBatches
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(None, Path(tmp) / "tok", vocab_size=8192, progress=False)
        prepare(None, Path(tmp) / "tok", Path(tmp) / "data", progress=False)
        split = TokenSplit(Path(tmp) / "data", "train")
        losses = {}
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            config = Config.from_preset("tiny", vocab_size=tok.vocab_size)
            model = build_model(config).train()
            opt = make_optimizer(model, TrainConfig(lr=2e-3), torch.device("cpu"))
            batches = TrainBatches(split, config.block_size, 16, seed=0)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            history = []
            for i in range(steps):
                for g in opt.param_groups:
                    g["lr"] = 2e-3 * min(1.0, (i + 1) / 20)
                x, y = batches.next_batch()
                with autocast:
                    _, loss = model(x, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append(loss.item())
            losses[dtype] = sum(history[-10:]) / 10
    return losses["fp32"], losses["bf16"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,gpt2")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--decode-repeats", type=int, default=5)
    p.add_argument("--modes", default="default,fp32,fp32+compile,bf16",
                   help="default: what dtype auto picks here (the precision probe)")
    p.add_argument("--bf16-steps", type=int, default=150)
    p.add_argument("--skip-bf16-check", action="store_true")
    args = p.parse_args()
    import transformers

    print(f"machine: {hardware_description(torch.device('cpu'))}; transformers {transformers.__version__}")
    print()
    rows = []
    for shape in args.shapes.split(","):
        config = Config.from_preset(shape, dropout=0.0)
        print(f"{shape}: {describe_probe(config.n_embd, 4 * config.n_embd, 4 * 256, config.vocab_size)}")
        train = bench_train(config, 4, 256, 2, args.train_steps, args.modes.split(","))
        hf = train.pop("HF transformers fp32")
        best_mode = max(train, key=train.get)
        rows.append((shape, "train tokens/s (4x256)", "HF fp32", hf, None))
        for mode, value in train.items():
            rows.append((shape, "train tokens/s (4x256)", mode + (" *best" if mode == best_mode else ""), value, value / hf))
        decode = bench_decode(config, 32, 128, args.decode_repeats)
        weight_bytes = config.matmul_params() * 4
        bound, bandwidth = decode_bound_tokens_per_s(config)
        print(f"{shape}: one matrix-vector product per weight matrix reads {bandwidth:.1f} GB/s")
        rows.append((shape, "decode tokens/s (batch 1)", "HF generate", decode["HF transformers generate"], None))
        rows.append((shape, "decode tokens/s (batch 1)", "lmforge", decode["lmforge generate"],
                     decode["lmforge generate"] / decode["HF transformers generate"]))
        rows.append((shape, "decode bandwidth bound", f"{weight_bytes / 1e6:.0f} MB/token fp32", bound,
                     decode["lmforge generate"] / bound))
        print_table(rows)
    if not args.skip_bf16_check:
        fp32, bf16 = bf16_loss_check(args.bf16_steps)
        print(f"\nbf16 check ({args.bf16_steps} steps, tiny, stdlib text): fp32 loss {fp32:.4f}, bf16 loss {bf16:.4f}, "
              f"difference {abs(bf16 - fp32) / fp32 * 100:.2f}% (limit 2%) -> {'OK' if abs(bf16 - fp32) / fp32 < 0.02 else 'FAIL'}")


def print_table(rows) -> None:
    print("\n| shape | measure | system | value | ratio vs HF (or vs bound) |")
    print("|---|---|---|---:|---:|")
    for shape, measure, system, value, ratio in rows:
        print(f"| {shape} | {measure} | {system} | {value:,.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
