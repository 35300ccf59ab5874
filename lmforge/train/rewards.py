"""Rewards for reinforcement learning: each scores (prompt, completion, the prompt row's other fields).

    model:DIR        a reward model (`lmforge reward`): its scalar score of the prompt and completion
    exact            1 when the completion's final answer (its last number, else its first line) equals
                     the row's "answer", else 0
    arithmetic       the built-in arithmetic task's check: the first number of the completion is a + b,
                     with a and b from the row ("a", "b") or from a prompt "A + B ="
    regex:PATTERN    1 when the completion matches PATTERN (re.search), else 0: a format check
    MODULE:FUNCTION  your function, called as FUNCTION(prompt=..., completion=..., **row_fields) -> float.
                     This imports and runs your code (MODULE is found from the current folder or
                     PYTHONPATH); lmforge does so only because you named it.

Several are combined with ``;`` and weighted by ``reward_weights`` ("1;0.5"): the reward is the
weighted sum. A reward that raises or returns NaN/inf stops the run naming the prompt, or (with
``reward_errors: penalty``) is counted and scored ``error_penalty`` instead.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _final_answer(text: str) -> str:
    numbers = _NUMBER.findall(text.replace(",", ""))
    if numbers:
        return numbers[-1]
    return text.strip().split("\n")[0].strip()


def exact_answer(prompt: str, completion: str, answer=None, **_) -> float:
    if answer is None:
        raise LmforgeError(EXACT_NEEDS)
    expected = str(answer).strip().replace(",", "")
    got = _final_answer(completion)
    try:
        return float(float(got) == float(expected))
    except ValueError:
        return float(got == expected)


def _prompt_text(prompt) -> str:
    """A prompt's text: itself, or the last message's content of a conversation."""
    if isinstance(prompt, list):
        return next((m.get("content", "") for m in reversed(prompt) if isinstance(m, dict)), "")
    return prompt if isinstance(prompt, str) else ""


def _operands(prompt) -> tuple[str, str] | None:
    match = re.search(r"(-?\d+)\s*\+\s*(-?\d+)\s*=?\s*$", _prompt_text(prompt))
    return match.groups() if match else None


def arithmetic(prompt: str, completion: str, a=None, b=None, answer=None, **_) -> float:
    if answer is None:
        if a is None or b is None:
            operands = _operands(prompt)
            if operands is None:
                raise LmforgeError(ARITHMETIC_NEEDS)
            a, b = operands
        answer = int(a) + int(b)
    first = _NUMBER.search(completion)
    return float(first is not None and first.group() == str(answer))


EXACT_NEEDS = "the exact reward needs an \"answer\" field in every prompt row"
ARITHMETIC_NEEDS = ("the arithmetic reward needs \"a\" and \"b\" (or \"answer\") fields, or a prompt ending "
                    "\"A + B =\"")


def row_problem(spec: str, row: dict, functions: list | tuple = ()) -> str | None:
    """What a prompt row lacks for the built-in rewards named in ``spec``, or what your ``functions``
    (``user_functions(spec)``) cannot be called with (checked before a run starts, so that a row deep in the
    file stops nothing half-way), or None."""
    names = set(_names(spec))
    if "exact" in names and row.get("answer") is None:
        return EXACT_NEEDS
    if ("arithmetic" in names and row.get("answer") is None and (row.get("a") is None or row.get("b") is None)
            and _operands(row.get("prompt")) is None):
        return ARITHMETIC_NEEDS
    for name, fn in functions:
        if (problem := _fields_problem(name, fn, row)) is not None:
            return problem
    return None


def _fields_problem(name: str, fn, row: dict) -> str | None:
    """Whether ``fn(prompt=..., completion=..., **fields)`` binds for this row's fields (as ``Reward`` calls it)."""
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # (a builtin without a signature: called as it is)
        return None
    keywords = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    named = {p.name for p in keywords}
    required = [p.name for p in keywords if p.default is p.empty and p.name not in ("prompt", "completion")]
    fields = [k for k in row if k not in ("prompt", "completion")]
    function = name.rpartition(":")[2]
    missing = [k for k in required if k not in row]
    if missing:
        have = ", ".join(repr(k) for k in fields) or "none but 'prompt'"
        return (f"reward {name}: {function}() needs the field(s) {', '.join(map(repr, missing))} (its parameters), "
                f"which this row lacks (its other fields: {have}); add them to every row, or give the parameter(s) a "
                f"default")
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        extra = [k for k in fields if k not in named]
        if extra:
            return (f"reward {name}: lmforge passes every field of the row, {function}(prompt=..., completion=..., "
                    f"**row_fields), but {function}() takes no parameter {', '.join(map(repr, extra))}; add **fields "
                    f"to its parameters")
    return None


