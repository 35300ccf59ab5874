"""LoRA (Hu et al., 2021): low-rank adapters beside frozen weights, saved in PEFT's format.

``W x`` becomes ``W x + (alpha / r) · B A x`` with ``A`` (r × in) random and ``B`` (out × r) zero at
the start, so training begins from the base model exactly. lmforge keeps q/k/v (and SwiGLU's
gate/up) in one fused matrix; an adapter covers a *slice* of its outputs, which is exactly what a
PEFT adapter on Hugging Face's separate ``q_proj``/``v_proj`` (or on GPT-2's fused ``c_attn``) does.

Targets are named the same way for every family: ``q``, ``k``, ``v``, ``o`` (attention) and ``fc``,
``proj`` (MLP in and out; ``fc`` of a SwiGLU MLP is its gate and up projections). In an encoder-decoder
(T5) ``q`` ... ``o`` adapt the self-attention of both stacks and the decoder's cross-attention, as PEFT's
``target_modules=["q", "v"]`` does; ``fc`` is ``wi`` (or gated ``wi_0`` and ``wi_1``), ``proj`` is ``wo``.

An adapter folder holds what PEFT writes (``adapter_config.json`` with PEFT's keys only, and
``adapter_model.safetensors``) plus ``lmforge_adapter.json``: lmforge's targets, a task head, and the
exact base the adapter was trained on (its folder and the SHA-256 of its weight files), so that an
adapter is never folded into other weights by mistake.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.hf import weight_files
from lmforge.utils import atomic_dir, atomic_write_json, read_json, sha256_file, warn

TARGETS = ("q", "k", "v", "o", "fc", "proj")
ADAPTER_META = "lmforge_adapter.json"
PEFT_TASK = {None: "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS",
             "question_answering": "QUESTION_ANS"}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus adapters on named slices of its output features."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], r: int, alpha: float, dropout: float,
                 device: torch.device | None = None):
        super().__init__()
        self.base = base
        self.slices = slices
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        from lmforge.model.gpt import drawn_on_cpu

        device, dtype = device or base.weight.device, base.weight.dtype
        # A drawn as PEFT and the LoRA paper's code draw it, from the CPU's random numbers on any device
        init = lambda a_matrix: nn.init.kaiming_uniform_(a_matrix, a=math.sqrt(5))  # noqa: E731
        self.lora_A = nn.ParameterDict({n: nn.Parameter(drawn_on_cpu(torch.empty(r, base.in_features, dtype=dtype),
                                                                     init, device)) for n in slices})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(b - a, r, device=device, dtype=dtype)) for n, (a, b) in slices.items()})
        self.drop = nn.Dropout(dropout)

    enabled = True  # False: the frozen base alone (see adapters_off)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = self.drop(x)
        # The update over all output features: each adapter's slice, zeros between (out of place, so
        # it works whether or not the frozen layer's output carries gradients).
        pieces, at = [], 0
        for name, (a, b) in sorted(self.slices.items(), key=lambda item: item[1]):
            if a > at:
                pieces.append(y.new_zeros(*y.shape[:-1], a - at))
            pieces.append((h @ self.lora_A[name].T @ self.lora_B[name].T) * self.scale)
            at = b
        if at < y.size(-1):
            pieces.append(y.new_zeros(*y.shape[:-1], y.size(-1) - at))
        return y + torch.cat(pieces, dim=-1)

    def delta(self) -> torch.Tensor:
        """The change to the base weight: (out, in), zero outside the adapted slices."""
        d = torch.zeros_like(self.base.weight)
        for name, (a, b) in self.slices.items():
            d[a:b] += self.scale * self.lora_B[name] @ self.lora_A[name]
        return d

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.delta()
        return self.base


def _slices(model, block, target: str) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(module path inside a block, PEFT module name(s), slices) of one target name."""
    from lmforge.model.encoder import Encoder
    from lmforge.model.encoder_decoder import DecoderBlock, EncoderDecoder

    c = model.config
    if isinstance(model, EncoderDecoder):
        # T5 keeps every projection apart; q, k, v and o name the self-attention's and (in the decoder) the
        # cross-attention's, as PEFT's target "q" matches both SelfAttention.q and EncDecAttention.q.
        decoder = isinstance(block, DecoderBlock)
        if target in ("q", "k", "v", "o"):
            out = c.d_model if target == "o" else c.n_head * c.d_kv
            attentions = [("self_attn", "layer.0.SelfAttention"), ("cross_attn", "layer.1.EncDecAttention")] \
                if decoder else [("attn", "layer.0.SelfAttention")]
            return [(f"{ours}.{target}", f"{theirs}.{target}", {target: (0, out)}) for ours, theirs in attentions]
        ff = f"layer.{2 if decoder else 1}.DenseReluDense"
        if target == "proj":
            return [("ff.wo", f"{ff}.wo", {"proj": (0, c.d_model)})]
        names = ("wi_0", "wi_1") if c.feed_forward.startswith("gated") else ("wi",)
        return [(f"ff.{name}", f"{ff}.{name}", {"fc": (0, c.d_ff)}) for name in names]
    if isinstance(model, Encoder):
        d = c.n_embd
        qkv = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}
        if target in qkv:
            return [("attn.qkv", {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value"}[target],
                     {target: qkv[target]})]
        return [{"o": ("attn.proj", "attention.output.dense", {"o": (0, d)}),
                 "fc": ("fc", "intermediate.dense", {"fc": (0, c.mlp_hidden)}),
                 "proj": ("proj", "output.dense", {"proj": (0, d)})}[target]]
    q, kv = c.n_head * c.head_size, c.kv_heads * c.head_size
    if c.family == "gpt2":
        # GPT-2 keeps q, k and v in one Conv1D (c_attn): PEFT adapts it whole, and so does lmforge.
        whole = {"q": ("attn.qkv", "attn.c_attn", {"qkv": (0, q + 2 * kv)}), "k": None, "v": None,
                 "o": ("attn.proj", "attn.c_proj", {"o": (0, c.n_embd)}),
                 "fc": ("mlp.fc", "mlp.c_fc", {"fc": (0, c.hidden)}),
                 "proj": ("mlp.proj", "mlp.c_proj", {"proj": (0, c.n_embd)})}
        whole["k"] = whole["v"] = whole["q"]
        return [whole[target]]
    qkv = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    if target in qkv:
        return [("attn.qkv", f"self_attn.{target}_proj", {target: qkv[target]})]
    if target == "o":
        return [("attn.proj", "self_attn.o_proj", {"o": (0, c.n_embd)})]
    if target == "fc":
        return [("mlp.fc", "mlp.gate_proj", {"gate": (0, c.hidden)}), ("mlp.fc", "mlp.up_proj", {"up": (c.hidden, 2 * c.hidden)})]
    return [("mlp.proj", "mlp.down_proj", {"proj": (0, c.n_embd)})]


def _blocks(model) -> list[tuple[str, int, object]]:
    """(lmforge's path of the block list, layer number, block) of every block; an encoder-decoder's two stacks."""
    from lmforge.model.encoder_decoder import EncoderDecoder

    if isinstance(model, EncoderDecoder):
        return [(f"{stack}.blocks", i, block) for stack in ("encoder", "decoder")
                for i, block in enumerate(getattr(model, stack).blocks)]
    return [("blocks", i, block) for i, block in enumerate(model.blocks)]


def _peft_block_prefix(model, path: str, layer: int) -> str:
    from lmforge.model.encoder import Encoder
    from lmforge.model.encoder_decoder import EncoderDecoder

    c = model.config
    if isinstance(model, EncoderDecoder):
        return f"{path.split('.')[0]}.block.{layer}."
    if isinstance(model, Encoder):
        return ("" if c.head is None else "bert.") + f"encoder.layer.{layer}."
    return f"transformer.h.{layer}." if c.family == "gpt2" else f"model.layers.{layer}."


def _head_modules(model) -> list[str]:
    """Task heads trained in full beside the adapters (PEFT's modules_to_save)."""
    return [name for name in ("score", "classifier", "qa_outputs") if getattr(model, name, None) is not None]


def add_lora(model, targets: list[str] | str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> dict:
    """Freeze ``model`` and wrap the targeted layers of every block with adapters; heads stay trainable.

    Returns the adapter settings (saved with the adapter). A model already carrying adapters is refused.
    """
    if getattr(model, "lora", None):
        raise LmforgeError("the model already has LoRA adapters")
    from lmforge.model.encoder_decoder import EncoderDecoder

    if not hasattr(model, "blocks") and not isinstance(model, EncoderDecoder):
        raise LmforgeError(f"LoRA adapters are for decoders, encoders and encoder-decoders, not {type(model).__name__}; "
                           f"use --method full")
    if getattr(model.config, "family", None) == "lmforge":
        raise LmforgeError("LoRA adapters are saved in PEFT's format, which needs a Hugging Face family (not 'lmforge')")
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise LmforgeError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    modules: dict[str, dict] = {}  # module path → {slice name: (a, b)} and its PEFT names
    for blocks, i, block in _blocks(model):
        for target in targets:
            for path, peft_name, slices in _slices(model, block, target):
                entry = modules.setdefault(f"{blocks}.{i}.{path}", {"slices": {}, "peft": {}})
                for slice_name, span in slices.items():
                    entry["slices"][slice_name] = span
                    entry["peft"][slice_name] = _peft_block_prefix(model, blocks, i) + peft_name
    from lmforge.model.gpt import new_weights_device

    device = new_weights_device(model)
    pending = getattr(model, "pending_weights", None)  # a folder opened for sharding: its tensors by name
    for path, entry in modules.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), entry["slices"], r, alpha, dropout, device))
        if pending is not None:  # the frozen layer's weights now sit under path.base
            for key in [k for k in pending if k.startswith(path + ".")]:
                pending[f"{path}.base.{key[len(path) + 1:]}"] = pending.pop(key)
    for name in _head_modules(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    # The folder the frozen weights were loaded from: the adapter's exact base, recorded when it is saved.
    source = getattr(model, "source", None)
    model.lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "modules": modules,
                  "base": Path(source).resolve() if source is not None else None}
    return model.lora


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model):
    """Run ``model`` as its frozen base inside the block: every adapter switched off, no copy made
    (DPO's reference model, when the policy is trained with LoRA)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base weight; the model becomes a plain model again, every weight trainable
    as a loaded model's are (the base's were frozen under the adapters: a run started from a merged adapter
    would otherwise train only some of them)."""
    for name, module in lora_layers(model):
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, module.merged())
    model.lora = None
    return model.requires_grad_(True)


