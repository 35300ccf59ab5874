"""Score models on held-out preference pairs of examples/make_preferences.py (the real next line or a corrupted one).

    python examples/eval_preferences.py --pairs examples/preferences/next_line_test.jsonl \\
        --model base=runs/demo/train --model sft=runs/pref/sft --model dpo=runs/pref/dpo \\
        --reference runs/pref/sft --reward-model runs/pref/reward

For each language model, over every pair:
    log p prefers real   log π(chosen | prompt) > log π(rejected | prompt): sums over the answer's tokens, the same
                         tokens DPO trains on (the line and the end-of-text token), overall and per corruption kind
    greedy = real line   greedy decoding from the prompt gives the real line exactly (the first line it writes)
    similarity           how close that line is to the real one: difflib's ratio (0 to 1, 1 when equal), averaged
    writes nothing       greedy decoding ends at once (the end-of-text token first): similarity 0
    vs reference         (runs of `lmforge dpo`) DPO's implicit reward accuracy: [log π(c) - log π_ref(c)]
                         - [log π(r) - log π_ref(r)] > 0, what `lmforge dpo` logs as val_reward_accuracy
                         (ties count as wrong, as there)
then, for each two models, whether their "log p prefers the real line" differ by more than chance (an exact
sign test over the pairs where they disagree), and for a reward model (`lmforge reward`), how often it
scores the real line higher.
"""

import argparse
import difflib
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge import generate
from lmforge.data.preference import read_pairs, tokenize_pairs
from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.train.preference import reward_scores

KINDS = ("other", "swap", "bracket")


@torch.no_grad()
def answer_logps(model, tokenizer, rows: list[dict], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities, each of shape (pairs,), tokenised as `lmforge dpo` does."""
    pairs, stats = tokenize_pairs(tokenizer, rows, model.config.block_size)
    assert len(pairs) == len(rows) and not stats.dropped, "every test pair fits the context"
    pad = tokenizer.eos_id or 0
    out = []
    for answer in ("chosen", "rejected"):
        values = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            seqs = [p.prompt + getattr(p, answer) for p in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            labels = torch.full_like(ids, -100)
            for row, p in enumerate(chunk):  # the token at t is predicted at t - 1
                start, end = len(p.prompt), len(p.prompt) + len(getattr(p, answer))
                labels[row, start - 1 : end - 1] = ids[row, start:end]
            logits = model(ids).float()
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
            values.append(-nll.view(labels.shape).sum(-1))
        out.append(torch.cat(values))
    return out[0], out[1]


def trained_by_dpo(folder: str) -> bool:
    run = Path(folder) / "run.json"  # a run folder says what trained it
    return run.exists() and json.loads(run.read_text(encoding="utf-8")).get("task") == "dpo"


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven of the pairs where two models differ."""
    from math import comb

    n = better + worse
    return min(1.0, 2 * sum(comb(n, k) for k in range(min(better, worse) + 1)) / 2**n) if n else 1.0


def first_line(text: str) -> str | None:
    """The line a model writes after the prompt: its text starts with the newline that ends the prompt's line."""
    return text[1:].split("\n")[0] if text.startswith("\n") else None


def per_kind(correct: list[bool], rows: list[dict]) -> dict:
    scores = {"all": sum(correct) / len(correct)}
    for kind in KINDS:
        picked = [c for c, r in zip(correct, rows) if r.get("kind") == kind]
        if picked:
            scores[kind] = sum(picked) / len(picked)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER of a language model (repeatable)")
    parser.add_argument("--reference", help="the DPO reference model, for the implicit-reward accuracy")
    parser.add_argument("--reward-model", help="a reward model folder or run")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = read_pairs(args.pairs).rows
    n = len(rows)
    counts = ", ".join(f"{k} {sum(r.get('kind') == k for r in rows)}" for k in KINDS)
    print(f"{n} held-out pairs from {args.pairs} ({counts})\n")
    results = {"pairs": args.pairs, "n": n, "models": {}}

    reference = None
    if args.reference:
        ref_model = load_model(args.reference).eval()
        reference = answer_logps(ref_model, load_tokenizer_for(ref_model), rows)
    for spec in args.model:
        name, _, folder = spec.partition("=")
        started = time.perf_counter()
        model = load_model(folder).eval()
        tokenizer = load_tokenizer_for(model)
        chosen, rejected = answer_logps(model, tokenizer, rows)
        right = (chosen > rejected).tolist()
        prefers = per_kind(right, rows)
        outputs = generate(model, [r["prompt"] for r in rows], tokenizer=tokenizer, chat=False,
                           max_new_tokens=args.max_new_tokens, temperature=0)
        lines = [first_line(o.text) for o in outputs]
        real = [r["chosen"][1:].rstrip() for r in rows]
        exact = sum(line is not None and line.rstrip() == want for line, want in zip(lines, real)) / n
        similarity = sum(difflib.SequenceMatcher(None, (line or "").strip(), want.strip()).ratio()
                         for line, want in zip(lines, real)) / n
        empty = sum(not o.text.strip() for o in outputs) / n
        entry = {"folder": folder, "logp_prefers_real": prefers, "greedy_exact": exact, "greedy_similarity": similarity,
                 "greedy_empty": empty,
                 "mean_logp_chosen": chosen.mean().item(), "mean_logp_rejected": rejected.mean().item()}
        if reference is not None and trained_by_dpo(folder):
            h = (chosen - reference[0]) - (rejected - reference[1])
            entry["implicit_reward_accuracy"] = per_kind((h > 0).tolist(), rows)
        entry["right"] = right
        entry["seconds"] = round(time.perf_counter() - started, 1)
        results["models"][name] = entry

    if args.reward_model:
        started = time.perf_counter()
        answers = [{"prompt": r["prompt"], "answer": r[k]} for r in rows for k in ("chosen", "rejected")]
        scores = reward_scores(args.reward_model, answers)
        correct = [scores[2 * i] > scores[2 * i + 1] for i in range(n)]
        results["reward_model"] = {"folder": args.reward_model, "accuracy": per_kind(correct, rows),
                                   "seconds": round(time.perf_counter() - started, 1)}

    pct = lambda v: f"{100 * v:.1f}%"
    print("| model | log p prefers the real line | other / swap / bracket | greedy = real line | similarity | "
          f"writes nothing | DPO implicit reward accuracy{f' (vs {args.reference})' if args.reference else ''} |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, e in results["models"].items():
        p = e["logp_prefers_real"]
        implicit = pct(e["implicit_reward_accuracy"]["all"]) if "implicit_reward_accuracy" in e else "—"
        print(f"| {name} | {pct(p['all'])} | {' / '.join(pct(p[k]) for k in KINDS if k in p)} | "
              f"{pct(e['greedy_exact'])} | {e['greedy_similarity']:.3f} | {pct(e['greedy_empty'])} | {implicit} |")
    names = list(results["models"])
    for before, after in itertools.combinations(names, 2):  # is a difference in "log p prefers the real line" chance?
        a, b = results["models"][after]["right"], results["models"][before]["right"]
        better, worse = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
        print(f"\n{after} vs {before}: right where {before} is wrong in {better} pairs, wrong where it is right in "
              f"{worse} (two-sided sign test p = {sign_test(better, worse):.3f})", end="")
    print()
    if "reward_model" in results:
        a = results["reward_model"]["accuracy"]
        print(f"\nreward model {args.reward_model}: scores the real line higher in {pct(a['all'])} of pairs "
              f"({' / '.join(pct(a[k]) for k in KINDS if k in a)} for other / swap / bracket)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
