"""`lmforge eval`: perplexity, multiple-choice, classification, generation and regression tasks.

    multiple_choice / classification   each choice scored by the log-likelihood of " choice" after the prompt;
                                       acc, acc_norm (log-likelihood / characters of the choice, as the harness);
                                       accuracy, macro-F1, MCC (GLUE)
    generate                           greedy decoding until a stop sequence; exact match, SQuAD F1,
                                       BLEU (sacrebleu: corpus level, 13a, exp smoothing), ROUGE-1/2/L (rouge-score)
    regression                         the first number in the generated text; Pearson and Spearman (GLUE)
    perplexity                         sliding windows of the context length, every `stride` tokens (the
                                       standard recipe): perplexity and bits per byte

Requests are batched by length; results are a table and a JSON file with the model, task versions,
seeds and timings.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.loglikelihood import harness_encode, loglikelihoods, score_tokens
from lmforge.eval.metrics import bleu, classification_metrics, pearson, rouge, spearman, squad_f1
from lmforge.eval.tasks import Task
from lmforge.model.gpt import GPT
from lmforge.utils import atomic_write_json, warn

# -- sliding-window perplexity ----------------------------------------------------------------------


def sliding_windows(ids: list[int], window: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, new tokens) of each window over ``ids``: windows of ``window`` tokens start every ``stride``
    (default: half a window, so every token is predicted from at least half a window of context); each
    scores only the tokens earlier windows did not, so every token but the first is scored once (the
    recipe of transformers' perplexity guide)."""
    stride = min(stride or window // 2, window)
    requests, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        first = max(prev_end, begin + 1)  # tokens before prev_end were scored by earlier windows
        if end > first:
            requests.append((ids[begin:first], ids[first:end]))
        prev_end = end
        if end == len(ids):
            break
    return requests


def rolling_nll(model, sequences: list, stride: int | None = None, window: int | None = None, batch_size: int = 16,
                progress: bool = False) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of predicted tokens) over token sequences, each in
    ``sliding_windows`` of ``window`` tokens (default: the model's context), all batched through the
    log-likelihood scorer. Models without a context limit (n-gram, LSTM baselines) score each whole sequence."""
    if hasattr(model, "sequence_nll"):
        results = [model.sequence_nll(np.asarray(ids)) for ids in sequences]
        return sum(nll for nll, _ in results), sum(n for _, n in results)
    window = window or model.config.block_size
    requests = [w for ids in sequences for w in sliding_windows(np.asarray(ids, dtype=np.int64).tolist(), window, stride)]
    scores = score_tokens(model, requests, batch_size, progress=progress, desc="perplexity") if requests else []
    return -sum(score for score, _ in scores), sum(len(continuation) for _, continuation in requests)


def perplexity_metrics(nll: float, n_tokens: int, n_bytes: int, what: str) -> dict:
    """Perplexity and bits per byte from a summed negative log-likelihood. Over zero predicted tokens there
    is nothing to average: that is an error (naming ``what``), never a perplexity of 1."""
    if n_tokens == 0 or n_bytes == 0:
        raise LmforgeError(f"{what} has no token to predict (it needs at least two tokens of text); "
                           "give it more text")
    return {"perplexity": math.exp(nll / n_tokens), "bits_per_byte": nll / math.log(2) / n_bytes}


def perplexity_of(model, token_ids, n_bytes: int, stride: int | None = None, progress: bool = False,
                  what: str = "the text") -> dict:
    nll, n = rolling_nll(model, [token_ids], stride, progress=progress)
    return {**perplexity_metrics(nll, n, n_bytes, what), "tokens": n, "bytes": n_bytes}


_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")  # (".5" is 0.5, not 5)


# -- running tasks ------------------------------------------------------------------------------------


def run_task(model, tokenizer, task: Task, batch_size: int = 16, stride: int | None = None, progress: bool = True) -> dict:
    """Score one task; returns its metrics and what was run."""
    started = time.perf_counter()
    if task.type in ("multiple_choice", "classification"):
        metrics = _choice_task(model, tokenizer, task, batch_size, progress)
    elif task.type in ("generate", "regression"):
        metrics = _generation_task(model, tokenizer, task, batch_size, progress)
    else:
        texts = [str(d[task.text_field]) for d in task.docs]
        # (each text as transformers' perplexity recipe encodes it, tokenizer(text): Llama's <s> first, and then its
        # first token is predicted too; without such a token the first is not, and its bytes are not counted)
        sequences = [tokenizer.encode_prompt(t) for t in texts]
        nll, n = rolling_nll(model, sequences, stride, batch_size=batch_size, progress=progress)
        unscored = sum(len(tokenizer.token_bytes(ids[0])) for ids in sequences if ids and not tokenizer.prefix_ids)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts) - unscored
        metrics = perplexity_metrics(nll, n, n_bytes, f"task {task.name} ({task.source})")
        metrics = {k: v for k, v in metrics.items() if k in task.metrics}
    return {"version": task.version, "type": task.type, "source": task.source, "examples": len(task.docs),
            "shots": task.fewshot, "seed": task.seed, "metrics": metrics, "seconds": round(time.perf_counter() - started, 3)}


def _choice_task(model, tokenizer, task: Task, batch_size: int, progress: bool) -> dict:
    requests, spans, targets, lengths = [], [], [], []
    for i, doc in enumerate(task.docs):
        context, choices = task.context(i), task.choices_of(doc)
        spans.append((len(requests), len(choices)))
        targets.append(task.target_index(doc))
        for choice in choices:
            requests.append((context, task.target_delimiter + choice))
            lengths.append(len(choice))  # (characters, as lm-evaluation-harness's acc_norm)
    scores = loglikelihoods(model, tokenizer, requests, batch_size, progress=progress, desc=task.name)
    predictions, normalized = [], []
    for start, n in spans:
        s = scores[start : start + n]
        predictions.append(int(np.argmax(s)))
        normalized.append(int(np.argmax([v / max(lengths[start + j], 1) for j, v in enumerate(s)])))
    out = {}
    if "acc" in task.metrics:
        out["acc"] = float(np.mean([p == t for p, t in zip(predictions, targets)]))
    if "acc_norm" in task.metrics:
        out["acc_norm"] = float(np.mean([p == t for p, t in zip(normalized, targets)]))
    if task.type == "classification":
        # (macro-F1 over the labels that occur, in the references or the predictions: scikit-learn's default)
        metrics = classification_metrics(predictions, targets, sorted(set(predictions) | set(targets)))
        out.update({k: v for k, v in metrics.items() if k in task.metrics})
    return out


def _generation_task(model, tokenizer, task: Task, batch_size: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from lmforge.infer.engine import Engine, fit_source
    from lmforge.infer.generate import SamplingParams, fit_prompt

    answers = [task.references_of(d) for d in task.docs]  # (one or more right answers each)
    references = [refs[0] for refs in answers]
    cut = [r for refs in answers for r in refs if any(stop in task.target_delimiter + r for stop in task.until)]
    if cut:
        warn(f"task {task.name}: a stop sequence ({', '.join(map(repr, task.until))}) occurs in {len(cut)} of its "
             f"answers (first: {task.target_delimiter + cut[0]!r}); generation stops there, so those cannot match")
    # (special tokens the model writes are left out of its answer, as the harness's hf model decodes it)
    params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0, stop=list(task.until),
                            skip_special_tokens=True)
    engine = Engine(model, tokenizer, max_batch=min(batch_size, len(task.docs)))  # (rows are allocated up front)
    fit = fit_prompt if isinstance(model, GPT) else fit_source  # an encoder-decoder's prompt is its source
    contexts = [task.context(i) for i in range(len(task.docs))]
    # Longest prompts first: similar lengths decode side by side.
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    requests, truncated = {}, 0
    for i in order:
        # (a decoder's prompt as lm-evaluation-harness encodes it; an encoder-decoder's source as it is)
        ids = (harness_encode(tokenizer, contexts[i]) if fit is fit_prompt else tokenizer.encode(contexts[i])) \
            or [tokenizer.eos_id]
        fitted = fit(ids, params.max_new_tokens, model.config.block_size, True,
                     **({"say": False} if fit is fit_prompt else {"eos": tokenizer.eos_id, "say": False}))
        appended = fit is fit_source and tokenizer.eos_id is not None and ids[-1] != tokenizer.eos_id
        truncated += len(fitted) < len(ids) + appended
        requests[i] = engine.add(fitted, params)
    if truncated:
        warn(f"task {task.name}: {truncated} of its {len(contexts)} prompts did not fit the model's context with "
             f"{params.max_new_tokens} new tokens and were left-truncated (their beginning dropped)")
    bar = tqdm(total=len(requests), desc=task.name, unit="ex", disable=not progress)
    done = 0
    while engine.has_work:
        engine.step()
        now = sum(r.finished for r in requests.values())
        bar.update(now - done)
        done = now
    bar.close()
    predictions = [requests[i].sequences[0].text.strip() for i in range(len(contexts))]
    out = {}
    if task.type == "regression":
        guesses = [float(m.group()) if (m := _NUMBER.search(p)) else 0.0 for p in predictions]
        truth = [float(r) for r in references]
        unread = sum(_NUMBER.search(p) is None for p in predictions)
        if unread:
            warn(f"task {task.name}: {unread} of its {len(predictions)} answers hold no number and count as 0.0")
        flat = [f"{name} are all {values[0]:g}" for name, values in (("the model's answers", guesses),
                                                                       ("the references", truth)) if len(set(values)) == 1]
        if flat and set(task.metrics) & {"pearson", "spearman"}:
            warn(f"task {task.name}: {' and '.join(flat)}: a correlation with a constant is undefined (SciPy gives "
                 f"NaN); reported as 0.0")
        if "pearson" in task.metrics:
            out["pearson"] = pearson(guesses, truth)
        if "spearman" in task.metrics:
            out["spearman"] = spearman(guesses, truth)
        return out
    # several right answers (a list target): the best match counts, as SQuAD's and sacrebleu's multi-reference scores
    if "exact_match" in task.metrics:
        out["exact_match"] = float(np.mean([p in refs for p, refs in zip(predictions, answers)]))
    if "f1" in task.metrics:
        out["f1"] = float(np.mean([squad_f1(p, refs) for p, refs in zip(predictions, answers)]))
    if "bleu" in task.metrics:
        out["bleu"] = bleu(predictions, answers)
    if "rouge" in task.metrics:
        out.update(rouge(predictions, answers))
    out["samples"] = [{"prompt": contexts[i], "prediction": predictions[i],
                       "reference": answers[i][0] if len(answers[i]) == 1 else answers[i]}
                      for i in range(min(3, len(contexts)))]
    return out


def evaluate(models: str | os.PathLike | list, tasks: list[Task] = (), data: str | os.PathLike | None = None,
             split: str = "val", batch_size: int = 16, stride: int | None = None, max_tokens: int | None = None,
             progress: bool = True, out: str | os.PathLike | None = None, dtype: str = "auto",
             device: str = "auto") -> dict:
    """With ``data`` (a prepared-data folder), the perplexity of every model in ``models`` on its ``split``
    (Transformers beside n-gram and LSTM baselines, on the same tokens); ``tasks`` on the first model.
    Models run on ``device`` (auto: CUDA when present; n-gram baselines on the CPU). Returns (and with
    ``out`` saves) the results."""
    from lmforge import __version__
    from lmforge.model.checkpoint import load_generator, load_tokenizer_for, resolve_model_dir
    from lmforge.utils import pick_device

    if not isinstance(models, (str, os.PathLike, list, tuple)) or \
            not all(isinstance(m, (str, os.PathLike)) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)):
        raise LmforgeError(f"evaluate takes model, run or baseline folders (paths), not {type(models).__name__}")
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    if isinstance(tasks, str) or any(isinstance(t, str) for t in tasks):  # names and task files, as --tasks takes
        from lmforge.eval.tasks import resolve_tasks

        names = [t for t in tasks.split(",") if t] if isinstance(tasks, str) else [t for t in tasks if isinstance(t, str)]
        tasks = [t for t in ([] if isinstance(tasks, str) else tasks) if not isinstance(t, str)] + resolve_tasks(names)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise LmforgeError(f"batch_size must be a whole number, not {batch_size!r}")
    if not models:
        raise LmforgeError("pass --model (a model folder, a run folder, or an n-gram/LSTM baseline folder)")
    if not tasks and data is None:
        raise LmforgeError("nothing to evaluate: pass --tasks (built-in names or YAML files), --text FILE or --data DIR")
    if len(models) > 1 and data is None:
        raise LmforgeError("several --model are compared on a prepared split: add --data DIR")
    if batch_size < 1 or (stride is not None and stride < 1):
        raise LmforgeError("--batch-size and --stride must be at least 1")
    for task in tasks:
        task.check()
    device = pick_device(device)
    earlier = read_earlier_results(out) if out else None
    # Absolute: results accumulate per model, whatever folder the command was run from.
    results = {"model": str(resolve_model_dir(models[0]).resolve()), "lmforge_version": __version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if data is not None:
        rows = compare_on_split(models, data, split, stride, max_tokens, progress, dtype, device)
        results["perplexity"] = {"data": str(data), "split": split, "models": rows}
    results["tasks"] = {}
    if tasks:
        from lmforge.eval.baselines import transformer_dtype
        from lmforge.utils import warn

        if len(models) > 1:
            warn(f"the tasks run on the first --model only ({models[0]}); the others are compared on --data")
        from lmforge.model.gpt import use_fast_kernels

        model = load_generator(models[0], device, dtype=transformer_dtype(models[0], dtype, device),
                               needs="it predicts no next token, which tasks score (a decoder or an encoder-decoder)")
        use_fast_kernels(model, batch_size)  # the kernels measured fastest on this CPU (silent: results stay the same)
        scored = [t.name for t in tasks if t.type not in ("generate", "regression")]
        if not isinstance(model, GPT) and scored:
            raise LmforgeError(f"{models[0]} is an encoder-decoder (t5): it is evaluated on generation tasks (bleu, "
                               f"rouge, exact_match, ...) so far, not on {', '.join(scored)}")
        tokenizer = load_tokenizer_for(model)
        for task in tasks:
            results["tasks"][task.name] = run_task(model, tokenizer, task, batch_size, stride, progress)
    if earlier is not None:
        results = merge_earlier(earlier, results)
    if out:
        atomic_write_json(out, results)
    return results


def read_earlier_results(out: str | os.PathLike) -> dict | None:
    """The results file already at ``out`` (None when there is none), checked before any model work: a
    file that is not lmforge's results is refused rather than overwritten."""
    from lmforge.utils import read_json

    path = Path(out)
    if not path.exists():
        return None
    if path.is_dir():
        raise LmforgeError(f"--out {path} is a folder; give a .json file path")
    try:
        earlier = read_json(path, "earlier evaluation results")
    except LmforgeError:  # (not JSON at all: some other file)
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("tasks"), dict) or "model" not in earlier:
        raise LmforgeError(f"{path} exists and is not lmforge evaluation results; choose another --out")
    return earlier


