"""Hugging Face layouts of each family: ``config.json`` fields and tensor names, both ways.

lmforge's decoder keeps q/k/v (and SwiGLU's gate/up) fused in one matrix; Hugging Face stores
them apart (Llama family) or transposed in ``Conv1D`` layers (GPT-2). Everything here is pure
renaming, splitting, concatenating and transposing of tensors: no arithmetic on values.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import Config
from lmforge.model.gpt import GPT, deferring

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral", "bert", "t5", "mt5", "lmforge")
ENCODER_DECODER_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1's architecture; lmforge writes it back as t5

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


# transformers' names of GELU (ACT2FN) → lmforge's two: the exact one, and the tanh approximation (gelu_new,
# gelu_fast and gelu_accurate are that formula written three ways)
_GELU_NAMES = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh"}


def _gpt2_config_from_hf(hf: dict, where: str) -> dict:
    activation = _GELU_NAMES.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        activation = hf["activation_function"]
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
        mlp_hidden=int(hf["n_inner"]) if hf.get("n_inner") is not None else None,
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
    kind = (c.rope_scaling.get("rope_type", "llama3") if c.rope_scaling else "default")
    scaling = {k: v for k, v in (c.rope_scaling or {}).items() if k != "rope_type"}
    rope_parameters = {"rope_type": kind, "rope_theta": c.rope_theta, **scaling}
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
        "rope_scaling": {"rope_type": kind, **scaling} if c.rope_scaling else None,
    }
    if c.family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif c.family == "qwen2":
        slides = c.sliding_window is not None  # (on every layer: from layer 0 on)
        hf.update(use_sliding_window=slides, sliding_window=c.sliding_window, max_window_layers=0 if slides else c.n_layer,
                  layer_types=["sliding_attention" if slides else "full_attention"] * c.n_layer)
    else:
        hf.update(sliding_window=c.sliding_window)
    return hf


# transformers' defaults where config.json has no max_position_embeddings
_DEFAULT_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


def _llama_config_from_hf(hf: dict, where: str) -> dict:
    family = hf["model_type"]
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # (transformers' one function under two names)
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
        elif kind == "linear":  # (positions divided by the factor)
            rope_scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
        elif kind != "default":
            raise LmforgeError(f"{where}: rope scaling {kind!r} is not supported; lmforge supports default, linear "
                               f"and llama3")
    window = None
    if family == "mistral":
        window = hf.get("sliding_window", 4096)  # (transformers' MistralConfig when the key is absent)
    elif family == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
        # transformers: the layers from max_window_layers on slide (layer_types says so when written)
        layers, first = int(hf["num_hidden_layers"]), int(hf.get("max_window_layers", 28))
        kinds = set(hf.get("layer_types") or ["full_attention"] * min(first, layers) + ["sliding_attention"] * (layers - first))
        if kinds == {"sliding_attention"}:
            window = hf.get("sliding_window")
        elif kinds != {"full_attention"}:
            raise LmforgeError(f"{where}: sliding-window attention on only some layers is not supported")
    n_head = int(hf["num_attention_heads"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(hf.get("max_position_embeddings", _DEFAULT_POSITIONS[family])),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        n_embd=int(hf["hidden_size"]),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") is not None else None,
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


class RowConcat:
    """Tensors stacked along their rows, not yet copied: what a fused matrix is while a sharded model is being
    opened (``deferred_init``), so that each rank copies only its rows of q/k/v or gate/up from the memory map."""

    def __init__(self, parts: list[torch.Tensor], dtype: torch.dtype | None = None):
        self.parts, self.dtype = parts, dtype or parts[0].dtype
        self.shape = torch.Size([sum(p.shape[0] for p in parts), *parts[0].shape[1:]])

    def to(self, dtype: torch.dtype) -> RowConcat:
        return RowConcat(self.parts, dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the concatenation (copied, in ``dtype``)."""
        out, offset = [], 0
        for part in self.parts:
            n = part.shape[0]
            a, b = max(start - offset, 0), min(stop - offset, n)
            if a < b:
                out.append(part[a:b].to(self.dtype))
            offset += n
        return torch.cat(out) if out else torch.empty(0, *self.shape[1:], dtype=self.dtype)


