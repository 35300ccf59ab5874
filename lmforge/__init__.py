"""lmforge: tokenizers, corpora, Transformers of the GPT-2/Llama/Qwen2/Mistral/BERT families,
pretraining, fine-tuning, generation, evaluation, conversion, embeddings and run planning.

The Python API mirrors the command line; names are imported lazily so ``import lmforge`` (and
the worker processes of ``prepare``) stay fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "train_tokenizer": "lmforge.tokenizer",
    "Tokenizer": "lmforge.tokenizer",
    "prepare": "lmforge.data.prepare",
    "Config": "lmforge.model.config",
    "GPT": "lmforge.model.gpt",
    "load_model": "lmforge.model.checkpoint",
    "save_model": "lmforge.model.checkpoint",
    "convert": "lmforge.model.checkpoint",
    "Encoder": "lmforge.model.encoder",
    "EncoderConfig": "lmforge.model.encoder",
    "embed": "lmforge.model.encoder",
    "plan": "lmforge.train.plan",
    "TrainConfig": "lmforge.train.config",
    "pretrain": "lmforge.train.loop",
    "finetune": "lmforge.train.finetune",
    "FinetuneConfig": "lmforge.train.config",
    "train_reward": "lmforge.train.preference",
    "dpo": "lmforge.train.preference",
    "reward_scores": "lmforge.train.preference",
    "RewardConfig": "lmforge.train.config",
    "DPOConfig": "lmforge.train.config",
    "rl": "lmforge.train.rl",
    "RLConfig": "lmforge.train.config",
    "classify": "lmforge.eval.fewshot",
    "generate": "lmforge.infer.generate",
    "SamplingParams": "lmforge.infer.generate",
    "write_report": "lmforge.eval.report",
    "evaluate": "lmforge.eval.evaluate",
    "resolve_tasks": "lmforge.eval.tasks",
    "train_ngram": "lmforge.eval.baselines",
    "train_lstm": "lmforge.eval.baselines",
    "LmforgeError": "lmforge.errors",
}

__all__ = list(_API) + ["__version__"]


_SWITCHES = ("overwrite", "resume", "truncate", "skip-bad-lines", "force")  # flags that are keyword=True here


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    if isinstance(value, type) or not callable(value):
        return value
    api = _speaking_python(value)
    api.__module__, api.__qualname__ = __name__, name
    globals()[name] = api  # one object, which pickle finds again as lmforge.<name> (spawned processes take it)
    return api


def _speaking_python(function):
    """``function`` whose errors name its keyword arguments (``overwrite=True``), not the command line's flags
    (``--overwrite``); a command line quoted in backticks is left as written."""
    import functools
    import re

    from lmforge.errors import LmforgeError

    def keyword(match) -> str:
        flag = match.group(1)
        return flag.replace("-", "_") + ("=True" if flag in _SWITCHES else "")

    @functools.wraps(function)
    def api(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except LmforgeError as e:
            parts = str(e).split("`")  # (odd parts are quoted commands)
            said = "`".join(re.sub(r"(?<![\w`-])--([a-z][a-z0-9-]*)", keyword, part) if i % 2 == 0 else part
                            for i, part in enumerate(parts))
            if said == str(e):
                raise
            raise type(e)(said).with_traceback(e.__traceback__) from None

    return api