class Reward:
    """One named reward with its weight."""

    def __init__(self, name: str, weight: float, fn=None, batch_fn=None):
        self.name, self.weight, self.fn, self.batch_fn = name, weight, fn, batch_fn
        self.key = slug(name)  # its metrics' name (reward_KEY), made unique among a run's rewards by parse_rewards
        self.warned = False  # (a failure scored as a penalty is said once)

    def __call__(self, prompts: list, completions: list[str], rows: list[dict]) -> list:
        """Each value a float, or the exception it raised (the caller decides what an error costs)."""
        if self.batch_fn is not None:
            return self.batch_fn(prompts, completions)
        out = []
        for prompt, completion, row in zip(prompts, completions, rows):
            fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
            try:
                out.append(self.fn(prompt=prompt, completion=completion, **fields))
            except LmforgeError:
                raise
            except Exception as e:  # noqa: BLE001 (a user's function: reported by the caller, with the prompt)
                out.append(e)
        return out


def _reward_model(path: str, device):
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.train.preference import reward_scores

    if not Path(path).exists():
        raise LmforgeError(f"reward model {path} does not exist")
    model = load_model(path, device)
    c = model.config
    if getattr(c, "head", None) != "sequence_classification" or getattr(c, "num_labels", None) != 1:
        raise LmforgeError(f"{path} is not a reward model (one score); train one with `lmforge reward`")
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer_for(model)

    def score(prompts, completions):
        rows = [{"prompt": p, "answer": c} for p, c in zip(prompts, completions)]
        return reward_scores(model, rows, tokenizer)

    return score


