"""`lmforge eval`: perplexity against transformers, task types, metrics against their libraries, task files."""

import json
import math
import re

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.evaluate import evaluate, rolling_nll, run_task
from lmforge.eval.metrics import bleu, pearson, rouge, spearman
from lmforge.eval.loglikelihood import loglikelihoods
from lmforge.eval.tasks import BUILTIN, Task, load_task_file, resolve_tasks
from lmforge.model.checkpoint import load_model, load_tokenizer_for

transformers = pytest.importorskip("transformers")


def hf_sliding_window_nll(model, ids, window, stride):
    """transformers' perplexity-guide recipe: each window's labels are masked (-100) except its new tokens,
    and the model's mean loss is weighted by the number of labels it predicted. (The guide subtracts one
    per window for the label shift; after the first window that label is already masked, so the exact
    count, used here, is the unmasked labels after the shift.)"""
    ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        predicted = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * predicted
        n_tokens += predicted
        prev_end = end
        if end == ids.size(1):
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("stride", [16, 32, 64])
def test_sliding_window_perplexity_matches_the_transformers_recipe(hf_gpt2, stride):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_gpt2)).eval()
    ours = load_model(hf_gpt2)
    ids = load_tokenizer_for(ours).encode(open(__file__).read())[:300]  # longer than the 64-token context
    expected, n_expected = hf_sliding_window_nll(hf, ids, 64, stride)
    got, n_got = rolling_nll(ours, [ids], stride=stride, batch_size=3)
    assert n_got == n_expected
    assert math.exp(got / n_got) == pytest.approx(math.exp(expected / n_expected), rel=1e-4)
    # several texts in one batched call: the sum of each alone
    texts = [ids, ids[:50], ids[7:130]]
    alone = [hf_sliding_window_nll(hf, t, 64, stride) for t in texts]
    together, n_together = rolling_nll(ours, texts, stride=stride)
    assert n_together == sum(n for _, n in alone) and together == pytest.approx(sum(v for v, _ in alone), rel=1e-4)


def mc_task(docs, **kw):
    return Task("mc", "multiple_choice", docs, prompt="Q: {{ q }}\nA:", choices="{{ options }}", target="{{ answer }}", **kw)


def test_multiple_choice_accuracy_and_length_normalised_accuracy(hf_gpt2):
    """acc_norm divides by the choice's characters, as lm-evaluation-harness's acc_norm (it divided by UTF-8
    bytes, the harness's acc_bytes: another number under the same name where a choice is not ASCII)."""
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    docs = [{"q": f"item {i}", "options": ["red", "green light", "ééé"], "answer": i % 3} for i in range(12)]
    result = run_task(model, tok, mc_task(docs), progress=False)["metrics"]
    acc = acc_norm = 0
    for d in docs:
        scores = loglikelihoods(model, tok, [(f"Q: {d['q']}\nA:", " " + c) for c in d["options"]])
        acc += max(range(3), key=lambda j: scores[j]) == d["answer"]
        acc_norm += max(range(3), key=lambda j: scores[j] / len(d["options"][j])) == d["answer"]
    assert result == {"acc": acc / 12, "acc_norm": acc_norm / 12}


def test_few_shot_prompts_are_seeded_and_never_show_the_query():
    docs = [{"q": f"q{i}", "options": ["a", "b"], "answer": i % 2} for i in range(10)]
    task = mc_task(docs, fewshot=3, seed=7)
    context = task.context(4)
    assert context.count("Q: ") == 4 and context.endswith("Q: q4\nA:") and "Q: q4\nA:" not in context[:-8]
    assert context == mc_task(docs, fewshot=3, seed=7).context(4)
    assert context != mc_task(docs, fewshot=3, seed=8).context(4)


