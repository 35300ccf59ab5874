"""Encoder-decoder (T5) training and generation, lmforge against transformers on the same weights and inputs.

    python bench/bench_seq2seq.py                   # tiny and t5-small (60M) shapes
    python bench/bench_seq2seq.py --shapes tiny

Both start from one random T5ForConditionalGeneration saved with save_pretrained (lmforge loads the folder).

  * Training: 8 rows of a 256-token source and a 64-token target (random token ids; the work does not depend on
    them), forward, backward and a fused AdamW step (lr 1e-4), dropout off; tokens/s counts source and target
    tokens. transformers and lmforge in fp32 and in bf16 autocast, interleaved step by step in one process;
    median of 6 steps after 2. lmforge's steps run with subnormal floats flushed to zero, as its training loop
    runs them (`precision.flushing_subnormals`); a freshly initialised T5 head's softmax gradient is full of
    subnormals, and each of the head's two backward products then ran ~25x slower here. transformers runs as its
    Trainer does (no flush), and once more with the flush, so that both comparisons are there.
  * Generation: greedy, 64 new tokens for every row (no end token: transformers is given min_new_tokens, lmforge no
    stop token), sources of 128 tokens; batch 1 and batch 8; tokens/s counts new tokens; fp32 weights, lmforge's
    products through the kernel its probe measures fastest here, as `lmforge generate` runs them; the two
    libraries take turns run by run, median of 5 runs after 1 each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.precision import flushing_subnormals  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=8192, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                     feed_forward_proj="relu", tie_word_embeddings=True),
}
ROWS, SOURCE, TARGET = 8, 256, 64
GEN_SOURCE, NEW, REPEATS = 128, 64, 5


def bench_shape(shape: str) -> list[tuple]:
    from transformers import T5Config, T5ForConditionalGeneration

    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.checkpoint import load_model

    torch.manual_seed(0)
    config = T5Config(**SHAPES[shape], dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    vocab = SHAPES[shape]["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        model = T5ForConditionalGeneration(config)
        if not SHAPES[shape]["tie_word_embeddings"]:  # (transformers 5's T5Config ties the head whatever it is told)
            with torch.no_grad():
                model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, config.d_model) * config.d_model ** -0.5)
            model.config.tie_word_embeddings = False
        model.save_pretrained(tmp)
        hf = T5ForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa")
        ours = load_model(tmp)
    params = sum(p.numel() for p in ours.parameters())
    hf_tied = hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()
    assert ours.config.tied == hf_tied == SHAPES[shape]["tie_word_embeddings"]
    print(f"{shape}: {params / 1e6:.1f}M parameters, {'tied' if ours.config.tied else 'own'} head", flush=True)
    g = torch.Generator().manual_seed(0)
    source = torch.randint(2, vocab, (ROWS, SOURCE), generator=g)
    labels = torch.randint(2, vocab, (ROWS, TARGET), generator=g)
    rows = []

    import copy

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    flush = flushing_subnormals
    systems = {  # name: (model, precision, transformers?, flush?)
        "transformers fp32": (hf, nullcontext, True, nullcontext),
        "transformers fp32, subnormals flushed": (copy.deepcopy(hf), nullcontext, True, flush),
        "transformers bf16 autocast": (copy.deepcopy(hf), bf16, True, nullcontext),
        "transformers bf16 autocast, subnormals flushed": (copy.deepcopy(hf), bf16, True, flush),
        "lmforge fp32": (ours, nullcontext, False, flush),
        "lmforge bf16 autocast": (copy.deepcopy(ours), bf16, False, flush),
    }
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, (m, *_) in systems.items()}
    times = {k: [] for k in systems}
    for _ in range(8):
        for name, (model, precision, is_hf, flushed) in systems.items():
            model.train()
            with flushed():
                t = time.perf_counter()
                with precision():
                    loss = model(input_ids=source, labels=labels).loss if is_hf else model(source, labels=labels)[1]
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - t)
    rate = {name: ROWS * (SOURCE + TARGET) / statistics.median(times[name][2:]) for name in systems}
    for name in systems:
        same = f"transformers {name.split(' ', 1)[1].split(',')[0]}, subnormals flushed"
        rows.append((shape, "train tokens/s", name, rate[name], rate[name] / rate["transformers fp32"],
                     rate[name] / rate[same] if name.startswith("lmforge") else None))

    from lmforge.model.gpt import use_fast_kernels

    hf.eval()
    ours.eval()
    for batch in (1, ROWS):
        sources = torch.randint(2, vocab, (batch, GEN_SOURCE), generator=g)
        # as `lmforge generate` and `serve` run fp32 weights: through the kernel measured fastest here for 1 to
        # `batch` rows (BLAS as stored, BLAS transposed, oneDNN)
        generator = copy.deepcopy(ours)
        print(f"  {shape}, batch {batch}: fp32 products: {use_fast_kernels(generator, batch)}", flush=True)

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(sources, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            assert out.shape[1] == NEW + 1

        def our_generate():
            engine = Engine(generator, _Ids(), max_batch=batch)
            requests = [engine.add(s.tolist(), SamplingParams(max_new_tokens=NEW, temperature=0, stop_token_ids=[]))
                        for s in sources]
            engine.run(requests)
            assert all(len(r.sequences[0].tokens) == NEW for r in requests)

        # (the two take turns, run by run: on a shared VM a slow spell then hits both)
        times = {hf_generate: [], our_generate: []}
        for _ in range(REPEATS + 1):
            for run, seconds in times.items():
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
        hf_rate, our_rate = (batch * NEW / statistics.median(times[run][1:]) for run in (hf_generate, our_generate))
        rows.append((shape, f"generate tokens/s (batch {batch})", "transformers fp32", hf_rate, 1.0, None))
        rows.append((shape, f"generate tokens/s (batch {batch})", "lmforge fp32", our_rate, our_rate / hf_rate,
                     our_rate / hf_rate))
    return rows


class _Ids:
    """A tokenizer stand-in: the engine detokenizes as it goes; here only the ids matter."""

    eos_id = None

    def decode(self, ids):
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,t5-small")
    args = p.parse_args()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    print(f"machine: {hardware_description()}; transformers {transformers.__version__}")
    print(f"training: {ROWS} rows x ({SOURCE} source + {TARGET} target tokens); generation: sources of {GEN_SOURCE}, "
          f"{NEW} new tokens, greedy\n", flush=True)
    table = []
    for shape in args.shapes.split(","):
        table += bench_shape(shape)
    print("\n| shape | measure | system | value | vs transformers fp32 | vs transformers, same precision and flush |\n"
          "|---|---|---|---:|---:|---:|")
    for shape, measure, system, value, ratio, same in table:
        print(f"| {shape} | {measure} | {system} | {value:,.1f} | {ratio:.2f}x | "
              f"{'' if same is None else f'{same:.2f}x'} |")


if __name__ == "__main__":
    main()
