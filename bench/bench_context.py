"""Decode speed as the context grows: lmforge's engine vs transformers' generate, batch 1, greedy.

    python bench/bench_context.py                       # gpt2 shape, 528 new tokens, 3 repeats
    python bench/bench_context.py --new 272 --repeats 5

A random model of the gpt2 (124M) shape, fp32, the same weights in both systems; a 32-token prompt,
then every new token forced (no end token). Each generated token's arrival time is recorded (the
engine's steps; a logits processor in transformers, called once per token), so one run gives the
rate over each window of the output (tokens 17-144, 144-272, ... as in issue 11) and the time per
token at each position. Systems alternate and each figure is the median over repeats, so that a
shared machine's drift hits both alike; the spread (min-max over repeats) is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import _Ids  # noqa: E402
from bench_gpt import hf_model  # noqa: E402

from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.config import Config  # noqa: E402
from lmforge.model.gpt import build_model  # noqa: E402
from lmforge.model.hf import state_dict_to_hf  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402

PROMPT = 32


def lmforge_times(engine: Engine, prompt: list[int], new: int) -> tuple[list[float], list[int]]:
    """Arrival time of each generated token (seconds from the start) and the tokens."""
    request = engine.add(prompt, SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=[]))
    start, times = time.perf_counter(), []
    while not request.finished:
        events = engine.step()
        times += [time.perf_counter() - start] * len(events)
    return times, request.sequences[0].tokens


def hf_times(hf, prompt: list[int], new: int) -> tuple[list[float], list[int]]:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        # called once per new token, after that token's forward pass: the token's arrival time
        def __call__(self, input_ids, scores):
            times.append(time.perf_counter() - start)
            return scores

    ids = torch.tensor([prompt])
    times = []
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                          attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([Clock()]))
    return times, out[0, PROMPT:].tolist()


def window_rate(times: list[float], first: int, last: int) -> float:
    """Tokens/s over generated tokens ``first..last`` (1-based): (last - first) tokens between their arrivals."""
    return (last - first) / (times[last - 1] - times[first - 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--new", type=int, default=528, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--compile", action="store_true", help="also the engine with a compiled decode step (static shapes)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {hardware_description(torch.device('cpu'))}")
    config = Config.from_preset(args.shape)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    systems = {"lmforge": lambda prompt: lmforge_times(Engine(ours, _Ids(), max_batch=1), prompt, args.new)}
    if args.compile:
        # one engine for every run: its compiled step (one graph per cache bucket) is built once
        compiled = Engine(ours, _Ids(), max_batch=1, compile=True)
        systems["lmforge compiled"] = lambda prompt: lmforge_times(compiled, prompt, args.new)
    if not args.skip_hf:
        hf = hf_model(config).eval()
        loaded = hf.load_state_dict(state_dict_to_hf(ours), strict=False)
        assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys, loaded  # tied to wte: the same weights
        systems["HF generate"] = lambda prompt: hf_times(hf, prompt, args.new)
    prompt = torch.randint(0, config.vocab_size, (PROMPT,)).tolist()

    edges = [17] + list(range(144, args.new + 1, 128))
    windows = list(zip(edges, edges[1:])) + [(17, edges[-1])] * (len(edges) > 2)
    # per-token times are read over the 16 tokens after each bucket's start (the last one ends the run)
    buckets = sorted({b for b in (16, 64, 128, 256, 384, 512, 768) if b + 17 <= args.new} | {args.new - 17})
    for fn in systems.values():
        fn(prompt)  # warm up (a compiled engine builds its graphs here)
    runs = {name: [] for name in systems}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in systems.items():
            t, tokens[name] = fn(prompt)
            assert len(t) == args.new, (name, len(t))
            runs[name].append(t)
    hf = "HF generate"
    ours_names = [n for n in systems if n != hf]
    for n in ours_names:
        if hf in tokens:
            same = next((i for i, (x, y) in enumerate(zip(tokens[n], tokens[hf])) if x != y), args.new)
            print(f"{n}: greedy tokens identical to transformers: {same} of {args.new}")

    def fmt(values):
        med = statistics.median(values)
        return f"{med:,.1f} ({min(values):,.1f}-{max(values):,.1f})"

    print(f"\n{args.shape}, batch 1, fp32, {PROMPT}-token prompt, {args.new} new tokens, {torch.get_num_threads()} threads, "
          f"median (min-max) of {args.repeats} runs\n")
    names = list(systems)
    vs = [n for n in ours_names if hf in systems]
    print("| generated tokens | " + " | ".join(f"{n} tok/s" for n in names) + " |" + "".join(f" {n} vs HF |" for n in vs))
    print("|---|" + "---:|" * (len(names) + len(vs)))
    for first, last in windows:
        rates = {n: [window_rate(t, first, last) for t in runs[n]] for n in names}
        ratios = "".join(f" {statistics.median(rates[n]) / statistics.median(rates[hf]):.2f}x |" for n in vs)
        print(f"| {first}-{last} | " + " | ".join(fmt(rates[n]) for n in names) + " |" + ratios)
    print("\n| position (prompt + generated) | " + " | ".join(f"{n} ms/token" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for b in buckets:
        # median gap between consecutive arrivals over 16 tokens after generated token b
        per = {n: [1000 * statistics.median(t[i + 1] - t[i] for i in range(b, b + 16)) for t in runs[n]] for n in names}
        print(f"| {PROMPT + b} | " + " | ".join(fmt(per[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