def _user_function(spec: str):
    module_name, _, function = spec.rpartition(":")
    dotted = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
    if (not re.fullmatch(dotted, module_name) or module_name.endswith(".py")  # (a file: lenr.py, not module py of lenr)
            or not re.fullmatch(r"[A-Za-z_]\w*", function)):
        stem = Path(module_name).stem.lstrip(".") or "mymodule"
        raise LmforgeError(f"reward {spec}: MODULE:FUNCTION names a Python module as you would import it, not a "
                           f"file (for a function {function or 'score'} in {stem}.py: {stem}:{function or 'score'}, "
                           f"run from the folder that holds {stem}.py)")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LmforgeError(f"reward {spec}: cannot import {module_name} ({e}); run from the folder that holds "
                           f"{module_name.replace('.', '/')}.py or add it to PYTHONPATH") from None
    except Exception as e:  # noqa: BLE001 (your module failed as it was imported: a syntax error, a raise)
        where = f" ({Path(e.filename).name}:{e.lineno})" if isinstance(e, SyntaxError) and e.filename else ""
        raise LmforgeError(f"reward {spec}: importing {module_name} failed{where}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from None
    where = getattr(module, "__file__", None)
    mine = Path.cwd() / f"{module_name.replace('.', '/')}.py"
    if mine.is_file() and (where is None or Path(where).resolve() != mine.resolve()):
        # a module of that name was found first (the standard library's json, an installed package's): not your file
        top = module_name.partition(".")[0]
        rename = (f"rename your file (for example {top}_reward.py, then {top}_reward:{function})" if top == module_name
                  else f"rename your folder {top} (for example {top}_reward, then {top}_reward{module_name[len(top):]}:"
                       f"{function})")
        raise LmforgeError(f"reward {spec}: `import {module_name}` gives {where or 'a module built into Python'}, not "
                           f"your {mine.relative_to(Path.cwd())} (Python finds a module of that name first); {rename}")
    fn = getattr(module, function, None)
    if not callable(fn):
        raise LmforgeError(f"reward {spec}: {module_name} (imported from {where or 'Python itself: a built-in module'})"
                           f" has no function {function}")
    _check_signature(spec, fn)
    return fn


def _check_signature(spec: str, fn) -> None:
    """Refuse, before any rollout, a function that cannot be called as lmforge calls it: one completion at a time,
    ``fn(prompt=..., completion=..., **row_fields)`` (TRL's reward functions take lists: prompts, completions)."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (a builtin without a signature: called as it is)
        return
    required = [p.name for p in signature.parameters.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    batch = [name for name in required if name in ("prompts", "completions")]
    try:
        signature.bind_partial(prompt="", completion="")
    except TypeError:
        batch = batch or ["prompt", "completion"]
    if batch or any(p.kind is p.POSITIONAL_ONLY for p in signature.parameters.values()):
        raise LmforgeError(f"reward {spec}: lmforge calls it once per completion as {spec.rpartition(':')[2]}(prompt=..., "
                           f"completion=..., **row_fields) and takes a float back, but it is defined as "
                           f"{spec.rpartition(':')[2]}{signature}; give it that signature (TRL's batch functions take "
                           f"lists of prompts and completions)")


def _names(spec: str) -> list[str]:
    # a regex keeps its pattern exactly (a leading or trailing space may be the point); other names are trimmed
    return [n if n.startswith("regex:") else n.strip() for n in (s.lstrip() for s in spec.split(";")) if n.strip()]


def _is_user_function(name: str) -> bool:
    return (name not in ("exact", "arithmetic") and not name.startswith(("regex:", "model:"))
            and not Path(name).is_dir() and ":" in name)


def user_functions(spec: str) -> list[tuple[str, object]]:
    """Your MODULE:FUNCTION rewards of ``spec``, imported and checked: (name, function) pairs."""
    return [(name, _user_function(name)) for name in _names(spec) if _is_user_function(name)]


def parse_rewards(spec: str, weights: str = "", device="cpu") -> list[Reward]:
    """The rewards named by ``spec`` ("exact;model:runs/rm;mymodule:score") with ``weights`` ("1;0.5;2")."""
    names = _names(spec)
    if not names:
        raise LmforgeError("no reward given: set --reward (exact, arithmetic, regex:PATTERN, model:DIR or "
                           "MODULE:FUNCTION; several joined with ;)")
    values = [w.strip() for w in weights.split(";") if w.strip()] if weights else ["1"] * len(names)
    if len(values) != len(names):
        raise LmforgeError(f"--reward-weights has {len(values)} value(s) for {len(names)} reward(s)")
    try:
        values = [float(v) for v in values]
    except ValueError:
        raise LmforgeError(f"--reward-weights must be numbers joined with ;, not {weights!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise LmforgeError(f"--reward-weights must be finite numbers, not {weights!r}")
    rewards = []
    for name, weight in zip(names, values):
        if name == "exact":
            rewards.append(Reward(name, weight, exact_answer))
        elif name == "arithmetic":
            rewards.append(Reward(name, weight, arithmetic))
        elif name.startswith("regex:"):
            if not name[len("regex:"):]:
                raise LmforgeError("reward regex: needs a pattern (regex:PATTERN); an empty one matches every completion")
            try:
                pattern = re.compile(name[len("regex:"):])
            except re.error as e:
                raise LmforgeError(f"reward {name}: not a valid regular expression ({e})") from None
            rewards.append(Reward(name, weight, lambda completion, _p=pattern, **_: float(bool(_p.search(completion)))))
        elif name.startswith("model:") or Path(name).is_dir():
            rewards.append(Reward(name, weight, batch_fn=_reward_model(name.removeprefix("model:"), device)))
        elif _is_user_function(name):
            rewards.append(Reward(name, weight, _user_function(name)))
        else:
            raise LmforgeError(f"unknown reward {name!r}: use exact, arithmetic, regex:PATTERN, model:DIR or "
                               f"MODULE:FUNCTION")
    seen: set[str] = set()
    for reward in rewards:  # two rewards whose names read alike ("regex:a+", "regex:a*") keep their own metrics
        key, i = reward.key, 2
        while key in seen:
            key, i = f"{reward.key}_{i}", i + 1
        reward.key = key
        seen.add(key)
    return rewards


def slug(name: str) -> str:
    """A reward's name as a metric's: letters, digits and _ ("regex:^\\d+$" → "d")."""
    text = "".join(ch if ch.isalnum() else "_" for ch in name.removeprefix("model:").removeprefix("regex:"))
    return text[:40].strip("_") or "reward"


def score(rewards: list[Reward], prompts: list, completions: list[str], rows: list[dict], on_error: str,
          penalty: float) -> tuple[list[float], dict[str, list[float]], int]:
    """(total reward of each completion, each reward's values, how many values were errors)."""
    totals = [0.0] * len(completions)
    parts: dict[str, list[float]] = {}
    errors = 0
    for reward in rewards:
        values = reward(prompts, completions, rows)
        clean = []
        for i, value in enumerate(values):
            bad = isinstance(value, Exception)
            if not bad:
                try:
                    value = float(value)
                    bad = not math.isfinite(value)
                except (TypeError, ValueError):
                    bad = True
            if bad:
                what = f"raised {type(value).__name__}: {value}" if isinstance(value, Exception) else f"returned {value!r}"
                if on_error != "penalty":
                    raise LmforgeError(f"reward {reward.name} {what} for the prompt {str(prompts[i])[:80]!r}; fix it, or "
                                       f"pass --reward-errors penalty to score such completions {penalty}")
                if not reward.warned:  # (once: the rest are counted in the metrics' reward_errors)
                    from lmforge.utils import warn

                    warn(f"reward {reward.name} {what} for the prompt {str(prompts[i])[:80]!r}; scored {penalty} "
                         f"(--reward-errors penalty), as every such completion will be: see reward_errors in the metrics")
                    reward.warned = True
                errors += 1
                value = penalty
            clean.append(value)
            totals[i] += reward.weight * value
        parts[reward.key] = clean
    return totals, parts, errors
