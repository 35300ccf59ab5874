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
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.config import Config
from lmforge.model.gpt import GPT, build_model
from lmforge.utils import atomic_write_json, first_line, read_json, replace_dir

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", "lmforge")
MAX_SHARD_BYTES = 5 * 2**30

# -- GPT-2 ------------------------------------------------------------------------------------------
# Hugging Face GPT-2 stores these (in, out) in its Conv1D layers; lmforge's nn.Linear is (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# lmforge name inside a block → Hugging Face name inside a block.
_GPT2_BLOCK = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.c_attn.weight", "attn.qkv.bias": "attn.c_attn.bias",
    "attn.proj.weight": "attn.c_proj.weight", "attn.proj.bias": "attn.c_proj.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight", "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight", "mlp.proj.bias": "mlp.c_proj.bias",
}
_GPT2_TOP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
# Buffers that some checkpoints carry; they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _gpt2_config_to_hf(c: Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.mlp_hidden,
        "activation_function": "gelu_new" if c.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "scale_attn_weights": True,
    }


def _gpt2_config_from_hf(hf: dict, where: str) -> dict:
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
    return dict(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
        n_layer=int(hf["n_layer"]),
        n_head=int(hf["n_head"]),
        n_embd=int(hf["n_embd"]),
        mlp_hidden=hf.get("n_inner"),
        activation=activation,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        dropout=float(hf.get("resid_pdrop", 0.0)),
    )


def _gpt2_names(c: Config) -> dict[str, str]:
    """Hugging Face name → lmforge name, for every tensor of this config."""
    names = {hf: ours for ours, hf in _GPT2_TOP.items()}
    for i in range(c.n_layer):
        names.update({f"h.{i}.{hf}": f"blocks.{i}.{ours}" for ours, hf in _GPT2_BLOCK.items()})
    return names


def _gpt2_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {f"transformer.{hf}": sd[ours] for hf, ours in _gpt2_names(model.config).items()}
    return {k: v.t() if k.endswith(_CONV1D) else v for k, v in out.items()}


