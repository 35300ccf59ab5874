"""Pretraining objectives besides causal LM, each an objective of the one loop (`lmforge pretrain --objective`).

``mlm`` (BERT / RoBERTa): the encoder reads windows of the prepared shards framed as
``[CLS] tokens [SEP]`` (RoBERTa's "full sentences": a window runs across document ends, which the
end-of-text token marks) and predicts the tokens ``lmforge.data.masking.mask_tokens`` chose, with the
loss on those positions only. The masking is drawn afresh at every step (dynamic masking, RoBERTa) by
a generator seeded from ``(seed, step)``, over the whole step's rows before they are shared out: a
step's masks are the same whatever the micro-batch layout and number of processes, and resuming
needs no saved generator state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.data.loader import TrainBatches, eval_windows
from lmforge.data.masking import WordStarts, mask_tokens
from lmforge.errors import LmforgeError
from lmforge.model.config import PRESETS, Config
from lmforge.model.encoder import Encoder, EncoderConfig, MaskedLMHead, build_encoder
from lmforge.train.config import TrainConfig
from lmforge.train.loop import CausalLM, Distributed
from lmforge.utils import human_count


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of one step's random draws (``stream`` tells apart what draws: training, validation)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]))


class MaskedLM(CausalLM):
    """``--objective mlm``: masked-token prediction with a BERT-style encoder."""

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        super().__init__(config, device, checkpoint)
        tok = self.tokenizer
        self.content = self.block_size - 2  # tokens of text in a window, between [CLS] and [SEP]
        if self.content < 2:
            raise LmforgeError(f"block_size {self.block_size} leaves no room for text between [CLS] and [SEP]; raise it")
        self.windows = eval_windows(self.val_split, self.content - 1, config.eval_windows) if self.val_split else []
        vocab = tok.hf.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
        self.no_mask = torch.tensor([tok.hf.id_to_token(i) in special for i in range(vocab)])
        if tok.pad_id is not None:
            self.no_mask[tok.pad_id] = True
        self.vocab = vocab  # random replacements draw from the whole vocabulary, as transformers' collator does
        self.word_starts = WordStarts(tok) if config.whole_word_mask else None

    def load(self, checkpoint: Path | None):
        tok = self.tokenizer
        missing = [name for name, i in (("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id), ("[MASK]", tok.mask_id)) if i is None]
        if missing:
            raise LmforgeError(f"the tokenizer of {self.config.data} has no {', '.join(missing)} token(s), which masked-LM "
                               f"pretraining needs; train one with `lmforge tokenizer train --encoder` and prepare the "
                               f"data with it (or use a BERT tokenizer)")
        from lmforge.model.checkpoint import load_model

        c = self.config
        if checkpoint is not None:
            return load_model(checkpoint / "model", self.device).train()
        if c.model in PRESETS:
            return build_encoder(encoder_config(c, tok), self.device)
        if not Path(c.model).exists():
            raise LmforgeError(f"model {c.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
        given = [k for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head") if getattr(c, k) is not None]
        if given:
            raise LmforgeError(f"{', '.join(given)} cannot change when continuing from the model folder {c.model}")
        model = load_model(c.model, self.device)
        if not isinstance(model, Encoder):
            raise LmforgeError(f"{c.model} is a decoder; --objective mlm trains an encoder (bert): start from a preset "
                               f"or an encoder folder")
        return with_mlm_head(model).train()

    def batches(self, rank: int, world_size: int) -> MaskedBatches:
        c = self.config
        rows = TrainBatches(self.train_split, self.content - 1, c.micro_batch_size, c.seed, rank, world_size,
                            c.grad_accum_steps)
        return MaskedBatches(self, rows)

    def frame(self, rows: torch.Tensor) -> torch.Tensor:
        """Windows of text (B, content) → ``[CLS] text [SEP]`` (B, block_size)."""
        B = rows.size(0)
        cls = torch.full((B, 1), self.tokenizer.cls_id, dtype=torch.long)
        sep = torch.full((B, 1), self.tokenizer.sep_id, dtype=torch.long)
        return torch.cat([cls, rows.cpu(), sep], 1)

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return mask_tokens(ids, self.no_mask[ids], self.tokenizer.mask_id, self.vocab, generator, c.mlm_probability,
                           c.mask_replace_prob, c.random_replace_prob,
                           self.word_starts(ids) if self.word_starts is not None else None)

    def loss(self, model, batch):
        chosen = batch["labels"] != -100
        out = model(batch["ids"], select=chosen)
        labels = batch["labels"][chosen]
        if labels.numel() == 0:  # nothing chosen in this micro-batch: it weighs 0 in the step
            zero = out.logits.sum() * 0.0
            return zero, {"accuracy": zero.detach()}
        logits = out.logits.float()
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels), {"accuracy": accuracy.detach()}

    def loss_weight(self, batch) -> float:
        return float((batch["labels"] != -100).sum())

    def batch_tokens(self, batch) -> int:
        return batch["ids"].numel()

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        """Loss and accuracy on the fixed validation windows, each masked by its own generator (the same
        masks at every evaluation and on any number of processes)."""
        if self.val_split is None:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, predicted tokens
        for index in range(dist_.rank, len(self.windows), dist_.world_size):
            shard, offset = self.windows[index]
            rows = torch.from_numpy(self.val_split.shards[shard][offset : offset + self.content].astype(np.int64))
            ids, labels = self.corrupt(self.frame(rows[None]), step_generator(self.config.seed, index, 1))
            chosen = labels != -100
            if not chosen.any():
                continue
            with autocast:
                logits = model(ids.to(self.device), select=chosen.to(self.device)).logits.float().cpu()
            target = labels[chosen]
            totals += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                                    (logits.argmax(-1) == target).sum().item(), target.numel()], dtype=torch.float64)
        totals = dist_.all_sum(totals.to(self.device)).cpu()
        model.train(was_training)
        loss = (totals[0] / totals[2]).item()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_accuracy": (totals[1] / totals[2]).item()}

    def format_train(self, loss: float) -> str:
        return f"train loss {loss:.4f}"

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, ppl {record['val_perplexity']:.2f}, "
                f"masked-token accuracy {100 * record['val_accuracy']:.1f}%")

    def describe(self) -> dict:
        c, params = self.model.config, self.model.num_params()
        matrices = c.n_layer * (4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.mlp_hidden)
        # forward: 2 FLOPs per matrix weight + attention; the vocabulary projection on the predicted ~15% only
        forward = 2 * matrices + 4 * c.n_layer * self.block_size * c.n_embd \
            + 2 * self.config.mlm_probability * c.vocab_size * c.n_embd
        return {
            "model": c.to_dict(), "parameters": params, "flops_per_token": int(3 * forward),
            "data": {"train_tokens": self.train_split.tokens, "val_tokens": self.val_split.tokens if self.val_split else 0},
            "summary": f"encoder of {human_count(params)} parameters, masked LM ({100 * self.config.mlm_probability:g}% "
                       f"of tokens predicted); train split {human_count(self.train_split.tokens)} tokens",
        }

    def sample(self, step: int, out: Path, bar) -> None:
        pass  # an encoder writes no continuation; the validation accuracy says how it is doing


class MaskedBatches:
    """Micro-batches ``{"ids", "labels"}`` of masked windows; the position is the window loader's."""

    def __init__(self, objective: MaskedLM, rows: TrainBatches):
        self.objective, self.rows = objective, rows

    def next_batch(self, device) -> dict:
        o, rows = self.objective, self.rows
        step, first = rows.position
        mine = o.frame(rows.next_rows())
        # The step's draws are made over all its rows (every micro-batch, every process) and this micro-batch
        # takes its slice, so the masks do not depend on how the step is split. Other rows only take up draws.
        total = rows.batch_size * rows.accum_steps * rows.world_size
        everything = torch.full((total, mine.size(1)), o.tokenizer.cls_id, dtype=torch.long)
        everything[first : first + len(mine)] = mine
        ids, labels = o.corrupt(everything, step_generator(rows.seed, step, 0))
        ids, labels = ids[first : first + len(mine)], labels[first : first + len(mine)]
        return {"ids": ids.to(device), "labels": labels.to(device)}

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


