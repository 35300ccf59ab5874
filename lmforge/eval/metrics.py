"""Evaluation metrics: classification and regression (the GLUE conventions), extractive QA (SQuAD's),
BLEU and ROUGE (computed by sacrebleu and rouge-score)."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np


def _require_items(references: Sequence) -> int:
    """A metric over zero examples is undefined: a loud error, never a silent 0 or 1."""
    if len(references) == 0:
        raise ValueError("a metric over zero examples is undefined; there is nothing to score")
    return len(references)


def accuracy(predictions: Sequence, references: Sequence) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / _require_items(references)


def macro_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: every class seen in either list)."""
    _require_items(references)
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / _require_items(scores)


def matthews_corrcoef(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation, multi-class form (Gorodkin, 2004); 0 when undefined."""
    labels = sorted(set(references) | set(predictions), key=str)
    confusion = collections.Counter(zip(references, predictions))
    n = _require_items(references)
    correct = sum(confusion[(k, k)] for k in labels)
    true_counts = [sum(confusion[(k, j)] for j in labels) for k in labels]
    pred_counts = [sum(confusion[(j, k)] for j in labels) for k in labels]
    cov_ytyp = correct * n - sum(t * p for t, p in zip(true_counts, pred_counts))
    cov_ypyp = n * n - sum(p * p for p in pred_counts)
    cov_ytyt = n * n - sum(t * t for t in true_counts)
    denominator = math.sqrt(cov_ytyt * cov_ypyp)
    return cov_ytyp / denominator if denominator else 0.0


def classification_metrics(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> dict:
    return {
        "accuracy": accuracy(predictions, references),
        "macro_f1": macro_f1(predictions, references, labels),
        "mcc": matthews_corrcoef(predictions, references),
    }


# -- SQuAD (the official evaluation script's answer normalisation) ---------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles (a, an, the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, answers: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer."""

    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = collections.Counter(p) & collections.Counter(g)
        overlap = sum(common.values())
        if not p or not g:
            return float(p == g)
        if overlap == 0:
            return 0.0
        precision, recall = overlap / len(p), overlap / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, a) for a in answers)


def squad_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    n = _require_items(predictions)
    return {
        "exact_match": 100.0 * sum(squad_exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        "f1": 100.0 * sum(squad_f1(p, a) for p, a in zip(predictions, answers)) / n,
    }


# -- generation (the reference libraries' own numbers) and regression (the GLUE conventions) ---------


def _reference_lists(references: list) -> list[list[str]]:
    """Each prediction's references: a string is one, a list several."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(predictions: list[str], references: list) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenisation, exp smoothing). ``references``: one string per
    prediction, or a list of them (several references; rows with fewer are padded as sacrebleu asks, with None)."""
    import sacrebleu

    lists = _reference_lists(references)
    width = max((len(refs) for refs in lists), default=1)
    streams = [[refs[k] if k < len(refs) else None for refs in lists] for k in range(width)]
    return sacrebleu.corpus_bleu(predictions, streams).score


def rouge(predictions: list[str], references: list) -> dict:
    """Mean ROUGE-1/2/L F-measures (×100) with rouge-score; with several references per prediction, the best of
    each (rouge-score's ``score_multi``)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    lists = _reference_lists(references)
    scores = [scorer.score(refs[0], p) if len(refs) == 1 else scorer.score_multi(refs, p)
              for p, refs in zip(predictions, lists)]
    n = _require_items(scores)
    unread = sum(not re.search(r"[a-z0-9]", r.lower()) and bool(r.strip()) for refs in lists for r in refs)
    if unread:  # rouge-score's tokenizer keeps ASCII letters and digits only
        from lmforge.utils import warn

        warn(f"{unread} of {n} reference(s) have no ASCII letter or digit, which is all rouge-score reads: ROUGE "
             f"scores them 0 whatever the answer (BLEU reads them)")
    return {k: 100 * sum(s[k].fmeasure for s in scores) / n for k in ("rouge1", "rouge2", "rougeL")}


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    _require_items(x)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator else 0.0


def _ranks(values) -> np.ndarray:
    """Ranks with ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, float)
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))
