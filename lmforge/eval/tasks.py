"""Evaluation tasks: a small YAML spec over JSONL data, and built-in tasks whose data lmforge makes.

A task file (paths are relative to it; prompts are Jinja templates over each example's fields)::

    task: capitals
    version: 1
    type: multiple_choice        # multiple_choice | classification | generate | regression | perplexity
    data: capitals.jsonl
    prompt: "Q: What is the capital of {{ country }}?\\nA:"
    choices: "{{ options }}"      # a template giving a list, or a YAML list
    target: "{{ answer }}"        # the right choice: its index or its text (generate: the reference text)
    fewshot: 3                    # demonstrations per prompt (drawn with `seed`, never the query itself)
    fewshot_data: train.jsonl     # optional pool of demonstrations (default: the data itself)
    until: ["\\n"]                # generate: stop sequences
    max_new_tokens: 32
    metrics: [exact_match, f1]    # generate: exact_match, f1, bleu, rouge; regression: pearson, spearman

Built-in tasks (for smoke-testing small models) generate their own data: ``arithmetic``,
``copy``, ``reverse`` (generation), ``brackets`` (multiple choice: balanced or not).
"""

from __future__ import annotations

import ast
import functools
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmforge.data.corpus import jsonl_objects, read_text_file
from lmforge.errors import LmforgeError
from lmforge.utils import warn

TYPES = ("multiple_choice", "classification", "generate", "regression", "perplexity")
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "classification": ["accuracy", "macro_f1", "mcc"],
    "generate": ["exact_match"],
    "regression": ["pearson", "spearman"],
    "perplexity": ["perplexity", "bits_per_byte"],
}
KNOWN_METRICS = {
    "multiple_choice": {"acc", "acc_norm"},
    "classification": {"accuracy", "macro_f1", "mcc"},
    "generate": {"exact_match", "f1", "bleu", "rouge"},
    "regression": {"pearson", "spearman"},
    "perplexity": {"perplexity", "bits_per_byte"},
}