def _gpt2_from_hf(c: Config, hf_sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    # Checkpoints saved from GPT2Model (like the original `gpt2` upload) lack the "transformer." prefix.
    hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    return _rename(hf_sd, _gpt2_names(c), transpose=_CONV1D)


# -- Llama, Qwen2, Mistral --------------------------------------------------------------------------
# One layout: separate q/k/v and gate/up matrices, which lmforge keeps fused ([q | k | v], [gate | up]).
_LLAMA_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _llama_config_to_hf(c: Config) -> dict:
    rope_parameters = {"rope_type": "llama3" if c.rope_scaling else "default", "rope_theta": c.rope_theta}
    rope_parameters.update(c.rope_scaling or {})
    hf = {
        "architectures": [_LLAMA_ARCH[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "attention_dropout": c.dropout,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta/rope_scaling.
        "rope_parameters": rope_parameters,
        "rope_theta": c.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **c.rope_scaling} if c.rope_scaling else None,
    }
    if c.family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif c.family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        hf.update(sliding_window=c.sliding_window)
    return hf


def _llama_config_from_hf(hf: dict, where: str) -> dict:
    family = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported for {family}; lmforge's SwiGLU uses silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise LmforgeError(f"{where}: attention_bias/mlp_bias=true is not supported by lmforge's {family}")
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = {k: float(scaling[k]) for k in keys}
            rope_scaling["original_max_position_embeddings"] = int(rope_scaling["original_max_position_embeddings"])
        elif kind != "default":
            raise LmforgeError(f"{where}: rope scaling {kind!r} is not supported; lmforge supports default and llama3")
    window = None
    if family == "mistral":
        window = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window"):
        kinds = set(hf.get("layer_types") or [])
        if kinds != {"sliding_attention"}:
            raise LmforgeError(f"{where}: sliding-window attention on only some layers is not supported")
        window = hf.get("sliding_window")
    n_head = int(hf["num_attention_heads"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(hf.get("max_position_embeddings", 2048)),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        n_embd=int(hf["hidden_size"]),
        head_dim=hf.get("head_dim"),
        mlp_hidden=int(hf["intermediate_size"]),
        family=family,
        pos_embedding="rope",
        rope_theta=theta,
        rope_scaling=rope_scaling,
        norm="rmsnorm",
        mlp="swiglu",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bias=False,
        qkv_bias=family == "qwen2",
        sliding_window=int(window) if window else None,
        dropout=float(hf.get("attention_dropout", 0.0)),
    )


def _llama_names(c: Config) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight"}
    for i in range(c.n_layer):
        h, ours = f"model.layers.{i}.", f"blocks.{i}."
        names.update({
            h + "input_layernorm.weight": ours + "ln_1.weight",
            h + "post_attention_layernorm.weight": ours + "ln_2.weight",
            h + "self_attn.o_proj.weight": ours + "attn.proj.weight",
            h + "mlp.down_proj.weight": ours + "mlp.proj.weight",
        })
    return names


def _llama_fused(c: Config) -> list[tuple[str, list[str], list[int] | int]]:
    """(lmforge name, Hugging Face parts, split sizes) of every fused matrix."""
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size
    fused = []
    for i in range(c.n_layer):
        h, ours = f"model.layers.{i}.", f"blocks.{i}."
        fused.append((ours + "attn.qkv.weight", [h + f"self_attn.{x}_proj.weight" for x in "qkv"], [q, kv, kv]))
        if c.has_qkv_bias:
            fused.append((ours + "attn.qkv.bias", [h + f"self_attn.{x}_proj.bias" for x in "qkv"], [q, kv, kv]))
        fused.append((ours + "mlp.fc.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], c.hidden))
    return fused


def _llama_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {hf: sd[ours] for hf, ours in _llama_names(model.config).items()}
    for ours, parts, sizes in _llama_fused(model.config):
        out.update(zip(parts, sd[ours].split(sizes)))
    return out


def _llama_from_hf(c: Config, hf_sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    hf_sd = dict(hf_sd)
    fused, missing = {}, []
    for ours, parts, _ in _llama_fused(c):
        if all(p in hf_sd for p in parts):
            fused[ours] = torch.cat([hf_sd.pop(p) for p in parts])
        else:
            missing += [p for p in parts if p not in hf_sd]
    out, problems = _rename(hf_sd, _llama_names(c))
    out.update(fused)
    if missing:
        problems.insert(0, f"missing {_some(missing)}")
    return out, problems


# -- the dispatch -----------------------------------------------------------------------------------


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _rename(hf_sd: dict, names: dict[str, str], transpose: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """Rename Hugging Face tensors to lmforge's; returns (tensors, problems found)."""
    out = {ours: hf_sd[hf].t() if transpose and hf.endswith(transpose) else hf_sd[hf] for hf, ours in names.items() if hf in hf_sd}
    problems = []
    missing = [hf for hf in names if hf not in hf_sd]
    unexpected = [k for k in hf_sd if k not in names]
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    return out, problems


def config_to_hf(config: Config) -> dict:
    """The ``config.json`` of a checkpoint, in its family's Hugging Face layout."""
    if config.family == "lmforge":
        return {"model_type": "lmforge", "architectures": ["lmforge.GPT"], "lmforge_config": config.to_dict()}
    hf = _gpt2_config_to_hf(config) if config.family == "gpt2" else _llama_config_to_hf(config)
    hf.update({
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    })
    return hf


def config_from_hf(hf: dict, where: str = "config.json") -> Config:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmforgeError(
            f"{where}: model_type {model_type!r} is not supported; lmforge reads: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        if model_type == "lmforge":
            return Config.from_dict(hf["lmforge_config"])
        fields = _gpt2_config_from_hf(hf, where) if model_type == "gpt2" else _llama_config_from_hf(hf, where)
        return Config(
            **fields,
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gpt2")),
            init_std=float(hf.get("initializer_range", 0.02)),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )
    except KeyError as e:
        raise LmforgeError(f"{where}: missing field {e.args[0]!r}; is this a {model_type} config.json?") from None
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{where}: a field has the wrong type ({e})") from None


def _first_id(value):
    """Some configs list several end-of-sequence ids; lmforge stops on the first."""
    return value[0] if isinstance(value, list) and value else value


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config
    if c.family == "lmforge":
        out = dict(model.state_dict())
    else:
        out = _gpt2_to_hf(model) if c.family == "gpt2" else _llama_to_hf(model)
        if model.lm_head is not None:
            out["lm_head.weight"] = model.lm_head.weight
    # safetensors needs contiguous tensors that share no memory.
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def state_dict_from_hf(config: Config, hf_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if config.family == "lmforge":
        return {k: v.contiguous() for k, v in hf_sd.items()}  # lmforge's own names; load_state_dict checks them
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    head = hf_sd.pop("lm_head.weight", None)
    if config.family == "gpt2":
        out, problems = _gpt2_from_hf(config, hf_sd)
    else:
        out, problems = _llama_from_hf(config, hf_sd)
    if not config.tie_embeddings:
        if head is None:
            problems.insert(0, "missing lm_head.weight")
        else:
            out["lm_head.weight"] = head
    # (a tied head saved by older transformers is a copy of the embeddings and is dropped)
    if problems:
        raise LmforgeError(f"{where}: weights do not match config.json ({'; '.join(problems)})")
    # contiguous(): a transposed view as a Parameter would get row-major gradients for column-major
    # storage, which the fused AdamW kernel would pair up element by element, wrongly.
    return {k: v.contiguous() for k, v in out.items()}


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
