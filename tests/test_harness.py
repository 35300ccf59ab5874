"""lm-evaluation-harness: lmforge's model class, run by the harness itself on a local task."""

import json

import pytest

from lmforge.eval.evaluate import run_task
from lmforge.eval.tasks import load_task_file
from lmforge.model.checkpoint import load_model, load_tokenizer_for

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (a dev extra) is not installed")


def write_task(tmp_path):
    docs = [{"question": f"Which colour is item {i}?", "choices": ["red", "green", "blue", "violet"], "answer": i % 4}
            for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    harness_dir = tmp_path / "harness_tasks"
    harness_dir.mkdir()
    (harness_dir / "local_mc.yaml").write_text(
        "task: lmforge_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    (tmp_path / "ours.yaml").write_text(
        "task: local_mc\ntype: multiple_choice\ndata: data.jsonl\nprompt: '{{ question }}'\n"
        "choices: '{{ choices }}'\ntarget: '{{ answer }}'\nmetrics: [acc]\n"
    )
    return harness_dir, tmp_path / "ours.yaml"


def test_the_harness_scores_an_lmforge_model_like_lmforge_does(hf_gpt2, tmp_path):
    import lmforge.eval.harness  # noqa: F401  (registers "lmforge")
    from lm_eval.tasks import TaskManager

    harness_dir, ours = write_task(tmp_path)
    results = lm_eval.simple_evaluate(
        model="lmforge", model_args=f"pretrained={hf_gpt2},batch_size=4", tasks=["lmforge_local_mc"],
        task_manager=TaskManager(include_path=str(harness_dir), include_defaults=False), num_fewshot=0,
    )
    harness_acc = results["results"]["lmforge_local_mc"]["acc,none"]
    model = load_model(hf_gpt2)
    lmforge_acc = run_task(model, load_tokenizer_for(model), load_task_file(ours), progress=False)["metrics"]["acc"]
    assert harness_acc == pytest.approx(lmforge_acc)


def test_rolling_and_generation_requests(hf_gpt2):
    from lm_eval.api.instance import Instance

    from lmforge.eval.evaluate import rolling_nll
    from lmforge.eval.harness import LmforgeLM
    from lmforge.infer.generate import generate

    lm = LmforgeLM(pretrained=str(hf_gpt2), batch_size=2)
    text = "def main():\n    return 0\n" * 3  # fits one window: every token scored after end-of-text
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    ids = [lm.eot] + lm.tokenizer.encode(text)
    assert len(ids) <= lm.model.config.block_size
    nll, n = rolling_nll(lm.model, ids)
    assert n == len(ids) - 1 and rolling == pytest.approx(-nll, rel=1e-4)
    long_text = text * 10  # several of the harness's windows: more tokens, more negative
    longer = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)], disable_tqdm=True)[0]
    assert longer < rolling * 5
    outputs = lm.generate_until([Instance("generate_until", {}, ("import", {"until": ["\n"], "max_gen_toks": 8}), 0)],
                                disable_tqdm=True)
    assert outputs[0] == generate(lm.model, "import", max_new_tokens=8, temperature=0, stop=["\n"]).text
    (score, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("import", outputs[0][:3] or " x"), 0)], disable_tqdm=True)
    assert score < 0 and isinstance(greedy, bool)
