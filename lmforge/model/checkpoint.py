"""Model checkpoints are Hugging Face model folders.

A folder holds ``config.json`` + ``model.safetensors`` (sharded with an index when large) +
``tokenizer.json`` + ``generation_config.json``: ``transformers.AutoModelForCausalLM`` loads what
lmforge writes, and lmforge loads what ``save_pretrained`` writes (``pytorch_model.bin`` only
through ``torch.load(weights_only=True)``, so loading never runs code from a file).

GPT-2 in Hugging Face uses ``Conv1D`` layers whose weights are stored (in, out); lmforge uses
``nn.Linear`` (out, in), so those matrices are transposed on the way in and out.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.config import Config
from lmforge.model.gpt import GPT, build_model
from lmforge.utils import atomic_write_json, first_line, read_json, replace_dir

SUPPORTED_MODEL_TYPES = ("gpt2",)
MAX_SHARD_BYTES = 5 * 2**30
# Hugging Face GPT-2 weights stored (in, out) by its Conv1D layers.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# lmforge name inside a block → Hugging Face name inside a block.
_GPT2_BLOCK = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight",
    "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight",
    "attn.proj.bias": "attn.c_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
_GPT2_TOP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
# Buffers some transformers versions saved with GPT-2 weights; they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# -- config.json ----------------------------------------------------------------------------------


def config_to_hf(config: Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmforgeError(
            f"{where}: model_type {model_type!r} is not supported; lmforge reads: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    activation = hf.get("activation_function", "gelu_new")
    if activation in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        activation = "gelu_tanh"
    elif activation != "gelu":
        raise LmforgeError(f"{where}: activation_function {activation!r} is not supported; use gelu_new or gelu")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise LmforgeError(f"{where}: {flag}=true is not supported by lmforge's GPT-2")
    if hf.get("scale_attn_weights", True) is False:
        raise LmforgeError(f"{where}: scale_attn_weights=false is not supported by lmforge's GPT-2")
    try:
        return Config(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            mlp_hidden=hf.get("n_inner"),
            activation=activation,
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=float(hf.get("initializer_range", 0.02)),
            dropout=float(hf.get("resid_pdrop", 0.0)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    except KeyError as e:
        raise LmforgeError(f"{where}: missing field {e.args[0]!r}; is this a GPT-2 config.json?") from None
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{where}: a field has the wrong type ({e})") from None


# -- weights --------------------------------------------------------------------------------------


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {f"transformer.{hf}": sd[ours] for ours, hf in _GPT2_TOP.items() if ours in sd}
    for i in range(model.config.n_layer):
        for ours, hf in _GPT2_BLOCK.items():
            if f"blocks.{i}.{ours}" in sd:
                out[f"transformer.h.{i}.{hf}"] = sd[f"blocks.{i}.{ours}"]
    if model.lm_head is not None:
        out["lm_head.weight"] = sd["lm_head.weight"]
    # Conv1D stores (in, out); safetensors needs contiguous tensors that share no memory.
    return {k: (v.t() if k.endswith(_CONV1D) else v).detach().contiguous().cpu() for k, v in out.items()}


def state_dict_from_hf(config: Config, hf_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    # Checkpoints saved from GPT2Model (like the original `gpt2` upload) lack the "transformer." prefix.
    hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    wanted = dict((hf, ours) for ours, hf in _GPT2_TOP.items() if config.bias or not ours.endswith("bias"))
    for i in range(config.n_layer):
        for ours, hf in _GPT2_BLOCK.items():
            wanted[f"h.{i}.{hf}"] = f"blocks.{i}.{ours}"
    if not config.tie_embeddings:
        wanted["lm_head.weight"] = "lm_head.weight"
    elif "lm_head.weight" in hf_sd:
        del hf_sd["lm_head.weight"]  # a tied copy saved by older transformers
    missing = [k for k in wanted if k not in hf_sd]
    unexpected = [k for k in hf_sd if k not in wanted]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}" + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
            )
        raise LmforgeError(f"{where}: weights do not match config.json ({'; '.join(parts)})")
    # contiguous(): a transposed view as a Parameter would get row-major gradients for column-major
    # storage, which the fused AdamW kernel would pair up element by element, wrongly.
    return {ours: (hf_sd[hf].t().contiguous() if hf.endswith(_CONV1D) else hf_sd[hf]) for hf, ours in wanted.items()}


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise LmforgeError(f"{path} is not a valid safetensors file ({e}); the checkpoint is corrupt") from None
    except pickle.UnpicklingError as e:
        raise LmforgeError(f"refusing to load {path}: it is not plain tensors ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise LmforgeError(f"{path} could not be read ({first_line(e)}); the checkpoint is corrupt") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: safetensors (single or sharded) or pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return _load_weight_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.exists():
            weight_map = read_json(index, "weight index").get("weight_map", {})
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(_load_weight_file(folder / shard))
            return sd
    raise LmforgeError(f"{folder} has no model.safetensors or pytorch_model.bin; is it a model folder?")


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# -- folders --------------------------------------------------------------------------------------


def save_model(model: GPT, folder: str | os.PathLike, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face folder, atomically: all or nothing."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = model.config
        if tokenizer is not None and tokenizer.eos_id is not None and config.eos_token_id is None:
            from dataclasses import replace

            config = replace(config, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
        atomic_write_json(tmp / "config.json", config_to_hf(config))
        generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id") if getattr(config, k) is not None}
        atomic_write_json(tmp / "generation_config.json", generation)
        _write_weights(state_dict_to_hf(model), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, or a training run folder (its latest checkpoint's model folder)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"model folder {path} does not exist")
    if (path / "config.json").exists():
        return path
    from lmforge.train.checkpointing import latest_checkpoint

    ckpt = latest_checkpoint(path)
    if ckpt is not None:
        return ckpt / "model"
    raise LmforgeError(f"{path} has no config.json and no checkpoints; pass a model folder or a training run folder")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a Hugging Face GPT-2 folder (or a run folder's latest checkpoint) as an lmforge ``GPT``."""
    folder = resolve_model_dir(path)
    config = config_from_hf(read_json(folder / "config.json", "model config"), str(folder / "config.json"))
    weights = state_dict_from_hf(config, read_hf_weights(folder), str(folder))
    model = build_model(config, "meta")
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        # The first line only says "Error(s) in loading state_dict"; the second names the tensor.
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else first_line(e)
        raise LmforgeError(f"{folder}: weights do not fit config.json ({detail})") from None
    model.to(device=device, dtype=dtype or torch.float32)
    model.source = folder
    return model.eval()


def load_tokenizer_for(model: GPT, path: str | os.PathLike | None = None):
    """The tokenizer in the model's folder (or ``path``), checked against the model's vocabulary."""
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(path or model.source)
    if tok.vocab_size > model.config.vocab_size:
        raise LmforgeError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's embedding has only "
            f"{model.config.vocab_size}; use the tokenizer the model was trained with"
        )
    return tok
