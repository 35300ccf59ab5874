"""Few-shot prompting and in-context classification (`lmforge classify`).

A prompt is a task description, k demonstrations and the query, each rendered with a template
(default ``Input: {text}\\nOutput: {label}``). Each label is scored by the log-likelihood of its
continuation after the query's ``Output:``; the highest wins. K = 0 is zero-shot.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from lmforge.data.examples import read_examples
from lmforge.errors import LmforgeError
from lmforge.eval.loglikelihood import loglikelihoods
from lmforge.eval.metrics import classification_metrics

DEFAULT_TEMPLATE = "Input: {text}\nOutput: {label}"
SELECTIONS = ("random", "first", "balanced")


def choose_demonstrations(pool: list[dict], k: int, selection: str, seed: int, exclude: int | None = None,
                          also: frozenset = frozenset()) -> list[dict]:
    """k examples from ``pool`` (never the one at ``exclude``, nor those at ``also``): random with a seed, the
    first k, or balanced (labels take turns, in order of first appearance)."""
    if selection not in SELECTIONS:
        raise LmforgeError(f"unknown demonstration selection {selection!r}; use {', '.join(SELECTIONS)}")
    candidates = [i for i in range(len(pool)) if i != exclude and i not in also]
    if k <= 0:
        return []
    if selection == "first":
        picked = candidates[:k]
    elif selection == "random":
        if seed < 0:
            raise LmforgeError(f"--seed {seed} must be 0 or more")
        rng = np.random.default_rng([seed] if exclude is None else [seed, exclude])
        picked = [candidates[i] for i in rng.permutation(len(candidates))[:k]]
    else:
        by_label: dict = defaultdict(list)
        for i in candidates:
            by_label[str(pool[i]["label"])].append(i)
        queues = list(by_label.values())
        picked = []
        while len(picked) < k and any(queues):
            for q in queues:
                if q and len(picked) < k:
                    picked.append(q.pop(0))
    return [pool[i] for i in picked]


def build_prompt(demonstrations: list[dict], query_text: str, template: str = DEFAULT_TEMPLATE,
                 description: str = "", separator: str = "\n\n") -> tuple[str, str]:
    """(prompt up to the label, what goes between it and the label). The label slot is ``{label}``."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise LmforgeError(f"the few-shot template is not a format string ({e}); write {{{{ and }}}} for braces") from None
    if not {"text", "label"} <= fields:  # ("{{text}}" is the text "{text}" written out, not the slot)
        raise LmforgeError("a few-shot template needs both {text} and {label} (single braces: {{text}} is written "
                           "out as it is)")
    if fields - {"text", "label"}:
        raise LmforgeError(f"a few-shot template takes {{text}} and {{label}} only, not "
                           f"{', '.join('{' + f + '}' for f in sorted(fields - {'text', 'label'}))}; write {{{{ and }}}} "
                           f"for braces")
    # (where the {label} slot is: "{{label}}" before it is the text "{label}", not the slot)
    pieces = list(string.Formatter().parse(template))
    slot = next(i for i, (_, name, _, _) in enumerate(pieces) if name == "label")
    if any(literal.strip() or name is not None for literal, name, _, _ in pieces[slot + 1:]):
        raise LmforgeError("in a few-shot template, {label} must come last")
    before = "".join(literal.replace("{", "{{").replace("}", "}}") + ("" if name is None else "{" + name + (
        "!" + conv if conv else "") + (":" + spec if spec else "") + "}") for literal, name, spec, conv in pieces[:slot])
    before += pieces[slot][0].replace("{", "{{").replace("}", "}}")
    parts = [description] if description else []
    parts += [template.format(text=d["text"], label=d["label"]) for d in demonstrations]
    query = before.format(text=query_text)
    # Trailing spaces belong to the label's continuation: " positive" is how the model sees the word.
    stripped = query.rstrip(" ")
    parts.append(stripped)
    return separator.join(parts), query[len(stripped):]


def classify(model, tokenizer, data: str | os.PathLike, labels: list[str], shots: int = 0, selection: str = "random",
             seed: int = 0, template: str = DEFAULT_TEMPLATE, description: str = "", demos: str | None = None,
             skip_bad_lines: bool = False) -> dict:
    """Score every example of ``data`` (classification JSONL/CSV/Parquet) by label log-likelihood. An example
    is never shown as a demonstration to itself (from ``demos``: no demonstration with the query's text)."""
    from lmforge.utils import warn

    if len(labels) < 2:
        raise LmforgeError("pass at least two labels, e.g. --labels positive,negative")
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise LmforgeError(f"--labels lists {', '.join(map(repr, twice))} more than once; list each label once")
    if shots < 0:
        raise LmforgeError(f"--shots {shots} must be 0 or more")
    files = [(data, read_examples(data, "classification", skip_bad_lines))]
    if demos:
        files.append((demos, read_examples(demos, "classification", skip_bad_lines)))
    for n, (path, examples) in enumerate(files):
        if examples.skipped:
            warn(f"skipped {examples.skipped} malformed line(s) of {path} (lines {examples.skipped_lines[:5]}"
                 f"{' ...' if examples.skipped > 5 else ''})")
        unknown = sorted({str(r["label"]) for r in examples.rows} - set(labels))
        if unknown:
            what = "the data" if n == 0 else f"the demonstrations ({path})"
            raise LmforgeError(f"{what} has labels {', '.join(unknown)} that --labels does not list")
    rows = files[0][1].rows
    pool = files[1][1].rows if demos else rows
    by_text: dict = defaultdict(set)  # (a demonstrations file, or the data, may hold a query's text again)
    for j, d in enumerate(pool):
        by_text[d["text"]].add(j)
    # an example is never its own demonstration, nor one with its text
    available = min((len(pool) - len(by_text[r["text"]] | ({i} if pool is rows else set())) for i, r in enumerate(rows)),
                    default=len(pool))
    if shots > available:
        warn(f"--shots {shots}, but only {available} demonstration(s) to choose from: each prompt shows {available}")
        shots = available
    unused = [label for label in labels if all(str(r["label"]) != label for r in rows)]
    if unused:
        warn(f"--labels {', '.join(unused)}: in none of the examples; macro-F1 averages over the labels in the "
             f"examples or the answers")
    requests, prompts = [], []
    for i, row in enumerate(rows):
        shown = choose_demonstrations(pool, shots, selection, seed, exclude=i if pool is rows else None,
                                      also=frozenset(by_text.get(row["text"], ())))
        prompt, gap = build_prompt(shown, row["text"], template, description)
        prompts.append(prompt)
        requests += [(prompt, gap + label) for label in labels]
    scores = loglikelihoods(model, tokenizer, requests)
    predictions = [labels[int(np.argmax(scores[i * len(labels) : (i + 1) * len(labels)]))] for i in range(len(rows))]
    references = [str(r["label"]) for r in rows]
    return {
        "shots": shots,
        "examples": len(rows),
        **classification_metrics(predictions, references),
        # confusion[true][predicted]: a model that answers one label for everything shows as one full column
        "confusion": {t: {p: sum(r == t and q == p for r, q in zip(references, predictions)) for p in labels}
                      for t in labels},
        "predictions": predictions,
        "first_prompt": prompts[0] if prompts else "",
    }