def merge_earlier(earlier: dict, results: dict) -> dict:
    """Results of one model accumulate: tasks (and the perplexity comparison) not run this time are kept from
    ``earlier`` and listed under ``kept_from_earlier``. Results of another model (say, an earlier checkpoint of
    the run) are replaced, and ``replaced`` names that model."""
    if earlier["model"] != results["model"]:
        return {**results, "replaced": earlier["model"]}
    merged = {**results, "tasks": {**earlier["tasks"], **results["tasks"]}}
    kept = [name for name in earlier["tasks"] if name not in results["tasks"]]
    if "perplexity" not in results and "perplexity" in earlier:
        merged["perplexity"] = earlier["perplexity"]
        kept.insert(0, "perplexity")
    if kept:
        merged["kept_from_earlier"] = kept
    return merged


def format_results(results: dict) -> str:
    """The perplexity comparison (if any) and the task scores, as Markdown tables."""
    parts = []
    if "perplexity" in results:
        p = results["perplexity"]
        parts.append(f"Perplexity on {p['data']} ({p['split']} split):\n\n" + format_comparison(p["models"]))
    if results["tasks"]:
        lines = [f"Tasks, {results['model']}:", "", "| task | version | shots | examples | metric | value |",
                 "|---|---|---:|---:|---|---:|"]
        for name, r in results["tasks"].items():
            for metric, value in r["metrics"].items():
                if isinstance(value, (int, float)):
                    lines.append(f"| {name} | {r['version']} | {r['shots']} | {r['examples']} | {metric} | {value:.4f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# -- perplexity of several models on one prepared split -------------------------------------------------


def compare_on_split(model_paths: list[str], data_dir: str, split: str = "val", stride: int | None = None,
                     max_tokens: int | None = None, progress: bool = False, dtype: str = "auto",
                     device: str | torch.device = "cpu") -> list[dict]:
    """Perplexity and bits per byte of each model (Transformers and n-gram / LSTM baselines) on the same tokens."""
    from lmforge.data.loader import TokenSplit
    from lmforge.eval.baselines import load_any

    data = TokenSplit(data_dir, split)
    tokens = np.concatenate([np.asarray(s) for s in data.shards]).astype(np.int64) if data.shards else np.zeros(0, np.int64)
    if max_tokens is not None:
        if max_tokens < 2:
            raise LmforgeError(f"--max-tokens {max_tokens} leaves nothing to score; give at least 2")
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise LmforgeError(f"the {split} split of {data_dir} has {len(tokens)} tokens: nothing to score; "
                           f"prepare it with a larger --val-fraction or evaluate another --split")
    n_bytes = int(round(len(tokens) * data.bytes_per_token))
    check_tokenizers(model_paths, data_dir)
    rows = []
    for path in model_paths:
        model, kind = load_any(path, dtype, device)
        if kind.startswith("Transformer"):
            from lmforge.model.gpt import use_fast_kernels

            use_fast_kernels(model, 16)  # (windows of many rows: the kernels measured fastest for the most rows)
        if getattr(model, "config", None) is not None and getattr(model.config, "vocab_size", 10**9) < data.meta["tokenizer"]["vocab_size"]:
            raise LmforgeError(f"{path} has a smaller vocabulary than the data's tokenizer; evaluate models trained on it")
        started = time.perf_counter()
        result = perplexity_of(model, tokens, n_bytes, stride, progress, what=f"the {split} split of {data_dir}")
        if hasattr(model, "order"):
            context = f"the {model.order - 1} tokens before"
        elif hasattr(model, "sequence_nll"):
            context = "all earlier tokens"
        else:
            block = model.config.block_size
            context = f"windows of {block}, stride {min(stride or block // 2, block)}"
        rows.append({"model": str(path), "kind": kind, "context": context, **result,
                     "seconds": round(time.perf_counter() - started, 2)})
    return rows


def check_tokenizers(model_paths: list[str], data_dir) -> None:
    """Refuse, before any model work, a model whose tokenizer is not the one the data was prepared with: its
    perplexity would be over other tokens (or its ids would mean other text), a number that compares with nothing."""
    from lmforge.model.checkpoint import resolve_model_dir
    from lmforge.tokenizer import Tokenizer

    from lmforge.utils import read_json

    data_tokenizer = Tokenizer.load(data_dir)
    for path in model_paths:
        folder = resolve_model_dir(path)
        kind = read_json(folder / "config.json", "model config").get("model_type") \
            if (folder / "config.json").exists() else None
        if kind == "t5":  # (said first: no data would give it a perplexity here)
            raise LmforgeError(f"{path} is an encoder-decoder (t5): perplexity on --data is a decoder's (or a "
                               f"baseline's); evaluate it on --tasks")
        if kind == "bert":
            raise LmforgeError(f"{path} is an encoder (bert): `lmforge eval` scores decoders and encoder-decoders; an "
                               f"encoder's held-out loss and accuracy are in the metrics of the run that trained it "
                               f"(`lmforge report RUN`)")
        if not (folder / "tokenizer.json").exists():
            continue
        if not Tokenizer.load(folder).tokenizes_as(data_tokenizer):
            raise LmforgeError(f"{path} has another tokenizer than the one {data_dir} was prepared with, so its "
                               f"perplexity there would be over other tokens; prepare the data with its tokenizer "
                               f"(`lmforge prepare --tokenizer {folder}`)")


def format_comparison(rows: list[dict]) -> str:
    lines = ["| model | kind | context | perplexity | bits per byte | tokens |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kind']} | {r['context']} | {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} "
                     f"| {r['tokens']:,} |")
    return "\n".join(lines)
