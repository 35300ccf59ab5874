"""Write the data of the README's reinforcement-learning examples (deterministic).

    python examples/make_rl_prompts.py

Arithmetic, for GRPO with a verifiable reward. Every sum a + b of two numbers from 0 to --max (20: 441 sums) can be
asked three ways: "What is a plus b?", "Add a and b." and "a + b = ?". --unseen sums are never asked anywhere
before the evaluation. Each of the others is asked once in each file below, in a different phrasing each time
(drawn at random per sum), so no question is asked twice:

    examples/rl/arithmetic_sft.jsonl      chat examples answered "a + b = s." for `lmforge finetune`
    examples/rl/arithmetic_prompts.jsonl  {"prompt": [user message], "answer": "s"} for `lmforge rl --reward exact`
    examples/rl/arithmetic_val.jsonl      --val of them in the third phrasing, scored at each evaluation of the RL run
    examples/rl/arithmetic_test.jsonl     --test others in the third phrasing, scored only by examples/eval_rl.py
    examples/rl/arithmetic_unseen.jsonl   the --unseen sums, in a phrasing drawn at random: sums no model was taught

Next line of real code, for PPO against the reward model of examples/make_preferences.py: the 400 held-out pairs
of examples/preferences/next_line_test.jsonl come from 43 files that neither the SFT model nor the reward model
saw; their prompts are split by file, so the policy is trained on some files and measured on the others:

    examples/rl/next_line_prompts.jsonl   {"prompt"} of the files sorted first (PPO trains on these)
    examples/rl/next_line_eval.jsonl      the whole pairs of the other files (examples/eval_rl.py next-line)
"""

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "rl"
PHRASINGS = ("What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?")


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def arithmetic(largest: int, n_unseen: int, n_val: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(largest + 1) for b in range(largest + 1)]
    rng.shuffle(pairs)
    unseen, taught = pairs[:n_unseen], pairs[n_unseen:]
    sft, rl, held_out = [], [], []
    for a, b in taught:
        first, second, third = rng.sample(PHRASINGS, 3)
        sft.append({"messages": [{"role": "user", "content": first.format(a=a, b=b)},
                                 {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
        rl.append(prompt(second, a, b))
        held_out.append(prompt(third, a, b))
    return {"arithmetic_sft.jsonl": sft, "arithmetic_prompts.jsonl": rl, "arithmetic_val.jsonl": held_out[:n_val],
            "arithmetic_test.jsonl": held_out[n_val : n_val + n_test],
            "arithmetic_unseen.jsonl": [prompt(rng.choice(PHRASINGS), a, b) for a, b in unseen]}


def prompt(phrasing: str, a: int, b: int) -> dict:
    return {"prompt": [{"role": "user", "content": phrasing.format(a=a, b=b)}], "answer": str(a + b)}


def next_line(pairs_path: Path) -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in pairs_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    files = sorted({r["source"].rsplit(":", 1)[0] for r in rows})
    train_files = set(files[: len(files) // 2])
    train = [{"prompt": r["prompt"]} for r in rows if r["source"].rsplit(":", 1)[0] in train_files]
    held_out = [r for r in rows if r["source"].rsplit(":", 1)[0] not in train_files]
    return {"next_line_prompts.jsonl": train, "next_line_eval.jsonl": held_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max", type=int, default=20, help="largest number added (default 20: 441 sums)")
    parser.add_argument("--unseen", type=int, default=60)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", default=str(HERE / "preferences" / "next_line_test.jsonl"),
                        help="held-out pairs of examples/make_preferences.py")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    files = arithmetic(args.max, args.unseen, args.val, args.test, args.seed)
    if Path(args.pairs).exists():
        files.update(next_line(Path(args.pairs)))
    else:
        print(f"{args.pairs} does not exist (run examples/make_preferences.py first): no next-line prompts written")
    for name, rows in files.items():
        write(name, rows)
        print(f"{OUT / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