def encoder_config(c: TrainConfig, tokenizer) -> EncoderConfig:
    """A masked-LM encoder of a decoder preset's shape (width, depth, heads, MLP, context), overrides applied."""
    shape: Config = Config.from_preset(c.model, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                                       n_embd=c.n_embd)
    if shape.family != "gpt2" or c.n_kv_head is not None:
        raise LmforgeError(f"preset {c.model} is a Llama-layout decoder; an encoder is built from the tiny, mini or "
                           f"gpt2 shapes (without n_kv_head)")
    return EncoderConfig(vocab_size=tokenizer.hf.get_vocab_size(with_added_tokens=True), block_size=shape.block_size,
                         n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, mlp_hidden=shape.hidden,
                         dropout=c.dropout, pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                         pooler=False, head="masked_lm")


def with_mlm_head(model: Encoder) -> Encoder:
    """The encoder with a masked-LM head: its own if it has one, else a new one (N(0, 0.02), zero bias)."""
    if model.config.head == "masked_lm":
        return model
    weight = model.wte.weight
    model.config = model.config.with_head("masked_lm")
    model.classifier, model.qa_outputs = None, None
    model.pooler = None
    model.mlm = MaskedLMHead(model.config).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for module in model.mlm.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=model.config.init_std)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(model.mlm.bias)
    return model
