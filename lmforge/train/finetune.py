"""`lmforge finetune`: adapt a model to examples, through the same loop as pretraining.

Objectives (picked by the examples' format):

    SFT              chat or instruction examples; loss on the assistant's (or completion's) tokens only,
                     the end-of-turn token included; optional packing with document masking
    Classification   {"text", "label"} on a decoder (score of the last real token) or an encoder
    QA               SQuAD-style extractive question answering on an encoder (start/end logits)

Methods: ``full`` (everything trains), ``linear-probe`` (only the head; the frozen backbone's
features are computed once and cached), ``lora`` (adapters, PEFT format); ``freeze_layers`` /
``train_layers`` freeze part of the backbone in any method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.examples import Examples, read_examples
from lmforge.data.loader import StepPosition
from lmforge.errors import LmforgeError
from lmforge.eval.metrics import classification_metrics, squad_metrics
from lmforge.infer.engine import record_end_of_turn
from lmforge.model.checkpoint import load_adapted, load_model, load_tokenizer_for, save_model
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT
from lmforge.model.heads import attach_head, decoder_classifier_ids
from lmforge.model.hf import ENCODER_DECODER_TYPES
from lmforge.model.lora import LoRALinear, add_lora, count_trainable, lora_targets, save_adapter
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from lmforge.train.checkpointing import checkpoint_dirs
from lmforge.train.config import FinetuneConfig
from lmforge.train.loop import Distributed, Objective, may_defer, resolve_config, train
from lmforge.utils import human_count, warn


def split_examples(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first ``val_fraction`` held out."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = int(round(len(rows) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    if n_val >= len(rows):
        raise LmforgeError(f"--val-fraction {val_fraction:g} of {len(rows)} example(s) leaves none to train on; lower "
                           f"it (0 holds none out) or give held-out examples with --val")
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def set_dropout(model, p: float | None):
    """Fine-tune with dropout ``p`` (None keeps the model's own): every dropout of the model and its attention,
    not LoRA's own (``lora_dropout``); the saved model's config records it, as transformers' would."""
    if p is None:
        return model
    lora_drops = {id(m.drop) for m in model.modules() if isinstance(m, LoRALinear)}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and id(module) not in lora_drops:
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):  # attention's dropout_p
            module.dropout = p
    model.config = dataclasses.replace(model.config, dropout=p)
    return model


