"""Decode speed as the context grows: lmforge's engine vs transformers' generate, batch 1, greedy.

    python bench/bench_context.py                       # gpt2 shape, 528 new tokens, 3 repeats
    python bench/bench_context.py --new 272 --repeats 5
    python bench/bench_context.py --llama-cpp /tmp/llamaenv/bin/python   # beside llama.cpp (f32, bf16, q8_0)

A random model of the gpt2 (124M) shape, fp32, the same weights in both systems; a 32-token prompt,
then every new token forced (no end token). Each generated token's arrival time is recorded (the
engine's steps; a logits processor in transformers, called once per token), so one run gives the
rate over each window of the output (tokens 17-144, 144-272, ... as in issue 11) and the time per
token at each position. Systems alternate and each figure is the median over repeats, so that a
shared machine's drift hits both alike; the spread (min-max over repeats) is printed beside it.

With ``--llama-cpp PYTHON`` (a Python with llama-cpp-python and gguf: see bench/llamacpp_worker.py) the
same weights are also written as GGUF files in f32, bf16 and q8_0 and decoded by llama.cpp, beside
lmforge in fp32, bf16 and int8 (each compared with llama.cpp at its precision: int8 with q8_0).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import _Ids  # noqa: E402
from bench_gpt import hf_model  # noqa: E402

from lmforge.infer.engine import Engine, quantize_int8  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.config import Config  # noqa: E402
from lmforge.model.gpt import build_model, use_fast_kernels  # noqa: E402
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


def llama_cpp_systems(python: str, ours, config: Config, new: int, folder: Path) -> dict:
    """llama.cpp at f32, bf16 and q8_0 on ``ours``'s weights: each a function prompt → (times, tokens)."""
    from safetensors.torch import save_file

    worker = str(Path(__file__).resolve().parent / "llamacpp_worker.py")
    weights = {k: v.contiguous() for k, v in state_dict_to_hf(ours).items()}
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "layer_norm_epsilon": config.norm_eps, "vocab_size": config.vocab_size,
        "n_inner": config.hidden}))
    threads = torch.get_num_threads()

    def system(path: str):
        def run(prompt):
            out = subprocess.run([python, worker, "time", path, json.dumps(prompt), str(new), str(threads)],
                                 check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            return result["times"], result["tokens"]
        return run

    systems = {}
    prompt = list(range(1, PROMPT + 1))
    with torch.no_grad():
        ours_logits = ours(torch.tensor([prompt]))[0].float().numpy()
    for kind in ("f32", "bf16", "q8_0"):
        path = str(folder / f"model-{kind}.gguf")
        subprocess.run([python, worker, "convert", str(folder), path, kind], check=True)
        subprocess.run([python, worker, "logits", path, json.dumps(prompt), str(folder / "logits.npy")], check=True)
        theirs = np.load(folder / "logits.npy")
        # the conversion's check: the same logits as lmforge's fp32 within the format's rounding
        print(f"llama.cpp {kind}: logits over a {PROMPT}-token prompt differ from lmforge fp32's by at most "
              f"{np.abs(theirs - ours_logits).max():.2e} (largest logit {np.abs(ours_logits).max():.2f}); same argmax at "
              f"{(theirs.argmax(-1) == ours_logits.argmax(-1)).mean():.0%} of positions")
        systems[f"llama.cpp {kind}"] = system(path)
    return systems


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
    p.add_argument("--llama-cpp", metavar="PYTHON", help="a Python with llama-cpp-python and gguf: also llama.cpp at "
                   "f32, bf16 and q8_0, and lmforge at bf16 and int8")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {hardware_description(torch.device('cpu'))}")
    config = Config.from_preset(args.shape)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    # fp32 as `lmforge generate` runs it: through the kernel measured fastest here for one row (the values of `ours`)
    fast = copy.deepcopy(ours)
    print(f"lmforge fp32 products: {use_fast_kernels(fast, 1)}", flush=True)
    systems = {"lmforge": lambda prompt: lmforge_times(Engine(fast, _Ids(), max_batch=1), prompt, args.new)}
    if args.compile:
        # one engine for every run: its compiled step (one graph per cache bucket) is built once
        compiled = Engine(ours, _Ids(), max_batch=1, compile=True)
        systems["lmforge compiled"] = lambda prompt: lmforge_times(compiled, prompt, args.new)
    if not args.skip_hf:
        hf = hf_model(config).eval()
        loaded = hf.load_state_dict(state_dict_to_hf(ours), strict=False)
        assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys, loaded  # tied to wte: the same weights
        systems["HF generate"] = lambda prompt: hf_times(hf, prompt, args.new)
    if args.llama_cpp:
        bf16 = build_model(config).eval()
        bf16.load_state_dict(ours.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        print(f"lmforge bf16 products: {use_fast_kernels(bf16, 1)}", flush=True)
        int8 = quantize_int8(ours)
        systems["lmforge bf16"] = lambda prompt: lmforge_times(Engine(bf16, _Ids(), max_batch=1), prompt, args.new)
        systems["lmforge int8"] = lambda prompt: lmforge_times(Engine(int8, _Ids(), max_batch=1), prompt, args.new)
        gguf_dir = Path(tempfile.mkdtemp(prefix="bench_context_gguf_"))
        systems.update(llama_cpp_systems(args.llama_cpp, ours, config, args.new, gguf_dir))
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
    pairs = [(a, b) for a, b in (("lmforge", "llama.cpp f32"), ("lmforge bf16", "llama.cpp bf16"),
                                  ("lmforge int8", "llama.cpp q8_0")) if a in systems and b in systems]
    if pairs:
        print("\n| generated tokens | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |")
        print("|---|" + "---:|" * len(pairs))
        for first, last in windows:
            ratio = [statistics.median([window_rate(t, first, last) for t in runs[a]])
                     / statistics.median([window_rate(t, first, last) for t in runs[b]]) for a, b in pairs]
            print(f"| {first}-{last} | " + " | ".join(f"{r:.2f}x" for r in ratio) + " |")
    print("\n| position (prompt + generated) | " + " | ".join(f"{n} ms/token" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for b in buckets:
        # median gap between consecutive arrivals over 16 tokens after generated token b
        per = {n: [1000 * statistics.median(t[i + 1] - t[i] for i in range(b, b + 16)) for t in runs[n]] for n in names}
        print(f"| {PROMPT + b} | " + " | ".join(fmt(per[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