# -- PEFT format ----------------------------------------------------------------------------------


def save_adapter(model, folder: str | os.PathLike, base_model: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT does (plus the tokenizer), and
    ``lmforge_adapter.json``. The base recorded is the folder the model's weights were loaded from (when
    ``base_model`` is a run folder: the checkpoint it resolved to), with the hashes of its weight files."""
    from lmforge.model.checkpoint import resolve_model_dir
    from lmforge.model.encoder_decoder import EncoderDecoder

    settings = model.lora
    base = settings.get("base") or resolve_model_dir(base_model).resolve()
    tensors, peft_targets = {}, set()
    for path, entry in settings["modules"].items():
        module = model.get_submodule(path)
        for slice_name, peft_name in entry["peft"].items():
            tensors[f"base_model.model.{peft_name}.lora_A.weight"] = module.lora_A[slice_name]
            tensors[f"base_model.model.{peft_name}.lora_B.weight"] = module.lora_B[slice_name]
            peft_targets.add(peft_name)
    heads = _head_modules(model)
    for name in heads:
        for pname, p in getattr(model, name).named_parameters():
            tensors[f"base_model.model.{name}.{pname}"] = p
    head = getattr(model.config, "head", None)
    config = {  # PEFT's keys only: PEFT warns about any other
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if isinstance(model, EncoderDecoder) else PEFT_TASK[head],
        "base_model_name_or_path": str(base),
        "r": settings["r"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": _peft_names(model, peft_targets),
        "fan_in_fan_out": getattr(model.config, "family", None) == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "modules_to_save": heads or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    meta = {"targets": settings["targets"],
            "base_model": {"folder": str(base), "named": str(base_model), "weights": weights_record(base)}}
    if getattr(model, "end_token_ids", None):  # a chat-tuned adapter also stops at the end of a turn
        meta["end_token_ids"] = list(model.end_token_ids)
    if head is not None:  # what lmforge needs to rebuild the head on the base model
        c = model.config
        meta["head"] = {"head": head, "num_labels": c.num_labels, "labels": list(c.labels) if c.labels else None,
                        "pad_token_id": getattr(c, "pad_token_id", None), "pooling": getattr(c, "pooling", None)}
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
        atomic_write_json(tmp / ADAPTER_META, meta)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def read_adapter_meta(folder: Path, config: dict) -> dict:
    """lmforge's facts about an adapter: ``targets``, ``head`` and ``base_model`` (folder, weight hashes).

    Adapters saved before ``lmforge_adapter.json`` kept targets and head inside adapter_config.json and
    no weight hashes; PEFT adapters from elsewhere have none of it."""
    if (folder / ADAPTER_META).exists():
        meta = read_json(folder / ADAPTER_META, "adapter metadata")
        if not isinstance(meta, dict):
            raise LmforgeError(f"{folder / ADAPTER_META} is not a JSON object; re-save the adapter")
        return meta
    return {"targets": config.get("lmforge_targets"), "head": config.get("lmforge_head")}


# -- the base an adapter was trained on ------------------------------------------------------------

_hashes: dict[tuple[str, int, int], str] = {}  # (file, size, mtime): a file is hashed once per process


def _sha256(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def base_files(folder: Path) -> list[Path]:
    """The files that hold a base model's weights: a model folder's, or, for an adapter trained on another
    adapter, that adapter's own (it checks its own base when it is loaded)."""
    from lmforge.model.checkpoint import is_adapter_folder

    if is_adapter_folder(folder):
        return [p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if p.exists()]
    return weight_files(folder)