def test_generation_metrics_match_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "a quick brown fox", "hello world", "nothing like it"]
    references = ["the cat is on the mat", "the quick brown fox", "hello there world", "something else entirely"]
    assert bleu(predictions, references) == sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    direct = [scorer.score(r, p) for p, r in zip(predictions, references)]
    ours = rouge(predictions, references)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(100 * sum(s[key].fmeasure for s in direct) / 4)


def test_rouge_says_when_it_cannot_read_a_reference(capsys):
    assert rouge(["Привет мир", "hello"], ["Привет мир", "hello"])["rouge1"] == 50.0  # as rouge-score: 0 and 100
    assert "1 of 2 reference(s) have no ASCII letter or digit" in capsys.readouterr().err
    rouge(["hello"], ["hello"])
    assert capsys.readouterr().err == ""


def test_pearson_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = [1.0, 2.5, 2.5, 4.0, 3.0, 7.0, 6.5]
    y = [2.0, 2.0, 3.5, 3.0, 5.0, 6.0, 8.0]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_generation_task_stops_at_its_stop_sequence_and_scores(hf_gpt2, capsys):
    from lmforge.infer.generate import generate

    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    docs = [{"x": "def", "y": "whatever"}, {"x": "import", "y": "os"}]
    free = [generate(model, d["x"], max_new_tokens=10, temperature=0).text for d in docs]
    stop = free[0][3:5]  # a piece the model really produces
    task = Task("gen", "generate", docs, prompt="{{ x }}", target="{{ y }}", until=[stop], max_new_tokens=10,
                metrics=["exact_match", "f1", "bleu", "rouge"])
    result = run_task(model, tok, task, progress=False)["metrics"]
    assert result["samples"][0]["prediction"] == free[0][: free[0].find(stop)].strip()
    assert set(result) >= {"exact_match", "f1", "bleu", "rouge1", "rouge2", "rougeL"}
    regression = Task("reg", "regression", [{"x": "1", "y": "2"}, {"x": "2", "y": "3"}, {"x": "3", "y": "5"}],
                      prompt="{{ x }} ->", target="{{ y }}", max_new_tokens=3)
    capsys.readouterr()
    scores = run_task(model, tok, regression, progress=False)["metrics"]
    assert set(scores) == {"pearson", "spearman"}
    # the random model writes no number: every answer counts as 0.0, a constant, with which nothing correlates
    err = capsys.readouterr().err
    assert "answers hold no number" in err and "the model's answers are all 0: a correlation with a constant is " \
        "undefined (SciPy gives NaN); reported as 0.0" in err and scores["pearson"] == 0.0, err


def test_classification_tasks_report_glue_metrics(hf_gpt2):
    model = load_model(hf_gpt2)
    docs = [{"text": f"sample {i}", "label": ["no", "yes"][i % 2]} for i in range(10)]
    task = Task("cls", "classification", docs, prompt="{{ text }} ->", choices=["no", "yes"], target="{{ label }}")
    metrics = run_task(model, load_tokenizer_for(model), task, progress=False)["metrics"]
    assert set(metrics) == {"accuracy", "macro_f1", "mcc"}


