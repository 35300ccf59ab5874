"""Shared fixtures: a small real corpus (some stdlib modules), its tokenizer and prepared data,
and random tiny Hugging Face GPT-2 folders. Everything is built locally; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lmforge.data.corpus import stdlib_root

# Tests never touch the network: the Hugging Face libraries work from local files only.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
# ... nor the user's home: the precision probe's cache lives in a folder of this test session.
os.environ["LMFORGE_CACHE"] = tempfile.mkdtemp(prefix="lmforge-cache-")

# Real text: a few standard-library modules, about 0.5 MB.
CORPUS_FILES = [
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
    "textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "heapq.py", "bisect.py",
    "colorsys.py", "difflib.py", "keyword.py", "numbers.py", "operator.py", "queue.py", "sched.py",
    "statistics.py", "stringprep.py", "tabnanny.py", "this.py", "tokenize.py", "uu.py", "wave.py",
]
SMALL_MODEL = {"model": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for rel in CORPUS_FILES:
        src = stdlib_root() / rel
        if src.exists():
            dst = root / rel.replace("/", "_")
            shutil.copy(src, dst)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    from lmforge.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([corpus_dir], out, vocab_size=1024, progress=False)
    return out


@pytest.fixture(scope="session")
def data_dir(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "data"
    prepare([corpus_dir], tokenizer_dir, out, val_fraction=0.1, workers=0, progress=False)
    return out


def train_config(data_dir: Path, out: Path, **overrides) -> dict:
    """A training config for a ~30K-parameter model that runs a step in milliseconds."""
    config = dict(
        SMALL_MODEL, data=str(data_dir), out=str(out), micro_batch_size=4, max_steps=20, warmup_steps=5, lr=3e-3,
        eval_interval=10, eval_windows=8, checkpoint_interval=10, threads=1, tensorboard=False, seed=0,
        dtype="float32",  # exact arithmetic: `auto` picks bf16 autocast on CPUs where the probe finds it faster
    )
    config.update(overrides)
    return config


def make_hf_gpt2(folder: Path, vocab_size: int = 1024, tokenizer_dir: Path | None = None, seed: int = 0, **kw) -> Path:
    """Save a randomly initialised tiny transformers GPT-2 (and optionally a tokenizer) to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    args = dict(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    args.update(kw)
    model = GPT2LMHeadModel(GPT2Config(**args)).eval()
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_dir) / name, Path(folder) / name)
    return Path(folder)


def make_special_token_writer(folder: Path, tokenizer_dir: Path, token: int = 1) -> Path:
    """A tiny GPT-2 folder that writes special token ``token`` (<|im_start|>, not a stop token) at every step:
    every position's output is ln_f's bias, and the tied embedding row of ``token`` points along it."""
    from safetensors.torch import load_file, save_file

    make_hf_gpt2(folder, tokenizer_dir=tokenizer_dir)
    weights = load_file(folder / "model.safetensors")
    bias = torch.randn(32)
    weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"] = torch.zeros(32), bias
    weights["transformer.wte.weight"][token] = 10 * bias
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_llama_with_bos(folder: Path) -> Path:
    """A tiny Llama folder whose tokenizer puts <s> before a text (test_tokenizer's Llama-2-style tokenizer)."""
    from test_tokenizer import llama2_style_folder
    from transformers import LlamaConfig, LlamaForCausalLM

    llama2_style_folder(folder, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                 "tokenizer_class": "PreTrainedTokenizerFast"})
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=282, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as the runs it compares with set themselves (their losses to the last digit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hf_gpt2(tmp_path, tokenizer_dir) -> Path:
    return make_hf_gpt2(tmp_path / "hf-gpt2", tokenizer_dir=tokenizer_dir)


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120):
    """Run the real `lmforge` console entry point in a subprocess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def panels(monkeypatch):
    """What `lmforge report` plotted: every call's panels (file name, panels), then the real plot."""
    from lmforge.eval import report as report_module

    calls = []
    original = report_module._plot_panels

    def record(path, panels_, xlabel):
        calls.append((path.name, panels_))
        original(path, panels_, xlabel)

    monkeypatch.setattr(report_module, "_plot_panels", record)
    return calls
