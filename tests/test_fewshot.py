"""Few-shot prompts and in-context classification by label log-likelihood."""

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.fewshot import build_prompt, choose_demonstrations, classify
from lmforge.eval.loglikelihood import loglikelihoods
from lmforge.model.checkpoint import load_model, load_tokenizer_for

POOL = [{"text": f"t{i}", "label": "pos" if i % 3 else "neg"} for i in range(9)]


def test_prompt_builder_layout_and_label_gap():
    prompt, gap = build_prompt(POOL[:2], "is it good?", description="Classify the sentiment.")
    assert prompt == "Classify the sentiment.\n\nInput: t0\nOutput: neg\n\nInput: t1\nOutput: pos\n\nInput: is it good?\nOutput:"
    assert gap == " "  # the label is scored as " pos": the space belongs to the word
    prompt, gap = build_prompt([], "x", template="Review: {text}\nSentiment:{label}")
    assert (prompt, gap) == ("Review: x\nSentiment:", "")
    with pytest.raises(LmforgeError, match="label} must come last"):
        build_prompt([], "x", template="{label}: {text}")
    with pytest.raises(LmforgeError, match=r"takes \{text\} and \{label\} only, not \{foo\}"):
        build_prompt([], "x", template="{foo} {text} {label}")
    assert build_prompt([], "x", template="{{json}} {text}:{label}")[0] == "{json} x:"  # doubled braces are braces
    # "{{label}}" before the slot is the text "{label}" (it was taken for the slot: "must come last")
    prompt, gap = build_prompt(POOL[:1], "q", template="Task: write {{label}} for {text}\nAnswer: {label}")
    assert (prompt, gap) == ("Task: write {label} for t0\nAnswer: neg\n\nTask: write {label} for q\nAnswer:", " ")


def test_demonstration_selection():
    assert [d["text"] for d in choose_demonstrations(POOL, 3, "first", 0)] == ["t0", "t1", "t2"]
    assert [d["text"] for d in choose_demonstrations(POOL, 3, "first", 0, exclude=1)] == ["t0", "t2", "t3"]
    a = choose_demonstrations(POOL, 4, "random", seed=5, exclude=0)
    assert a == choose_demonstrations(POOL, 4, "random", seed=5, exclude=0) and POOL[0] not in a
    assert a != choose_demonstrations(POOL, 4, "random", seed=6, exclude=0)
    balanced = [d["label"] for d in choose_demonstrations(POOL, 4, "balanced", 0)]
    assert balanced == ["neg", "pos", "neg", "pos"]
    assert choose_demonstrations(POOL, 0, "random", 0) == []
    # a separate pool of demonstrations (nothing to exclude) is drawn from too
    b = choose_demonstrations(POOL, 3, "random", seed=5)
    assert len(b) == 3 and b == choose_demonstrations(POOL, 3, "random", seed=5)
    with pytest.raises(LmforgeError, match="--seed -1 must be 0 or more"):
        choose_demonstrations(POOL, 3, "random", seed=-1)


def test_loglikelihood_equals_the_sum_from_the_model_logits(hf_gpt2):
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    requests = [("The answer is", " yes"), ("Short", " and a longer continuation"), ("x", " y")]
    scores = loglikelihoods(model, tok, requests, batch_size=2)
    for (context, continuation), score in zip(requests, scores):
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0]
        expected = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert score == pytest.approx(expected, abs=1e-4)


def test_classify_picks_the_most_likely_label_and_reports_accuracy(hf_gpt2, tmp_path, capsys):
    rows = [{"text": f"sample {i}", "label": "yes" if i % 2 else "no"} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    for shots in (0, 3):
        result = classify(model, tok, data, ["yes", "no"], shots=shots, seed=1)
        # recompute the decision by hand for the first example
        shown = choose_demonstrations(rows, shots, "random", 1, exclude=0)
        prompt, gap = build_prompt(shown, rows[0]["text"])
        yes, no = loglikelihoods(model, tok, [(prompt, gap + "yes"), (prompt, gap + "no")])
        assert result["predictions"][0] == ("yes" if yes > no else "no")
        expected = sum(p == r["label"] for p, r in zip(result["predictions"], rows)) / len(rows)
        assert result["accuracy"] == expected
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no", "--shots", "2"]) == 0
    assert "12 examples, 2-shot: accuracy" in capsys.readouterr().out
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,maybe"]) == 2
    assert "labels no that --labels does not list" in capsys.readouterr().err
    # demonstrations from another file, drawn at random (the default)
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"text": f"demo {i}", "label": ["yes", "no"][i % 2]}) + "\n" for i in range(4)))
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no", "--demos", str(demos),
                 "--shots", "2"]) == 0
    assert "12 examples, 2-shot" in capsys.readouterr().out
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no", "--demos", str(demos),
                 "--shots", "9"]) == 0  # more than there are: all 4, said
    captured = capsys.readouterr()
    assert "only 4 demonstration(s) to choose from" in captured.err and "12 examples, 4-shot" in captured.out
    for argv, message in [(["--labels", "yes,no,yes"], "--labels lists 'yes' more than once"),
                          (["--labels", "yes,no", "--shots", "-2"], "--shots -2 must be 0 or more")]:
        assert main(["classify", str(data), "--model", str(hf_gpt2), *argv]) == 2
        assert message in capsys.readouterr().err



