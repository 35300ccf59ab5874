"""`lmforge pretrain`: the one training loop.

    batch → forward → loss / grad_accum_steps → backward → clip → AdamW step → log
    a step whose loss or gradient is NaN/inf is skipped; max_bad_steps of them in a row stop the run
    every eval_interval: validation loss, perplexity, bits per byte
    every checkpoint_interval: an atomic checkpoint with everything needed to resume exactly

It runs unchanged on one CPU, one GPU, or several processes under ``torchrun`` (DDP: gloo on CPU,
NCCL on GPU). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.data.loader import TokenSplit, TrainBatches, eval_windows, window_batch
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import language_model, load_decoder, load_model, model_kind
from lmforge.model.config import PRESETS, Config
from lmforge.model.gpt import GPT, build_model, deferred_init
from lmforge.precision import flushing_subnormals, keeping_freed_memory
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import (
    checkpoint_dirs,
    latest_checkpoint,
    load_trainer_state,
    resume_checkpoint,
    save_checkpoint,
    set_aside,
)
from lmforge.train.config import TrainConfig, load_config, means_preset, read_config_file, save_config
from lmforge.train.distributed import (  # noqa: F401 (Distributed: objectives import it from here)
    SHARDS,
    Distributed,
    SavedForBackward,
    checkpoint_activations,
    choose_parallel,
    full_value,
    is_meta,
    load_full_optimizer,
    load_sharded,
    materialize,
    meta_twin,
    no_sync,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    save_sharded,
    setup_distributed,
    shard,
    state_bytes,
    whole_model,
    wrap,
)
from lmforge.utils import (
    atomic_write_json,
    atomic_write_text,
    first_line,
    hardware_description,
    human_count,
    pick_device,
    warn,
)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for the update after ``step`` completed updates: linear warmup, cosine decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.final_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (config.lr - config.final_lr)


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not biases or LayerNorm gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel runs on CPU and CUDA in torch >= 2.4: one kernel per step instead of many.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=fused)


@torch.no_grad()
def evaluate(model: GPT, split: TokenSplit, windows, batch_size: int, device, autocast, dist_: Distributed) -> float:
    """Mean cross-entropy over the fixed validation windows (shared out across ranks)."""
    was_training = model.training
    model.eval()
    # (under FSDP every rank makes as many forward passes: a rank short of a batch runs window 0 and drops it)
    share = dist_.share(len(windows)) if dist_.sharded else list(range(dist_.rank, len(windows), dist_.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(share), batch_size):
        real = [windows[k] for k in share[i : i + batch_size] if k is not None]
        x, y = window_batch(split, real or windows[:1], model.config.block_size)
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        if real:
            total += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=device)
    if dist_.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


class MetricsLog:
    """Rank 0's JSON-lines log (one object per line) and, when installed, TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Lines after the checkpoint belong to steps that will run again; a line a killed run left cut short
            # is no record.
            def before(line: str) -> bool:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step

            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line and before(line)]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def resolve_config(config, resume: bool, overrides: dict, cls=TrainConfig) -> TrainConfig:
    """A config from a ``TrainConfig``, a dict or a YAML path, with ``overrides`` on top.

    With ``resume``, the run folder's saved ``config.yaml`` is the starting point, so
    ``--resume --out RUN`` alone is enough.
    """
    if isinstance(config, TrainConfig):  # (what it sets: what differs from the defaults; the rest is not "given")
        defaults = type(config)().to_dict()
        path, values = None, {k: v for k, v in config.to_dict().items() if defaults.get(k, object()) != v}
    elif isinstance(config, dict):
        path, values = None, dict(config)
    else:
        path, values = config, {}
    base = {}
    if resume:
        out = overrides.get("out") or values.get("out") or (read_config_file(path).get("out") if path else None)
        saved = Path(out or cls.out) / "config.yaml"
        if saved.exists():
            _refuse_another_command(saved.parent, cls)
            base = read_config_file(saved)
    config = load_config(path, {**values, **overrides}, base=base, cls=cls)
    config.source_file = path  # (read by --overwrite's check: the file must not lie in the folder it empties)
    return config


def _refuse_another_command(run: Path, cls) -> None:
    """A run resumed by the command that did not train it (finetune --resume on a pretraining run) is said as such,
    not as a key the other command misses. The command is read from run.json's task (pretraining writes none)."""
    from lmforge.train.config import DPOConfig, FinetuneConfig, RewardConfig, RLConfig
    from lmforge.utils import read_json

    if not (run / "run.json").is_file():
        return
    task = read_json(run / "run.json", "run description").get("task")
    trained = "pretrain" if task is None else {"reward": "reward", "dpo": "dpo", "rl": "rl"}.get(task, "finetune")
    resuming = next((name for kind, name in ((RLConfig, "rl"), (DPOConfig, "dpo"), (RewardConfig, "reward"),
                                             (FinetuneConfig, "finetune")) if issubclass(cls, kind)), "pretrain")
    if trained != resuming:
        raise LmforgeError(f"{run} is a run of `lmforge {trained}`; resume it with `lmforge {trained} --resume --out "
                           f"{run}`, or give `lmforge {resuming}` another --out")


# Keys that shape the model. A resumed run takes its model from the checkpoint, so a new value would be
# ignored while config.yaml recorded it: it is refused instead.
MODEL_KEYS = ("model", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "dropout", "objective")