def _tools(row: dict) -> list | None:
    """A chat row's ``tools`` (JSON text in a CSV or Parquet cell is read), or None."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            pass
    if tools is not None and not isinstance(tools, list):
        raise LmforgeError(f"a row's 'tools' must be a list of tool definitions (JSON objects), not "
                           f"{type(tools).__name__}: {str(tools)[:60]!r}")
    return tools or None

class ExampleBatches(StepPosition):
    """Micro-batches of example indices: epochs of seeded permutations, read as one endless stream.

    Like the pretraining loader, the rows of step ``s`` depend only on ``(seed, s)`` and are shared
    out among micro-batches and ranks; the position (one integer) is saved in every checkpoint.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int, accum_steps: int, collate):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.accum_steps, self.collate = rank, world_size, accum_steps, collate
        self.batch_index = 0
        self._epochs: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            self._epochs = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._epochs[epoch]

    def rows(self) -> list[int]:
        """Global row numbers of this rank's next micro-batch."""
        step, micro = divmod(self.batch_index, self.accum_steps)
        self.batch_index += 1
        per_step = self.batch_size * self.accum_steps * self.world_size
        first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def next_batch(self, device):
        indices = [int(self.order(g // self.n)[g % self.n]) for g in self.rows()]
        return _to(self.collate(indices), device)



class PackedBatches(ExampleBatches):
    """SFT rows of exactly ``row_len`` tokens cut from the endless stream of examples (no padding).

    An example that crosses a row boundary continues in the next row; attention never crosses from
    one example to another (document masking) and positions restart with each example.
    """

    def __init__(self, features: list[tuple[list[int], list[int]]], row_len: int, *args):
        super().__init__(len(features), *args, collate=None)
        self.features, self.row_len = features, row_len
        self.lengths = np.array([len(ids) for ids, _ in features])
        self.epoch_tokens = int(self.lengths.sum())
        self._cum: dict[int, np.ndarray] = {}

    def cumulative(self, epoch: int) -> np.ndarray:
        if epoch not in self._cum:
            self._cum = {epoch: np.concatenate([[0], np.cumsum(self.lengths[self.order(epoch)])])}
        return self._cum[epoch]

    def row(self, g: int) -> dict:
        start, end = g * self.row_len, (g + 1) * self.row_len
        ids, mask, segment, positions = [], [], [], []
        pos, seg = start, 0
        while pos < end:
            epoch, offset = divmod(pos, self.epoch_tokens)
            cum = self.cumulative(epoch)
            k = int(np.searchsorted(cum, offset, side="right")) - 1
            example = int(self.order(epoch)[k])
            within = offset - int(cum[k])
            take = min(int(self.lengths[example]) - within, end - pos)
            e_ids, e_mask = self.features[example]
            ids += e_ids[within : within + take]
            mask += e_mask[within : within + take]
            segment += [seg] * take
            positions += list(range(within, within + take))
            pos += take
            seg += 1
        return {"ids": ids, "mask": mask, "segment": segment, "positions": positions}

    def next_batch(self, device):
        rows = [self.row(g) for g in self.rows()]
        ids = torch.tensor([r["ids"] for r in rows])
        mask = torch.tensor([r["mask"] for r in rows])
        segment = torch.tensor([r["segment"] for r in rows])
        positions = torch.tensor([r["positions"] for r in rows])
        same = segment[:, None, :] == segment[:, :, None]
        causal = torch.ones(self.row_len, self.row_len, dtype=torch.bool).tril()
        # a target is the next token of the same example, where that token is in the loss
        labels = torch.full_like(ids, -100)
        keep = (segment[:, 1:] == segment[:, :-1]) & (mask[:, 1:] == 1)
        labels[:, :-1] = torch.where(keep, ids[:, 1:], -100)
        batch = {"ids": ids, "labels": labels, "positions": positions, "attn_mask": (same & causal)[:, None]}
        return _to(batch, device)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


# -- the common part of every fine-tuning objective -----------------------------------------------


class Finetune(Objective):
    head: str | None = None  # the task head the model needs
    defers_model = True  # whether the model may be opened unmaterialised (see load); not when setup runs it

    def __init__(self, config: FinetuneConfig, device: torch.device, checkpoint: Path | None, examples: Examples):
        self.config, self.device = config, device
        torch.manual_seed(config.seed)
        base = Path(config.model)
        if not base.exists():
            raise LmforgeError(f"model folder {base} does not exist")
        self.model = self.load(checkpoint)
        self.tokenizer = load_tokenizer_for(self.model)
        self.block_size = self.model.config.block_size
        self.max_length = min(config.max_length or self.block_size, self.block_size)
        train_rows, val_rows = examples.rows, []
        if config.val:
            val_rows = self.read_val(config.val, examples.task)
        elif config.val_fraction > 0:
            train_rows, val_rows = split_examples(examples.rows, config.val_fraction, config.seed)
        self.setup(train_rows, val_rows)
        given = getattr(config, "given", frozenset())
        if config.epochs > 0 and "max_steps" in given:  # (as transformers' max_steps overrides num_train_epochs)
            if "epochs" in given and int(os.environ.get("RANK", 0)) == 0:
                warn(f"--max-steps {config.max_steps} decides the run's length; --epochs {config.epochs:g} is not used")
            config.epochs = 0.0
        if config.epochs > 0:  # the loop reads max_steps after this
            per_step = config.micro_batch_size * config.grad_accum_steps * int(os.environ.get("WORLD_SIZE", 1))
            config.max_steps = max(1, math.ceil(config.epochs * self.epoch_units / per_step))
            over = config.max_steps * per_step - math.ceil(config.epochs * self.epoch_units)
            if over > 0 and int(os.environ.get("RANK", 0)) == 0:  # (every step has its rows: the last one fills up)
                unit = "rows of packed examples" if config.packing else "examples"
                warn(f"{config.epochs:g} pass(es) over {self.epoch_units} {unit} is not a whole number of steps of "
                     f"{per_step}: the last step also takes {over} {unit} of the next pass (for exact passes, "
                     f"make the rows a step divide {self.epoch_units})")

    def read_val(self, path: str, task: str) -> list:
        return read_examples(path, task, self.config.skip_bad_lines).rows

    def longer_hint(self) -> str:
        """What to do when examples do not fit ``max_length``: raise it, unless it is already the model's context."""
        if self.max_length < self.block_size:
            return f"raise --max-length (the model reads up to {self.block_size})"
        asked = f" (--max-length {self.config.max_length} is more than it reads)" \
            if (self.config.max_length or 0) > self.block_size else ""
        return f"the model reads at most {self.block_size} tokens{asked}: shorten the examples or use a model with a " \
               f"longer context"

    # the model ------------------------------------------------------------------------------------

    def load(self, checkpoint: Path | None):
        c = self.config
        if checkpoint is not None and c.method == "lora":
            with may_defer(c) if self.defers_model else nullcontext():  # (the base opened for sharding, as below)
                model = load_adapted(checkpoint / "model", self.device, merge=False, base=c.model)
            model.base_source = Path(c.model)
            return self._freeze(set_dropout(model, c.dropout), lora_loaded=True)
        # Under torchrun, the folder is opened without copying its weights: the loop shards it first (FSDP), each
        # rank copying its rows; a new head and LoRA adapters are drawn whole (they are small) and kept.
        deferrable = self.defers_model
        if checkpoint is not None:
            with may_defer(c) if deferrable else nullcontext():
                return self._freeze(set_dropout(load_model(checkpoint / "model", self.device), c.dropout))
        with may_defer(c) if deferrable else nullcontext():
            model = set_dropout(load_model(c.model, self.device), c.dropout)
        model.base_source = Path(c.model)
        if self.head is not None:
            self.attach(model)
        if c.method == "lora":
            if (Path(c.model) / "checkpoints").is_dir():
                warn(f"the adapter's base is a checkpoint of the run {c.model}, which that run deletes if it trains on "
                     f"(it keeps its last keep_checkpoints); to keep the adapter usable, fine-tune from a copy made "
                     f"with `lmforge convert {c.model} BASE`")
            add_lora(model, lora_targets(model, c.lora_targets), c.lora_r, c.lora_alpha, c.lora_dropout)
        return self._freeze(model)

    def attach(self, model) -> None:
        """Give the model this task's head (subclasses)."""

    def _freeze(self, model, lora_loaded: bool = False):
        c = self.config
        if c.method == "linear-probe":
            if self.head is None:
                raise LmforgeError("--method linear-probe trains only a task head; use it for classification or qa")
            for name, p in model.named_parameters():
                p.requires_grad_(name.split(".")[0] in ("score", "classifier", "qa_outputs"))
        elif c.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        blocks = len(getattr(model, "blocks", ()))
        frozen_blocks = c.freeze_layers if c.freeze_layers else (blocks - c.train_layers if c.train_layers else 0)
        if frozen_blocks > blocks:
            raise LmforgeError(f"the model has {blocks} blocks; cannot freeze {frozen_blocks}")
        if frozen_blocks:
            frozen = {"wte", "wpe", "wtt", "ln_emb"} | {f"blocks.{i}" for i in range(frozen_blocks)}
            for name, p in model.named_parameters():
                if name.split(".")[0] in frozen or ".".join(name.split(".")[:2]) in frozen:
                    p.requires_grad_(False)
        model.train()
        return model

    def val_batches(self):
        """The validation examples as training micro-batches (``collate(indices, val_features)``), on the device,
        in the same order at every evaluation."""
        size = self.config.micro_batch_size
        for i in range(0, self.n_val, size):
            yield _to(self.collate(list(range(i, min(i + size, self.n_val))), self.val_features), self.device)

    def save(self, folder: Path) -> None:
        if self.config.method == "lora":
            save_adapter(self.model, folder, self.config.model, self.save_tokenizer())
        else:
            save_model(self.model, folder, self.save_tokenizer())

    def save_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def describe(self) -> dict:
        trainable, total = count_trainable(self.model)
        kind = type(self.model).__name__
        return {
            "model": self.model.config.to_dict(),
            "base_model": str(self.config.model),
            "parameters": total,
            "flops_per_token": self.model.config.flops_per_token(self.max_length) if isinstance(self.model, GPT) else 0,
            "task": self.task,
            "method": self.config.method,
            "summary": f"{kind} {human_count(total)} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%), "
                       f"{self.task} by {self.config.method}; {self.n_train} training / {self.n_val} validation examples",
        }

    @property
    def epoch_units(self) -> int:
        return self.n_train


# -- supervised fine-tuning -----------------------------------------------------------------------


class SFT(Finetune):
    task = "sft"

    def setup(self, train_rows: list, val_rows: list) -> None:
        if not isinstance(self.model, GPT):
            raise LmforgeError("chat and instruction fine-tuning need a decoder model (gpt2, llama, qwen2, mistral)")
        self.chat = "messages" in train_rows[0]
        if self.chat:
            record_end_of_turn(self.model, self.tokenizer)
        self.train_features = self.featurize(train_rows)
        self.val_features = self.featurize(val_rows)
        if not self.train_features:
            raise LmforgeError(f"no training example has a token to learn from within {self.max_length} tokens; "
                               f"{self.longer_hint()}")
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.tokenizer.eos_id or 0)

    def featurize(self, rows: list) -> list[tuple[list[int], list[int]]]:
        tok, out, dropped, cut, merged = self.tokenizer, [], 0, 0, 0
        for row in rows:
            if self.chat:  # (with the row's tool definitions, as TRL renders them: the template writes them)
                try:
                    ids, mask = tok.encode_chat(row["messages"], tools=_tools(row))
                except LmforgeError as e:  # (which conversation: a template may refuse only some, Gemma a system turn)
                    first = str(row["messages"][0].get("content", ""))
                    raise LmforgeError(f"the conversation that starts {first[:40]!r}{'...' if len(first) > 40 else ''}"
                                       f": {e}") from None
            else:
                # As TRL's completion-only loss: prompt + completion tokenized as one text (with the tokenizer's
                # leading special tokens, Llama's <s>), learned from where it parts from the prompt's own tokens. (A
                # completion tokenized alone gets a SentencePiece tokenizer's word-start "▁": a space the text lacks.)
                prompt, ids = tok.encode_prompt(row["prompt"]), tok.encode_prompt(row["prompt"] + row["completion"])
                start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
                merged += start < len(prompt)
                if tok.eos_id is not None and ids[-1:] != [tok.eos_id]:  # (TRL adds it where the completion lacks it)
                    ids = ids + [tok.eos_id]
                mask = [0] * start + [1] * (len(ids) - start)
            long = len(ids) > self.max_length
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            if sum(mask[1:]) == 0:
                dropped += 1
                continue
            cut += long
            out.append((ids, mask))
        if merged:
            warn(f"{merged} of {len(rows)} example(s) end their prompt inside a token of prompt + completion (a space "
                 f"at the prompt's end?): their completion is learned from that token on, as TRL does; end the "
                 f"prompts where a token ends for a model that sees at inference what it learned from")
        if cut:
            warn(f"{cut} of {len(rows)} example(s) are longer than {self.max_length} tokens: cut to their "
                 f"first {self.max_length}, the rest not learned; {self.longer_hint()}")
        if dropped:
            warn(f"{dropped} example(s) had nothing to learn within {self.max_length} tokens and were dropped")
        return out

    @property
    def epoch_units(self) -> int:
        if self.config.packing:
            return math.ceil(sum(len(ids) for ids, _ in self.train_features) / self.max_length)
        return self.n_train

    def collate(self, indices: list[int], features=None) -> dict:
        features = features or self.train_features
        ids = _pad([features[i][0] for i in indices], self.pad_id)
        mask = _pad([features[i][1] for i in indices], 0)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
        return {"ids": ids, "labels": labels, "tokens": sum(len(features[i][0]) for i in indices)}

    def batches(self, rank: int, world_size: int):
        c = self.config
        args = (c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps)
        if c.packing:
            return PackedBatches(self.train_features, self.max_length, *args)
        return ExampleBatches(self.n_train, *args, collate=self.collate)

    def loss(self, model, batch) -> torch.Tensor:
        learned = batch["labels"] != -100  # logits only where a token is learned (not the prompts)
        logits = model(batch["ids"], positions=batch.get("positions"), attn_mask=batch.get("attn_mask"), select=learned)
        return F.cross_entropy(logits.float(), batch["labels"][learned], reduction="sum") / max(int(learned.sum()), 1)

    def loss_weight(self, batch) -> float:
        # Examples differ in length: the step's loss is the mean over every learned token of the step, so
        # 8 micro-batches of 1 example give the loss and gradient of 1 micro-batch of 8.
        return int((batch["labels"] != -100).sum())

    def batch_tokens(self, batch) -> int:
        """The examples' tokens the step read (prompts too: what tokens/s and MFU count), not the padding."""
        return batch["tokens"] if "tokens" in batch else batch["ids"].numel()  # (packed rows have no padding)

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if not self.val_features:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches():
            with autocast:
                logits = self.model(batch["ids"])
            losses = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
            total += losses.item()
            count += int((batch["labels"] != -100).sum())
        self.model.train()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def save_tokenizer(self) -> Tokenizer:
        if self.chat and not self.tokenizer.chat_template:
            # Store the template the model was trained with, so chat and generate (and transformers) use it.
            self.tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
        return self.tokenizer


# -- classification -------------------------------------------------------------------------------


def refuse_pooling(pooling: str) -> None:
    """--pooling is an encoder's choice: a decoder's classifier reads the last token (as transformers' does)."""
    if pooling != "auto":
        raise LmforgeError(f"--pooling {pooling} applies to encoders (bert); a decoder's classifier reads the last "
                           f"token of each text, as transformers' does: leave --pooling out")


class Classification(Finetune):
    task = "classification"
    head = "sequence_classification"

    def __init__(self, config, device, checkpoint, examples):
        names = [x.strip() for x in config.labels.split(",") if x.strip()] if config.labels else None
        twice = [name for i, name in enumerate(names or []) if name in names[:i]]
        if twice:
            raise LmforgeError(f"--labels lists {twice[0]!r} twice; give each label once, in the head's order")
        seen = {label for r in examples.rows for label in self.row_labels(r)}
        if len({str(v) for v in seen}) < 2 and checkpoint is None:
            raise LmforgeError(f"the training examples all have the label {next(iter(seen))!r}: a classifier learns to "
                               f"tell two or more apart; add examples of the other label(s)")
        if names is None:
            if all(isinstance(v, int) for v in seen):
                names = [str(i) for i in range(max(seen) + 1)]  # integer labels are the head's indices
                unused = len(names) - len(seen)
                if unused:
                    warn(f"the labels are integers, the head's output indices: {unused} of its {len(names)} outputs "
                         f"(0 to {max(seen)}) have no example; give the labels as text, or --labels, to name only "
                         f"those there are")
            else:
                names = sorted(str(v) for v in seen)
        saved = checkpoint / "model" / "config.json" if checkpoint is not None else None
        if saved is not None and saved.exists():  # a resumed head keeps its labels: data with others is refused
            id2label = json.loads(saved.read_text(encoding="utf-8")).get("id2label") or {}
            trained = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(len(id2label))]
            if trained and trained != names:
                raise LmforgeError(f"the labels of {config.train} ({', '.join(names)}) are not the ones the run was "
                                   f"trained with ({', '.join(trained)}); resume with examples of those labels, or start "
                                   f"a new run (--out)")
        self.label_names = names
        self.label_index = {name: i for i, name in enumerate(names)}
        super().__init__(config, device, checkpoint, examples)

    @staticmethod
    def row_labels(row: dict) -> list:
        """The labels an example holds: one for a text, one a word for a tagged sentence."""
        return [row["label"]]

    def attach(self, model) -> None:
        pad = None
        if isinstance(model, GPT):
            refuse_pooling(self.config.pooling)
            tok = load_tokenizer_for(model)
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        pooling = self.config.pooling
        if isinstance(model, Encoder) and pooling == "auto":
            # sentence-transformers models are trained for mean pooling; plain BERT has a trained pooler
            pooling = "mean" if (Path(self.config.model) / "modules.json").exists() or model.pooler is None else "pooler"
        attach_head(model, self.head, len(self.label_names), self.label_names, pad, None if pooling == "auto" else pooling)

    def save_tokenizer(self) -> Tokenizer:
        pad = self.model.config.pad_token_id
        if isinstance(self.model, GPT) and self.tokenizer.pad_id is None and pad is not None:
            # A decoder without a pad token pads with its end-of-text token (see attach): the saved tokenizer says so,
            # as transformers' recipe sets tokenizer.pad_token, or tokenizer(texts, padding=True) fails there.
            self.tokenizer.config["pad_token"] = self.tokenizer.hf.id_to_token(pad)
        return self.tokenizer

    def label_of(self, value) -> int:
        key = str(value)
        if key not in self.label_index:
            raise LmforgeError(f"label {value!r} is not one of the labels {', '.join(self.label_names)}; "
                               f"set --labels to list them all")
        return self.label_index[key]

    def featurize(self, rows: list) -> list[tuple[list[int], list[int], int]]:
        tok, out, cut = self.tokenizer, [], 0
        encoder = isinstance(self.model, Encoder)
        for row in rows:
            if encoder:
                enc = tok.hf.encode(row["text"], row.get("text_pair") or None, add_special_tokens=True)
                ids, types = enc.ids, enc.type_ids
                cut += len(ids) > self.max_length
                if len(ids) > self.max_length:  # keep [SEP] at the end
                    ids, types = ids[: self.max_length - 1] + ids[-1:], types[: self.max_length - 1] + types[-1:]
            else:
                text = row["text"] + ("\n" + row["text_pair"] if row.get("text_pair") else "")
                ids = decoder_classifier_ids(tok, text, self.model, whole=True)
                cut += len(ids) > min(self.max_length, self.model.config.block_size)
                ids = ids[-min(self.max_length, self.model.config.block_size):]
                types = [0] * len(ids)
            out.append((ids, types, self.label_of(row["label"])))
        if cut:
            kept = "first" if encoder else "last (where a decoder's score reads)"
            warn(f"{cut} of {len(rows)} text(s) are longer than {self.max_length} tokens: cut to their {kept} "
                 f"{self.max_length}; {self.longer_hint()}")
        return out

    def setup(self, train_rows: list, val_rows: list) -> None:
        self.train_features, self.val_features = self.featurize(train_rows), self.featurize(val_rows)
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)
        self.cached = None
        if self.config.method == "linear-probe" and int(os.environ.get("WORLD_SIZE", 1)) == 1:
            # The backbone is frozen: compute what the head reads once, and train the head on that.
            self.cached = self.features_of(self.train_features)

    def pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return pad if pad is not None else 0

    def tokens_batch(self, features, indices: list[int]) -> dict:
        ids = _pad([features[i][0] for i in indices], self.pad_id())
        types = _pad([features[i][1] for i in indices], 0)
        lengths = torch.tensor([len(features[i][0]) for i in indices])
        mask = (torch.arange(ids.size(1))[None] < lengths[:, None]).long()
        return {"ids": ids, "types": types, "mask": mask, "labels": torch.tensor([features[i][2] for i in indices])}

    def collate(self, indices: list[int]) -> dict:
        """A training micro-batch: cached backbone features (linear probe) or token ids."""
        if self.cached is not None:
            return {"features": self.cached[indices], "labels": torch.tensor([self.train_features[i][2] for i in indices])}
        return self.tokens_batch(self.train_features, indices)

    @torch.no_grad()
    def features_of(self, features) -> torch.Tensor:
        """What the head reads, from the frozen backbone (eval mode), for every example."""
        self.model.eval()
        out = [self.backbone_features(_to(self.tokens_batch(features, list(range(i, min(i + 32, len(features))))), self.device))
               for i in range(0, len(features), 32)]
        self.model.train()
        return torch.cat(out) if out else torch.empty(0)

    def backbone_features(self, b: dict) -> torch.Tensor:
        model = self.model
        if isinstance(model, GPT):
            hidden = model.hidden_states(b["ids"])
            return hidden[torch.arange(hidden.size(0), device=hidden.device), b["mask"].sum(1) - 1]
        from lmforge.model.encoder import EncoderOutput

        hidden = model.encode(b["ids"], b["mask"], b["types"])
        pooled = torch.tanh(model.pooler(hidden[:, 0])) if model.pooler is not None else None
        return model.sentence_features(EncoderOutput(hidden, pooled), b["mask"])

    def logits(self, model, b: dict) -> torch.Tensor:
        if "features" in b:
            return (self.model.score if isinstance(self.model, GPT) else self.model.classifier)(b["features"])
        if isinstance(self.model, GPT):
            return model(b["ids"])
        return model(b["ids"], b["mask"], b["types"]).logits

    def batches(self, rank: int, world_size: int):
        c = self.config
        return ExampleBatches(self.n_train, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps, self.collate)

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def batch_tokens(self, batch) -> int:
        return int(batch["mask"].sum()) if "mask" in batch else len(batch["labels"])

    @torch.no_grad()
    def predict(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) for ``features``, in order."""
        self.model.eval()
        logits, labels = [], []
        for i in range(0, len(features), self.config.micro_batch_size):
            b = _to(self.tokens_batch(features, list(range(i, min(i + self.config.micro_batch_size, len(features))))), self.device)
            logits.append(self.logits(self.model, b).float())
            labels.append(b["labels"])
        self.model.train()
        return torch.cat(logits), torch.cat(labels)

    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if not self.val_features:
            return None
        with autocast:
            logits, labels = self.predict(self.val_features)
        predictions = logits.argmax(-1).tolist()
        # (macro-F1 over the labels that occur, as scikit-learn's: a head output no example has is no class)
        metrics = classification_metrics(predictions, labels.tolist(), sorted(set(predictions) | set(labels.tolist())))
        return {"val_loss": F.cross_entropy(logits, labels).item(), **{f"val_{k}": v for k, v in metrics.items()}}

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.4f}, "
                f"macro-F1 {record['val_macro_f1']:.4f}, MCC {record['val_mcc']:.4f}")


# -- tagging --------------------------------------------------------------------------------------


class Tagging(Classification):
    """Token classification (named entities, parts of speech) with an encoder, from ``{"tokens": [words],
    "tags": [one per word]}`` (the datasets library's ``ner_tags`` too). As transformers' token-classification
    recipe: each word's tag is learned at its first sub-token, the other sub-tokens and the special tokens are
    not scored (-100), and the loss is the mean over the scored tokens of the step. Validation reports accuracy,
    macro-F1 (over the tags that occur) and MCC over the words, not over entity spans."""

    task = "tagging"
    head = "token_classification"

    @staticmethod
    def row_labels(row: dict) -> list:
        return row["tags"]

    def attach(self, model) -> None:
        if not isinstance(model, Encoder):
            raise LmforgeError("tagging (token classification) needs an encoder model (bert)")
        attach_head(model, self.head, len(self.label_names), self.label_names)

    def featurize(self, rows: list) -> list[tuple[list[int], list[int], list[int]]]:
        out, cut = [], 0
        for row in rows:
            enc = self.tokenizer.hf.encode(row["tokens"], is_pretokenized=True, add_special_tokens=True)
            labels, previous = [], None
            for word in enc.word_ids:
                labels.append(-100 if word is None or word == previous else self.label_of(row["tags"][word]))
                previous = word
            ids, types = enc.ids, enc.type_ids
            if len(ids) > self.max_length:  # keep [SEP] at the end; the words after the cut are not learned
                ids, types = ids[: self.max_length - 1] + ids[-1:], types[: self.max_length - 1] + types[-1:]
                labels, cut = labels[: self.max_length - 1] + [-100], cut + 1
            out.append((ids, types, labels))
        if cut:
            warn(f"{cut} of {len(rows)} sentence(s) are longer than {self.max_length} tokens: their later words are "
                 f"not learned or scored (--max-length)")
        return out

    def setup(self, train_rows: list, val_rows: list) -> None:
        self.train_features, self.val_features = self.featurize(train_rows), self.featurize(val_rows)
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)
        self.cached = None  # (a linear probe trains the head on the frozen backbone's tokens, as they come)

    def tokens_batch(self, features, indices: list[int]) -> dict:
        batch = super().tokens_batch([(f[0], f[1], 0) for f in (features[i] for i in indices)],
                                     list(range(len(indices))))
        batch["labels"] = _pad([features[i][2] for i in indices], -100)
        return batch

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float().flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=-100)

    def loss_weight(self, batch) -> float:
        return int((batch["labels"] != -100).sum())

    @torch.no_grad()
    def predict(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, tags) of every scored word of ``features``, in order."""
        self.model.eval()
        logits, labels = [], []
        for i in range(0, len(features), self.config.micro_batch_size):
            b = _to(self.tokens_batch(features, list(range(i, min(i + self.config.micro_batch_size, len(features))))),
                    self.device)
            scored = b["labels"] != -100
            logits.append(self.logits(self.model, b).float()[scored])
            labels.append(b["labels"][scored])
        self.model.train()
        return torch.cat(logits), torch.cat(labels)


# -- a retriever's encoder ------------------------------------------------------------------------


class Contrastive(Finetune):
    """Sentence embeddings for retrieval, from ``{"query", "positive"}`` pairs: each query's embedding is pulled
    towards its positive's and pushed from the micro-batch's other positives (in-batch negatives; the loss of
    sentence-transformers' MultipleNegativesRankingLoss: cross-entropy over ``scale`` × cosine similarities).
    Embeddings are pooled as the folder's modules.json says (``encoder.sentence_recipe``: mean where it says
    nothing) and normalised, as `lmforge embed` and `lmforge index` make them, so a folder saved from here indexes
    better. The negatives are a micro-batch's rows: its size matters, not only the step's."""

    task = "retrieval"
    scale = 20.0  # sentence-transformers' default: cosine similarities in [-1, 1] become logits in [-20, 20]
    pooling: tuple[str, ...] = ("mean",)  # the folder's (setup reads it)

    def setup(self, train_rows: list, val_rows: list) -> None:
        if not isinstance(self.model, Encoder):
            raise LmforgeError(f"{self.config.model} is not an encoder; {{\"query\", \"positive\"}} pairs train a sentence "
                               f"encoder for retrieval (a bert folder such as all-MiniLM-L6-v2)")
        if self.config.method == "linear-probe":
            raise LmforgeError("--method linear-probe trains a task head; retrieval has none: use full or lora")
        from lmforge.model.encoder import declared_max_length, sentence_recipe

        # (a folder that pools its [CLS] token, BGE's, is trained on the vectors it will be read by)
        self.pooling = sentence_recipe(getattr(self.model, "source", None) or Path(self.config.model)).pooling
        declared = declared_max_length(Path(self.config.model))
        self.max_length = min(self.max_length, declared) if declared else self.max_length
        self.train_features, self.val_features = self.featurize(train_rows), self.featurize(val_rows)
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)

    def featurize(self, rows: list) -> list[tuple[list[int], list[int]]]:
        def ids(text: str) -> list[int]:
            out = self.tokenizer.encode(text, add_special_tokens=True)
            return out if len(out) <= self.max_length else out[: self.max_length - 1] + out[-1:]  # keep [SEP]

        return [(ids(r["query"]), ids(r["positive"])) for r in rows]

    def side(self, features, indices: list[int], which: int) -> dict:
        rows = [features[i][which] for i in indices]
        ids = _pad(rows, self.model.config.pad_token_id or 0)
        lengths = torch.tensor([len(r) for r in rows])
        return {"ids": ids, "mask": (torch.arange(ids.size(1))[None] < lengths[:, None]).long()}

    def collate(self, indices: list[int], features=None) -> dict:
        features = self.train_features if features is None else features
        q, d = self.side(features, indices, 0), self.side(features, indices, 1)
        return {"query_ids": q["ids"], "query_mask": q["mask"], "doc_ids": d["ids"], "doc_mask": d["mask"]}

    def batches(self, rank: int, world_size: int):
        c = self.config
        return ExampleBatches(self.n_train, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps, self.collate)

    def embed(self, model, ids, mask) -> torch.Tensor:
        from lmforge.model.encoder import pool

        return F.normalize(pool(model.encode(ids, mask), mask, self.pooling).float(), dim=-1)

    def loss(self, model, batch):
        queries = self.embed(model, batch["query_ids"], batch["query_mask"])
        docs = self.embed(model, batch["doc_ids"], batch["doc_mask"])
        scores = self.scale * queries @ docs.T  # (B, B): row i's positive is column i
        target = torch.arange(len(scores), device=scores.device)
        accuracy = (scores.argmax(-1) == target).float().mean()
        return F.cross_entropy(scores, target), {"in_batch_accuracy": accuracy}

    def loss_weight(self, batch) -> float:
        return float(batch["query_ids"].size(0))

    def batch_tokens(self, batch) -> int:
        return int(batch["query_mask"].sum() + batch["doc_mask"].sum())

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        """Each validation query searched among all the validation positives: recall@1, MRR, and the loss."""
        if not self.val_features:
            return None
        self.model.eval()
        queries, docs = [], []
        with autocast:
            for b in self.val_batches():
                queries.append(self.embed(self.model, b["query_ids"], b["query_mask"]))
                docs.append(self.embed(self.model, b["doc_ids"], b["doc_mask"]))
        self.model.train()
        scores = torch.cat(queries) @ torch.cat(docs).T
        target = torch.arange(len(scores), device=scores.device)
        right = scores.gather(1, target[:, None])
        ranks = (scores > right).sum(1) + 1
        return {"val_loss": F.cross_entropy(self.scale * scores, target).item(),
                "val_recall_at_1": (ranks == 1).float().mean().item(), "val_mrr": (1.0 / ranks).mean().item()}

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, recall@1 {record['val_recall_at_1']:.4f} "
                f"(among {self.n_val}), MRR {record['val_mrr']:.4f}")

    def save(self, folder: Path) -> None:
        super().save(folder)
        if self.config.method != "lora":  # a sentence-transformers base: the fine-tuned folder loads there too
            base = Path(self.config.model)
            for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
                if (base / name).is_file():
                    shutil.copy(base / name, folder / name)
            if (base / "1_Pooling").is_dir():
                shutil.copytree(base / "1_Pooling", folder / "1_Pooling", dirs_exist_ok=True)


