"""Log-likelihood scoring throughput: lmforge vs lm-evaluation-harness's own `hf` model, on the same
model folder and the same multiple-choice task, measured in one process.

    python bench/bench_eval.py                         # tiny and gpt2 shapes (about 10 minutes on 2 cores)
    python bench/bench_eval.py --shapes tiny --docs 50

The task is HellaSwag-shaped and made of real text: each question is ``--context`` characters of a
standard-library module; its four choices are the true next ``--choice`` characters and three passages
from elsewhere. The model (random weights, saved by lmforge as a Hugging Face GPT-2 folder with its
tokenizer) is loaded by both systems before timing; each runs the task through `lm_eval.simple_evaluate`.

Reported: requests/s inside the model's ``loglikelihood`` (the part a backend controls; the harness's
own task building and metrics are the same for both) and end to end; the largest difference between the
two systems' per-request log-likelihoods, and both accuracies, so that speed is not bought with
different numbers; and lmforge's own `lmforge eval` on the same data. Systems alternate, best of
``--repeats``. ``--batch-size`` is requests per forward pass for `hf`; for lmforge a batch is rows (a row
holds a question's context and all its choices), so lmforge runs at batch-size / 4 rows: the same
requests per pass.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.data.corpus import stdlib_root  # noqa: E402
from lmforge.utils import hardware_description  # noqa: E402

TASK = "bench_stdlib_mc"
SOURCES = ["argparse.py", "difflib.py", "textwrap.py", "tokenize.py", "inspect.py", "pathlib.py", "statistics.py",
           "json/decoder.py", "json/encoder.py", "shlex.py", "heapq.py", "string.py"]


def make_task(folder: Path, docs: int, context: int, choice: int, seed: int = 0) -> tuple[Path, Path]:
    """The task's JSONL data, its harness YAML folder and lmforge's YAML for the same data."""
    rng = random.Random(seed)
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in SOURCES]

    def lines(text: str, at: int, n_chars: int) -> tuple[str, int]:
        """Whole lines from the line after ``at``, at least ``n_chars`` of them (questions break where real
        ones do, so the context's tokens are a prefix of the whole text's, for both systems)."""
        start = text.index("\n", at) + 1
        end = text.find("\n", start + n_chars)
        return text[start : end + 1], end + 1

    rows = []
    while len(rows) < docs:
        text = rng.choice(texts)
        prompt, end = lines(text, rng.randrange(0, len(text) - 4 * (context + choice)), context)
        true, _ = lines(text, end - 1, choice)
        others = []
        while len(others) < 3:
            t = rng.choice(texts)
            others.append(lines(t, rng.randrange(0, len(t) - 4 * choice), choice)[0])
        answer = rng.randrange(4)
        choices = others[:answer] + [true] + others[answer:]
        if len(set(choices)) == 4:
            rows.append({"context": prompt, "choices": choices, "answer": answer})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    harness = folder / "harness"
    harness.mkdir()
    (harness / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    ours = folder / "ours.yaml"
    ours.write_text(f"task: {TASK}\ntype: multiple_choice\ndata: {data}\nprompt: '{{{{ context }}}}'\n"
                    "choices: '{{ choices }}'\ntarget: '{{ answer }}'\ntarget_delimiter: ''\nmetrics: [acc]\n")
    return harness, ours


def make_model(folder: Path, shape: str, tokenizer_dir: Path) -> Path:
    from lmforge.model.checkpoint import save_model
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = build_model(Config.from_preset(shape)).eval()
    return save_model(model, folder, Tokenizer.load(tokenizer_dir))


class Timed:
    """Wraps an lm_eval model: the seconds spent in its ``loglikelihood`` and the requests it scored."""

    def __init__(self, lm):
        self.lm, self.seconds, self.requests = lm, 0.0, 0
        inner = lm.loglikelihood

        def loglikelihood(requests, *args, **kwargs):
            started = time.perf_counter()
            out = inner(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.requests += len(requests)
            return out

        lm.loglikelihood = loglikelihood


def run_harness(timed: Timed, harness_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    timed.seconds, timed.requests = 0.0, 0
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(model=timed.lm, tasks=[TASK], num_fewshot=0, log_samples=True,
                                      task_manager=TaskManager(include_path=str(harness_dir), include_defaults=False))
    total = time.perf_counter() - started
    scores = [[float(r[0][0]) for r in s["resps"]] for s in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]
    return {"seconds": timed.seconds, "total": total, "requests": timed.requests, "scores": scores,
            "acc": results["results"][TASK]["acc,none"]}


def bench_shape(shape: str, args, work: Path, tokenizer_dir: Path) -> list[tuple]:
    import lm_eval.models.huggingface  # noqa: F401

    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.evaluate import run_task
    from lmforge.eval.harness import LmforgeLM
    from lmforge.eval.tasks import load_task_file
    from lmforge.model.checkpoint import load_decoder, load_tokenizer_for

    folder = make_model(work / shape, shape, tokenizer_dir)
    harness_dir, ours_yaml = make_task(Path(tempfile.mkdtemp(dir=work)), args.docs, args.context, args.choice)
    hf = Timed(HFLM(pretrained=str(folder), batch_size=args.batch_size, device="cpu", dtype="float32"))
    ours = Timed(LmforgeLM(pretrained=str(folder), batch_size=max(1, args.batch_size // 4), device="cpu"))
    model = load_decoder(folder).eval()
    tokenizer, task = load_tokenizer_for(model), load_task_file(ours_yaml)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate, so drifting machine state hits both alike
        for name, timed in (("hf", hf), ("lmforge", ours)):
            r = run_harness(timed, harness_dir)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
        started = time.perf_counter()
        own = run_task(model, tokenizer, task, batch_size=max(1, args.batch_size // 4), progress=False)
        seconds = time.perf_counter() - started
        if "own" not in best or seconds < best["own"]["seconds"]:
            best["own"] = {"seconds": seconds, "acc": own["metrics"]["acc"], "requests": 4 * args.docs}
    h, o = best["hf"], best["lmforge"]
    diff = max(abs(a - b) for x, y in zip(h["scores"], o["scores"]) for a, b in zip(x, y))
    base = h["requests"] / h["seconds"]
    rows = [
        (shape, "lm-eval `hf` model", h["requests"] / h["seconds"], h["requests"] / h["total"], h["acc"], ""),
        (shape, "lm-eval `lmforge` model", o["requests"] / o["seconds"], o["requests"] / o["total"], o["acc"],
         f"{o['requests'] / o['seconds'] / base:.2f}x"),
        (shape, "`lmforge eval`", best["own"]["requests"] / best["own"]["seconds"], None, best["own"]["acc"],
         f"{best['own']['requests'] / best['own']['seconds'] / base:.2f}x"),
    ]
    print(f"{shape}: {h['requests']} requests; largest per-request log-likelihood difference hf vs lmforge: {diff:.2e}",
          flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--docs", type=int, default=100, help="questions (4 requests each)")
    parser.add_argument("--context", type=int, default=400, help="characters of context per question")
    parser.add_argument("--choice", type=int, default=100, help="characters per choice")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import lm_eval
    import transformers

    from lmforge.tokenizer import train_tokenizer

    print(f"machine: {hardware_description(torch.device('cpu'))}; "
          f"transformers {transformers.__version__}, lm_eval {lm_eval.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer_dir = work / "tokenizer"
        train_tokenizer([str(stdlib_root() / name) for name in SOURCES], tokenizer_dir, vocab_size=8192, progress=False)
        rows = []
        for shape in args.shapes.split(","):
            rows += bench_shape(shape, args, work, tokenizer_dir)
    print()
    print("| shape | system | requests/s in loglikelihood | requests/s end to end | acc | vs `hf` |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, system, scoring, total, acc, ratio in rows:
        total_cell = f"{total:,.1f}" if total is not None else ""
        print(f"| {shape} | {system} | {scoring:,.1f} | {total_cell} | {acc:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
