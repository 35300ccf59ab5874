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


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
