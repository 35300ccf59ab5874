"""Measure what the README's reinforcement-learning examples change, on prompts no model trained on.

    python examples/eval_rl.py arithmetic --prompts examples/rl/arithmetic_test.jsonl \\
        --model sft=runs/rl/sft --model grpo_seed1=runs/rl/grpo --model grpo_seed2=runs/rl/grpo_seed2
    python examples/eval_rl.py next-line --pairs examples/rl/next_line_eval.jsonl \\
        --model sft=runs/pref/sft --model ppo_beta0.05=runs/rl/ppo_beta0.05 --reward-model runs/pref/reward

arithmetic: each prompt {"prompt": messages, "answer"} is answered as `lmforge rl` answers it (the chat template,
stopping at the end of the turn), and an answer is right when `--reward exact` would score it 1 (its last number
is the sum):
    greedy pass@1    the greedy answer is right
    sampled pass@1   the share of --k samples at --temperature that are right (their mean over prompts)
    pass@k           at least one of the --k samples is right
    ± (bootstrap)    the std of greedy pass@1 over --bootstrap resamples of the prompts: the noise of the eval set
and, for each two models, an exact sign test over the prompts where one greedy answer is right and the other wrong,
and the difference of their sampled pass@1 with its paired bootstrap std (the same resampled prompts for both).

next-line: the true rule behind examples/make_preferences.py's pairs is "write the file's real next line"; the
reward model only learned to prefer it. On held-out pairs {"prompt", "chosen", "rejected"} of files no model saw:
    greedy = real line   the first line greedy decoding writes is the real one exactly
    similarity           difflib's ratio between that line and the real one (0 to 1), averaged
    writes nothing       greedy decoding ends at once
    reward model score   the --reward-model's mean score of the greedy completions: what PPO maximised
    log p prefers real   log π(real line) > log π(corrupted line), as examples/eval_preferences.py measures it
"""

import argparse
import difflib
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import torch
from eval_preferences import answer_logps, first_line, sign_test

from lmforge.data.preference import encode_prompt
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model.checkpoint import load_decoder, load_tokenizer_for
from lmforge.train.rewards import exact_answer


def complete(model, tokenizer, prompts: list, n: int, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
    """``n`` completions of each prompt (messages or text), encoded and stopped as `lmforge rl` does; prompt j's
    samples use seeds from (seed, j), so every model sees the same random numbers."""
    engine = Engine(model, tokenizer, max_batch=min(64 * max(n, 1), len(prompts) * n))
    requests = []
    for j, prompt in enumerate(prompts):
        _, ids, end = encode_prompt(tokenizer, prompt)
        stops = sorted({t for t in (end, tokenizer.eos_id) if t is not None})
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stops, n=n,
                                seed=None if temperature == 0 else seed * 1_000_003 + j * n)
        requests.append(engine.add(list(ids), params))
    engine.run(requests)
    return [[s.text for s in r.sequences] for r in requests]


def bootstrap_std(values: list[float], resamples: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    means = [statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples)]
    return statistics.pstdev(means)


def compare(results: dict, key: str, sampled: str | None = None, resamples: int = 1000) -> None:
    """For each two models: a sign test of ``key`` (right/wrong per prompt) and, with ``sampled`` (each prompt's
    share of right samples), the difference of its mean with its paired bootstrap std (the same prompts resampled)."""
    for before, after in itertools.combinations(results, 2):
        a, b = results[after][key], results[before][key]
        better, worse = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
        line = (f"{after} vs {before}: right where {before} is wrong on {better} prompts, wrong where it is right on "
                f"{worse} (two-sided sign test p = {sign_test(better, worse):.2g})")
        if sampled:
            gains = [x - y for x, y in zip(results[after][sampled], results[before][sampled])]
            line += (f"; sampled pass@1 {100 * statistics.fmean(gains):+.1f} points "
                     f"(paired bootstrap std {100 * bootstrap_std(gains, resamples):.1f})")
        print(line)


