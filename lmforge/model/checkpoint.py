"""Model checkpoints are Hugging Face model folders (the name mappings live in hf.py).

A folder holds ``config.json`` + ``model.safetensors`` (sharded with an index when large) +
``tokenizer.json`` + ``generation_config.json``: ``transformers.AutoModelForCausalLM`` loads what
lmforge writes, and lmforge loads what ``save_pretrained`` writes (``pytorch_model.bin`` only
through ``torch.load(weights_only=True)``, so loading never runs code from a file).
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, build_model, deferring
from lmforge.model.hf import (
    ENCODER_DECODER_TYPES,
    SUPPORTED_MODEL_TYPES,
    bert_config_from_hf,
    bert_config_to_hf,
    bert_state_dict_from_hf,
    bert_state_dict_to_hf,
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    t5_config_from_hf,
    t5_config_to_hf,
    t5_state_dict_from_hf,
    t5_state_dict_to_hf,
    weight_files,
)
from lmforge.utils import (atomic_dir, atomic_write_json, check_output_dir, first_line, read_json,
                           refuse_overwriting_sources)

MAX_SHARD_BYTES = 5 * 2**30


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:  # (a clone made without git-lfs holds these small text files in place of weights)
            if f.read(64).startswith(b"version https://git-lfs"):
                raise LmforgeError(f"{path} is a Git LFS pointer, not the weights: fetch them (`git lfs pull` in the "
                                   f"clone) or download the folder again")
        if path.suffix == ".safetensors":
            return load_file(path)
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        # (a plain pickle may hold anything: a list, a nested dict, numbers beside the tensors)
        odd = type(tensors).__name__ if not isinstance(tensors, dict) else next(
            (f"{k!r}: {type(v).__name__}" for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
        if odd:
            raise LmforgeError(f"{path} is not a state dict of named tensors (it holds {odd}); the checkpoint is "
                               f"corrupt or not a model's weights")
        return tensors
    except SafetensorError as e:
        raise LmforgeError(f"{path} is not a valid safetensors file ({e}); the checkpoint is corrupt") from None
    except pickle.UnpicklingError as e:
        raise LmforgeError(f"refusing to load {path}: it is not plain tensors ({first_line(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise LmforgeError(f"{path} could not be read ({first_line(e)}); the checkpoint is corrupt") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: safetensors (single or sharded) or pytorch_model.bin."""
    files = weight_files(folder)
    if not files:
        raise LmforgeError(f"{folder} has no model.safetensors or pytorch_model.bin; is it a model folder?")
    sd: dict[str, torch.Tensor] = {}
    for path in files:
        sd.update(_load_weight_file(path))
    return sd


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