def _llama_from_hf(c: Config, hf_sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    hf_sd = dict(hf_sd)
    fused, missing = {}, []
    for ours, parts, _ in _llama_fused(c):
        if all(p in hf_sd for p in parts):
            taken = [hf_sd.pop(p) for p in parts]
            fused[ours] = RowConcat(taken) if deferring() else torch.cat(taken)
        else:
            missing += [p for p in parts if p not in hf_sd]
    out, problems = _rename(hf_sd, _llama_names(c))
    out.update(fused)
    if missing:
        problems.insert(0, f"missing {_some(missing)}")
    return out, problems


# -- the dispatch -----------------------------------------------------------------------------------


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor laid out row-major: a transposed view as a Parameter would get row-major gradients for
    column-major storage, which the fused AdamW kernel would pair up element by element, wrongly. While a
    sharded model is being opened (``deferred_init``) views are kept, so that nothing is copied whole: each
    rank copies its rows of one tensor at a time."""
    return dict(tensors) if deferring() else {k: v.contiguous() for k, v in tensors.items()}


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


_CLASSIFIER_ARCH = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                    "qwen2": "Qwen2ForSequenceClassification", "mistral": "MistralForSequenceClassification"}


def config_to_hf(config: Config) -> dict:
    """The ``config.json`` of a checkpoint, in its family's Hugging Face layout."""
    if config.family == "lmforge":
        return {"model_type": "lmforge", "architectures": ["lmforge.GPT"], "lmforge_config": config.to_dict()}
    hf = _gpt2_config_to_hf(config) if config.family == "gpt2" else _llama_config_to_hf(config)
    if config.head == "sequence_classification":
        hf.update(architectures=[_CLASSIFIER_ARCH[config.family]], pad_token_id=config.pad_token_id, **_label_maps(config))
    hf.update({
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    })
    return hf


def config_from_hf(hf: dict, where: str = "config.json", weights: dict[str, torch.Tensor] | None = None) -> Config:
    """A decoder's ``Config`` from its ``config.json``. With the folder's ``weights``, an ``lm_head`` that differs from
    the token embeddings is an untied head whatever tie_word_embeddings says, as transformers 5 reads it (it ties
    only what the file does not hold twice)."""
    model_type = hf.get("model_type")
    if model_type in ("lmforge-ngram", "lmforge-lstm"):
        kind = {"lmforge-ngram": "n-gram", "lmforge-lstm": "LSTM"}[model_type]
        raise LmforgeError(f"{where}: this is an {kind} baseline; it is scored beside "
                           "Transformers by `lmforge eval --data DATA --model ...`, not used as one")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmforgeError(
            f"{where}: model_type {model_type!r} is not supported; lmforge reads: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "bert":
        raise LmforgeError(f"{where}: bert is an encoder; this needs a decoder (gpt2, llama, qwen2, mistral)")
    if model_type in ENCODER_DECODER_TYPES:
        raise LmforgeError(f"{where}: {model_type} is an encoder-decoder; this needs a decoder (gpt2, llama, qwen2, mistral)")
    with _reading(where, model_type):
        if model_type == "lmforge":
            return Config.from_dict(hf["lmforge_config"])
        fields = _gpt2_config_from_hf(hf, where) if model_type == "gpt2" else _llama_config_from_hf(hf, where)
        arch = (hf.get("architectures") or [""])[0]
        if arch.endswith("ForSequenceClassification"):
            id2label = hf.get("id2label") or {}
            labels = tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else None
            fields.update(head="sequence_classification", labels=labels, pad_token_id=hf.get("pad_token_id"),
                          num_labels=len(labels) if labels else int(hf.get("num_labels", 2)))
        elif arch and not arch.endswith(("LMHeadModel", "ForCausalLM", "Model")):
            raise LmforgeError(f"{where}: architecture {arch} is not supported; lmforge reads causal LMs and "
                               f"sequence classifiers of {model_type}")
        tied = bool(hf.get("tie_word_embeddings", model_type == "gpt2"))
        if tied and fields.get("head") is None and weights is not None and _own_head(weights):
            tied = False
        return Config(
            **fields,
            tie_embeddings=tied,
            init_std=float(hf.get("initializer_range", 0.02)),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )


_EMBEDDINGS = ("transformer.wte.weight", "wte.weight", "model.embed_tokens.weight", "embed_tokens.weight")


def _own_head(weights: dict[str, torch.Tensor]) -> bool:
    """Whether ``weights`` hold an lm_head that is not a copy of the token embeddings."""
    head = weights.get("lm_head.weight")
    embeddings = next((weights[name] for name in _EMBEDDINGS if name in weights), None)
    return (head is not None and embeddings is not None
            and not (head.shape == embeddings.shape and torch.equal(head, embeddings)))


@contextmanager
def _reading(where: str, model_type: str):
    """A config.json's missing or mistyped field as one line, not a traceback."""
    try:
        yield
    except KeyError as e:
        raise LmforgeError(f"{where}: missing field {e.args[0]!r}; is this a {model_type} config.json?") from None
    except (TypeError, ValueError, AttributeError) as e:  # (AttributeError: a list or string where an object belongs)
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
        if model.score is not None:
            out["score.weight"] = model.score.weight
    # safetensors needs contiguous tensors that share no memory.
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def state_dict_from_hf(config: Config, hf_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if config.family == "lmforge":
        return {k: v.contiguous() for k, v in hf_sd.items()}  # lmforge's own names; load_state_dict checks them
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    head = hf_sd.pop("lm_head.weight", None)
    if config.tie_embeddings and head is not None and not any(k in hf_sd for k in _EMBEDDINGS):
        # a tied model saved with its head's name for the shared matrix: transformers ties the embeddings to it
        hf_sd["model.embed_tokens.weight" if config.family != "gpt2" else "transformer.wte.weight"] = head
    # (a score head in a language model's folder stays in: it is refused below, not dropped)
    score = hf_sd.pop("score.weight", None) if config.head == "sequence_classification" else None
    if config.family == "gpt2":
        out, problems = _gpt2_from_hf(config, hf_sd)
    else:
        if not any(k.startswith("model.") for k in hf_sd):  # a bare LlamaModel's names (no "model." prefix)
            hf_sd = {k if k.startswith(("lm_head.", "score.")) else "model." + k: v for k, v in hf_sd.items()}
        out, problems = _llama_from_hf(config, hf_sd)
    if config.head == "sequence_classification":
        if score is None:
            problems.insert(0, "missing score.weight")
        else:
            out["score.weight"] = score
    elif not config.tie_embeddings:
        if head is None:
            problems.insert(0, "missing lm_head.weight")
        else:
            out["lm_head.weight"] = head
    # (a tied head saved by older transformers is a copy of the embeddings and is dropped)
    if problems:
        raise LmforgeError(f"{where}: weights do not match config.json ({'; '.join(problems)})")
    return _contiguous(out)


# -- BERT (the encoder) -----------------------------------------------------------------------------
# The backbone's names; models with a head store it under "bert." and the head beside it.
_BERT_ARCH = {None: "BertModel", "masked_lm": "BertForMaskedLM", "pretraining": "BertForPreTraining",
              "sequence_classification": "BertForSequenceClassification",
              "token_classification": "BertForTokenClassification", "question_answering": "BertForQuestionAnswering"}
_BERT_IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def bert_config_from_hf(hf: dict, weight_names, where: str):

    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise LmforgeError(f"{where}: a BERT decoder (is_decoder/add_cross_attention true: causal attention) is not "
                           f"supported; lmforge's encoder attends both ways")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    act = _GELU_NAMES.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise LmforgeError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported for bert; use gelu")
    heads = {v: k for k, v in _BERT_ARCH.items()}
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in heads:
        raise LmforgeError(f"{where}: architecture {arch} is not supported; lmforge reads {', '.join(_BERT_ARCH.values())}")
    with _reading(where, "bert"):
        return _bert_config(hf, weight_names, heads[arch], act)


def _bert_config(hf: dict, weight_names, head: str | None, act: str):
    from lmforge.model.encoder import EncoderConfig

    id2label = hf.get("id2label") or {}
    labels = tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else None
    return EncoderConfig(
        vocab_size=int(hf["vocab_size"]),
        block_size=int(hf.get("max_position_embeddings", 512)),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=int(hf["num_attention_heads"]),
        n_embd=int(hf["hidden_size"]),
        mlp_hidden=int(hf["intermediate_size"]),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        activation=act,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)),
        pad_token_id=int(hf.get("pad_token_id") or 0),
        pooler=any(n.endswith("pooler.dense.weight") for n in weight_names),
        pooling=hf.get("lmforge_pooling", "pooler"),
        head=head,
        num_labels=len(labels) if labels else int(hf.get("num_labels", 2)),
        labels=labels,
    )


def bert_config_to_hf(c) -> dict:
    hf = {
        "architectures": [_BERT_ARCH[c.head]],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.mlp_hidden,
        "hidden_act": "gelu" if c.activation == "gelu" else "gelu_new",
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "max_position_embeddings": c.block_size,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": c.init_std,
        "layer_norm_eps": c.norm_eps,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }
    if c.head in ("sequence_classification", "token_classification"):
        hf.update(_label_maps(c))
    if c.head == "sequence_classification" and c.pooling != "pooler":
        # transformers' BertForSequenceClassification always reads the pooler; lmforge notes its own choice.
        hf["lmforge_pooling"] = c.pooling
    return hf


def _label_maps(c) -> dict:
    labels = c.labels or tuple(f"LABEL_{i}" for i in range(c.num_labels))
    return {"id2label": {str(i): name for i, name in enumerate(labels)}, "label2id": {name: i for i, name in enumerate(labels)}}


def _bert_names(c) -> dict[str, str]:
    names = {
        "embeddings.word_embeddings.weight": "wte.weight",
        "embeddings.position_embeddings.weight": "wpe.weight",
        "embeddings.token_type_embeddings.weight": "wtt.weight",
        "embeddings.LayerNorm.weight": "ln_emb.weight",
        "embeddings.LayerNorm.bias": "ln_emb.bias",
    }
    for i in range(c.n_layer):
        h, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            names.update({
                f"{h}attention.output.dense.{part}": f"{ours}attn.proj.{part}",
                f"{h}attention.output.LayerNorm.{part}": f"{ours}ln_1.{part}",
                f"{h}intermediate.dense.{part}": f"{ours}fc.{part}",
                f"{h}output.dense.{part}": f"{ours}proj.{part}",
                f"{h}output.LayerNorm.{part}": f"{ours}ln_2.{part}",
            })
    if c.pooler:
        names.update({"pooler.dense.weight": "pooler.weight", "pooler.dense.bias": "pooler.bias"})
    prefix = "" if c.head is None else "bert."
    names = {prefix + hf: ours for hf, ours in names.items()}
    if c.head == "pretraining":
        names.update({"cls.seq_relationship.weight": "nsp.weight", "cls.seq_relationship.bias": "nsp.bias"})
    if c.head in ("masked_lm", "pretraining"):
        names.update({
            "cls.predictions.transform.dense.weight": "mlm.dense.weight",
            "cls.predictions.transform.dense.bias": "mlm.dense.bias",
            "cls.predictions.transform.LayerNorm.weight": "mlm.ln.weight",
            "cls.predictions.transform.LayerNorm.bias": "mlm.ln.bias",
            "cls.predictions.bias": "mlm.bias",
        })
    elif c.head == "question_answering":
        names.update({"qa_outputs.weight": "qa_outputs.weight", "qa_outputs.bias": "qa_outputs.bias"})
    elif c.head is not None:
        names.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    return names


def _bert_fused(c) -> list[tuple[str, list[str]]]:
    prefix = "" if c.head is None else "bert."
    return [(f"blocks.{i}.attn.qkv.{part}", [f"{prefix}encoder.layer.{i}.attention.self.{x}.{part}" for x in ("query", "key", "value")])
            for i in range(c.n_layer) for part in ("weight", "bias")]


def _legacy_norm_name(name: str) -> str:
    """``name`` with LayerNorm's ``gamma``/``beta`` (TensorFlow's names) as ``weight``/``bias``."""
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def bert_state_dict_from_hf(c, hf_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """lmforge's tensors of a BERT folder. An MLM head of its own (not a copy of the word embeddings), which lmforge's
    encoder does not have, is refused rather than replaced by the word embeddings, whatever tie_word_embeddings says:
    transformers 5 predicts with such a head even where the field is true (4 tied it over)."""
    own = next((v for k, v in hf_sd.items() if k.endswith("cls.predictions.decoder.weight")), None)
    words = next((v for k, v in hf_sd.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if (c.head in ("masked_lm", "pretraining") and own is not None and words is not None
            and not (own.shape == words.shape and torch.equal(own, words))):
        raise LmforgeError(f"{where}: the masked-LM head has weights of its own (not the word embeddings'), which "
                           f"lmforge's encoder does not support: it predicts with the word embeddings")
    # Google's BERT checkpoints (bert-base-uncased) name LayerNorm's parameters gamma and beta, as transformers renames
    # on loading, and carry the next-sentence head beside the masked-LM one, which transformers leaves unused there
    hf_sd = {_legacy_norm_name(k): v for k, v in hf_sd.items()}
    if "cls.predictions.decoder.bias" in hf_sd:  # the bias the head adds, where a file holds it (transformers uses it)
        hf_sd["cls.predictions.bias"] = hf_sd["cls.predictions.decoder.bias"]
    next_sentence = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")
    unused = _BERT_IGNORED + (next_sentence if c.head == "masked_lm" else ())
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith(unused)}
    if c.head is None:  # a bare backbone saved from a head model keeps its "bert." prefix
        hf_sd = {k.removeprefix("bert."): v for k, v in hf_sd.items()}
    fused, missing = {}, []
    for ours, parts in _bert_fused(c):
        if all(p in hf_sd for p in parts):
            fused[ours] = torch.cat([hf_sd.pop(p) for p in parts])
        else:
            missing += [p for p in parts if p not in hf_sd]
    out, problems = _rename(hf_sd, _bert_names(c))
    if missing:
        problems.insert(0, f"missing {_some(missing)}")
    if problems:
        raise LmforgeError(f"{where}: weights do not match config.json ({'; '.join(problems)})")
    out.update(fused)
    return _contiguous(out)


def bert_state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    c, sd = model.config, model.state_dict()
    out = {hf: sd[ours] for hf, ours in _bert_names(c).items()}
    for ours, parts in _bert_fused(c):
        out.update(zip(parts, sd[ours].chunk(3)))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


# -- T5 (the encoder-decoder) -----------------------------------------------------------------------
# Whether the head is tied is told in more than one place. transformers 4 reads tie_word_embeddings (true:
# the head is the shared matrix and the output is scaled by d_model^-0.5; false: its own head, no
# scaling). transformers 5 always ties unless the file holds an lm_head that differs, and reads the
# scaling from scale_decoder_outputs. lmforge reads the head from the weights and the scaling from
# scale_decoder_outputs when present, else from tie_word_embeddings, and writes both fields.
_T5_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               # the original T5 checkpoints (t5-small ...) carry a cross-attention position bias that no T5 uses
               # (transformers ignores it too)
               "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def t5_config_from_hf(hf: dict, weights: dict[str, torch.Tensor], where: str):
    from lmforge.model.encoder_decoder import ACTIVATIONS, feed_forward_activation

    feed_forward = str(hf.get("feed_forward_proj", "relu"))
    try:
        feed_forward_activation(feed_forward)
    except LmforgeError:
        raise LmforgeError(f"{where}: feed_forward_proj {feed_forward!r} is not supported; lmforge reads "
                           f"{', '.join(ACTIVATIONS)}, each also as gated-NAME") from None
    with _reading(where, "t5"):
        return _t5_config(hf, weights, feed_forward)


def _t5_config(hf: dict, weights: dict[str, torch.Tensor], feed_forward: str):
    from lmforge.model.encoder_decoder import Seq2SeqConfig

    head, shared = weights.get("lm_head.weight"), weights.get("shared.weight")
    tied = head is None or (shared is not None and head.shape == shared.shape and torch.equal(head, shared))
    if "scale_decoder_outputs" in hf:
        scale = hf["scale_decoder_outputs"]
    else:  # mT5 (T5 v1.1's shape) is never scaled by transformers 5, and its published checkpoints are untied
        scale = hf.get("model_type") != "mt5" and hf.get("tie_word_embeddings", True) is not False
    pad = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0)
    start = hf.get("decoder_start_token_id")
    eos = hf.get("eos_token_id")
    return Seq2SeqConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_kv=int(hf["d_kv"]), d_ff=int(hf["d_ff"]),
        n_layer=int(hf["num_layers"]), n_decoder_layer=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        n_head=int(hf["num_heads"]), num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        max_distance=int(hf.get("relative_attention_max_distance", 128)), feed_forward=feed_forward,
        dropout=float(hf.get("dropout_rate", 0.1)), norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tied=bool(tied), scale_output=bool(scale), init_factor=float(hf.get("initializer_factor", 1.0)),
        pad_token_id=pad, eos_token_id=int(_first_id(eos) if eos is not None else 1),
        decoder_start_token_id=int(start if start is not None else pad),
        block_size=int(hf.get("n_positions") or hf.get("lmforge_block_size") or 512),
    )


def t5_config_to_hf(c) -> dict:
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": c.vocab_size, "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.n_layer,
        "num_decoder_layers": c.n_decoder_layer, "num_heads": c.n_head,
        "relative_attention_num_buckets": c.num_buckets, "relative_attention_max_distance": c.max_distance,
        "feed_forward_proj": c.feed_forward, "dropout_rate": c.dropout, "layer_norm_epsilon": c.norm_eps,
        "initializer_factor": c.init_factor, "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        # transformers 4 scales exactly when it ties; a tied head without scaling is written as an own copy
        "tie_word_embeddings": c.tied and c.scale_output, "scale_decoder_outputs": c.scale_output,
        "n_positions": c.block_size, "torch_dtype": "float32",
    }