def weights_record(folder: str | os.PathLike) -> dict[str, dict]:
    """Size, modification time and SHA-256 of each weight file of a model folder."""
    record = {}
    for path in base_files(Path(folder)):
        stat = path.stat()
        record[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path, stat)}
    return record


def weights_difference(folder: str | os.PathLike, record: dict[str, dict]) -> str | None:
    """How the weights in ``folder`` differ from ``record`` (one phrase), or None when they are the same.

    A file with the recorded size and modification time is taken as recorded, so that loading an
    adapter does not re-read gigabytes of base weights each time; any other file is hashed."""
    files = {p.name: p for p in base_files(Path(folder))}
    if sorted(files) != sorted(record):
        return f"its weight files are {', '.join(sorted(files)) or 'none'}, not {', '.join(sorted(record))}"
    for name, want in record.items():
        stat = files[name].stat()
        if stat.st_size == want["bytes"] and stat.st_mtime_ns == want["mtime_ns"]:
            continue
        got = _sha256(files[name], stat)
        if got != want["sha256"]:
            return f"its {name} has SHA-256 {got[:12]}..., the adapter was trained on {want['sha256'][:12]}..."
    return None


def adapter_base(adapter: Path, config: dict, meta: dict, base: str | os.PathLike | None = None,
                 force: bool = False) -> Path:
    """The model folder to put ``adapter`` on: ``base`` when given, else the one it records; checked
    against the weights it was trained on. A mismatch is an error, or, with ``force``, a warning."""
    from lmforge.model.checkpoint import resolve_model_dir

    recorded = meta.get("base_model") or {}
    exact = recorded.get("folder")
    fix = ("give the exact base folder (`lmforge merge ADAPTER --base FOLDER --out DIR`), "
           "or accept other weights with `--force` (merge, convert)")
    if base is None:
        named = exact or config.get("base_model_name_or_path")
        if not named or not Path(named).exists():
            pruned = named and Path(named).parent.parent.name == "checkpoints"
            why = (" (it was a checkpoint of a training run, deleted as the run trained on: a run keeps its last "
                   "keep_checkpoints)") if pruned else ""
            raise LmforgeError(f"{adapter}: its base model {named!r} is not on this machine{why}; {fix}")
        folder = resolve_model_dir(named)
    else:
        folder = resolve_model_dir(base)
        # A run folder whose latest checkpoint moved on still holds the checkpoint the adapter was trained on.
        if exact and Path(exact).is_relative_to(Path(base).resolve()) and Path(exact).exists():
            folder = Path(exact)
    if not recorded.get("weights"):
        if (Path(base or config.get("base_model_name_or_path") or folder) / "checkpoints").is_dir():
            warn(f"{adapter} names its base as a run folder and records no weight hashes (saved by an older lmforge); "
                 f"using {folder}, that run's latest checkpoint, which may not be the one the adapter was trained on")
        return folder
    try:
        problem = weights_difference(folder, recorded["weights"])
    except (KeyError, TypeError, AttributeError):
        raise LmforgeError(f"{adapter / ADAPTER_META} is malformed (its base_model weights); re-save the adapter") from None
    if problem is None:
        return folder
    message = f"{adapter} was trained on {exact}, but {folder} is not that model: {problem}"
    if not force:
        raise LmforgeError(f"{message}; {fix}")
    warn(f"{message}; going on because of --force: the result is NOT the model that was fine-tuned")
    return folder