def _check_run_dir(out: Path, config: TrainConfig, resume: bool, overwrite: bool,
                   fixed_on_resume: tuple[str, ...]) -> tuple[Path | None, list[Path], bool]:
    """Check the run folder, writing nothing: the checkpoint to resume from (None to start fresh), the
    damaged checkpoints newer than it, and whether the folder is to be emptied first (``overwrite``)."""
    from lmforge.utils import refuse_file_on_path

    refuse_file_on_path(out)
    if resume is True and overwrite:  # (as the commands refuse them together; "auto" may empty a run that died early)
        raise LmforgeError("resume continues the run in out and overwrite deletes it to start over; give one of them")
    if resume == "auto":  # continue when there is something to continue (torchrun --max-restarts), else start
        if checkpoint_dirs(out):
            resume = True
        elif out.exists() and any(out.iterdir()):
            resume, overwrite = False, overwrite or (out / "config.yaml").exists()  # a run that died before saving
        else:
            resume = False
    if resume:
        saved = read_config_file(out / "config.yaml") if (out / "config.yaml").exists() else {}
        for key in (*fixed_on_resume, "seed"):  # (the seed: the data order, and a fine-tuning run's held-out split)
            if key in saved and saved[key] != getattr(config, key, saved[key]):
                raise LmforgeError(
                    f"--{key.replace('_', '-')} cannot change when resuming ({out} was trained with {saved[key]!r}, "
                    f"not {getattr(config, key)!r}); start a new run with another --out to change it"
                )
        checkpoint, damaged = resume_checkpoint(out)
        return checkpoint, damaged, False
    if out.exists() and any(out.iterdir()):
        is_run = (out / "config.yaml").exists() or (out / "checkpoints").exists()
        if not overwrite:
            if not is_run:
                hint = "choose another --out"
            elif checkpoint_dirs(out):
                hint = "pass --resume to continue it or --overwrite to start over"
            else:  # (a run that stopped before its first checkpoint: nothing to resume)
                hint = "it holds no checkpoint to resume; pass --overwrite to start over"
            raise LmforgeError(f"run folder {out} is not empty; {hint}")
        if not is_run:
            raise LmforgeError(f"--overwrite refused: {out} is not an lmforge run folder; choose another --out")
        _refuse_inputs_inside(out, config)
        return None, [], True
    return None, [], False


def _refuse_inputs_inside(out: Path, config) -> None:
    """--overwrite empties ``out``: refuse when a file or folder the run reads (its model, data, prompts, a reward
    model: an option's value, or the path after ``model:`` in a list of rewards) lies inside it."""
    import dataclasses

    from lmforge.utils import refuse_overwriting_sources

    def exists(text: str) -> bool:
        try:
            return bool(text) and Path(text).expanduser().exists()
        except (OSError, ValueError):  # (a value that is no path: too long, a NUL byte)
            return False

    paths = [getattr(config, "source_file", None)]  # (the --config file)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name != "out" and isinstance(value, str):
            for part in value.split(";"):
                paths += [text for text in {part.strip(), part.strip().split(":", 1)[-1]} if exists(text)]
    for spec in str(getattr(config, "reward", "") or "").split(";"):  # a user's reward function: its module's file
        module, _, function = spec.strip().rpartition(":")
        if function.isidentifier() and not spec.strip().startswith(("model:", "regex:")):
            paths.append(_module_file(module))
    refuse_overwriting_sources(out, *(p for p in paths if p))


def _module_file(name: str) -> str | None:
    """Where the module ``name`` (dotted) would be imported from, found without importing it: its top
    package's folder or its file, looked up from the working folder first as a reward function is."""
    import importlib.machinery
    import sys

    top = name.split(".")[0]
    if not top.isidentifier():
        return None
    spec = importlib.machinery.PathFinder.find_spec(top, [str(Path.cwd()), *sys.path])
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    origin = Path(spec.origin)
    return str(origin.parent if origin.name == "__init__.py" else origin)


# -- objectives -----------------------------------------------------------------------------------
# An objective is what a run optimises: its model, its batches (whose position is saved in every
# checkpoint), its loss, its evaluation and how its model is saved. The loop below is the same for all.


def may_defer(config: TrainConfig):
    """A context for building an objective's model: under torchrun with FSDP possible, models are left on the
    meta device (fresh) or memory-mapped (from a folder), for the loop to shard before they get memory.
    Only objectives whose construction reads no weight values use it."""
    return deferred_init(int(os.environ.get("WORLD_SIZE", 1)) > 1 and config.parallel != "ddp")


class Objective:
    model: torch.nn.Module  # the bare model (not wrapped by DDP or torch.compile)
    tokenizer: Tokenizer
    eval_interval_name = "val_loss"  # the metric printed at each evaluation

    def batches(self, rank: int, world_size: int):
        """A stream with next_batch(device), state_dict() and load_state_dict()."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch):
        """The micro-batch's mean loss; or ``(loss, metrics)``, ``metrics`` a dict of scalar tensors (means
        over the same items) that the loop averages like the loss and logs beside it."""
        raise NotImplementedError

    def loss_weight(self, batch) -> float:
        """How many items the micro-batch's mean loss is over (tokens in the loss, pairs, ...). The step's
        loss is the mean over every item of every micro-batch on every rank, whatever the layout: a
        micro-batch counts in proportion to its weight, not as one of equals."""
        return 1.0

    def batch_tokens(self, batch) -> int:
        raise NotImplementedError

    def write_run_files(self, out: Path) -> None:
        """Files the objective keeps in the run folder (rank 0, once the checks passed)."""

    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        return None

    def save(self, folder: Path) -> None:
        from lmforge.model.checkpoint import save_model

        save_model(self.model, folder, self.tokenizer)

    def describe(self) -> dict:
        return {}

    def holding_casts(self):
        """A block in which autocast's bf16 copies of the weights are made once (set by the loop: see there)."""
        return nullcontext()

    def sample(self, step: int, out: Path, bar) -> None:
        pass

    def format_train(self, loss: float) -> str:
        """What the evaluation line says about training so far."""
        return f"train loss {loss:.4f}"

    def format_eval(self, record: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items() if k.startswith("val_"))