# -- extractive question answering ----------------------------------------------------------------


class QA(Finetune):
    task = "qa"
    head = "question_answering"
    max_answer_tokens = 30

    def attach(self, model) -> None:
        if not isinstance(model, Encoder):
            raise LmforgeError("extractive question answering needs an encoder model (bert)")
        attach_head(model, self.head)

    def featurize(self, rows: list, training: bool) -> list[dict]:
        """One window per example: the question, then as much of the context as fits."""
        hf = self.tokenizer.hf
        hf.enable_truncation(self.max_length, strategy="only_second")
        out, outside, empty, long_questions = [], 0, 0, 0
        try:
            for row in rows:
                if training and not (row["answers"]["text"] or [""])[0].strip():
                    empty += 1  # (an unanswerable question, SQuAD 2's: no span to learn)
                    continue
                try:
                    enc = hf.encode(row["question"], row["context"], add_special_tokens=True)
                except Exception as e:  # (the tokenizers library's "Truncation error": no room left for the context)
                    if "runcation" not in str(e):
                        raise
                    long_questions += 1
                    continue
                context_tokens = [i for i, s in enumerate(enc.sequence_ids) if s == 1]
                start_char = row["answers"]["answer_start"][0]
                end_char = start_char + len(row["answers"]["text"][0])
                start = next((i for i in context_tokens if enc.offsets[i][0] <= start_char < enc.offsets[i][1]), None)
                end = next((i for i in context_tokens if enc.offsets[i][0] < end_char <= enc.offsets[i][1]), None)
                if training and (start is None or end is None):
                    outside += 1
                    continue
                out.append({"ids": enc.ids, "types": enc.type_ids, "start": start or 0, "end": end or 0,
                            "context_tokens": context_tokens, "offsets": enc.offsets, "context": row["context"],
                            "answers": row["answers"]["text"]})
        finally:
            hf.no_truncation()
        if long_questions:
            warn(f"{long_questions} {'training' if training else 'validation'} example(s) have a question that leaves "
                 f"no room for the context within {self.max_length} tokens and were left out; {self.longer_hint()}")
        if outside:
            warn(f"{outside} training example(s) had the answer beyond {self.max_length} tokens and were dropped")
        if empty:
            warn(f"{empty} training example(s) have an empty answer and were dropped (extractive QA here learns "
                 f"answer spans; unanswerable questions are not supported)")
        return out

    def setup(self, train_rows: list, val_rows: list) -> None:
        self.train_features, self.val_features = self.featurize(train_rows, True), self.featurize(val_rows, False)
        if not self.train_features:
            raise LmforgeError("no training example has its answer within max_length tokens")
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)

    def collate(self, indices: list[int], features=None) -> dict:
        features = features if features is not None else self.train_features
        ids = _pad([features[i]["ids"] for i in indices], self.model.config.pad_token_id)
        types = _pad([features[i]["types"] for i in indices], 0)
        lengths = torch.tensor([len(features[i]["ids"]) for i in indices])
        mask = (torch.arange(ids.size(1))[None] < lengths[:, None]).long()
        return {"ids": ids, "types": types, "mask": mask, "start": torch.tensor([features[i]["start"] for i in indices]),
                "end": torch.tensor([features[i]["end"] for i in indices])}

    def batches(self, rank: int, world_size: int):
        c = self.config
        return ExampleBatches(self.n_train, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps, self.collate)

    def loss(self, model, batch) -> torch.Tensor:
        return model(batch["ids"], batch["mask"], batch["types"], start_positions=batch["start"], end_positions=batch["end"]).loss

    def batch_tokens(self, batch) -> int:
        return int(batch["mask"].sum())

    def best_span(self, feature: dict, start_logits: torch.Tensor, end_logits: torch.Tensor) -> str:
        """The highest-scoring context span with start <= end and at most max_answer_tokens tokens."""
        ctx = feature["context_tokens"]
        if not ctx:
            return ""
        s = start_logits[ctx[0] : ctx[-1] + 1]
        e = end_logits[ctx[0] : ctx[-1] + 1]
        scores = s[:, None] + e[None, :]
        n = len(ctx)
        ones = torch.ones(n, n, dtype=torch.bool, device=scores.device)
        allowed = ones.triu() & ~ones.triu(self.max_answer_tokens)
        scores = scores.masked_fill(~allowed, float("-inf"))
        i, j = divmod(int(scores.argmax()), n)
        a, b = feature["offsets"][ctx[0] + i][0], feature["offsets"][ctx[0] + j][1]
        return feature["context"][a:b]

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if not self.val_features:
            return None
        self.model.eval()
        predictions, _loss_sum = [], 0.0
        for i in range(0, self.n_val, self.config.micro_batch_size):
            idx = list(range(i, min(i + self.config.micro_batch_size, self.n_val)))
            b = _to(self.collate(idx, self.val_features), self.device)
            with autocast:
                out = self.model(b["ids"], b["mask"], b["types"])
            for row, k in enumerate(idx):
                predictions.append(self.best_span(self.val_features[k], out.start_logits[row], out.end_logits[row]))
        self.model.train()
        metrics = squad_metrics(predictions, [f["answers"] for f in self.val_features])
        return {"val_exact_match": metrics["exact_match"], "val_f1": metrics["f1"]}

    def format_eval(self, record: dict) -> str:
        return f"exact match {record['val_exact_match']:.2f}, F1 {record['val_f1']:.2f}"