# PEFT LoraConfig settings that change nothing lmforge computes from a saved adapter: names and bookkeeping,
# settings read below (r, alpha, targets, heads, rsLoRA) and how PEFT initialised or runs the adapter's own
# weights (not the base's). Any other setting, when it is on, changes PEFT's outputs and is refused, so that a
# setting of a PEFT release lmforge has not seen is never ignored.
_NEUTRAL_SETTINGS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "use_rslora",
    "fan_in_fan_out", "layers_pattern", "init_lora_weights", "bias", "ensure_weight_tying", "megatron_config",
    "megatron_core", "runtime_config", "loftq_config", "eva_config", "corda_config", "qalora_group_size",
    "lmforge_targets", "lmforge_head"}
# init_lora_weights values after which PEFT's saved A and B are applied to the base as it is: PiSSA, OLoRA,
# CorDA and LoftQ take their initial product out of the base weights, which PEFT redoes when it loads them.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")


def read_adapter_config(folder: Path) -> dict:
    config = read_json(folder / "adapter_config.json", "adapter config")
    if not isinstance(config, dict):
        raise LmforgeError(f"{folder}/adapter_config.json is not a JSON object; re-save the adapter")
    if config.get("peft_type") != "LORA":
        raise LmforgeError(f"{folder}: peft_type {config.get('peft_type')!r} is not supported; lmforge reads LORA adapters")
    # PEFT settings that change the adapted model and that lmforge does not apply: refused, never ignored
    heads = {"score", "classifier", "qa_outputs"}  # (a head lmforge trains in full is loaded whole)
    modules = config.get("modules_to_save") or []
    unsupported = [(f"modules_to_save {sorted(set(modules) - heads)}", isinstance(modules, list) and bool(set(modules) - heads)),
                   (f"bias {config.get('bias')!r}", config.get("bias", "none") not in (None, "none")),
                   (f"init_lora_weights {config.get('init_lora_weights')!r} (its initial product is taken out of the "
                    f"base weights)", config.get("init_lora_weights", True) not in _PLAIN_INITS)]
    unsupported += [(f"{key} {value!r}", True) for key, value in config.items()
                    if key not in _NEUTRAL_SETTINGS and value not in (None, False, "", [], {})]
    for name, used in unsupported:
        if used:
            raise LmforgeError(f"{folder}: the adapter sets {name[:120]}, which lmforge does not apply (its outputs would "
                               f"differ from PEFT's); merge it with PEFT (merge_and_unload) and load the merged folder")
    if not isinstance(modules, list):
        raise LmforgeError(f"{folder}/adapter_config.json: modules_to_save must be a list of module names "
                           f"(it is {modules!r})")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    number = (int, float)
    if (not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, number) or isinstance(alpha, bool)
            or not isinstance(dropout or 0.0, number) or not 0 <= (dropout or 0.0) < 1):
        raise LmforgeError(f"{folder}/adapter_config.json: r must be a whole number of 1 or more, lora_alpha a number and "
                           f"lora_dropout in [0, 1) (it has r {r!r}, lora_alpha {alpha!r}, lora_dropout {dropout!r})")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if not (value is None or isinstance(value, str) or isinstance(value, list)
                and all(isinstance(name, str) for name in value)):
            raise LmforgeError(f"{folder}/adapter_config.json: {key} must be a regular expression or a list of module "
                               f"names (it is {value!r})")
    return config