@dataclass
class Task:
    name: str
    type: str
    docs: list[dict]
    prompt: str = "{{ text }}"
    choices: str | list | None = None
    target: str = "{{ target }}"
    target_delimiter: str = " "
    fewshot: int = 0
    fewshot_docs: list[dict] | None = None
    fewshot_separator: str = "\n\n"
    seed: int = 0
    until: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 32
    metrics: list[str] = field(default_factory=list)
    version: int | str = 1
    text_field: str = "text"  # perplexity tasks: the field holding the text
    source: str = "<built-in>"

    def __post_init__(self):
        if self.type not in TYPES:
            raise LmforgeError(f"task {self.name}: type {self.type!r} is not one of {', '.join(TYPES)}")
        self.metrics = list(self.metrics or DEFAULT_METRICS[self.type])
        unknown = [m for m in self.metrics if m not in KNOWN_METRICS[self.type]]
        if unknown:
            raise LmforgeError(f"task {self.name}: metric(s) {', '.join(unknown)} do not apply to {self.type}; "
                               f"use {', '.join(sorted(KNOWN_METRICS[self.type]))}")
        if self.type in ("multiple_choice", "classification") and self.choices is None:
            raise LmforgeError(f"task {self.name}: a {self.type} task needs `choices`")
        if not self.docs:
            raise LmforgeError(f"task {self.name}: its data holds no examples")

    # -- rendering ------------------------------------------------------------------------------

    def render(self, template: str, doc: dict) -> str:
        return _render(template, doc, self.name)

    def choices_of(self, doc: dict) -> list[str]:
        """The choices: a YAML list, a field holding a list (``{{ options }}``), or a template rendering to a
        list written as a Python literal (as lm-evaluation-harness reads it) or in YAML."""
        if isinstance(self.choices, list):
            return [str(c) for c in self.choices]
        single = _SINGLE_FIELD.fullmatch(self.choices)
        if single and isinstance(doc.get(single.group(1)), list):
            parsed = value = doc[single.group(1)]
        else:
            value = self.render(self.choices, doc)
            parsed = _parse_list(value)
        if not isinstance(parsed, list) or not parsed:
            raise LmforgeError(f"task {self.name}: `choices` gave {value!r}, " + ("an empty list" if parsed == [] else
                                                                                 "not a list"))
        return [str(c) for c in parsed]

    def references_of(self, doc: dict) -> list[str]:
        """A generation task's right answers: the rendered target, or each item where the target is one field
        holding a list (``target: "{{ answers }}"``, SQuAD's several answers: the best match counts)."""
        value = self._answer_list(doc)
        if value is not None:
            if not value or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                field = _SINGLE_FIELD.fullmatch(self.target).group(1)
                raise LmforgeError(f"task {self.name}: the target field {field!r} holds {value!r}; a list of answers "
                                   f"must hold at least one, each a string or a number")
            return [str(v).strip() for v in value]
        return [self.render(self.target, doc).strip()]

    def _answer_list(self, doc: dict) -> list | None:
        """The list a target of one field (``{{ answers }}``) names, or None where the target is no such field."""
        single = _SINGLE_FIELD.fullmatch(self.target or "")
        value = doc.get(single.group(1)) if single else None
        return value if isinstance(value, list) else None

    def target_index(self, doc: dict) -> int:
        """The right choice's index: the target is an index, or the text of one of the choices. A target that is
        one field holding a JSON integer (``target: "{{ answer }}"`` with ``"answer": 2``) is an index, as in
        lm-evaluation-harness; where another choice's text is that number it could mean either, and is refused
        (a JSON string means the text); past the last index, it is the choice that reads it."""
        choices = self.choices_of(doc)
        field = re.fullmatch(r"\s*\{\{\s*(\w+)\s*\}\}\s*", self.target or "")
        value = doc.get(field.group(1)) if field else None
        if isinstance(value, int) and not isinstance(value, bool):
            as_text = [i for i, c in enumerate(choices) if c.strip() == str(value)]
            if 0 <= value < len(choices):
                if as_text and as_text[0] != value:  # ("stars": 3 among "1".."5": the 4th choice, or "3"?)
                    raise LmforgeError(
                        f"task {self.name}: target {value} is both the index of choice {choices[value]!r} and the "
                        f"text of choice {choices[as_text[0]]!r}; write it as the JSON string \"{value}\" for the "
                        f"choice that reads {value} (a number is read as an index, as lm-evaluation-harness reads it)")
                return value
            if as_text:
                return as_text[0]
            raise LmforgeError(f"task {self.name}: target index {value} is out of range for "
                               f"{len(choices)} choices ({', '.join(map(repr, choices))})")
        written = self.render(self.target, doc)
        if written in choices:  # as written: a choice may begin with a space
            return choices.index(written)
        target = written.strip()
        stripped = [c.strip() for c in choices]
        if target in stripped:
            return stripped.index(target)
        if target.lstrip("-").isdigit():
            if 0 <= int(target) < len(choices):
                return int(target)
            raise LmforgeError(f"task {self.name}: target {target!r} is no choice, and as an index it is out of range "
                               f"for {len(choices)} choices ({', '.join(map(repr, choices))})")
        raise LmforgeError(f"task {self.name}: target {target!r} is neither a choice ({', '.join(map(repr, choices))}) "
                           f"nor an index")

    def check(self) -> None:
        """Render every example's prompt and answer now, so that a mistake in the task file stops the run before
        any model work (not after an hour of it)."""
        if not self.docs:
            raise LmforgeError(f"task {self.name} ({self.source}) has no examples; no score is computed over none")
        for doc in self.docs:
            if self.type == "perplexity":
                if self.text_field not in doc:
                    raise LmforgeError(f"task {self.name}: an example has no {self.text_field!r} field (set text_field)")
                continue  # (scored on its text alone: no prompt)
            self.render(self.prompt, doc)
            if self.type in ("multiple_choice", "classification"):
                self.target_index(doc)
            else:
                target = self.render(self.target, doc)
                self.references_of(doc)  # (a list of answers holds answers)
                if self.type == "regression":
                    try:
                        float(target)
                    except ValueError:
                        raise LmforgeError(f"task {self.name}: a regression target must be a number, not "
                                           f"{target!r}") from None
        if self.fewshot > 0:  # the demonstrations' files are rendered now too (their fields may differ)
            for doc in self.fewshot_docs if self.fewshot_docs is not None else []:
                self.demonstration(doc)

    def demonstration(self, doc: dict) -> str:
        """A solved example: the prompt followed by the right answer."""
        if self.type in ("multiple_choice", "classification"):
            answer = self.choices_of(doc)[self.target_index(doc)]
        elif self._answer_list(doc) is not None:  # several right answers: the first, as lm-evaluation-harness shows it
            answer = self.references_of(doc)[0]
        else:
            answer = self.render(self.target, doc)
        return self.render(self.prompt, doc) + self.target_delimiter + answer

    def context(self, index: int) -> str:
        """The prompt of ``docs[index]`` after ``fewshot`` demonstrations chosen with the seed."""
        doc = self.docs[index]
        parts = []
        if self.fewshot > 0:
            pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
            candidates = [i for i in range(len(pool)) if pool is not self.docs or i != index]
            rng = random.Random(f"{self.seed}-{index}")
            picked = rng.sample(candidates, min(self.fewshot, len(candidates)))
            parts = [self.demonstration(pool[i]) for i in picked]
        return self.fewshot_separator.join(parts + [self.render(self.prompt, doc)])


