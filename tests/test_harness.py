"""lm-evaluation-harness: lmforge's model class, run by the harness itself on a local task."""

import json
import re

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
        model="lmforge", model_args=f"pretrained={hf_gpt2}", batch_size=4, tasks=["lmforge_local_mc"],
        task_manager=TaskManager(include_path=str(harness_dir), include_defaults=False), num_fewshot=0,
    )
    harness_acc = results["results"]["lmforge_local_mc"]["acc,none"]
    model = load_model(hf_gpt2)
    lmforge_acc = run_task(model, load_tokenizer_for(model), load_task_file(ours), progress=False)["metrics"]["acc"]
    assert harness_acc == pytest.approx(lmforge_acc)


@pytest.fixture(params=["gpt2", "llama-with-bos"])
def harness_folder(request, hf_gpt2, tmp_path):
    """GPT-2's folder, or a Llama folder whose tokenizer puts <s> before a text (the harness adds it by default)."""
    if request.param == "gpt2":
        return hf_gpt2
    from conftest import make_llama_with_bos

    return make_llama_with_bos(tmp_path / "llama")


@pytest.mark.parametrize("add_bos", [None, True])
def test_every_request_type_equals_the_harness_hf_model_on_the_same_folder(harness_folder, add_bos):
    """The harness's own transformers backend and lmforge's, on one Hugging Face folder, request by request; also
    with add_bos_token=True (GPT-2's <|endoftext|> first; no second <s> before a text that has one), contexts that
    merge with their continuation into one token ("Hello" + "world": the whole's tokens after the context's count)
    and a context of whitespace only."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    hf_gpt2 = harness_folder
    kwargs = {} if add_bos is None else {"add_bos_token": add_bos}
    ours = LmforgeLM(pretrained=str(hf_gpt2), batch_size=3, **kwargs)
    theirs = HFLM(pretrained=str(hf_gpt2), batch_size=3, device="cpu", dtype="float32", **kwargs)
    contexts = ["import os\nimport", "def main():\n    return", "class A:\n    pass\n\n\nclass"]
    choices = [" sys", " json", " 0", "(", " B", " B(A):"]
    # ("": from <s>; no two requests of one whole text: the harness scores such twins as one, one of them wrongly)
    pairs = [(c, k) for c in [*contexts, ""] for k in choices]
    pairs += [("Hello", "world"), ("def ma", "in():"), ("<s>Hello", " world"), ("<|endoftext|>import", " os")]
    if ours.tokenizer.prefix_ids:  # (with nothing before a text, the harness's hf model fails on a blank context)
        pairs.append(("\n", "Hello world"))
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for (score, greedy), (score_ref, greedy_ref) in zip(ours.loglikelihood(requests, True), theirs.loglikelihood(requests, True)):
        assert score == pytest.approx(score_ref, abs=1e-4) and greedy == greedy_ref
    text = open(__file__).read()[:1500]  # several 64-token windows
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, text[:40]])]
    assert ours.loglikelihood_rolling(rolling, True) == pytest.approx(theirs.loglikelihood_rolling(rolling, True), abs=1e-3)
    generate = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), i)
                for i, c in enumerate(contexts)]
    assert ours.generate_until(generate, True) == theirs.generate_until(generate, True)


def test_the_installed_entry_point_is_what_the_harness_loads(hf_gpt2, tmp_path):
    """lmforge's metadata names its model in the harness's `lm_eval.models` group. In a fresh process the
    harness resolves the name lazily from that value (as its plugin discovery does), imports lmforge itself
    and evaluates."""
    import subprocess
    import sys

    harness_dir, _ = write_task(tmp_path)
    script = f"""
import sys
from importlib.metadata import entry_points
(entry,) = [e for e in entry_points(group="lm_eval.models") if e.name == "lmforge"]
import lm_eval
from lm_eval.api.registry import model_registry
from lm_eval.tasks import TaskManager
model_registry.register("lmforge", target=entry.value)
assert "lmforge.eval.harness" not in sys.modules
results = lm_eval.simple_evaluate(model="lmforge", model_args="pretrained={hf_gpt2}", tasks=["lmforge_local_mc"],
                                  task_manager=TaskManager(include_path="{harness_dir}", include_defaults=False))