def peft_head(folder: Path, config: dict, model, base: Path) -> dict | None:
    """The task head of a PEFT adapter that lmforge did not save (no ``lmforge_adapter.json``), put on a model
    without one: PEFT's usual flow trains a ``SEQ_CLS`` adapter on a causal LM loaded as a classifier
    (``AutoModelForSequenceClassification``), and saves the new head whole in the adapter (modules_to_save);
    the number of labels is its number of rows, and the padding token the classifier reads past is the base's
    ``pad_token_id`` (as transformers reads it). None for an adapter of the model's own task."""
    from safetensors import safe_open

    heads = {"SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification",
             "QUESTION_ANS": "question_answering"}
    task = config.get("task_type")
    if task not in heads or any(getattr(model, name, None) is not None for name in ("score", "classifier", "qa_outputs")):
        return None
    try:
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            shapes = {key.replace(".modules_to_save.default.", ".").removeprefix("base_model.model."):
                      f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as e:  # a missing or corrupt file
        raise LmforgeError(f"{folder}/adapter_model.safetensors cannot be read ({e})") from None
    rows = next((shapes[f"{name}.weight"] for name in ("score", "classifier", "qa_outputs") if f"{name}.weight" in shapes),
                None)
    if rows is None:
        raise LmforgeError(f"{folder}: the adapter's task_type is {task} but it holds no task head (score, classifier "
                           f"or qa_outputs weights), and its base has none; give the base model the head was trained "
                           f"with, or merge the adapter with PEFT (merge_and_unload) and load the merged folder")
    hf = read_json(base / "config.json", "model config") if (base / "config.json").exists() else {}
    pad = hf.get("pad_token_id") if isinstance(hf, dict) else None
    pad = pad if isinstance(pad, int) else getattr(model.config, "pad_token_id", None)
    return {"head": heads[task], "num_labels": int(rows[0]), "pad_token_id": pad}


def adapter_scale(config: dict) -> float:
    """The ``alpha`` that gives lmforge's ``alpha / r`` the adapter's scale: rsLoRA's is ``lora_alpha / √r``."""
    alpha, r = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha


def load_adapter(model, folder: str | os.PathLike) -> None:
    """Add adapters to ``model`` as ``folder`` (a PEFT LoRA adapter) describes, and load their weights."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    targets = read_adapter_meta(folder, config).get("targets") or _targets_from_peft(model, config)
    if not (folder / "adapter_model.safetensors").exists() and (folder / "adapter_model.bin").exists():
        raise LmforgeError(f"{folder} holds its weights as adapter_model.bin (a pickle, which lmforge does not read: "
                           f"loading one can run code); re-save it as safetensors with PEFT "
                           f"(PeftModel.from_pretrained(...).save_pretrained(folder, safe_serialization=True))")
    add_lora(model, targets, int(config["r"]), adapter_scale(config), float(config.get("lora_dropout", 0.0)))
    try:
        tensors = load_file(folder / "adapter_model.safetensors")
    except Exception as e:  # a missing or corrupt file
        raise LmforgeError(f"{folder}/adapter_model.safetensors cannot be read ({e})") from None
    expected = {}
    for path, entry in model.lora["modules"].items():
        module = model.get_submodule(path)
        for slice_name, peft_name in entry["peft"].items():
            expected[f"base_model.model.{peft_name}.lora_A.weight"] = module.lora_A[slice_name]
            expected[f"base_model.model.{peft_name}.lora_B.weight"] = module.lora_B[slice_name]
    for name in _head_modules(model):
        for pname, p in getattr(model, name).named_parameters():
            expected[f"base_model.model.{name}.{pname}"] = p
    # PEFT names the adapter in some keys (".default."); lmforge writes them without it.
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
               .replace(".modules_to_save.default.", "."): v for k, v in tensors.items()}
    missing = [k for k in expected if k not in tensors]
    missing = [k for k in missing if not any(k.startswith(f"base_model.model.{h}.") for h in _head_modules(model))] or missing
    if [k for k in missing if ".lora_" in k]:
        raise LmforgeError(f"{folder}: adapter weights missing for {missing[0]} (and {len(missing) - 1} more); "
                           f"is it an adapter of this model?")
    # Every tensor of the file is applied, or the adapter is refused: PEFT applies it, so without it the outputs
    # would differ from PEFT's.
    unused = [k for k in tensors if k not in expected]
    lora = [k for k in unused if k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if lora:
        module = lora[0].removeprefix("base_model.model.").split(".lora_")[0]
        raise LmforgeError(f"{folder}: the adapter adapts {module}, which lmforge does not adapt (it adapts the "
                           f"Transformer blocks' products); merge the adapter with PEFT (merge_and_unload) and load "
                           f"the merged folder")
    if unused:
        what = unused[0].removeprefix("base_model.model.")
        head = [h for h in ("score", "classifier", "qa_outputs") if what.startswith(h + ".")]
        why = (f"a task head ({head[0]}) on a model loaded without one: its adapter_config.json's task_type "
               f"{config.get('task_type')!r} needs a classification base, or an adapter saved by lmforge"
               if head else "weights of its own that lmforge does not apply")
        raise LmforgeError(f"{folder}: the adapter holds {what}{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}, "
                           f"{why}; merge the adapter with PEFT (merge_and_unload) and load the merged folder")
    with torch.no_grad():
        for key, param in expected.items():
            if key in tensors:
                if tensors[key].shape != param.shape:
                    raise LmforgeError(f"{folder}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(param.shape)}")
                param.copy_(tensors[key])


def lora_targets(model, targets: str) -> list[str]:
    """lmforge's LoRA targets for ``--lora-targets`` in lmforge's names (q, k, v, o, fc, proj) or in PEFT's
    (``q_proj,v_proj``, GPT-2's ``c_attn``, ``all-linear``), which adapt what PEFT's target_modules would."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if all(name in TARGETS for name in names):
        return names
    return _targets_from_peft(model, {"target_modules": "all-linear" if names == ["all-linear"] else names})


def _targets_from_peft(model, config: dict) -> list[str]:
    """lmforge's targets for a PEFT adapter's ``target_modules``, matched as PEFT matches them: a name adapts every
    module whose path is that name or ends with "." + it (GPT-2's ``c_proj`` is attention's and the MLP's output;
    ``attn.c_proj`` attention's alone), a string is a regular expression over whole paths, "all-linear" every
    linear module but the output head; names that match nothing are passed over, as PEFT does, while one module
    matched is needed; ``exclude_modules`` is matched the same way. Refused, since lmforge adapts each product in
    every block or in none and nothing outside the blocks: a product adapted in some blocks only or in part
    (Llama's gate_proj without up_proj, which lmforge computes as one product), and a module outside the blocks
    (BERT's pooler or masked-LM transform under ``dense``)."""
    import re

    paths = _peft_paths(model)
    spec, exclude = config.get("target_modules"), config.get("exclude_modules")

    def matcher(names):
        if isinstance(names, str):
            try:
                regex = re.compile(names)
            except re.error as e:
                raise LmforgeError(f"adapter {names!r} is not a regular expression ({e})") from None
            return regex.fullmatch
        return lambda path: any(path == name or path.endswith("." + name) for name in names or [])

    linear = isinstance(spec, str) and spec.lower() == "all-linear"
    chosen = (lambda path: True) if linear else matcher(spec)
    excluded = matcher(exclude) if exclude else (lambda path: False)
    # Outside the blocks: PEFT paths end with these (BERT's under "bert."); "all-linear" takes a BERT's pooler
    # and masked-LM transform (PEFT leaves out the output head, and a classifier's head for SEQ_CLS).
    outside = [m for m in _OUTSIDE if not excluded(m) and (
        (linear and m in _linear_outside(model)) or not linear and (
            chosen(m) or chosen("bert." + m) or isinstance(spec, list) and any(name.endswith("." + m) for name in spec)))]
    if outside:
        raise LmforgeError(f"adapter target_modules {spec!r} also adapts {outside[0]}, outside the Transformer blocks, "
                           f"which lmforge does not adapt; merge the adapter with PEFT (merge_and_unload) and load "
                           f"the merged folder")
    targets = []
    for target, where in sorted(paths.items()):
        matched = [p for p in where if chosen(p) and not excluded(p)]
        if matched and len(matched) < len(where):
            missed = next(p for p in where if p not in matched)
            names = _names(where)
            together = f", and computes {' and '.join(names)} as one product" if len(names) > 1 else ""
            raise LmforgeError(f"the adapter adapts {matched[0]} but not {missed}: lmforge adapts a product in every "
                               f"block or in none{together}; merge the adapter with PEFT (merge_and_unload) and load "
                               f"the merged folder")
        if matched:
            targets.append(target)
    if not targets:
        names = sorted({path.rsplit(".", 1)[-1] for where in paths.values() for path in where})
        raise LmforgeError(f"adapter target_modules {spec!r} names none of this model's adaptable products "
                           f"({', '.join(names)})")
    return targets


def _names(paths: list[str]) -> list[str]:
    """The distinct module names (last parts of the paths) among ``paths``."""
    return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


def _linear_outside(model) -> list[str]:
    """The entries of _OUTSIDE that PEFT's "all-linear" adapts in ``model``: a BERT's pooler and masked-LM
    transform (a decoder's output head and a classifier's head it leaves out)."""
    return [name for name, there in (("pooler.dense", getattr(model, "pooler", None)),
                                     ("cls.predictions.transform.dense", getattr(model, "mlm", None))) if there is not None]


def _peft_paths(model) -> dict[str, list[str]]:
    """lmforge target -> the PEFT module paths (from the model's root) it adapts, in every block."""
    paths: dict[str, list[str]] = {}
    for blocks, layer, block in _blocks(model):
        for target in ("q", "k", "v", "o", "fc", "proj"):
            for _, theirs, _ in _slices(model, block, target):
                paths.setdefault(target, []).append(_peft_block_prefix(model, blocks, layer) + theirs)
    return paths


# Modules outside the blocks whose names end like a block's products (BERT's pooler and masked-LM transform):
# a target name must not reach them.
_OUTSIDE = ("pooler.dense", "cls.predictions.transform.dense", "lm_head", "score", "classifier", "qa_outputs")


def _peft_names(model, adapted: set[str]) -> list[str]:
    """``target_modules`` that make PEFT adapt exactly the modules at the paths ``adapted``: for each, the
    shortest ending of its path ("c_attn", "attn.c_proj", "intermediate.dense", "0.output.dense") that names
    no other module (PEFT adapts every module whose path ends with "." + a target name)."""
    every = [path for paths in _peft_paths(model).values() for path in paths] + list(_OUTSIDE)
    names = set()
    for path in adapted:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if all(other in adapted for other in every if other == name or other.endswith("." + name)):
                names.add(name)
                break
    return sorted(names)


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
