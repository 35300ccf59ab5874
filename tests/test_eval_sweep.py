"""`lmforge eval` on task files with mistakes, and few-shot prompts, against lm-evaluation-harness's own task logic."""

import json

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task, load_task_file


def write_task_file(folder, body: str, docs=({"q": "Hello", "n": 1},)):
    (folder / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "t.yaml").write_text("data: d.jsonl\n" + body)
    return folder / "t.yaml"


@pytest.mark.parametrize("prompt, says", [("{{ q + n }}", 'can only concatenate str (not "int") to str'),
                                          ("{{ n / 0 }}", "division by zero"), ("{{ q() }}", "not callable")])
def test_a_template_that_fails_while_rendering_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, prompt,
                                                                                            says):
    """A text added to a number, a division by zero, a call of a text: the template's TypeError or
    ZeroDivisionError was a traceback (only Jinja's own errors were said in one line)."""
    task = write_task_file(tmp_path, f"type: generate\nprompt: '{prompt}'\ntarget: '{{{{ q }}}}'\n")
    out = tmp_path / "out.json"
    assert main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", str(task), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: task t: template") and says in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["null", "[a, b]", "''"])
def test_a_task_name_that_is_not_text_is_refused(tmp_path, name):
    """`task: null` ran as a task named "None" (and a list as "['a', 'b']")."""
    with pytest.raises(LmforgeError, match=r"`task` must be a name"):
        load_task_file(write_task_file(tmp_path, f"task: {name}\ntype: generate\nprompt: '{{{{ q }}}}'\n"))


def test_empty_choices_are_called_empty(tmp_path):
    task = load_task_file(write_task_file(tmp_path, "type: multiple_choice\nprompt: '{{ q }}'\nchoices: '{{ c }}'\n"
                                                    "target: 0\n", docs=[{"q": "Hello", "c": []}]))
    with pytest.raises(LmforgeError, match=r"`choices` gave \[\], an empty list"):
        task.check()


def test_a_demonstration_of_several_right_answers_shows_the_first_as_the_harness_does():
    """A generation task whose target is a field holding several answers (SQuAD's) showed the whole list, "['z']", as
    each demonstration's answer; lm-evaluation-harness shows the first (build_qa_turn's a[0])."""
    from lm_eval.api.task import ConfigurableTask

    docs = [{"q": "a?", "answers": ["x", "y"]}, {"q": "b?", "answers": ["z", "w"]}, {"q": "c?", "answers": ["v"]}]
    task = Task("qa", "generate", docs, prompt="Q: {{ q }}\nA:", target="{{ answers }}", fewshot=1)
    shown = [d for d in docs if f"Q: {d['q']}" in task.context(0).split("\n\n")[0]][0]
    turn = ConfigurableTask.build_qa_turn(None, q=f"Q: {shown['q']}\nA:", a=shown["answers"])
    assert task.context(0) == "".join(m.to_text() for m in turn) + "Q: a?\nA:"
    assert task.context(0).startswith(f"Q: {shown['q']}\nA: {shown['answers'][0]}\n\n")
    assert task.references_of(docs[0]) == ["x", "y"]  # (the answers scored against are all of them still)


@pytest.mark.parametrize("answer, value", [(".5", 0.5), ("about -.25 or so", -0.25), ("3.75", 3.75), ("4", 4.0),
                                           ("-2", -2.0)])
def test_a_regression_answer_is_read_as_the_number_it_writes(answer, value):
    """A regression task reads the first number of the answer: ".5" was read as 5 (the digits after the point)."""
    from lmforge.eval.evaluate import _NUMBER

    assert float(_NUMBER.search(answer).group()) == value


def test_a_list_of_answers_that_holds_no_answers_is_said_before_the_model_loads(tmp_path, capsys):
    """A target field holding [] or a nested list was refused only after the model was loaded (README: mistakes in a
    task file are reported before any model work)."""
    for answers in ([], [["x"], "y"]):
        task = write_task_file(tmp_path, "type: generate\nprompt: '{{ q }}'\ntarget: '{{ answers }}'\n",
                               docs=[{"q": "Hello", "answers": answers}])
        assert main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", str(task)]) == 2
        assert "the target field 'answers' holds" in capsys.readouterr().err