def test_classify_runs_the_products_through_the_kernels_measured_fastest(hf_gpt2, tmp_path, monkeypatch, capsys):
    """`lmforge classify` applies the kernel choice (as `eval` does, for its 8 rows a batch): the kernel changes,
    the predictions do not."""
    from lmforge import precision
    from lmforge.model import gpt

    rows = [{"text": f"sample {i}", "label": "yes" if i % 3 else "no"} for i in range(10)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real, said = gpt.use_fast_kernels, []
    monkeypatch.setattr(gpt, "use_fast_kernels", lambda model, rows, **kw: said.append((rows, real(model, rows, **kw))))
    printed = []
    kernels = ["transposed"] + (["onednn"] if precision.onednn_linear_available() else []) + (
        ["packed"] if precision.pack_weight(torch.ones(4, 2), 1) is not None else [])
    for chosen in ["plain", *kernels]:
        monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows, c=chosen: {"head": [c, 2.0],
                                                                                              "body": [c, 2.0]})
        assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no", "--shots", "2"]) == 0
        printed.append(capsys.readouterr().out)
    assert [rows for rows, _ in said] == [8] * len(printed) and said[0][1] == "as loaded"
    assert all(kernel != "as loaded" for _, kernel in said[1:]), said
    assert all(out == printed[0] for out in printed) and "10 examples, 2-shot: accuracy" in printed[0]


def test_classify_never_shows_a_query_as_its_own_demonstration_and_checks_what_it_is_given(hf_gpt2, tmp_path, capsys):
    """--demos naming the data file itself (or holding its texts) would show each query's own answer in its
    prompt; demonstrations with labels outside --labels, a template whose {text} is written out ({{text}}), a
    listed label no example has (it lowered macro-F1) and malformed lines (--skip-bad-lines) are each said."""
    rows = [{"text": f"sample {i}", "label": "yes" if i % 2 else "no"} for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    result = classify(model, tok, data, ["yes", "no"], shots=9, selection="first", demos=str(data))
    assert result["shots"] == 5 and result["first_prompt"].count("sample 0") == 1
    twice = tmp_path / "twice.jsonl"  # the same text twice in the data: neither is shown to the other
    twice.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], *rows]))
    result = classify(model, tok, twice, ["yes", "no"], shots=9, selection="first")
    assert result["shots"] == 5 and result["first_prompt"].count("sample 0") == 1
    plain = classify(model, tok, data, ["yes", "no"])
    assert classify(model, tok, data, ["yes", "no", "maybe"])["macro_f1"] == plain["macro_f1"]
    assert "--labels maybe: in none of the examples" in capsys.readouterr().err
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"text": "x", "label": "neutral"}) + "\n")
    with pytest.raises(LmforgeError, match=r"the demonstrations \(.*demos.jsonl\) has labels neutral"):
        classify(model, tok, data, ["yes", "no"], shots=1, demos=str(demos))
    with pytest.raises(LmforgeError, match="needs both {text} and {label}"):
        classify(model, tok, data, ["yes", "no"], template="{{text}} {label}")
    data.write_text(data.read_text() + "not json\n")
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no"]) == 2
    assert "--skip-bad-lines" in capsys.readouterr().err
    assert main(["classify", str(data), "--model", str(hf_gpt2), "--labels", "yes,no", "--skip-bad-lines"]) == 0
    assert "skipped 1 malformed line(s)" in capsys.readouterr().err