def _t5_names(c) -> dict[str, str]:
    """transformers' name → lmforge's, for every tensor but a tied head."""
    names = {"shared.weight": "shared.weight", "encoder.final_layer_norm.weight": "encoder.ln_f.weight",
             "decoder.final_layer_norm.weight": "decoder.ln_f.weight",
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.relative_bias.weight",
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "decoder.relative_bias.weight"}
    ff = ("wi_0", "wi_1", "wo") if c.feed_forward.startswith("gated") else ("wi", "wo")
    for stack, n, layers in (("encoder", c.n_layer, (("SelfAttention", "attn", "ln_attn"),)),
                             ("decoder", c.n_decoder_layer, (("SelfAttention", "self_attn", "ln_self"),
                                                              ("EncDecAttention", "cross_attn", "ln_cross")))):
        for i in range(n):
            h, ours = f"{stack}.block.{i}.layer.", f"{stack}.blocks.{i}."
            for k, (theirs, attn, norm) in enumerate(layers):
                names[f"{h}{k}.layer_norm.weight"] = f"{ours}{norm}.weight"
                names.update({f"{h}{k}.{theirs}.{x}.weight": f"{ours}{attn}.{x}.weight" for x in "qkvo"})
            k = len(layers)
            names[f"{h}{k}.layer_norm.weight"] = f"{ours}ln_ff.weight"
            names.update({f"{h}{k}.DenseReluDense.{x}.weight": f"{ours}ff.{x}.weight" for x in ff})
    if not c.tied:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def t5_state_dict_from_hf(c, hf_sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    hf_sd = {k: v for k, v in hf_sd.items() if k not in _T5_IGNORED and not (c.tied and k == "lm_head.weight")}
    out, problems = _rename(hf_sd, _t5_names(c))
    if problems:
        raise LmforgeError(f"{where}: weights do not match config.json ({'; '.join(problems)})")
    return _contiguous(out)


def t5_state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    c, sd = model.config, model.state_dict()
    out = {hf: sd[ours] for hf, ours in _t5_names(c).items()}
    if c.tied and not c.scale_output:  # see t5_config_to_hf
        out["lm_head.weight"] = sd["shared.weight"].clone()
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def weight_files(folder: Path) -> list[Path]:
    """The files a model folder's weights are read from: safetensors (single or sharded) before
    pytorch_model.bin; empty when it has none."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.exists():
            from lmforge.utils import read_json

            weight_map = read_json(index, "weight index").get("weight_map")
            if not (isinstance(weight_map, dict) and weight_map
                    and all(isinstance(file, str) for file in weight_map.values())):
                raise LmforgeError(f"{index}: its weight_map must map tensor names to shard files (it is "
                                   f"{str(weight_map)[:80]}); the weight index is corrupt, restore or re-create it")
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    return []
