"""Masked-LM training, lmforge's encoder against transformers' BertForMaskedLM: tokens/s on the same weights and batches.

    python bench/bench_mlm.py                    # tiny (4 x 256) and bert-base (12 x 768) shapes
    python bench/bench_mlm.py --shapes tiny

Both models start from the same weights (a random BertForMaskedLM saved with save_pretrained and loaded by lmforge)
and train on the same batches: windows of 128 tokens of the standard library framed [CLS] ... [SEP], masked by
lmforge's masking (15%, 80/10/10; equal to transformers' DataCollatorForLanguageModeling, which a test checks), 16
rows a step; AdamW alike (fused in both, lr 1e-4, no weight decay), dropout off. A step is forward, backward and the
optimizer's update. The two run interleaved in one process, one step each in turn, so that whatever else runs on the
machine falls on both alike; the first 2 steps of each are left out and each figure is the median step.

  * transformers: BertForMaskedLM(input_ids, labels) in fp32, and in bf16 autocast.
  * lmforge: the encoder's forward with the masked positions selected (the vocabulary projection on the ~15% it
    predicts, as `lmforge pretrain --objective mlm` runs it), in fp32 and in the precision `dtype: auto` picks.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.data.masking import mask_tokens  # noqa: E402
from lmforge.precision import choose_autocast  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=256), "bert-base": dict(n_layer=12, n_head=12, n_embd=768)}
ROWS, WIDTH, VOCAB = 16, 128, 8192


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` masked batches of standard-library tokens (a fixed-vocabulary byte-level tokenizer, trained here)."""
    import sysconfig

    from lmforge.tokenizer import train_tokenizer

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)[:30]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer([str(p) for p in files], tmp, vocab_size=VOCAB, progress=False, encoder=True)
    stream = torch.tensor(tok.encode("\n".join(p.read_text(errors="replace") for p in files)))
    g = torch.Generator().manual_seed(seed)
    special = torch.zeros(VOCAB, dtype=torch.bool)
    special[:7] = True
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(stream) - WIDTH, (ROWS,), generator=g)
        rows = torch.stack([stream[s : s + WIDTH - 2] for s in starts.tolist()])
        ids = torch.cat([torch.full((ROWS, 1), tok.cls_id), rows, torch.full((ROWS, 1), tok.sep_id)], 1)
        out.append(mask_tokens(ids, special[ids], tok.mask_id, VOCAB, g))
    return out


def bench_shape(shape: str, steps: int) -> list[tuple]:
    from transformers import BertConfig, BertForMaskedLM

    from lmforge.model.checkpoint import load_model

    s = SHAPES[shape]
    torch.manual_seed(0)
    hf_config = BertConfig(vocab_size=VOCAB, hidden_size=s["n_embd"], num_hidden_layers=s["n_layer"],
                           num_attention_heads=s["n_head"], intermediate_size=4 * s["n_embd"], max_position_embeddings=512,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        BertForMaskedLM(hf_config).save_pretrained(tmp)
        hf = BertForMaskedLM.from_pretrained(tmp, attn_implementation="sdpa").train()
        ours = load_model(tmp).train()
    choice = choose_autocast(torch.device("cpu"), "auto", s["n_embd"], 4 * s["n_embd"], ROWS * WIDTH)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def hf_step(model, ids, labels):
        return model(input_ids=ids, labels=labels).loss

    def our_step(model, ids, labels):
        chosen = labels != -100
        return F.cross_entropy(model(ids, select=chosen).logits.float(), labels[chosen])

    import copy

    systems = {  # name: (model, step, precision context)
        "transformers fp32": (hf, hf_step, nullcontext),
        "transformers bf16 autocast": (copy.deepcopy(hf), hf_step, bf16),
        "lmforge fp32": (ours, our_step, nullcontext),
        f"lmforge default ({'bf16' if choice.dtype == 'bfloat16' else 'fp32'})":
            (copy.deepcopy(ours), our_step, bf16 if choice.dtype == "bfloat16" else nullcontext),
    }
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
                  for name, (m, _, _) in systems.items()}
    times = {name: [] for name in systems}
    losses = {name: [] for name in systems}
    for ids, labels in batches(steps + 2):
        for name, (model, step, precision) in systems.items():
            t = time.perf_counter()
            with precision():
                loss = step(model, ids, labels)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
            losses[name].append(loss.item())
    base = ROWS * WIDTH / statistics.median(times["transformers fp32"][2:])
    rows = []
    for name in systems:
        rate = ROWS * WIDTH / statistics.median(times[name][2:])
        rows.append((shape, name, rate, rate / base, losses[name][0], losses[name][-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,bert-base")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    print(f"machine: {hardware_description()}; transformers {transformers.__version__}")
    print(f"batches: {ROWS} rows x {WIDTH} tokens, 15% masked; {args.steps} timed steps after 2\n")
    print("| shape | system | tokens/s | vs transformers fp32 | first loss | last loss |\n|---|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        for row in bench_shape(shape, args.steps):
            print(f"| {row[0]} | {row[1]} | {row[2]:,.0f} | {row[3]:.2f}x | {row[4]:.3f} | {row[5]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