def test_task_files_and_their_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"{i}", "opts": ["x", "y"], "a": "y"}) + "\n" for i in range(3)))
    (tmp_path / "t.yaml").write_text("task: mine\nversion: 2\ntype: multiple_choice\ndata: d.jsonl\nprompt: '{{ q }}'\n"
                                     "choices: '{{ opts }}'\ntarget: '{{ a }}'\nfewshot: 1\n")
    task = load_task_file(tmp_path / "t.yaml")
    assert (task.name, task.version, len(task.docs), task.target_index(task.docs[0])) == ("mine", 2, 3, 1)
    (tmp_path / "bad.yaml").write_text("type: multiple_choice\ndata: d.jsonl\nchioces: [a]\n")
    with pytest.raises(LmforgeError, match="unknown key\\(s\\) chioces"):
        load_task_file(tmp_path / "bad.yaml")
    (tmp_path / "field.yaml").write_text("type: generate\ndata: d.jsonl\nprompt: '{{ question }}'\n")
    with pytest.raises(LmforgeError, match="template .* failed .* check the field names"):
        load_task_file(tmp_path / "field.yaml").context(0)
    (tmp_path / "metric.yaml").write_text("type: generate\ndata: d.jsonl\nmetrics: [acc]\n")
    with pytest.raises(LmforgeError, match="metric\\(s\\) acc do not apply to generate"):
        load_task_file(tmp_path / "metric.yaml")
    with pytest.raises(LmforgeError, match="unknown task 'hellaswag'"):
        resolve_tasks(["hellaswag"])
    # values of the wrong kind are one line naming the key, not a crash deep in rendering
    generate = "type: generate\ndata: d.jsonl\nprompt: '{{ q }}'\ntarget: '{{ a }}'\n"
    for extra, message in [("fewshot: three", "`fewshot` must be a whole number of 0 or more, not 'three'"),
                           ("fewshot: -2", "`fewshot` must be a whole number of 0 or more, not -2"),
                           ("seed: abc", "`seed` must be a whole number"),
                           ("until: 5", "`until` must be text or a list of texts, not 5"),
                           ("target_delimiter: 3", "`target_delimiter` must be text, not 3"),
                           ("fewshot_separator:", "`fewshot_separator` must be text, not None"),
                           ("max_new_tokens: 0", "`max_new_tokens` must be a whole number of 1 or more")]:
        (tmp_path / "typed.yaml").write_text(generate.replace("prompt: '{{ q }}'\n", "") + extra + "\n"
                                             if extra.startswith("prompt") else generate + extra + "\n")
        with pytest.raises(LmforgeError, match=re.escape(message)):
            load_task_file(tmp_path / "typed.yaml")
    (tmp_path / "string_metric.yaml").write_text(generate + "metrics: bleu\n")
    assert load_task_file(tmp_path / "string_metric.yaml").metrics == ["bleu"]  # one metric as text
    # a regression target that is no number, and a folder as data, are said before any model work
    (tmp_path / "r.jsonl").write_text(json.dumps({"q": "how much?", "a": "plenty"}) + "\n")
    (tmp_path / "reg.yaml").write_text("type: regression\ndata: r.jsonl\nprompt: '{{ q }}'\ntarget: '{{ a }}'\n")
    with pytest.raises(LmforgeError, match="a regression target must be a number, not 'plenty'"):
        load_task_file(tmp_path / "reg.yaml").check()
    (tmp_path / "dir.yaml").write_text("type: generate\ndata: .\n")
    with pytest.raises(LmforgeError, match="task dir: data file .* is a folder; give the JSONL file in it"):
        load_task_file(tmp_path / "dir.yaml")
    # two tasks of one name would overwrite each other's results; more shots than examples are said and cut
    (tmp_path / "t2.yaml").write_text((tmp_path / "t.yaml").read_text())
    with pytest.raises(LmforgeError, match="two tasks are named 'mine'"):
        resolve_tasks([str(tmp_path / "t.yaml"), str(tmp_path / "t2.yaml")])
    assert resolve_tasks([str(tmp_path / "t.yaml")], limit=2, fewshot=5)[0].fewshot == 1


def test_builtin_tasks_are_generated_deterministically_and_correctly():
    from lmforge.eval.tasks import _is_balanced

    for name in BUILTIN:
        a, b = BUILTIN[name](20, 3), BUILTIN[name](20, 3)
        assert a.docs == b.docs and a.docs != BUILTIN[name](20, 4).docs
    arithmetic = BUILTIN["arithmetic"](5, 0)
    assert all(int(d["answer"]) == d["a"] + d["b"] for d in arithmetic.docs)
    brackets = BUILTIN["brackets"](50, 0)
    assert all((d["answer"] == "yes") == _is_balanced(d["s"]) for d in brackets.docs)
    assert {d["answer"] for d in brackets.docs} == {"yes", "no"}
    assert BUILTIN["reverse"](3, 0).render("{{ s[::-1] }}", {"s": "abc"}) == "cba"


