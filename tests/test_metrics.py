import random

import pytest

from lmforge.eval.metrics import (accuracy, macro_f1, matthews_corrcoef, normalize_answer, squad_exact_match, squad_f1,
                                  squad_metrics)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_scikit_learn(seed):
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    labels = ["a", "b", "c"][: 2 + seed % 2]
    refs = [rng.choice(labels) for _ in range(200)]
    preds = [r if rng.random() < 0.6 else rng.choice(labels) for r in refs]
    assert accuracy(preds, refs) == pytest.approx(sklearn.accuracy_score(refs, preds))
    assert macro_f1(preds, refs) == pytest.approx(sklearn.f1_score(refs, preds, average="macro"))
    assert matthews_corrcoef(preds, refs) == pytest.approx(sklearn.matthews_corrcoef(refs, preds))


def test_mcc_edge_cases():
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # undefined: one class only
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0


def test_squad_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert squad_exact_match("the Eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    # "tower in paris" vs "eiffel tower": overlap 1 token; precision 1/3, recall 1/2 → F1 0.4
    assert squad_f1("tower in Paris", ["Eiffel Tower"]) == pytest.approx(0.4)
    assert squad_f1("tower in Paris", ["Eiffel Tower", "in Paris"]) == pytest.approx(0.8)  # best gold answer
    assert squad_metrics(["Paris", "nope"], [["paris"], ["yes"]]) == {"exact_match": 50.0, "f1": 50.0}