# -- sequence to sequence (encoder-decoder) -------------------------------------------------------


class Seq2Seq(Finetune):
    """Translation, summarisation: the encoder reads the source (ending with the end-of-text token, as T5's
    inputs do), the decoder learns the target and its end-of-text token; the loss is the mean over target
    tokens."""

    task = "seq2seq"

    def load(self, checkpoint: Path | None):
        if self.config.method == "linear-probe" or self.config.freeze_layers or self.config.train_layers:
            raise LmforgeError("an encoder-decoder is fine-tuned with --method full or --method lora (linear probes "
                               "and frozen layers are for decoders and encoders so far)")
        return super().load(checkpoint)

    def setup(self, train_rows: list, val_rows: list) -> None:
        from lmforge.model.encoder_decoder import EncoderDecoder

        if not isinstance(self.model, EncoderDecoder):
            raise LmforgeError("source/target fine-tuning needs an encoder-decoder (t5); for a decoder write the "
                               "examples as {\"prompt\", \"completion\"}")
        self.train_features = self.featurize(train_rows)
        self.val_features = self.featurize(val_rows)
        self.n_train, self.n_val = len(self.train_features), len(self.val_features)

    def featurize(self, rows: list) -> list[tuple[list[int], list[int]]]:
        tok = self.tokenizer
        end = [tok.eos_id] if tok.eos_id is not None else []
        source_key, target_key = ("source", "target") if rows and "source" in rows[0] else ("prompt", "completion")
        out, long_sources, long_targets = [], 0, 0
        for r in rows:
            source, target = tok.encode(r[source_key]), tok.encode(r[target_key])
            long_sources += len(source) + len(end) > self.max_length
            long_targets += len(target) + len(end) > self.max_length
            # a source keeps its end (as generation's --truncate keeps it), a target its beginning; both their end
            # token, as a tokenizer's truncation does (a target cut without it would teach the model never to stop)
            keep = self.max_length - len(end)
            out.append((source[-keep:] + end if keep > 0 else end[-self.max_length:], target[:keep] + end))
        for count, what in ((long_sources, "source(s) left-truncated to their last"), (long_targets,
                                                                                       "target(s) cut to their first")):
            if count:
                warn(f"{count} of {len(rows)} example(s): {what} {self.max_length} tokens with the end token "
                     f"(the model reads and writes at most that many; --max-length)")
        return out

    def collate(self, indices: list[int], features=None) -> dict:
        features = features or self.train_features
        pad = self.model.config.pad_token_id
        sources = [features[i][0] for i in indices]
        return {"ids": _pad(sources, pad), "mask": _pad([[1] * len(s) for s in sources], 0),
                "labels": _pad([features[i][1] for i in indices], -100)}

    def batches(self, rank: int, world_size: int):
        c = self.config
        return ExampleBatches(self.n_train, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps,
                              collate=self.collate)

    def loss(self, model, batch) -> torch.Tensor:
        return model(batch["ids"], batch["mask"], labels=batch["labels"])[1]

    def loss_weight(self, batch) -> float:
        return int((batch["labels"] != -100).sum())

    def batch_tokens(self, batch) -> int:
        return int(batch["mask"].sum()) + int((batch["labels"] != -100).sum())

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if not self.val_features:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches():
            with autocast:
                logits = self.model(batch["ids"], batch["mask"], labels=batch["labels"])[0]
            total += F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((batch["labels"] != -100).sum())
        self.model.train()
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