def test_results_json_and_the_command(hf_gpt2, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(hf_gpt2), "--tasks", "brackets,copy", "--limit", "6", "--quiet", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| brackets | builtin-1 | 0 | 6 | acc |" in table
    results = json.loads(out.read_text())
    assert results["model"] == str(hf_gpt2) and set(results["tasks"]) == {"brackets", "copy"}
    for r in results["tasks"].values():
        assert {"version", "seed", "seconds", "shots", "metrics"} <= set(r)
    (tmp_path / "t.txt").write_text("some text to score " * 40)
    assert main(["eval", "--model", str(hf_gpt2), "--text", str(tmp_path / "t.txt"), "--quiet"]) == 0
    assert "| t.txt | text | 0 | 1 | perplexity |" in capsys.readouterr().out
    assert main(["eval", "--model", str(hf_gpt2)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_eval_runs_the_products_through_the_kernels_measured_fastest(hf_gpt2, tmp_path, monkeypatch, capsys):
    """`lmforge eval` (tasks, as `generate` does) applies the kernel choice for its batch size; the kernel changes,
    the scores do not."""
    from lmforge import precision
    from lmforge.model import gpt

    real, said = gpt.use_fast_kernels, []
    monkeypatch.setattr(gpt, "use_fast_kernels", lambda model, rows, **kw: said.append((rows, real(model, rows, **kw))))
    scores = []
    kernel = "onednn" if precision.onednn_linear_available() else "transposed"
    for chosen in ("plain", kernel):
        monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows, c=chosen: {"head": [c, 2.0],
                                                                                              "body": [c, 2.0]})
        out = tmp_path / f"{chosen}.json"
        assert main(["eval", "--model", str(hf_gpt2), "--tasks", "brackets,copy", "--limit", "6", "--quiet",
                     "--batch-size", "4", "--out", str(out)]) == 0
        scores.append({name: r["metrics"] for name, r in json.loads(out.read_text())["tasks"].items()})
    assert [rows for rows, _ in said] == [4, 4] and said[0][1] == "as loaded" and said[1][1] != "as loaded", said
    assert scores[0] == scores[1]


def test_a_stop_sequence_inside_the_answers_is_flagged_and_builtins_have_none(hf_gpt2, capsys):
    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    for name in ("arithmetic", "copy", "reverse"):
        task = BUILTIN[name](5, 0)
        run_task(model, tok, task, progress=False)
        assert "stop sequence" not in capsys.readouterr().err
        assert not any(stop in task.target_delimiter + task.render(task.target, d) for d in task.docs for stop in task.until)
    cut = Task("cut", "generate", [{"s": "abc"}], prompt="copy: {{ s }} ->", target="{{ s }}", until=[" "])
    run_task(model, tok, cut, progress=False)
    assert "task cut: a stop sequence (' ') occurs in 1 of its answers (first: ' abc')" in capsys.readouterr().err


def test_choices_with_quotes_backslashes_and_newlines_in_every_form():
    awkward = ["it's", 'say "hi"\n', "back\\slash", "[not, a, list]"]
    doc = {"options": awkward, "a": "x", "b": "y"}
    assert mc_task([doc]).choices_of(doc) == awkward  # a field holding a list
    assert Task("t", "multiple_choice", [doc], choices="{{ options | list }}").choices_of(doc) == awkward  # rendered repr
    assert Task("t", "multiple_choice", [doc], choices="[{{ a }}, {{ b }}]").choices_of(doc) == ["x", "y"]  # YAML
    with pytest.raises(LmforgeError, match="`choices` gave 'x', not a list"):
        Task("t", "multiple_choice", [doc], choices="{{ a }}").choices_of(doc)


def test_targets_keep_their_spaces_and_bad_tasks_stop_the_run_before_any_model_work():
    doc = {"q": "except ValueError as", "options": [" e:", " e {", " (e)"], "answer": " e:"}
    assert mc_task([doc]).target_index(doc) == 0
    assert mc_task([{**doc, "answer": "(e)"}]).target_index({**doc, "answer": "(e)"}) == 2  # stripped, as a fallback
    bad = mc_task([doc, {**doc, "answer": "nope"}])
    with pytest.raises(LmforgeError, match="target 'nope' is neither a choice"):
        evaluate("no-such-model-folder", [bad])  # the task is checked before the model is looked at


def test_seed_on_the_command_line_overrides_a_task_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"q": f"{i}", "opts": ["x", "y"], "a": "y"}) + "\n" for i in range(9)))
    (tmp_path / "t.yaml").write_text("type: multiple_choice\ndata: d.jsonl\nprompt: '{{ q }}'\nchoices: '{{ opts }}'\n"
                                     "target: '{{ a }}'\nfewshot: 2\nseed: 5\n")
    (from_file,) = resolve_tasks([str(tmp_path / "t.yaml")])
    (overridden,) = resolve_tasks([str(tmp_path / "t.yaml")], seed=6)
    assert (from_file.seed, overridden.seed) == (5, 6) and from_file.context(0) != overridden.context(0)
    assert resolve_tasks(["copy"])[0].docs == resolve_tasks(["copy"], seed=0)[0].docs != resolve_tasks(["copy"], seed=1)[0].docs