def arithmetic(args) -> dict:
    rows = [json.loads(line) for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"{len(rows)} prompts from {args.prompts}; {args.k} samples each at temperature {args.temperature}\n")
    results = {}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        started = time.perf_counter()
        model = load_decoder(folder).eval()
        tokenizer = load_tokenizer_for(model)
        prompts = [r["prompt"] for r in rows]
        greedy = complete(model, tokenizer, prompts, 1, 0.0, args.max_new_tokens, args.seed)
        samples = complete(model, tokenizer, prompts, args.k, args.temperature, args.max_new_tokens, args.seed)
        right = lambda text, row: exact_answer(row["prompt"], text, answer=row["answer"]) == 1.0
        greedy_right = [right(g[0], r) for g, r in zip(greedy, rows)]
        sample_right = [[right(s, r) for s in group] for group, r in zip(samples, rows)]
        results[name] = {
            "folder": folder, "greedy_pass1": statistics.fmean(greedy_right),
            "greedy_pass1_bootstrap_std": bootstrap_std([float(x) for x in greedy_right], args.bootstrap),
            "sampled_pass1": statistics.fmean(statistics.fmean(g) for g in sample_right),
            f"pass@{args.k}": statistics.fmean(any(g) for g in sample_right),
            "greedy_right": greedy_right, "sampled_right": [statistics.fmean(g) for g in sample_right], "examples": [(r["prompt"][-1]["content"], g[0]) for r, g in zip(rows[:3], greedy)],
            "seconds": round(time.perf_counter() - started, 1)}
    print(f"| model | greedy pass@1 | ± (bootstrap std) | sampled pass@1 (T={args.temperature:g}) | pass@{args.k} |")
    print("|---|---:|---:|---:|---:|")
    for name, e in results.items():
        print(f"| {name} | {100 * e['greedy_pass1']:.1f}% | {100 * e['greedy_pass1_bootstrap_std']:.1f} | "
              f"{100 * e['sampled_pass1']:.1f}% | {100 * e[f'pass@{args.k}']:.1f}% |")
    print()
    for name, e in results.items():
        print(f"{name} ({e['seconds']} s): " + "; ".join(f"{q!r} -> {a!r}" for q, a in e["examples"]))
    print()
    compare(results, "greedy_right", "sampled_right", args.bootstrap)
    return results


def next_line(args) -> dict:
    from lmforge.train.preference import reward_scores

    rows = [json.loads(line) for line in Path(args.pairs).read_text(encoding="utf-8").splitlines() if line.strip()]
    files = len({r["source"].rsplit(":", 1)[0] for r in rows}) if "source" in rows[0] else "?"
    print(f"{len(rows)} held-out pairs from {files} files ({args.pairs})\n")
    real = [r["chosen"][1:].rstrip() for r in rows]
    results = {}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        started = time.perf_counter()
        model = load_decoder(folder).eval()
        tokenizer = load_tokenizer_for(model)
        texts = [g[0] for g in complete(model, tokenizer, [r["prompt"] for r in rows], 1, 0.0, args.max_new_tokens, 0)]
        lines = [first_line(t) for t in texts]
        exact = [line is not None and line.rstrip() == want for line, want in zip(lines, real)]
        similarity = [difflib.SequenceMatcher(None, (line or "").strip(), want.strip()).ratio()
                      for line, want in zip(lines, real)]
        with torch.no_grad():
            chosen, rejected = answer_logps(model, tokenizer, rows)
        entry = {"folder": folder, "greedy_exact": statistics.fmean(exact), "similarity": statistics.fmean(similarity),
                 "similarity_bootstrap_std": bootstrap_std(similarity, args.bootstrap),
                 "writes_nothing": statistics.fmean(not t.strip() for t in texts),
                 "logp_prefers_real": (chosen > rejected).float().mean().item(), "greedy_right": exact,
                 "example": (rows[0]["prompt"][-60:], texts[0])}
        if args.reward_model:
            scores = reward_scores(args.reward_model, [{"prompt": r["prompt"], "answer": t} for r, t in zip(rows, texts)])
            entry["reward_model_score"] = statistics.fmean(scores)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = entry
    print("| model | greedy = real line | similarity (± bootstrap std) | writes nothing | reward model score | "
          "log p prefers real |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, e in results.items():
        score = f"{e['reward_model_score']:.3f}" if "reward_model_score" in e else "—"
        print(f"| {name} | {100 * e['greedy_exact']:.1f}% | {e['similarity']:.3f} ± {e['similarity_bootstrap_std']:.3f} | "
              f"{100 * e['writes_nothing']:.1f}% | {score} | {100 * e['logp_prefers_real']:.1f}% |")
    print()
    for name, e in results.items():
        print(f"{name} ({e['seconds']} s): ...{e['example'][0]!r} -> {e['example'][1]!r}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("arithmetic", help="pass@1 and pass@k of the exact answer")
    a.add_argument("--prompts", required=True)
    a.add_argument("--k", type=int, default=8)
    a.add_argument("--temperature", type=float, default=1.0)
    a.add_argument("--max-new-tokens", type=int, default=16)
    n = sub.add_parser("next-line", help="the real next line, before and after PPO")
    n.add_argument("--pairs", required=True)
    n.add_argument("--reward-model")
    n.add_argument("--max-new-tokens", type=int, default=40)
    for p in (a, n):
        p.add_argument("--model", action="append", default=[], required=True, help="NAME=FOLDER (repeatable)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the prompts for the noise")
        p.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = arithmetic(args) if args.kind == "arithmetic" else next_line(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