model = model_registry.get("lmforge")
print("resolved", model.__module__ + "." + model.__name__)
print("acc", results["results"]["lmforge_local_mc"]["acc,none"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resolved lmforge.eval.harness.LmforgeLM" in done.stdout and "acc " in done.stdout


def test_lmforge_lm_eval_runs_the_harness_command_line(hf_gpt2, tmp_path):
    from conftest import run_cli

    harness_dir, _ = write_task(tmp_path)
    out = tmp_path / "results"
    done = run_cli("lm-eval", "run", "--model", "lmforge", "--model_args", f"pretrained={hf_gpt2}", "--batch_size", "4",
                   "--tasks", "lmforge_local_mc", "--include_path", str(harness_dir), "--output_path", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lmforge_local_mc" in done.stdout and "acc" in done.stdout
    assert list(out.rglob("results_*.json"))


def test_the_harness_model_refuses_what_it_cannot_run_in_one_line(hf_gpt2):
    """`--batch_size 0` ran into range() and a missing pretrained= was a TypeError: each is one line now."""
    from lmforge.errors import LmforgeError
    from lmforge.eval.harness import LmforgeLM

    for kwargs, message in [({}, "needs a folder: --model_args pretrained="),
                            ({"pretrained": str(hf_gpt2), "batch_size": 0}, "--batch_size 0 must be a whole number"),
                            ({"pretrained": str(hf_gpt2), "batch_size": "x"}, "--batch_size 'x' must be"),
                            ({"pretrained": str(hf_gpt2), "max_gen_toks": "0"}, "max_gen_toks '0' must be")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            LmforgeLM(**kwargs)
    assert LmforgeLM(pretrained=str(hf_gpt2), batch_size="auto:4").batch_size == 8


def test_lmforge_lm_eval_says_a_task_it_does_not_know_or_a_missing_include_path_in_one_line(hf_gpt2, tmp_path):
    """An unknown task (or none) was the harness's ValueError traceback; a --include_path that does not exist was
    passed over, and the harness went on to look for its own task of that name online."""
    from conftest import run_cli

    harness_dir, _ = write_task(tmp_path)
    common = ["lm-eval", "run", "--model", "lmforge", "--model_args", f"pretrained={hf_gpt2}"]
    for argv, message in [(["--tasks", "lmforge_local_mc", "--include_path", str(tmp_path / "nope")],
                           f"--include_path {tmp_path / 'nope'} does not exist; give the folder of your task YAML files"),
                          (["--tasks", "no_such_task", "--include_path", str(harness_dir)],
                           "lm-eval: Tasks not found: no_such_task; `lmforge lm-eval ls tasks` lists the harness's tasks")]:
        done = run_cli(*common, *argv)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]  # (the harness logs its progress above it)
        assert "Traceback" not in done.stderr and last.startswith(f"lmforge: error: {message}"), done.stderr[-2000:]


def test_importing_lmforges_model_leaves_the_harness_its_own():
    """lm-eval reads its built-in models only into an empty registry: registering "lmforge" first hid "hf" from
    `lmforge lm-eval --model hf` and from simple_evaluate in the same process."""
    import subprocess
    import sys

    code = ("import lmforge.eval.harness\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('lmforge').__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.split() == ["HFLM", "LmforgeLM"], result.stderr[-2000:]  # (a fresh process: a clean registry)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_apply_chat_template_renders_prompts_as_the_harness_hf_model_does(hf_gpt2, tmp_path):
    """--apply_chat_template with the lmforge model was the harness's NotImplementedError (no tokenizer_name, no
    apply_chat_template); now its prompts are the hf model's, continued final message (a task's gen_prefix) included,
    and the harness's scores are the hf model's."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import LmforgeLM

    config = json.loads((hf_gpt2 / "tokenizer_config.json").read_text())
    (hf_gpt2 / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    ours = LmforgeLM(pretrained=str(hf_gpt2), batch_size=4)
    theirs = HFLM(pretrained=str(hf_gpt2), batch_size=4, device="cpu", dtype="float32")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which colour?"},
            {"role": "assistant", "content": "The answer is "}]
    for history, generation_prompt in [(chat[:2], True), (chat, False)]:
        ours_text = ours.apply_chat_template(history, generation_prompt)
        assert ours_text == theirs.apply_chat_template(history, generation_prompt)
    assert ours.chat_template(True) == CHATML and ours.tokenizer_name
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML
    ours.tokenizer.config["chat_template"] = theirs.tokenizer.chat_template = no_system  # (both render without it)
    assert ours.apply_chat_template(chat[:2]) == theirs.apply_chat_template(chat[:2]) == \
        "<|im_start|>user\nWhich colour?<|im_end|>\n<|im_start|>assistant\n"

    harness_dir, _ = write_task(tmp_path)
    scores = {}
    for name in ("lmforge", "hf"):
        results = lm_eval.simple_evaluate(
            model=name, model_args=f"pretrained={hf_gpt2},dtype=float32", batch_size=4, tasks=["lmforge_local_mc"],
            task_manager=TaskManager(include_path=str(harness_dir), include_defaults=False), num_fewshot=0, limit=6,
            apply_chat_template=True, log_samples=True, device="cpu")
        samples = results["samples"]["lmforge_local_mc"]
        assert samples[0]["arguments"][0][0].startswith("<|im_start|>user\n")
        scores[name] = [resp[0][0] for s in samples for resp in s["resps"]]
    assert scores["lmforge"] == pytest.approx(scores["hf"], abs=1e-4)
