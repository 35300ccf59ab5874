"""Summarise standard-library functions into the first line of their docstring: a baseline, a T5-shaped model
(span corruption, then fine-tuned) and a decoder fine-tuned on the same pairs, scored with ROUGE and BLEU.

    python examples/eval_summarize.py --out runs/summarize                 # about 40 minutes on 2 CPU cores
    python examples/eval_summarize.py --out runs/summarize --quick          # a few minutes, to try it

The data is real code nobody here wrote: every function or method of the running Python's standard library
(``.py`` files outside tests, ``encodings`` and ``pydoc_data``) that has a docstring whose first line is 3 to 15
words. The source is the function's code with the docstring removed (its first 600 characters); the target is
that first line. The split is by module, with ``lmforge prepare``'s draw (seed 0, 5% to validation): the test
functions come from files the pretraining never read, and no module gives both training and test pairs.

  (a) baseline: the function's name, split into words ("read_config_file" -> "read config file");
  (b) T5 shape: an encoder-decoder of the tiny preset's size (4 + 4 layers x 256), pretrained with span
      corruption on the training split of the standard library, then fine-tuned on the training pairs;
  (c) decoder: make demo's kind of GPT (the tiny preset), pretrained with the same steps on the same tokens,
      then fine-tuned on "code\\n# summary:" -> "first line".

Both models decode greedily, up to 24 tokens; the first line of the output is the summary. ROUGE-1/2/L F1
(rouge-score, with stemming) and corpus BLEU (sacrebleu) over the test pairs, as `lmforge eval` computes them.
"""

import argparse
import ast
import json
import re
import sys
import time
from pathlib import Path

from lmforge import finetune, generate, prepare, pretrain, train_tokenizer
from lmforge.data.corpus import read_clean_documents, stdlib_root
from lmforge.data.prepare import validation_draw
from lmforge.eval.metrics import bleu, rouge

SKIP = ("test", "tests", "idlelib", "encodings", "pydoc_data", "site-packages", "lib2to3")
PROMPT_SUFFIX = "\n# summary:"


def functions(text: str, source: str) -> list[dict]:
    """(code without the docstring, the docstring's first line) of each documented function of a file's ``text``."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        summary = doc.strip().splitlines()[0].strip()
        if not 3 <= len(summary.split()) <= 15:
            continue
        first, last = node.lineno - 1, node.end_lineno
        doc_first, doc_last = node.body[0].lineno - 1, node.body[0].end_lineno
        code = "".join(lines[first:doc_first] + lines[doc_last:last])
        code = "\n".join(line for line in code.splitlines() if line.strip())[:600]
        if len(code.splitlines()) < 2:
            continue
        out.append({"source": code, "target": summary, "name": node.name, "file": source})
    return out


def make_pairs() -> tuple[list[dict], list[dict]]:
    """Training and test pairs, split by file with `lmforge prepare`'s draw on the cleaned documents it reads."""
    root = stdlib_root()
    train, test = [], []
    for doc in read_clean_documents(None):
        source = str(Path(doc.source).relative_to(root))
        if any(part in SKIP or part.startswith("test") for part in Path(source).parts):
            continue
        (test if validation_draw(doc.text, 0) < 0.05 else train).extend(functions(doc.text, source))
    return train, test


def name_baseline(name: str) -> str:
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).replace("_", " ").split()
    return " ".join(words).lower()


def first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def score(predictions: list[str], references: list[str]) -> dict:
    return {**rouge(predictions, references), "bleu": bleu(predictions, references)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/summarize")
    p.add_argument("--quick", action="store_true", help="few steps and test pairs, to try the script")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--finetune-epochs", type=float, default=3.0)
    args = p.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    steps = 30 if args.quick else args.pretrain_steps

    train, test = make_pairs()
    if args.quick:
        train, test = train[:300], test[:40]
    print(f"pairs: {len(train)} training functions, {len(test)} test functions (other modules)", flush=True)
    (out / "task").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out / "task" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    decoder_rows = [{"prompt": r["source"] + PROMPT_SUFFIX, "completion": " " + r["target"]} for r in train]
    (out / "task" / "train_decoder.jsonl").write_text("".join(json.dumps(r) + "\n" for r in decoder_rows),
                                                      encoding="utf-8")

    tok, data = out / "tokenizer", out / "data"
    if not (data / "meta.json").exists():
        train_tokenizer(None, tok, vocab_size=8192, progress=False, overwrite=True, sentinels=100)
        prepare(None, tok, data, progress=False, overwrite=True)
    common = dict(model="tiny", data=str(data), max_steps=steps, micro_batch_size=16, lr=1e-3,
                  warmup_steps=min(100, steps // 10), eval_interval=max(steps // 5, 1), checkpoint_interval=steps,
                  seed=0, tensorboard=False)
    references = [r["target"] for r in test]
    results = {"(a) function name": score([name_baseline(r["name"]) for r in test], references)}
    t5 = pretrain({**common, "objective": "span", "block_size": 256, "out": str(out / "t5-pretrain")},
                  overwrite=True, progress=False)
    gpt = pretrain({**common, "block_size": 256, "out": str(out / "gpt-pretrain")}, overwrite=True, progress=False)
    print(f"pretraining: T5 {t5['elapsed'] / 60:.1f} min ({t5['eval']}), GPT {gpt['elapsed'] / 60:.1f} min "
          f"({gpt['eval']})", flush=True)
    ft = dict(epochs=0.2 if args.quick else args.finetune_epochs, micro_batch_size=16, lr=5e-4, warmup_steps=20,
              max_length=256, val_fraction=0.0, eval_interval=10**6, seed=0, tensorboard=False)
    t5_ft = finetune(model=str(Path(t5["checkpoint"]) / "model"), train=str(out / "task" / "train.jsonl"),
                     out=str(out / "t5-finetune"), overwrite=True, progress=False, **ft)
    gpt_ft = finetune(model=str(Path(gpt["checkpoint"]) / "model"), train=str(out / "task" / "train_decoder.jsonl"),
                      out=str(out / "gpt-finetune"), overwrite=True, progress=False, **ft)
    print(f"fine-tuning: T5 {t5_ft['elapsed'] / 60:.1f} min, GPT {gpt_ft['elapsed'] / 60:.1f} min", flush=True)
    for name, run, prompts in (
        ("(b) T5 shape: span corruption + fine-tuning", t5_ft, [r["source"] for r in test]),
        ("(c) decoder: causal LM + fine-tuning", gpt_ft, [r["source"] + PROMPT_SUFFIX for r in test]),
    ):
        model = str(Path(run["checkpoint"]) / "model")
        outputs = generate(model, prompts, max_new_tokens=24, temperature=0, truncate=True)
        predictions = [first_line(g.text) for g in outputs]
        results[name] = score(predictions, references)
        results[name]["examples"] = [{"code": r["source"][:120], "reference": r["target"], "prediction": pr}
                                     for r, pr in zip(test[:3], predictions[:3])]
    print(f"\n| system | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU |   ({len(test)} test functions)\n|---|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['rouge1']:.1f} | {s['rouge2']:.1f} | {s['rougeL']:.1f} | {s['bleu']:.1f} |")
    for name, s in results.items():
        for ex in s.get("examples", []):
            print(f"{name}: {ex['reference']!r} -> {ex['prediction']!r}")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