def test_a_task_file_s_integer_target_is_an_index_even_among_number_choices(tmp_path):
    """An integer target is an index (as in lm-evaluation-harness): `"answer": 1` among "2", "4", "6", "8" is "4"
    (it was scored against no choice, or the wrong one). Where it is also another choice's text (`2` there: "6",
    or "2"?) it is refused as ambiguous; a JSON string is the text; past the last index (5 stars among "1".."5")
    it is the choice that reads it. Empty stop sequences and odd versions are refused, and a fewshot_data file
    is named as such."""
    from lmforge.eval.tasks import load_task_file

    rows = [{"q": "2+2=", "choices": ["2", "4", "6", "8"], "answer": 1},
            {"q": "1+1=", "choices": ["2", "4", "6", "8"], "answer": "2"},
            {"q": "best?", "choices": ["1", "2", "3", "4", "5"], "answer": 5}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = "type: multiple_choice\ndata: t.jsonl\nprompt: '{{ q }}'\nchoices: '{{ choices }}'\ntarget: '{{ answer }}'\n"
    (tmp_path / "t.yaml").write_text(spec)
    task = load_task_file(tmp_path / "t.yaml")
    assert [task.target_index(d) for d in task.docs] == [1, 0, 4]
    with pytest.raises(LmforgeError, match="target 2 is both the index of choice '6' and the text of choice '2'"):
        task.target_index({"q": "x", "choices": ["2", "4", "6", "8"], "answer": 2})
    (tmp_path / "t.jsonl").write_text(json.dumps({"q": "x", "choices": ["a", "b"], "answer": 7}) + "\n")
    with pytest.raises(LmforgeError, match="target index 7 is out of range for 2 choices"):
        load_task_file(tmp_path / "t.yaml").target_index({"q": "x", "choices": ["a", "b"], "answer": 7})
    for extra, message in [("until: ['']\n", "`until` holds an empty stop sequence"),
                           ("version: [1]\n", "`version` must be a number or text"),
                           ("fewshot_data: nothere.jsonl\n", "fewshot_data file")]:
        (tmp_path / "bad.yaml").write_text(spec + extra)
        with pytest.raises(LmforgeError, match=re.escape(message)):
            load_task_file(tmp_path / "bad.yaml")


def test_perplexity_tasks_encode_as_transformers_and_count_the_bytes_they_predict(hf_gpt2, tmp_path):
    """A perplexity task's texts are encoded as transformers' recipe encodes them, tokenizer(text): Llama's <s> went
    missing, and with it the prediction of each text's first token. Bits per byte count the bytes of the tokens
    predicted (a text's first token without <s> before it is not: its bytes were counted)."""
    from conftest import make_llama_with_bos
    from transformers import AutoTokenizer

    llama = make_llama_with_bos(tmp_path / "llama")
    texts = ["Hello world", "Hello, world's", "world Hello Hello"]
    for folder in (llama, hf_gpt2):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
        nll = n = n_bytes = 0
        for text in texts:
            ids = hf_tok(text)["input_ids"]
            with torch.no_grad():
                nll += hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1)
            n += len(ids) - 1
            first = ids[0] not in hf_tok.all_special_ids  # (a first token predicted from nothing is not scored)
            n_bytes += len(text.encode()) - (len(hf_tok.decode(ids[:1]).encode()) if first else 0)
        model = load_model(folder)
        task = Task("ppl", "perplexity", [{"text": t} for t in texts])
        metrics = run_task(model, load_tokenizer_for(model), task, progress=False)["metrics"]
        assert metrics["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_macro_f1_is_over_the_labels_that_occur_as_scikit_learn_counts_it(hf_gpt2):
    """A choice no reference and no prediction names added an F1 of 0 to the mean."""
    from sklearn.metrics import f1_score

    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    docs = [{"text": f"sample {i}", "label": ["no", "yes"][i % 2]} for i in range(10)]
    task = Task("cls", "classification", docs, prompt="{{ text }} ->", choices=["no", "yes", "\u2603 \u2603 \u2603"],
                target="{{ label }}")
    metrics = run_task(model, tok, task, progress=False)["metrics"]
    scores = loglikelihoods(model, tok, [(f"sample {i} ->", " " + c) for i in range(10) for c in task.choices])
    predicted = [max(range(3), key=lambda j: scores[3 * i + j]) for i in range(10)]
    assert 2 not in predicted  # (the third choice is never the answer nor the guess)
    assert metrics["macro_f1"] == pytest.approx(f1_score([i % 2 for i in range(10)], predicted, average="macro"))


def test_a_list_of_answers_scores_the_best_match_and_special_tokens_are_no_part_of_an_answer(hf_gpt2, tmp_path,
                                                                                               tokenizer_dir):
    """A target field holding several answers (SQuAD's) was scored as the text of the list; and an answer kept the
    special tokens the model wrote (the harness's hf model leaves them out)."""
    import sacrebleu
    from conftest import make_special_token_writer

    from lmforge.infer.generate import generate

    model = load_model(hf_gpt2)
    tok = load_tokenizer_for(model)
    docs = [{"x": "def", "answers": ["nothing like it"]}, {"x": "import", "answers": ["no", "nor this"]}]
    said = [generate(model, d["x"], max_new_tokens=6, temperature=0).text.split("\n")[0].strip() for d in docs]
    docs[1]["answers"].append(said[1])  # (the model's own answer, among others)
    task = Task("gen", "generate", docs, prompt="{{ x }}", target="{{ answers }}", max_new_tokens=6,
                metrics=["exact_match", "f1", "bleu"])
    metrics = run_task(model, tok, task, progress=False)["metrics"]
    assert metrics["exact_match"] == 0.5 and metrics["f1"] >= 0.5
    streams = [["nothing like it", "no"], [None, "nor this"], [None, said[1]]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(said, streams).score)
    # a model that writes <|im_start|> (a special token, not a stop token) answers nothing
    special = load_model(make_special_token_writer(tmp_path / "m", tokenizer_dir))
    task = Task("gen", "generate", [{"x": "def", "y": ""}], prompt="{{ x }}", target="{{ y }}", max_new_tokens=3,
                metrics=["exact_match"])
    result = run_task(special, load_tokenizer_for(special), task, progress=False)["metrics"]
    assert result["samples"][0]["prediction"] == "" and result["exact_match"] == 1.0
