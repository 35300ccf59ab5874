"""The historical baselines: Kneser–Ney against NLTK, the LSTM, and the comparison table."""

import json
import math
import random

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.eval.baselines import KneserNey, LSTMConfig, LSTMLM


@pytest.mark.parametrize("order,discount", [(2, 0.1), (3, 0.1), (3, 0.75), (4, 0.5)])
def test_kneser_ney_agrees_with_nltk(order, discount):
    nltk_lm = pytest.importorskip("nltk.lm", reason="nltk (a dev extra) is not installed")
    from nltk.lm.preprocessing import pad_both_ends, padded_everygram_pipeline
    from nltk.util import ngrams

    rng = random.Random(order)
    words = "the cat sat on a mat while the dog ran to the red house and a bird sang".split()
    train = [rng.choice(words) for _ in range(3000)]
    test = [rng.choice(words) for _ in range(300)]  # every test word occurs in training
    data, vocab = padded_everygram_pipeline(order, [train])
    reference = nltk_lm.KneserNeyInterpolated(order, discount=discount)
    reference.fit(data, vocab)
    expected = reference.perplexity(list(ngrams(pad_both_ends(test, n=order), order)))
    ids = {w: i for i, w in enumerate(sorted(set(train)))}
    ours = KneserNey(order, discount, len(ids), smooth_unigram=False).fit([np.array([ids[w] for w in train])])
    probabilities = ours.probabilities(ours._padded(np.array([ids[w] for w in test])), order - 1)
    assert math.exp(-np.log(probabilities).mean()) == pytest.approx(expected, rel=0.01)


def test_smoothed_kneser_ney_is_a_distribution_and_gives_unseen_tokens_some_probability():
    model = KneserNey(3, 0.75, vocab_size=12).fit([np.array([1, 2, 3, 1, 2, 4, 1, 2, 3, 5])])
    context = np.array([model.bos, model.bos, 1, 2])
    total = 0.0
    for w in range(model.base):
        p = model.probabilities(np.append(context, w), 4)
        total += p[0]
        assert p[0] > 0
    assert total == pytest.approx(1.0, abs=1e-9)


def test_lstm_scores_a_sequence_as_its_forward_pass_does():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=50, n_embd=16, hidden=24, n_layer=2)).eval()
    ids = torch.randint(0, 50, (300,))
    nll, n = model.sequence_nll(ids.numpy(), chunk=64)  # carried state across chunks
    with torch.no_grad():
        _, loss = model(ids[None, :-1], ids[None, 1:])
    assert n == 299 and nll / n == pytest.approx(loss.item(), rel=1e-5)
    assert LSTMConfig(vocab_size=50, n_embd=16, hidden=24, n_layer=2).num_params() == model.num_params()


def test_baselines_from_the_command_line_and_the_comparison_table(data_dir, tmp_path, capsys):
    assert main(["baseline", "--kind", "ngram", "--data", str(data_dir), "--out", str(tmp_path / "ngram")]) == 0
    assert main(["baseline", "--kind", "ngram", "--data", str(data_dir), "--out", str(tmp_path / "ngram")]) == 2
    assert "output folder" in capsys.readouterr().err  # not empty: it needs --overwrite
    assert main(["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", str(tmp_path / "lstm"), "--quiet",
                 "--n-embd", "16", "--hidden", "24", "--n-layer", "1", "--max-steps", "30", "--block-size", "32",
                 "--micro-batch-size", "4", "--eval-interval", "30", "--threads", "1", "--tensorboard", "false",
                 "--sample-prompt", "import", "--sample-tokens", "5"]) == 0
    samples = [json.loads(line) for line in (tmp_path / "lstm" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 30] and all(s["prompt"] == "import" and s["text"] for s in samples)
    # an existing LSTM run: the error's advice (--resume) is an option baseline takes
    capsys.readouterr()
    lstm = ["baseline", "--kind", "lstm", "--data", str(data_dir), "--out", str(tmp_path / "lstm"), "--quiet"]
    assert main(lstm) == 2 and "pass --resume to continue it" in capsys.readouterr().err
    assert main(lstm + ["--resume", "--max-steps", "32", "--eval-interval", "100"]) == 0
    assert "resuming from step 30" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "lstm")]) == 0  # its run folder reports as any run's
    assert "LSTM baseline: 1 layers, embeddings 16, hidden 24" in (tmp_path / "lstm" / "report.md").read_text()
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "gpt"), "--n-layer", "1", "--n-embd", "32",
                 "--n-head", "2", "--block-size", "32", "--max-steps", "30", "--micro-batch-size", "4", "--quiet",
                 "--threads", "1", "--tensorboard", "false"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "ngram"), "def"]) == 2
    assert "this is an n-gram baseline; it is scored beside Transformers by `lmforge eval" in capsys.readouterr().err
    out = tmp_path / "cmp.json"
    assert main(["eval", "--data", str(data_dir), "--model", str(tmp_path / "gpt"), "--model", str(tmp_path / "ngram"),
                 "--model", str(tmp_path / "lstm"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| Transformer (gpt2) | windows of 32, stride 16 |" in table and "| LSTM | all earlier tokens |" in table
    assert "| n-gram (Kneser-Ney) | the 2 tokens before |" in table
    rows = json.loads(out.read_text())["perplexity"]["models"]
    assert len({r["tokens"] for r in rows}) == 1  # the same tokens for every model
    assert all(0 < r["bits_per_byte"] < 8 and r["perplexity"] > 1 for r in rows)

    # one command on a run folder: perplexity beside a baseline and task scores, kept as RUN/eval.json ...
    assert main(["eval", "--model", str(tmp_path / "gpt"), "--model", str(tmp_path / "ngram"), "--data", str(data_dir),
                 "--tasks", "brackets", "--limit", "6", "--quiet"]) == 0
    assert f"wrote {tmp_path / 'gpt' / 'eval.json'}" in capsys.readouterr().out
    results = json.loads((tmp_path / "gpt" / "eval.json").read_text())
    # ... which the report shows, numbers as saved
    from lmforge.eval.report import write_report

    report = write_report(tmp_path / "gpt").read_text()
    assert "## Evaluation" in report
    for r in results["perplexity"]["models"]:
        assert f"| {r['perplexity']:.2f} | {r['bits_per_byte']:.4f} | {r['tokens']:,} |" in report
    assert f"| brackets | builtin-1 | 0 | 6 | acc | {results['tasks']['brackets']['metrics']['acc']:.4f} |" in report
