"""Preference pairs from real code: which of two next lines of a Python standard-library file is the real one.

    python examples/make_preferences.py            # writes examples/preferences/*.jsonl (deterministic)

Each pair's prompt is the end of a stdlib file up to the end of a line (at most 6 lines, 300 characters);
the chosen answer is the file's real next line, the rejected one the same line corrupted in one of three
ways, picked at random among those that apply:

    other      a different line of the same file, moved to the real line's indentation
    swap       two different identifiers of the line swapped everywhere in it  (self.x = y  ->  y.x = self)
    bracket    one bracket of the line deleted, so the line no longer balances

Nothing tells the model this rule; it only sees which answer was preferred. Answers start with the newline
that ends the prompt's last line ("\\n    return x"), so the prompt ends where a tokenizer splits anyway.

The split follows `lmforge prepare`'s (seed 0, 5% validation, the default that `make demo` uses): the
training pairs come from files of its training split, and the test pairs from files of its validation
split, which the demo model never trained on. `encodings/` (codec tables, a third of the corpus, lines
that predict themselves) and `pydoc_data/` (the documentation as one table of strings) are left out of
both. The pairs come from the running Python's standard library: the files committed here were written
by Python 3.11, and another version gives other pairs. Files written (under 1 MB together):

    next_line_train.jsonl   {"prompt", "chosen", "rejected", "kind", "source"}    for lmforge reward / dpo
    next_line_sft.jsonl     {"prompt", "completion"}: the same prompts with the real line, for lmforge finetune
    next_line_test.jsonl    held-out pairs (other files), for examples/eval_preferences.py
"""

import argparse
import json
import keyword
import math
import os
import random
import re
from pathlib import Path

from lmforge.data.corpus import read_clean_documents, stdlib_root
from lmforge.data.prepare import validation_draw

HERE = Path(__file__).parent
IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
BRACKETS = "()[]{}"
CONTEXT_LINES, CONTEXT_CHARS = 6, 300


def is_target(line: str) -> bool:
    """A line worth predicting: code (not a comment), with a name in it, 12 to 80 characters after indentation."""
    text = line.strip()
    return 12 <= len(text) <= 80 and not text.startswith("#") and IDENTIFIER.search(text) is not None


def indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def other_line(lines: list[str], i: int, rng: random.Random) -> str | None:
    candidates = [j for j in range(len(lines)) if abs(j - i) > 1 and is_target(lines[j])
                  and lines[j].strip() != lines[i].strip()]
    return indent_of(lines[i]) + lines[rng.choice(candidates)].strip() if candidates else None


def swap_identifiers(line: str, rng: random.Random) -> str | None:
    names = sorted({m.group() for m in IDENTIFIER.finditer(line) if not keyword.iskeyword(m.group())})
    if len(names) < 2:
        return None
    a, b = rng.sample(names, 2)
    swapped = IDENTIFIER.sub(lambda m: {a: b, b: a}.get(m.group(), m.group()), line)
    return swapped if swapped != line else None


def drop_bracket(line: str, rng: random.Random) -> str | None:
    where = [k for k, ch in enumerate(line) if ch in BRACKETS]
    if not where:
        return None
    k = rng.choice(where)
    return line[:k] + line[k + 1:]


CORRUPTIONS = {"other": other_line, "swap": swap_identifiers, "bracket": drop_bracket}


def pairs_of_file(text: str, source: str, rng: random.Random, per_file: int) -> list[dict]:
    """Up to ``per_file`` pairs from one file, at target lines drawn at random."""
    lines = text.split("\n")
    # the prompt must end on a non-blank line without trailing spaces: the answer's newline starts a new token
    starts = [i for i in range(1, len(lines)) if is_target(lines[i]) and lines[i - 1].strip()
              and not lines[i - 1][-1].isspace()]
    rng.shuffle(starts)
    out = []
    for i in starts[:per_file]:
        context = lines[max(0, i - CONTEXT_LINES) : i]
        while len(context) > 1 and len("\n".join(context)) > CONTEXT_CHARS:
            context = context[1:]
        kinds = list(CORRUPTIONS)
        rng.shuffle(kinds)
        for kind in kinds:
            corrupted = other_line(lines, i, rng) if kind == "other" else CORRUPTIONS[kind](lines[i], rng)
            if corrupted is not None and corrupted.strip() != lines[i].strip():
                break
        else:
            continue
        out.append({"prompt": "\n".join(context), "chosen": "\n" + lines[i], "rejected": "\n" + corrupted,
                    "kind": kind, "source": f"{source}:{i + 1}"})
    return out


def make(n_train: int, n_test: int, seed: int = 0) -> dict[str, list[dict]]:
    root = stdlib_root()
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for doc in read_clean_documents(None):  # the documents `lmforge prepare` reads, cleaned the same way
        source = str(Path(doc.source).relative_to(root))
        if source.startswith(("encodings/", "pydoc_data/")):  # codec tables; the docs as one big string table
            continue
        splits["test" if validation_draw(doc.text, 0) < 0.05 else "train"].append((doc.text, source))
    rng = random.Random(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        files = splits[split]
        per_file = max(1, math.ceil(2 * n / len(files)))  # about twice what is needed, then a random n of them
        rows = [row for text, source in files for row in pairs_of_file(text, source, rng, per_file)]
        rng.shuffle(rows)
        out[split] = rows[:n]
    out["sft"] = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in out["train"]]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "preferences"))
    parser.add_argument("--train", type=int, default=1200, help="training pairs")
    parser.add_argument("--test", type=int, default=400, help="held-out pairs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make(args.train, args.test).items():
        path = out / f"next_line_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        kinds = {k: sum(r.get("kind") == k for r in rows) for k in CORRUPTIONS} if split != "sft" else {}
        print(f"wrote {os.path.relpath(path)}: {len(rows)} rows, {path.stat().st_size / 1e3:.0f} KB"
              + (f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""))