_ENV = None
_SINGLE_FIELD = re.compile(r"\s*\{\{\s*(\w+)\s*\}\}\s*")


def _parse_list(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


@functools.lru_cache(maxsize=256)
def _compiled(template: str):
    """A template compiled once (Jinja's sandbox: a task file cannot reach Python internals)."""
    global _ENV
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if _ENV is None:
        _ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return _ENV.from_string(template)


def _render(template: str, doc: dict, task: str) -> str:
    from jinja2 import TemplateError
    try:
        return _compiled(template).render(**doc)
    except (TemplateError, ArithmeticError, TypeError, ValueError) as e:  # (also {{ q + n }}: a text and a number)
        raise LmforgeError(f"task {task}: template {template!r} failed on an example ({e}); check the field names") from None


# -- loading ----------------------------------------------------------------------------------------


def read_jsonl(path: Path, task: str, what: str = "data file") -> list[dict]:
    if not path.is_file():
        raise LmforgeError(f"task {task}: {what} {path} " + ("is a folder; give the JSONL file in it"
                                                              if path.is_dir() else "does not exist"))
    return [doc for _, doc in jsonl_objects(path)]


_SPEC_KEYS = {"task", "version", "type", "data", "fewshot_data", "prompt", "choices", "target", "target_delimiter",
              "fewshot", "fewshot_separator", "seed", "until", "max_new_tokens", "metrics", "text_field"}


def load_task_file(path: str | os.PathLike) -> Task:
    from lmforge.train.config import read_config_file

    path = Path(path)
    spec = read_config_file(path, "task file")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise LmforgeError(f"task file {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_SPEC_KEYS))}")
    for key in ("type", "data"):
        if key not in spec:
            raise LmforgeError(f"task file {path} needs `{key}`")
    name = spec.get("task", path.stem)
    if not isinstance(name, (str, int, float)) or isinstance(name, bool) or name == "":
        raise LmforgeError(f"task file {path}: `task` must be a name (text), not {name!r}")
    name = str(name)

    def value(key: str, default, kind: str):
        """``spec[key]`` checked against what the key takes: text, a whole number (0 or more; max_new_tokens 1 or
        more), text or a list of texts, or text or a list (choices)."""
        v = spec.get(key, default)
        if kind == "text" and isinstance(v, (int, float)) and not isinstance(v, bool) and key in ("target", "task"):
            v = str(v)  # (a target may be an index: `target: 0`)
        ok = {"text": isinstance(v, str),
              "count": isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "max_new_tokens" else 0),
              "texts": isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
              "choices": v is None or isinstance(v, str) or (isinstance(v, list) and bool(v))}[kind]
        if not ok:
            wanted = {"text": "text", "count": "a whole number" + (" of 1 or more" if key == "max_new_tokens" else
                                                                    " of 0 or more"),
                      "texts": "text or a list of texts", "choices": "a list or a template"}[kind]
            raise LmforgeError(f"task file {path}: `{key}` must be {wanted}, not {v!r}")
        return [v] if kind == "texts" and isinstance(v, str) else v

    value("type", None, "text")
    value("data", None, "text")
    version = spec.get("version", 1)
    if not isinstance(version, (int, float, str)) or isinstance(version, bool):
        raise LmforgeError(f"task file {path}: `version` must be a number or text, not {version!r}")
    if "" in value("until", ["\n"], "texts"):
        raise LmforgeError(f"task file {path}: `until` holds an empty stop sequence, which would stop every answer "
                           f"before its first character; remove it")
    fewshot_data = value("fewshot_data", "", "text")
    kwargs = dict(
        name=name,
        type=spec["type"],
        docs=read_jsonl(path.parent / spec["data"], name),
        prompt=value("prompt", "{{ text }}", "text"),
        choices=value("choices", None, "choices"),
        target=value("target", "{{ target }}", "text"),
        target_delimiter=value("target_delimiter", " ", "text"),
        fewshot=value("fewshot", 0, "count"),
        fewshot_docs=read_jsonl(path.parent / fewshot_data, name, "fewshot_data file") if fewshot_data else None,
        fewshot_separator=value("fewshot_separator", "\n\n", "text"),
        seed=value("seed", 0, "count"),
        until=value("until", ["\n"], "texts"),
        max_new_tokens=value("max_new_tokens", 32, "count"),
        metrics=value("metrics", [], "texts"),
        version=version,
        text_field=value("text_field", "text", "text"),
        source=str(path),
    )
    if kwargs["fewshot_docs"] is not None and not kwargs["fewshot_docs"]:
        raise LmforgeError(f"task {name}: its fewshot_data file {fewshot_data} holds no examples")
    return Task(**kwargs)