class CausalLM(Objective):
    """Pretraining: next-token cross-entropy on random windows of prepared token shards."""

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        self.config, self.device = config, device
        self.train_split = TokenSplit(config.data, "train")
        self.val_split = TokenSplit(config.data, "val") if self.train_split.meta["splits"]["val"]["tokens"] else None
        self.tokenizer = Tokenizer.load(config.data)
        made_with = self.train_split.meta["tokenizer"]
        if self.tokenizer.sha256 != made_with["sha256"]:
            raise LmforgeError(f"{config.data}/tokenizer.json does not match the one the data was made with; run prepare again")
        if checkpoint is not None and (checkpoint / "model" / "tokenizer.json").exists():
            if Tokenizer.load(checkpoint / "model").sha256 != made_with["sha256"]:
                raise LmforgeError(
                    f"{config.data} was prepared with a different tokenizer than the one {checkpoint.parent.parent} "
                    f"was trained with; resume with data prepared by that tokenizer, or start a new run (--out) for this data"
                )
        torch.manual_seed(config.seed)
        with may_defer(config):
            self.model = self.load(checkpoint)
        if made_with["vocab_size"] > self.model.config.vocab_size:
            source = checkpoint or config.model
            raise LmforgeError(
                f"{config.data} has token ids up to {made_with['vocab_size'] - 1} but the model of {source} has only "
                f"{self.model.config.vocab_size} embeddings; prepare the data with that model's tokenizer"
            )
        if checkpoint is None and config.model and not means_preset(config.model, config.out) \
                and Path(config.model).exists():
            # continuing a model: on tokens of its own tokenizer
            from lmforge.model.checkpoint import resolve_model_dir

            folder = resolve_model_dir(config.model)
            if (folder / "tokenizer.json").exists() and not Tokenizer.load(folder).tokenizes_as(self.tokenizer):
                raise LmforgeError(f"{config.data} was prepared with another tokenizer than {config.model}'s; its "
                                   f"token ids would mean other text to the model: prepare the data with that model's "
                                   f"tokenizer (`lmforge prepare --tokenizer {folder}`)")
        self.block_size = self.model.config.block_size
        self.windows = eval_windows(self.val_split, self.block_size, config.eval_windows) if self.val_split else []

    def load(self, checkpoint: Path | None):
        """The model: from the checkpoint being resumed, or new (a preset or a model folder)."""
        if checkpoint is not None:
            return load_decoder(checkpoint / "model", self.device).train()
        return _build_model(self.config, self.tokenizer, self.device)

    def batches(self, rank: int, world_size: int) -> TrainBatches:
        c = self.config
        return TrainBatches(self.train_split, self.block_size, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps)

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def batch_tokens(self, batch) -> int:
        return batch[0].numel()

    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if self.val_split is None:
            return None
        loss = evaluate(self.model, self.val_split, self.windows, self.config.micro_batch_size, self.device, autocast, dist_)
        return {
            "val_loss": loss,
            "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bits_per_byte": loss / math.log(2) / self.val_split.bytes_per_token,
        }

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, ppl {record['val_perplexity']:.2f}, "
                f"{record['val_bits_per_byte']:.3f} bits/byte")

    def describe(self) -> dict:
        block = self.block_size
        return {
            "model": self.model.config.to_dict(),
            "parameters": self.model.num_params(),
            "flops_per_token": self.model.config.flops_per_token(block),
            "data": {"train_tokens": self.train_split.tokens, "val_tokens": self.val_split.tokens if self.val_split else 0},
            "summary": f"{human_count(self.model.num_params())} parameters, "
                       f"{human_count(self.model.config.flops_per_token(block))} training FLOPs/token; "
                       f"train split {human_count(self.train_split.tokens)} tokens",
        }

    def sample(self, step: int, out: Path, bar) -> None:
        prompt = self.config.sample_prompt
        if not prompt:
            return
        from lmforge.infer.generate import SamplingParams

        params = SamplingParams(max_new_tokens=min(self.config.sample_tokens, self.block_size - 1), temperature=0.8,
                                top_k=40, seed=0, truncate=True)
        was_training = self.model.training
        self.model.eval()
        text = self.sample_text(prompt, params)
        self.model.train(was_training)
        bar.write(f"--- sample at step {step} ---\n{prompt}{text}\n---")
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")

    def sample_text(self, prompt: str, params) -> str:
        from lmforge.infer.generate import stream_generate

        return "".join(stream_generate(self.model, self.tokenizer, prompt, params))