def save_model(model, folder: str | os.PathLike, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a decoder, encoder or encoder-decoder (and its tokenizer) as a Hugging Face folder, atomically."""
    from lmforge.model.encoder import Encoder
    from lmforge.model.encoder_decoder import EncoderDecoder

    with atomic_dir(folder) as tmp:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if isinstance(model, Encoder):
            atomic_write_json(tmp / "config.json", {**bert_config_to_hf(model.config), "torch_dtype": dtype})
            if _kept_generation(model):
                atomic_write_json(tmp / "generation_config.json", _kept_generation(model))
            tensors = bert_state_dict_to_hf(model)
        elif isinstance(model, EncoderDecoder):
            c = model.config
            atomic_write_json(tmp / "config.json", {**t5_config_to_hf(c), "torch_dtype": dtype})
            atomic_write_json(tmp / "generation_config.json", {**_kept_generation(model),
                                                               "decoder_start_token_id": model.start_token_id,
                                                               "eos_token_id": _end_ids(model, c.eos_token_id),
                                                               "pad_token_id": c.pad_token_id})
            tensors = t5_state_dict_to_hf(model)
        else:
            config = model.config
            if tokenizer is not None and tokenizer.eos_id is not None and config.eos_token_id is None:
                config = replace(config, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
            hf_config = config_to_hf(config)
            if config.family != "lmforge":
                hf_config["torch_dtype"] = dtype
            atomic_write_json(tmp / "config.json", hf_config)
            generation = {**_kept_generation(model), **{k: getattr(config, k) for k in ("bos_token_id", "eos_token_id")
                                                        if getattr(config, k) is not None}}
            if config.eos_token_id is not None or getattr(model, "end_token_ids", None):
                generation["eos_token_id"] = _end_ids(model, config.eos_token_id)
            atomic_write_json(tmp / "generation_config.json", generation)
            tensors = state_dict_to_hf(model)
        _write_weights(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def _kept_generation(model) -> dict:
    """The generation_config.json of the folder a model was loaded from (its sampling recommendation and the
    like), which a fine-tuned copy keeps, as transformers' ``save_pretrained`` keeps ``generation_config``."""
    return dict(getattr(model, "generation_settings", None) or {})


def _end_ids(model, eos: int | None) -> int | list[int]:
    """generation_config.json's ``eos_token_id``: the config's, or a list of it and the other ends the model stops
    at (a chat-tuned model's end of a turn; a folder's list, as read), which transformers' ``generate`` reads."""
    # (a folder's own list as read, which may leave config.json's out: saved as it was, not widened by it)
    ids = [i for i in dict.fromkeys(getattr(model, "end_token_ids", None) or [eos]) if i is not None]
    return ids[0] if len(ids) == 1 else ids


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, a training run folder (its latest checkpoint's model folder), one of its checkpoints
    (``checkpoints/step_N``: its model folder) or its ``checkpoints`` folder (the latest)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"model folder {path} does not exist")
    if path.is_file():
        raise LmforgeError(f"{path} is a file; give the folder that holds the model ({path.parent})")
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return path
    if (path / "model" / "config.json").exists() or (path / "model" / "adapter_config.json").exists():
        return path / "model"  # a checkpoint of a run: its model folder
    from lmforge.train.checkpointing import latest_checkpoint

    ckpt = latest_checkpoint(path) or (latest_checkpoint(path.parent) if path.name == "checkpoints" else None)
    if ckpt is not None:
        return ckpt / "model"
    raise LmforgeError(f"{path} has no config.json and no checkpoints; pass a model folder or a training run folder")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a model folder (or a run folder's latest checkpoint): a ``GPT`` for decoder families,
    an ``Encoder`` for ``bert``, an ``EncoderDecoder`` for ``t5``."""
    from lmforge.model.encoder import build_encoder

    if not isinstance(path, (str, os.PathLike)):
        raise LmforgeError(f"load_model takes a model, adapter or run folder (a path), not {type(path).__name__}")
    if isinstance(dtype, str):  # ("bfloat16", as the commands' --dtype takes it)
        from lmforge.precision import DTYPES

        if dtype not in DTYPES:
            raise LmforgeError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    folder = resolve_model_dir(path)
    if is_adapter_folder(folder):
        return load_adapted(folder, device, dtype, merge=True)
    if (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists():
        from lmforge.utils import warn

        warn(f"{folder} holds a model (config.json) and a LoRA adapter (adapter_config.json): loading the model "
             f"alone, without the adapter; to use the adapter, keep it in a folder of its own and give that folder")
    where = str(folder / "config.json")
    hf = read_json(folder / "config.json", "model config")
    raw = read_hf_weights(folder) if hf.get("model_type") in SUPPORTED_MODEL_TYPES else {}
    if hf.get("model_type") == "bert":
        config = bert_config_from_hf(hf, raw.keys(), where)
        model = build_encoder(config, "meta")
        weights = bert_state_dict_from_hf(config, raw, str(folder))
    elif hf.get("model_type") in ENCODER_DECODER_TYPES:
        from lmforge.model.encoder_decoder import build_encoder_decoder

        config = t5_config_from_hf(hf, raw, where)
        model = build_encoder_decoder(config, "meta")
        weights = t5_state_dict_from_hf(config, raw, str(folder))
    else:
        config = config_from_hf(hf, where, raw)
        model = build_model(config, "meta")
        weights = state_dict_from_hf(config, raw, str(folder))
    # (kept when the model is saved again, as save_pretrained keeps generation_config; its end ids stop generation)
    model.generation_settings = generation_settings(folder)
    model.end_token_ids = end_token_ids(hf, model.generation_settings, config.vocab_size)
    if deferring():  # sharded training: each rank copies its shard of each tensor later (train/distributed.py)
        _check_names(model, weights, folder)
        model.pending_weights = weights
        model.source = folder
        return model
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        # The first line only says "Error(s) in loading state_dict"; the second names the tensor.
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else first_line(e)
        raise LmforgeError(f"{folder}: weights do not fit config.json ({detail})") from None
    model.to(device=device, dtype=dtype or torch.float32)
    model.source = folder
    return model.eval()


def generation_settings(folder: Path) -> dict:
    """A folder's generation_config.json ({} when it has none)."""
    path = Path(folder) / "generation_config.json"
    return read_json(path, "generation config") if path.exists() else {}


def end_token_ids(hf: dict, generation: dict, vocab_size: int) -> list[int]:
    """The end-of-sequence ids a folder names: generation_config.json's ``eos_token_id`` where it names any, else
    config.json's, each one id or a list (Qwen2.5's and Llama 3's chat models list the end of a turn beside the
    end of text); transformers' ``generate`` stops at any of them (and, where generation_config.json names
    others, not at config.json's), and so does lmforge."""
    values = [generation.get("eos_token_id")] if generation.get("eos_token_id") is not None else [hf.get("eos_token_id")]
    ids = []
    for value in values:
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size and i not in ids:
                ids.append(i)
    return ids


def _check_names(model, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """What ``load_state_dict(strict=True)`` would refuse, checked without loading (names and shapes)."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in weights]
    unexpected = [n for n in weights if n not in params]
    wrong = [n for n, p in params.items() if n in weights and tuple(weights[n].shape) != tuple(p.shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                  else f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, not {tuple(params[wrong[0]].shape)}")
        raise LmforgeError(f"{folder}: weights do not fit config.json ({detail})")


_adapters_loading: list[Path] = []  # the adapters whose bases are being loaded (an adapter on an adapter)


def load_adapted(adapter: str | os.PathLike, device="cpu", dtype=None, merge: bool = True, base: str | None = None,
                 force: bool = False):
    """The base model of a LoRA adapter folder, with the adapter applied (and merged when ``merge``).

    The base is ``base`` or the folder the adapter records; its weights must be the ones the adapter
    was trained on (an error otherwise; with ``force`` a warning)."""
    from lmforge.model.heads import attach_head
    from lmforge.model.lora import (adapter_base, load_adapter, merge_lora, peft_head, read_adapter_config,
                                    read_adapter_meta)

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    meta = read_adapter_meta(adapter, config)
    base_folder = adapter_base(adapter, config, meta, base, force)
    if base_folder.resolve() in _adapters_loading or base_folder.resolve() == adapter.resolve():
        chain = " → ".join(str(p) for p in [*_adapters_loading, adapter.resolve(), base_folder.resolve()])
        raise LmforgeError(f"{adapter}: its base models form a loop ({chain}); set base_model_name_or_path in "
                           f"adapter_config.json to the model folder the adapter was trained on")
    _adapters_loading.append(adapter.resolve())
    try:
        model = load_model(base_folder, device, dtype)
    finally:
        _adapters_loading.pop()
    head = meta.get("head") or peft_head(adapter, config, model, base_folder)
    if head:
        attach_head(model, head["head"], head["num_labels"], head.get("labels"), head.get("pad_token_id"), head.get("pooling"))
    load_adapter(model, adapter)
    model.end_token_ids = list(dict.fromkeys([*getattr(model, "end_token_ids", []), *meta.get("end_token_ids", [])]))
    if merge:
        merge_lora(model)
    model.source = adapter
    # the model folder it all stands on (an adapter trained on an adapter: that one's base), whose precision and
    # generation settings merging keeps
    model.base_source = model.base_source if is_adapter_folder(base_folder) else base_folder
    return model.eval()


def is_adapter_folder(folder: Path) -> bool:
    """A LoRA adapter on its own (adapter_config.json, no model of its own)."""
    return (folder / "adapter_config.json").exists() and not (folder / "config.json").exists()


def weights_precision(path: str | os.PathLike, device: torch.device, requested: str = "auto"):
    """The precision to run a decoder folder's weights in (a ``precision.Choice``): ``requested``, or for
    ``auto`` the checkpoint's stored ``torch_dtype`` unless decoding in it is measured slower here."""
    from lmforge.precision import DTYPES, choose_weights

    if requested not in ("auto", *DTYPES):
        raise LmforgeError(f"--dtype {requested} is not one of auto, {', '.join(DTYPES)}")
    folder = resolve_model_dir(path)
    if is_adapter_folder(folder):  # the base's precision
        base = read_json(folder / "adapter_config.json", "adapter config").get("base_model_name_or_path")
        folder = Path(base) if base and (Path(base) / "config.json").exists() else folder
    hf = read_json(folder / "config.json", "model config") if (folder / "config.json").exists() else {}
    stored = hf.get("torch_dtype") or hf.get("dtype")
    width = hf.get("n_embd") or hf.get("hidden_size") or hf.get("d_model") or 768
    return choose_weights(device, requested, stored if isinstance(stored, str) else None, int(width),
                          int(hf.get("vocab_size") or 32000))


def load_decoder(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 needs: str | None = None) -> GPT:
    """``load_model`` for commands that need a decoder (generation, training). ``needs``: what an encoder lacks
    for the command, said when one is given (default: it cannot generate text)."""
    model = load_model(path, device, dtype)
    if not isinstance(model, GPT):
        from lmforge.model.encoder import Encoder

        if isinstance(model, Encoder):
            raise LmforgeError(_encoder_refusal(model, needs))
        raise LmforgeError(f"{model.source} is an encoder-decoder (t5); this command runs decoders (gpt2, llama, "
                           f"qwen2, mistral) only so far")
    return language_model(model)


def model_kind(model) -> str:
    """What a model is, for messages: "a decoder", "an encoder (bert)" or "an encoder-decoder (t5)"."""
    from lmforge.model.encoder import Encoder
    from lmforge.model.encoder_decoder import EncoderDecoder

    if isinstance(model, EncoderDecoder):
        return "an encoder-decoder (t5)"
    return "an encoder (bert)" if isinstance(model, Encoder) else "a decoder"


def _encoder_refusal(model, needs: str | None = None) -> str:
    """Why an encoder cannot serve a command that generates (or ``needs`` what else a decoder has), with what it can
    do instead (by its head)."""
    use = {"sequence_classification": "it is a classifier (its head scores labels)",
           "question_answering": "it is an extractive QA model (its head points at answers in a context)",
           "token_classification": "it is a tagger (its head labels tokens)"}.get(
        getattr(model.config, "head", None), "use `lmforge embed` (or `index`) with it")
    return f"{model.source} is an encoder (bert): {needs or 'it cannot generate text'}; {use}"


def language_model(model):
    """``model``, refused when it is a decoder with a classification (or reward) head in place of the language
    model's: it scores whole texts and predicts no token."""
    if isinstance(model, GPT) and model.score is not None:
        raise LmforgeError(f"{model.source} is a classifier or reward model (a score head, no language-model head): "
                           f"it predicts no next token; use a language model here (`lmforge reward-score` scores "
                           f"with a reward model)")
    return model


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   needs: str | None = None):
    """``load_model`` for commands that generate text (or score it: ``needs`` says so to an encoder): a decoder or an
    encoder-decoder."""
    from lmforge.model.encoder_decoder import EncoderDecoder

    model = load_model(path, device, dtype)
    if not isinstance(model, (GPT, EncoderDecoder)):
        raise LmforgeError(_encoder_refusal(model, needs))
    return language_model(model)


def load_tokenizer_for(model: GPT, path: str | os.PathLike | None = None):
    """The tokenizer in the model's folder (or ``path``), checked against the model's vocabulary. An adapter saved
    without one (PEFT writes none) uses its base's: the exact folder it was put on (``base_source``)."""
    from lmforge.tokenizer import Tokenizer

    source = path or model.source
    if path is None and not (Path(source) / "tokenizer.json").exists() and getattr(model, "base_source", None):
        source = model.base_source
    tok = Tokenizer.load(source)
    if tok.vocab_size > model.config.vocab_size:
        raise LmforgeError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's embedding has only "
            f"{model.config.vocab_size}; use the tokenizer the model was trained with"
        )
    return tok


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB" or a plain byte count → bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = str(text).strip().lower()
    size = None
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            size = int(float(t[: -len(unit)]) * factor)
            break
    if size is None and t.isdigit():
        size = int(t)
    if size is None:
        raise LmforgeError(f"size {text!r} not understood; write it like 5GB, 500MB or 2GiB")
    if size < 1:
        raise LmforgeError(f"size {text!r} must be at least one byte")
    return size


def convert(src: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
            max_shard_size: str | int = MAX_SHARD_BYTES, overwrite: bool = False, force: bool = False) -> Path:
    """Read any supported model folder (or a run's latest checkpoint) and write it as a Hugging Face
    folder: safetensors (sharded past ``max_shard_size``), optionally cast to ``dtype``.

    Files beside the weights (tokenizer, sentence-transformers modules, ...) are copied unchanged. A LoRA
    adapter folder is merged into the base it records (checked as ``load_adapted`` checks it; ``force``
    as there), in the base's precision, with the adapter's tokenizer.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise LmforgeError(f"--dtype {dtype} is not supported; use {', '.join(dtypes)}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    out = check_output_dir(out, overwrite, ("a model folder", "config.json"))
    folder = resolve_model_dir(src)
    refuse_overwriting_sources(out, folder)
    if folder.resolve() in out.resolve().parents:  # (its files are copied: the new folder would copy itself)
        raise LmforgeError(f"--out {out} lies inside the model folder {folder} it is made from; choose a folder "
                           f"outside it")
    adapter = is_adapter_folder(folder)
    if adapter:
        model = load_adapted(folder, dtype=dtypes[dtype] if dtype else None, merge=True, force=force)
        refuse_overwriting_sources(out, model.base_source)
        print(f"{folder} is a LoRA adapter: merged it into its base model {model.base_source}")
    else:
        model = load_model(folder, dtype=dtypes[dtype] if dtype else None)
    weights_from = model.base_source if adapter else folder
    if dtype == "float16" and not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                                      if t.is_floating_point()):
        raise LmforgeError(f"{folder} has weights beyond fp16's range (±65504): as float16 they would be inf; "
                           f"convert to bfloat16 instead")
    if dtype is None:  # keep the source's precision
        model.to(stored_precision(weights_from))
    save_model(model, out, max_shard_bytes=limit)
    from lmforge.model.lora import ADAPTER_META

    adapter_files = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", ADAPTER_META)
    # The base's files first; an adapter's own (its tokenizer, with the chat template it was tuned on) win.
    for source_folder in [weights_from, folder] if adapter else [folder]:
        for item in source_folder.iterdir():
            skip = item.name in ("config.json", "generation_config.json") or item.name.startswith(_WEIGHT_FILES)
            skip = skip or item.name.startswith("pytorch_model-") and item.suffix == ".bin"  # (sharded .bin weights)
            skip = skip or item.name.startswith("model-") and item.suffix == ".safetensors"
            if skip or item.name.startswith(".") or item.name in adapter_files:
                continue
            if item.is_dir():
                shutil.copytree(item, out / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, out / item.name)
    return out


def stored_precision(folder: Path) -> torch.dtype:
    """The precision a model folder's weights are stored in (its config's ``torch_dtype``, or transformers 5's
    ``dtype``); fp32 when it says none."""
    stored = read_json(Path(folder) / "config.json", "model config")
    name = stored.get("torch_dtype") or stored.get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