# -- built-in tasks -------------------------------------------------------------------------------


def _arithmetic(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        docs.append({"a": a, "b": b, "answer": str(a + b)})
    return docs


def _strings(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [{"s": "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))} for _ in range(n)]


def _brackets(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        depth, out = 0, []
        for _ in range(rng.randint(2, 6)):
            if depth and rng.random() < 0.5:
                out.append(")")
                depth -= 1
            else:
                out.append("(")
                depth += 1
        out += [")"] * depth
        s = "".join(out)
        if i % 2:  # half of them unbalanced: drop or add one bracket
            s = s[:-1] if rng.random() < 0.5 else s + rng.choice("()")
        balanced = _is_balanced(s)
        docs.append({"s": s, "answer": "yes" if balanced else "no"})
    return docs


def _is_balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += 1 if ch == "(" else -1
        if depth < 0:
            return False
    return depth == 0


BUILTIN = {
    "arithmetic": lambda n, seed: Task("arithmetic", "generate", _arithmetic(n, seed), prompt="{{ a }} + {{ b }} =",
                                       target="{{ answer }}", until=["\n"], max_new_tokens=6,
                                       metrics=["exact_match"], version="builtin-1"),
    "copy": lambda n, seed: Task("copy", "generate", _strings(n, seed), prompt="copy: {{ s }} ->", target="{{ s }}",
                                 until=["\n"], max_new_tokens=12, metrics=["exact_match", "f1"], version="builtin-1"),
    "reverse": lambda n, seed: Task("reverse", "generate", _strings(n, seed), prompt="reverse: {{ s }} ->",
                                    target="{{ s[::-1] }}", until=["\n"], max_new_tokens=12,
                                    metrics=["exact_match", "f1"], version="builtin-1"),
    "brackets": lambda n, seed: Task("brackets", "multiple_choice", _brackets(n, seed),
                                     prompt="Is {{ s }} balanced?", choices=["yes", "no"], target="{{ answer }}",
                                     version="builtin-1"),
}


MAX_BUILTIN_EXAMPLES = 1_000_000  # the most --limit makes a built-in task generate


def text_task(path: str | os.PathLike) -> Task:
    """Perplexity and bits per byte of one text file."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"text file {path} " + ("is a folder; give one text file" if path.is_dir()
                                                   else "does not exist"))
    text = read_text_file(path)
    if not text.strip():
        raise LmforgeError(f"text file {path} is empty; perplexity needs text to score")
    return Task(path.name, "perplexity", [{"text": text}], source=str(path), version="text")


def resolve_tasks(names: list[str], limit: int | None = None, seed: int | None = None,
                  fewshot: int | None = None) -> list[Task]:
    """Built-in task names or YAML task files, with an optional example limit, and ``seed`` (the built-ins'
    data and every task's demonstrations; default: 0, or the task file's) and ``fewshot`` overriding the files."""
    if limit is not None and limit < 1:
        raise LmforgeError(f"--limit {limit} must be at least 1 (leave it out to use every example)")
    if limit is not None and limit > MAX_BUILTIN_EXAMPLES and any(name in BUILTIN for name in names):
        # (a built-in task makes --limit examples: a huge one would run out of memory making them)
        raise LmforgeError(f"--limit {limit} is more examples than a built-in task makes: give at most "
                           f"{MAX_BUILTIN_EXAMPLES:,} (default 100)")
    if fewshot is not None and fewshot < 0:
        raise LmforgeError(f"--shots {fewshot} must be 0 (zero-shot) or more")
    tasks = []
    for name in names:
        if name in BUILTIN:
            task = BUILTIN[name](limit or 100, seed or 0)
        elif name.endswith((".yaml", ".yml")) or Path(name).exists():
            task = load_task_file(name)
        else:
            raise LmforgeError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN)}; or pass a YAML task file")
        if limit:
            task.docs = task.docs[:limit]
        if fewshot is not None:
            task.fewshot = fewshot
        if seed is not None:
            task.seed = seed
        available = len(task.fewshot_docs) if task.fewshot_docs is not None else len(task.docs) - 1
        if task.fewshot > available:  # (an example is never its own demonstration)
            warn(f"task {task.name}: {task.fewshot} shots, but only {available} demonstration(s) to choose from "
                 f"(--limit shrinks the pool too): each prompt shows {max(available, 0)}")
            task.fewshot = max(available, 0)
        same = next((t for t in tasks if t.name == task.name), None)
        if same is not None:
            raise LmforgeError(f"two tasks are named {task.name!r} ({same.source} and {task.source}); their results "
                               f"would overwrite each other: give one another `task:` name")
        tasks.append(task)
    return tasks