def _build_model(config: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> GPT:
    shape = {k: getattr(config, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head")}
    if means_preset(config.model, config.out):
        model_config = Config.from_preset(
            config.model,
            vocab_size=tokenizer.vocab_size,
            dropout=config.dropout,
            bos_token_id=tokenizer.eos_id,
            eos_token_id=tokenizer.eos_id,
            **shape,
        )
        return build_model(model_config, device)
    if not Path(config.model).exists():
        raise LmforgeError(f"model {config.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    model = load_model(config.model, device)
    if not isinstance(model, GPT):
        objective = "mlm (or mlm+nsp, plm)" if model_kind(model).startswith("an encoder (") else "span"
        raise LmforgeError(f"{config.model} is {model_kind(model)}; --objective clm trains a decoder: pretrain it with "
                           f"--objective {objective}, or start from a decoder preset or folder")
    language_model(model)
    refuse_other_shape(model, shape, config.model)
    return model.train()


def refuse_other_shape(model, shape: dict, folder) -> None:
    """A model continued from a folder keeps its shape: a ``shape`` value (block_size, n_layer, ...) given and
    other than the model's is refused (its own value, given again, is fine)."""
    def own(key):
        return getattr(model.config, "kv_heads" if key == "n_kv_head" else key, None)

    other = [f"{k} {v} (the model's: {own(k)})" for k, v in shape.items() if v is not None and v != own(k)]
    if other:
        raise LmforgeError(f"{', '.join(other)} cannot change when continuing from the model folder {folder}")


def pretrain(config: TrainConfig | dict | str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool = True, **overrides) -> dict:
    """Train a model; ``config`` is a ``TrainConfig``, a dict or a YAML path, ``overrides`` win over it.

    Returns a summary: the run folder, steps, tokens, final validation loss.
    """
    config = resolve_config(config, resume, overrides)
    objective = CausalLM
    if config.objective == "mlm":
        from lmforge.train.pretraining import MaskedLM as objective
    elif config.objective == "mlm+nsp":
        from lmforge.train.pretraining import NextSentence as objective
    elif config.objective == "plm":
        from lmforge.train.pretraining import PermutationLM as objective
    elif config.objective == "span":
        from lmforge.train.pretraining import SpanCorruption as objective
    return train(config, objective, resume=resume, overwrite=overwrite, progress=progress)


# -- the loop -------------------------------------------------------------------------------------


def train(config: TrainConfig, make_objective, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, fixed_on_resume: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Run ``make_objective(config, device, checkpoint)`` through the training loop.

    ``fixed_on_resume``: config keys that a resumed run refuses to change (what shapes its model).
    """
    from tqdm.auto import tqdm

    dist_ = setup_distributed(config.device, config.dist_timeout, config.parallel)
    # Subnormal floats (AdamW's moments of unused embedding rows, the softmax gradient of a peaked head) are
    # computed on ~20x slower: an untied embedding made a T5 step 3x slower by step 500. Training flushes them.
    try:
        with flushing_subnormals(), contextlib.ExitStack() as steps:
            return _train(config, make_objective, dist_, resume, overwrite, progress and dist_.is_main, tqdm,
                          fixed_on_resume, steps)
    except KeyboardInterrupt:
        if dist_.is_main and Path(config.out).is_dir():  # (what the interruption lost, and where to go on from)
            last = latest_checkpoint(config.out)
            print(f"lmforge: stopped; the last checkpoint is {last or 'none (nothing was saved)'}"
                  f"{'; --resume goes on from it' if last else ''}", file=sys.stderr, flush=True)
        raise
    except RuntimeError as e:
        if not dist_.enabled or not _lost_a_process(e):
            raise
        last = latest_checkpoint(config.out)
        raise LmforgeError(
            f"process {dist_.rank}: another process of the run stopped or did not answer within dist_timeout "
            f"({config.dist_timeout:g} s): {first_line(e)}. The last checkpoint is {last or 'none'}; fix the cause "
            f"and continue with --resume (under `torchrun --max-restarts N`, `--resume auto` continues by itself)"
        ) from None
    finally:
        if dist_.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _lost_a_process(error: RuntimeError) -> bool:
    """Whether a collective failed because a peer died or hung (gloo and NCCL say so in these words)."""
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        words in text for words in ("connection closed by peer", "timed out", "timeout", "connection reset", "broken pipe"))


def _restore(state: dict, checkpoint: Path, model, optimizer, batches, device: torch.device, dist_: Distributed) -> None:
    """Put the optimizer (and, from a sharded checkpoint, the model), the loader's position and the RNGs
    back where ``checkpoint`` left them, whatever the number of processes that saved it. The optimizer's settings
    are this run's (a resumed run given another --weight-decay or --beta2 uses it, as its config.yaml says; the
    saved state would otherwise put the old ones back): said in one line when they changed."""
    asked = [{k: group[k] for k in _OPTIMIZER_SETTINGS} for group in optimizer.param_groups]
    try:
        if (checkpoint / SHARDS).is_dir():  # saved under FSDP: each rank reads the parts its layout needs
            load_sharded(checkpoint / SHARDS, model, optimizer)
        elif dist_.sharded:  # saved whole by one process or under DDP: each rank keeps its part
            load_full_optimizer(state["optimizer"], model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise LmforgeError(f"the optimizer state in {checkpoint} does not fit the model's trainable parameters "
                           f"({first_line(e)}); resume with the settings the run was started with") from None
    except BaseException as e:  # DCP's CheckpointException (a BaseException) names each rank's failure
        failures = getattr(e, "failures", None)
        if not isinstance(failures, dict) or not failures:
            raise
        cause = next(iter(failures.values()))
        cause = cause[0] if isinstance(cause, tuple) else cause
        raise LmforgeError(f"the sharded state in {checkpoint / SHARDS} cannot be read into this run "
                           f"({type(cause).__name__}: {first_line(cause)}); resume with the settings the run was "
                           f"started with") from None
    changed = {}
    for group, settings in zip(optimizer.param_groups, asked):
        for key, value in settings.items():
            if (tuple(group[key]) if isinstance(group[key], list) else group[key]) != value:  # (DCP: lists)
                changed.setdefault(key, (group[key], value))
                group[key] = value
    if changed and dist_.rank == 0:
        warn("the optimizer goes on with this run's settings: " + ", ".join(
            f"{key} {_setting(old)} -> {_setting(new)}" for key, (old, new) in changed.items()))
    batches.load_state_dict(state["loader"])
    # Each rank's own random state when the number of processes is the same; otherwise rank 0's for all.
    ranks = state["rng"].get("ranks")
    same_layout = ranks is not None and len(ranks) == dist_.world_size
    rng = ranks[dist_.rank] if same_layout else state["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


_SCHEDULE = ("lr", "min_lr", "warmup_steps", "max_steps")  # what lr_at reads


def _say_schedule_change(state: dict, config: TrainConfig) -> None:
    """A resumed run whose learning-rate schedule changed (a larger --max-steps stretches the cosine over more
    steps, as a new --lr moves it): the lr jumps where it goes on, said in one line."""
    saved = state.get("schedule")
    if not saved or all(saved.get(k) == getattr(config, k) for k in _SCHEDULE):
        return
    step = state["step"]
    was, now = lr_at(step, replace(config, **{k: saved[k] for k in _SCHEDULE if k in saved})), lr_at(step, config)
    if not math.isclose(was, now, rel_tol=1e-3, abs_tol=1e-12):
        changed = ", ".join(f"{k} {saved[k]} -> {getattr(config, k)}" for k in _SCHEDULE
                            if k in saved and saved[k] != getattr(config, k))
        warn(f"the learning-rate schedule changed ({changed}): from step {step} on the lr is {now:.3g} where the "
             f"run's own schedule was at {was:.3g} (an lr that jumps can set a run back; to go on as it was, keep "
             f"these settings)")


_OPTIMIZER_SETTINGS = ("weight_decay", "betas", "eps")  # (lr: set at every step, lr_at)


def _setting(value) -> str:
    return "(" + ", ".join(f"{v:g}" for v in value) + ")" if isinstance(value, tuple) else f"{value:g}"


def _rng_states(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _throughput(tokens: int, seconds: float, flops_per_token, peak: float, peak_source: str, device,
                dist_: Distributed) -> dict:
    """Speed since the last evaluation, model FLOPs utilisation (the training FLOPs the tokens needed over
    what the devices can do), and every rank's peak memory (a collective: all ranks call it)."""
    memory = dist_.gather(peak_memory_bytes(device) / 2**20)
    record = {"tokens_per_second": tokens / seconds if seconds else 0.0, "peak_memory_mb": memory}
    if flops_per_token and peak and seconds:
        record.update(mfu=flops_per_token * tokens / seconds / (peak * dist_.world_size),
                      peak_flops_per_device=peak, peak_source=peak_source)
    return record


def _keep_global_batch(config: TrainConfig, state: dict, dist_: Distributed) -> None:
    """Resuming on another number of processes: change grad_accum_steps so that a step still trains on as
    many rows (the loader then hands out exactly the rows the original layout would have)."""
    saved = state.get("global_batch")
    now = config.micro_batch_size * config.grad_accum_steps * dist_.world_size
    if saved is None or saved == now:
        return
    per_pass = config.micro_batch_size * dist_.world_size
    if saved % per_pass:
        fits = [m for m in range(1, saved // dist_.world_size + 1) if saved % (m * dist_.world_size) == 0]
        hint = f"pass --micro-batch-size {fits[-1]}" if fits else f"resume on a number of processes that divides {saved}"
        raise LmforgeError(
            f"the run's steps are of {saved} rows (saved on {state.get('world_size')} process(es)); "
            f"{dist_.world_size} process(es) x micro_batch_size {config.micro_batch_size} cannot make that up: {hint}"
        )
    config.grad_accum_steps = saved // per_pass
    if dist_.is_main and state.get("world_size") != dist_.world_size:
        print(f"resuming on {dist_.world_size} process(es) (saved on {state.get('world_size')}): grad_accum_steps "
              f"{config.grad_accum_steps} keeps the {saved} rows of a step", flush=True)
    elif dist_.is_main:  # (the same processes, another --grad-accum-steps or --micro-batch-size)
        warn(f"a resumed run keeps its {saved} rows a step: grad_accum_steps {config.grad_accum_steps} (not "
             f"{now // per_pass}); to train on other batches, start a new run from its model folder")


def _every_rank_sees(seen: bool, out: Path, dist_: Distributed, what: str, blind: list[int] | None = None) -> None:
    """Refuse, on every rank alike, a run folder that some processes do not see as process 0 does: on several
    machines without a shared file system each would read and write a folder of its own, and their
    checkpoints could never be resumed. ``blind``: the ranks that do not, when already gathered."""
    if not dist_.enabled:
        return
    if blind is None:
        blind = [rank for rank, ok in enumerate(dist_.gather(bool(seen))) if not ok]
    if blind:
        raise LmforgeError(
            f"process(es) {', '.join(map(str, blind))} of {dist_.world_size} cannot see {what}, which process 0 "
            f"sees in the run folder {out}: every process reads the run's checkpoints there, and under FSDP writes "
            f"its shards there. Put --out on a file system all the machines share (the same path on each)")


def _check_shared_folder(out: Path, dist_: Distributed) -> None:
    """Several processes: each must see the run folder process 0 writes (a machine without the shared file system
    would write a folder of its own). Process 0 writes a probe file with a token naming this start; every process
    reads it back; the probe (and the folder, if it made it for the probe) is removed before an error, so a refused
    start leaves things as they were."""
    token = dist_.broadcast(secrets.token_hex(8))
    probe = out / f".lmforge-probe-{token}"
    made = False
    if dist_.is_main:
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(token, encoding="utf-8")
    dist_.barrier()
    try:
        seen = probe.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = [rank for rank, ok in enumerate(dist_.gather(seen)) if not ok]  # (all have read it by now)
    if dist_.is_main:
        probe.unlink(missing_ok=True)
        if blind and made:
            shutil.rmtree(out, ignore_errors=True)
    if blind:
        _every_rank_sees(False, out, dist_, "the files process 0 writes there", blind)


def _write_run_info(out: Path, config: TrainConfig, objective, device, use_bf16: bool, world_size: int) -> str:
    """The run folder's config.yaml and run.json (what the model is, and where it trains); returns the
    objective's one-line summary of the model."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    objective.write_run_files(out)
    info = objective.describe()
    summary = info.pop("summary", "")
    atomic_write_json(out / "run.json", {
        **info,
        "trainable_parameters": sum(p.numel() for p in objective.model.parameters() if p.requires_grad),
        "device": str(device),
        "dtype": "bfloat16 autocast" if use_bf16 else "float32",
        "world_size": world_size,
        "hardware": hardware_description(device),
    })
    return summary


def _precision(config: TrainConfig, objective, device: torch.device):
    """The training precision: as configured, or for ``auto`` measured on the model's own MLP shape."""
    from lmforge.precision import choose_autocast

    shape = objective.model.config
    width = getattr(shape, "n_embd", None) or getattr(shape, "d_model", None) or 768
    rows = config.micro_batch_size * (getattr(objective, "block_size", None) or 256)
    return choose_autocast(device, config.dtype, width, 4 * width, rows)


def _train(config: TrainConfig, make_objective, dist_: Distributed, resume: bool, overwrite: bool, progress: bool,
           tqdm, fixed_on_resume: tuple[str, ...], steps: contextlib.ExitStack) -> dict:
    out = Path(config.out)
    device = pick_device(config.device)
    baseline_memory = reset_peak_memory(device)  # before the model: what `plan --measured` subtracts
    if config.threads:
        torch.set_num_threads(config.threads)

    # Every check runs before anything in the run folder is written: a refused start or --resume leaves
    # the folder as it was, so a plain --resume still works after a mistaken one.
    checkpoint, damaged, start_over = None, [], False
    if dist_.is_main:
        checkpoint, damaged, start_over = _check_run_dir(out, config, resume, overwrite, fixed_on_resume)
    checkpoint = dist_.broadcast(checkpoint)
    _every_rank_sees(checkpoint is None or Path(checkpoint).is_dir(), out, dist_, f"the checkpoint {checkpoint}")
    state = load_trainer_state(checkpoint) if checkpoint is not None else None
    if state is not None:
        _keep_global_batch(config, state, dist_)

    # With several processes the model may be sharded: objectives that can build it on the meta device do
    # (see may_defer), and it gets memory below, one shard per rank, never whole in one process.
    objective = make_objective(config, device, checkpoint)  # may set max_steps (fine-tuning by epochs)
    if state is not None and state["step"] >= config.max_steps:
        # The run already went as far as asked: say so and change nothing, so running it again is harmless.
        if dist_.is_main:
            larger = "--epochs" if getattr(config, "epochs", 0) > 0 else "--max-steps"  # (epochs set max_steps)
            print(f"{out} is already at step {state['step']} ≥ --max-steps {config.max_steps}; nothing to do "
                  f"(pass a larger {larger} to continue)", flush=True)
        return {"out": str(out), "steps": state["step"], "tokens": state["tokens"], "elapsed": state["elapsed"],
                "skipped_steps": state.get("skipped_steps", 0), "val_loss": None, "eval": None,
                "checkpoint": str(checkpoint) if dist_.is_main else None, "already_done": True}
    model = objective.model
    precision = dist_.broadcast(_precision(config, objective, device) if dist_.is_main else None)
    use_bf16 = precision.dtype == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    objective.autocast = autocast  # objectives that run the model outside the loop's steps (RL rollouts) use it too
    dist_.parallel, parallel_reason = choose_parallel(config.parallel, model, dist_.world_size, device, dist_.joined)
    if config.activation_checkpointing:
        checkpoint_activations(model)
    if device.type == "cuda":  # the head's products in aligned rows: 13% less peak memory (gpt.aligned_linear)
        for module in model.modules():
            if hasattr(module, "head_multiple"):
                module.head_multiple = 64
    if dist_.sharded:
        twin = meta_twin(model)  # the plain structure that rank 0 saves the gathered weights through
        shard(model, device, use_bf16)
    if is_meta(model):
        materialize(model, device)
    optimizer = make_optimizer(model, config, device)
    # (taken now: after a forward pass FSDP may show the root's gathered weights as model.parameters())
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    batches = objective.batches(dist_.rank, dist_.world_size)
    step, tokens_seen, elapsed = 0, 0, 0.0
    skipped_steps = bad_steps = 0  # updates skipped for a non-finite loss or gradient: in all, and in a row
    if state is not None:
        _restore(state, checkpoint, model, optimizer, batches, device, dist_)
        step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]
        skipped_steps, bad_steps = state.get("skipped_steps", 0), state.get("bad_steps", 0)
        if dist_.is_main:
            _say_schedule_change(state, config)

    train_model: torch.nn.Module = torch.compile(model) if config.compile else model
    train_model = wrap(train_model, dist_, device)
    flops_per_token = objective.describe().get("flops_per_token")
    peak, peak_source = peak_flops(device, use_bf16) if flops_per_token else (0.0, "")

    log = None
    if dist_.enabled:  # (before process 0 writes anything in the run folder)
        _check_shared_folder(out, dist_)
    if dist_.is_main:  # the checks passed: from here on the run folder is written
        if start_over:
            shutil.rmtree(out)
        for bad in damaged:
            warn(f"damaged checkpoint {bad.name} kept as {set_aside(bad).name}, out of the run's way")
        summary = _write_run_info(out, config, objective, device, use_bf16, dist_.world_size)
        log = MetricsLog(out, step if checkpoint is not None else None, config.tensorboard)
        if checkpoint is not None:
            print(f"resuming from step {step} of {out}", flush=True)
        print(f"model: {summary} on {dist_.world_size}×{device}", flush=True)
        print(f"precision: {precision.reason}", flush=True)
        if dist_.enabled:
            print(f"parallel: {dist_.parallel} ({parallel_reason})", flush=True)
        elif config.parallel != "auto":
            warn(f"--parallel {config.parallel} has nothing to share out in one process; start several with "
                 f"`torchrun --nproc-per-node N -m lmforge ...`")
        if peak:
            print(f"MFU is against {peak / 1e12:.2f} TFLOP/s ({peak_source})", flush=True)

    def holding_casts(enabled: bool = True):
        """In bf16 autocast, the bf16 copies autocast makes of the weights are kept (autocast's cache) until the
        block ends, instead of being made again in each autocast region (each micro-batch, each evaluation
        batch) inside it: an outer region with autocast off keeps the cache, and the code between the regions
        runs as it would outside. Not under FSDP, whose gathered weights are new tensors at every forward pass.
        (An objective must not run its trainable weights under no_grad before it runs them with gradients in
        one step: the later pass would get the first one's copies, which carry no gradient. lmforge's objectives
        run the policy first.)"""
        held = enabled and use_bf16 and not dist_.sharded
        return torch.autocast(device.type, enabled=False) if held else nullcontext()

    objective.holding_casts = holding_casts  # (RL's no-grad pass over a rollout holds them too)

    def run_eval() -> dict | None:
        with holding_casts():
            metrics = objective.evaluate(dist_, autocast)
        if metrics is None:
            return None
        record = {"step": step, "tokens": tokens_seen, **metrics}
        if log:
            log.write(record)
        return record

    bar = tqdm(total=config.max_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    pending = None  # a checkpoint whose shards are being written in the background (--async-save)
    if config.async_save and not dist_.sharded and dist_.is_main:
        warn("--async-save applies to the sharded checkpoints of --parallel fsdp; this run saves its checkpoints "
             "whole, in the foreground")

    def report_saved(saved: Path | None, started: float, background: bool = False) -> None:
        if dist_.is_main:
            size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
            seconds = time.perf_counter() - started
            bar.write(f"checkpoint {saved.name}: {size / 2**20:,.1f} MB, " + (
                f"in place {seconds:.2f} s after it was started (shards written in the background)" if background
                else f"written in {seconds:.2f} s"))

    def seal_pending() -> None:
        """The checkpoint written in the background becomes the run's latest (every rank calls this)."""
        nonlocal pending
        if pending is not None:
            report_saved(pending.finish(), pending.started, background=True)
            pending = None
    window_tokens, window_seconds = 0, 0.0  # since the last evaluation: throughput.json's figures
    measured = None  # this process's saved activations and training state, in the first step it runs
    last_eval = None
    if step == 0:
        last_eval = run_eval()
        if last_eval and dist_.is_main:
            bar.write(f"step 0: {objective.format_eval(last_eval)}")
        if dist_.is_main and not dist_.sharded:  # (under FSDP a forward pass needs every rank)
            objective.sample(step, out, bar)
    model.train()
    # The steps keep freed memory for the next step's large tensors instead of mapping them afresh (until train()
    # returns). Not before: the whole tensors that loading and sharding free would stay with the process too.
    steps.enter_context(keeping_freed_memory())

    def abandon_on_failure(error_type, error, traceback) -> bool:  # (an __exit__: runs as the error leaves)
        if error_type is not None and pending is not None:
            pending.abandon()
        return False

    steps.push(abandon_on_failure)
    while step < config.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The step's loss is the mean over all its items (tokens, pairs, ...) on every rank. Each micro-batch's
        # mean loss is scaled by its share of the step's items before backward() adds it to .grad; DDP then
        # averages over ranks, hence the factor world_size. Equal micro-batches give the usual 1/accum_steps.
        micro_batches = [batches.next_batch(device) for _ in range(config.grad_accum_steps)]
        weights = [float(objective.loss_weight(b)) for b in micro_batches]
        total_weight = dist_.all_sum(torch.tensor(sum(weights), dtype=torch.float64, device=device)).item()
        sums: dict[str, torch.Tensor] = {}  # weighted sums of the loss and the objective's metrics
        step_tokens = 0
        with holding_casts(config.grad_accum_steps > 1):  # (the weights' bf16 copies: once a step)
            for micro, batch in enumerate(micro_batches):
                last_micro = micro == config.grad_accum_steps - 1
                # Gradients are all-reduced across ranks only on the last micro-batch.
                # The run's first micro-batch counts what autograd keeps for the backward pass (plan --measured).
                counting = measured is None and micro == 0
                if counting:
                    saved = SavedForBackward()
                with no_sync(train_model, dist_, last_micro):
                    with autocast, saved if counting else nullcontext():
                        loss = objective.loss(train_model, batch)
                    loss, metrics = loss if isinstance(loss, tuple) else (loss, {})
                    share = weights[micro] * dist_.world_size / total_weight if total_weight > 0 else 0.0
                    (loss * share).backward()
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * weights[micro]
                step_tokens += objective.batch_tokens(batch)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        names = list(sums)
        means = (dist_.all_sum(torch.stack([sums[k] for k in names])) / total_weight).tolist() if total_weight > 0 \
            else [float("nan")] * len(names)
        step_metrics = dict(zip(names, means))
        train_loss = step_metrics.pop("loss")
        # One NaN or inf update would poison the weights and AdamW's moments for good: skip it. The grad
        # norm (of all-reduced gradients) and the mean loss are the same on every rank, so all ranks agree.
        finite = math.isfinite(train_loss) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        if measured is None:  # exact, where resident memory is not: what the plan's memory model counts
            measured = {"activation_mb": saved.bytes / 2**20, "states_mb": state_bytes(model, optimizer) / 2**20}
        optimizer.zero_grad(set_to_none=True)
        bad_steps = 0 if finite else bad_steps + 1
        skipped_steps += not finite
        step += 1
        if dist_.enabled:  # ranks' micro-batches differ in length (examples, pairs): count them all
            step_tokens = int(dist_.all_sum(torch.tensor(step_tokens, dtype=torch.int64, device=device)).item())
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        elapsed += dt
        window_tokens, window_seconds = window_tokens + step_tokens, window_seconds + dt
        if log:
            log.write({
                "step": step, "tokens": tokens_seen, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_second": step_tokens / dt, "elapsed": elapsed, **step_metrics,
                **({} if finite else {"skipped": True}),
            })
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}", refresh=False)
        bar.update()
        if not finite:
            if bad_steps >= config.max_bad_steps:
                seal_pending()  # a good checkpoint: let it land
                bar.close()
                if log:
                    log.close()
                last = latest_checkpoint(out)
                raise LmforgeError(
                    f"step {step}: the loss or gradients were not finite for {bad_steps} steps in a row "
                    f"(max_bad_steps {config.max_bad_steps}); stopped. The last good checkpoint is "
                    f"{last or 'none (none was saved yet)'}: lower lr or check the data, then --resume"
                )
            if dist_.is_main:
                bar.write(f"step {step}: loss or gradients not finite; update skipped ({bad_steps} in a row)")
        if step % config.eval_interval == 0 or step == config.max_steps:
            throughput = _throughput(window_tokens, window_seconds, flops_per_token, peak, peak_source, device, dist_)
            for key, values in zip(("activation_mb", "states_mb"), zip(*dist_.gather(tuple(measured.values())))):
                throughput[key] = list(values)
            window_tokens, window_seconds = 0, 0.0
            if dist_.is_main:
                atomic_write_json(out / "throughput.json", {"step": step, "parallel": dist_.parallel,
                                                             "activation_checkpointing": config.activation_checkpointing,
                                                             "baseline_memory_mb": baseline_memory / 2**20, **throughput})
            last_eval = run_eval()
            if last_eval and dist_.is_main:
                bar.write(f"step {step}: {objective.format_train(train_loss)}, {objective.format_eval(last_eval)}")
        if pending is not None and dist_.all_sum(torch.tensor(float(pending.done()), device=device)).item() \
                == dist_.world_size:  # every rank's shards are written: it becomes the latest checkpoint now
            seal_pending()
        if step % config.checkpoint_interval == 0 or step == config.max_steps:
            state = {
                "step": step, "tokens": tokens_seen, "elapsed": elapsed, "skipped_steps": skipped_steps,
                "bad_steps": bad_steps, "loader": batches.state_dict(), "world_size": dist_.world_size,
                "global_batch": config.micro_batch_size * config.grad_accum_steps * dist_.world_size,
                "schedule": {k: getattr(config, k) for k in _SCHEDULE},
                "rng": {**_rng_states(device), "ranks": dist_.gather(_rng_states(device))},
            }
            seal_pending()  # at most one checkpoint is written in the background at a time
            started = time.perf_counter()
            if dist_.sharded:  # every rank writes its shards; rank 0 also the gathered model folder
                def save_model(folder: Path) -> None:
                    with whole_model(objective, twin, dist_):
                        if dist_.is_main:
                            objective.save(folder)

                saving = save_checkpoint(
                    out, step, save_model, state, config.keep_checkpoints, dist_=dist_, background=config.async_save,
                    write_shards=lambda folder: save_sharded(folder / SHARDS, model, optimizer, config.async_save,
                                                             config.dist_timeout))
                if config.async_save:
                    pending = saving
                    if dist_.is_main:
                        bar.write(f"checkpoint {saving.final.name}: shards being written in the background "
                                  f"({time.perf_counter() - started:.2f} s to start)")
                    continue
            elif dist_.is_main:
                save_checkpoint(out, step, objective.save, {**state, "optimizer": optimizer.state_dict()},
                                config.keep_checkpoints)
            dist_.barrier()
            report_saved(latest_checkpoint(out) if dist_.is_main else None, started)
    seal_pending()
    bar.close()
    if dist_.is_main and not dist_.sharded:
        objective.sample(step, out, bar)
    if log:
        log.close()
    return {
        "out": str(out),
        "steps": step,
        "tokens": tokens_seen,
        "elapsed": elapsed,
        "skipped_steps": skipped_steps,
        "val_loss": last_eval.get("val_loss") if last_eval else None,
        "eval": last_eval,
        "checkpoint": str(latest_checkpoint(out)) if dist_.is_main else None,
    }