OBJECTIVES = {"chat": SFT, "instruction": SFT, "classification": Classification, "tagging": Tagging, "qa": QA,
              "seq2seq": Seq2Seq,
              "retrieval": Contrastive}
# What the checkpoint's model (or adapter) and optimizer state were built for: --resume refuses to change them.
FIXED_ON_RESUME = ("model", "task", "method", "labels", "pooling", "freeze_layers", "train_layers",
                   "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                   "val_fraction")  # (with the seed, the held-out split: another would hold out trained examples)


def finetune(config: FinetuneConfig | dict | str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, progress: bool = True, **overrides) -> dict:
    """Fine-tune ``model`` on the ``train`` examples; the task comes from the examples' fields.

    Returns the loop's summary (run folder, steps, last evaluation, latest checkpoint).
    """
    config = resolve_config(config, resume, overrides, cls=FinetuneConfig)
    examples = read_examples(config.train, config.task, config.skip_bad_lines)
    if examples.skipped:
        warn(f"skipped {examples.skipped} malformed example(s) of {config.train} (lines {examples.skipped_lines[:5]}"
             f"{' ...' if examples.skipped > 5 else ''})")
    objective = OBJECTIVES[examples.task]
    if examples.task == "instruction" and _model_type(config.model) in ENCODER_DECODER_TYPES:
        objective = Seq2Seq  # prompt → completion is source → target for an encoder-decoder
    if config.labels and not issubclass(objective, Classification):
        raise LmforgeError(f"--labels names a classifier's labels, but {config.train} holds {examples.task} examples")
    if config.packing and objective is not SFT:
        raise LmforgeError("packing applies to chat and instruction fine-tuning only")
    run_info = Path(config.out) / "run.json"
    if resume and run_info.is_file() and checkpoint_dirs(config.out):  # a resumed run's head and loss stay its own
        from lmforge.utils import read_json

        trained = read_json(run_info, "run description").get("task")
        if trained and trained != objective.task:
            raise LmforgeError(f"{config.train} holds {objective.task} examples, but {config.out} was trained for "
                               f"{trained}; resume with examples of that task, or start a new run (--out)")
    return train(config, lambda c, device, ckpt: objective(c, device, ckpt, examples), resume=resume,
                 overwrite=overwrite, progress=progress, fixed_on_resume=FIXED_ON_RESUME)


def _model_type(folder: str) -> str | None:
    """The model_type of a model folder's config.json (None when there is none to read)."""
    from lmforge.model.checkpoint import resolve_model_dir
    from lmforge.utils import read_json

    try:
        return read_json(resolve_model_dir(folder) / "config.json", "model config").get("model_type")
    except LmforgeError:
        return None
