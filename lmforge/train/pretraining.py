"""Pretraining objectives besides causal LM, each an objective of the one loop (`lmforge pretrain --objective`).

``mlm`` (BERT / RoBERTa): the encoder reads windows of the prepared shards framed as
``[CLS] tokens [SEP]`` (RoBERTa's "full sentences": a window runs across document ends, which the
end-of-text token marks) and predicts the tokens ``lmforge.data.masking.mask_tokens`` chose, with the
loss on those positions only. The masking is drawn afresh at every step (dynamic masking, RoBERTa) by
a generator seeded from ``(seed, step)``, over the whole step's rows before they are shared out: a
step's masks are the same whatever the micro-batch layout and number of processes, and resuming
needs no saved generator state.

``mlm+nsp`` (BERT) adds next-sentence prediction: each row is ``[CLS] A [SEP] B [SEP]`` (token types 0
then 1), A the text at a random place cut at a random length, B either the text that follows it (label
0, "is next") or, half the time, text from another document (label 1). The segments are cut at token
positions, not sentences. The loss is the masked-LM loss (mean over the step's predicted tokens) plus the
next-sentence loss (mean over its rows) on the pooled [CLS], as in ``transformers.BertForPreTraining``.

``plm`` (XLNet) is documented on ``PermutationLM``. ``span`` (T5) trains the encoder-decoder to restore
corrupted spans: ``noise_density`` of each row's tokens, in spans of ``mean_span_length`` on average,
are each replaced by a sentinel in the encoder's input and spelled out after their sentinel in the
decoder's target; rows are cut so that every input is exactly ``block_size`` tokens (the reference's
length arithmetic, ``lmforge.data.masking.span_raw_length``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.data.loader import StepPosition, TrainBatches, eval_windows
from lmforge.data.masking import (
    SentenceStarts,
    WordStarts,
    corrupt_spans,
    factorization_order,
    mask_tokens,
    plm_targets,
    span_input_lengths,
    span_lengths,
    span_noise_mask,
    span_raw_length,
)
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import model_kind
from lmforge.model.config import PRESETS, Config
from lmforge.model.encoder import Encoder, EncoderConfig, MaskedLMHead, build_encoder
from lmforge.train.config import TrainConfig, means_preset
from lmforge.train.loop import CausalLM, Distributed, may_defer, refuse_other_shape
from lmforge.utils import human_count


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of one step's random draws (``stream`` tells apart what draws: training, validation)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]))


@torch.no_grad()
def held_out_tokens(objective, dist_: Distributed, autocast, length: int, make_batch) -> dict | None:
    """Loss, perplexity and accuracy of ``objective.predict`` over the fixed validation windows of ``length``
    tokens; ``make_batch(rows, index)`` corrupts window ``index`` the same way at every evaluation. The
    windows are shared out over the processes and the sums all-reduced."""
    if objective.val_split is None:
        return None
    model, split = objective.model, objective.val_split
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, right, predicted tokens
    for index in dist_.share(len(objective.windows)):
        shard, offset = objective.windows[index or 0]
        rows = torch.from_numpy(split.shards[shard][offset : offset + length].astype(np.int64))[None]
        batch = make_batch(rows, index or 0)
        counts = index is not None and bool((batch["labels"] != -100).any())
        if not counts and not dist_.sharded:
            continue
        with autocast:  # (under FSDP every rank makes as many forward passes; the padding's are dropped)
            logits, target = objective.predict(model, {k: v.to(objective.device) for k, v in batch.items()})
        if not counts:
            continue
        logits, target = logits.float().cpu(), target.cpu()
        totals += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                                (logits.argmax(-1) == target).sum().item(), target.numel()], dtype=torch.float64)
    totals = dist_.all_sum(totals.to(objective.device)).cpu()
    model.train(was_training)
    loss = (totals[0] / totals[2]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_accuracy": (totals[1] / totals[2]).item()}


class MaskedLM(CausalLM):
    """``--objective mlm``: masked-token prediction with a BERT-style encoder."""

    head = "masked_lm"
    framing = 2  # special tokens around a row's text: [CLS] text [SEP]

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        super().__init__(config, device, checkpoint)
        tok = self.tokenizer
        self.content = self.block_size - self.framing  # tokens of text in a row
        if self.content < 2:
            raise LmforgeError(f"block_size {self.block_size} leaves no room for text between the special tokens; raise it")
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

        def refuse(model) -> str:
            return (f"{self.config.model} is {model_kind(model)}; --objective {self.config.objective} trains an encoder (bert): "
                    f"start from a preset or an encoder folder")

        model = load_or_build(self.config, self.device, checkpoint, Encoder, refuse,
                              lambda: build_encoder(encoder_config(self.config, tok, self.head), self.device))
        return model if checkpoint is not None else with_pretraining_head(model, self.head).train()

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

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A batch of rows (B, T) as the model is to see it: ``ids``, ``labels`` (-100 where nothing is predicted)
        and whatever else the objective's ``predict`` needs, each with the rows first."""
        c = self.config
        ids, labels = mask_tokens(ids, self.no_mask[ids], self.tokenizer.mask_id, self.vocab, generator,
                                  c.mlm_probability, c.mask_replace_prob, c.random_replace_prob,
                                  self.word_starts(ids) if self.word_starts is not None else None)
        return {"ids": ids, "labels": labels}

    def predict(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, vocab), targets (N,)) at the predicted positions, in row-major order."""
        chosen = batch["labels"] != -100
        return model(batch["ids"], select=chosen).logits, batch["labels"][chosen]

    def loss(self, model, batch):
        logits, labels = self.predict(model, batch)
        if labels.numel() == 0:  # nothing chosen in this micro-batch: it weighs 0 in the step
            zero = logits.sum() * 0.0
            return zero, {"accuracy": zero.detach()}
        logits = logits.float()
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels), {"accuracy": accuracy.detach()}

    def loss_weight(self, batch) -> float:
        return float((batch["labels"] != -100).sum())

    def batch_tokens(self, batch) -> int:
        return batch["ids"].numel()

    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        """Loss and accuracy on the fixed validation windows, each masked by its own generator (the same
        masks at every evaluation and on any number of processes)."""
        return held_out_tokens(self, dist_, autocast, self.content, lambda rows, index: self.corrupt(
            self.frame(rows), step_generator(self.config.seed, index, 1)))

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
        batch = o.corrupt(everything, step_generator(rows.seed, step, 0))
        return {k: v[first : first + len(mine)].to(device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


class PermutationLM(MaskedLM):
    """``--objective plm``: permutation language modelling (XLNet) with the encoder's two-stream attention.

    The predicted tokens are ``DataCollatorForPermutationLanguageModeling``'s spans (``plm_probability`` 1/6 of
    the tokens, spans of at most ``max_span_length``) and the factorisation order its permutation (same draws,
    same order). Where it differs: the collator replaces the predicted tokens by [MASK] in the input, while
    here, as in XLNet, the content stream reads their real tokens and only the query stream, which predicts,
    is kept from each token's own content and from later ones in the order; and every token that is not
    predicted (special tokens included, which the collator orders with the rest) is context that sees no
    predicted token. The query stream starts from the [MASK] embedding, so the model saved is a plain
    BertForMaskedLM folder with no extra weights.
    """

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        if (config.block_size or 0) % 2:
            raise LmforgeError(f"--objective plm needs an even block_size (the factorisation order pairs positions "
                               f"i and i + block_size/2), not {config.block_size}")
        super().__init__(config, device, checkpoint)
        if self.block_size % 2:
            raise LmforgeError(f"--objective plm needs an even block_size, not {self.block_size}; pass --block-size")

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        c = self.config
        targets = plm_targets(tuple(ids.shape), self.no_mask[ids], c.plm_probability, c.max_span_length, generator)
        order = factorization_order(targets, generator)
        return {"ids": ids, "labels": ids.masked_fill(~targets, -100), "order": order}

    def predict(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["order"] >= 0
        return model(batch["ids"], plm_order=batch["order"], plm_query=self.tokenizer.mask_id).logits, batch["ids"][targets]

    def describe(self) -> dict:
        info = super().describe()
        info["summary"] = info["summary"].replace(f"masked LM ({100 * self.config.mlm_probability:g}%",
                                                  f"permutation LM (two streams; {100 * self.config.plm_probability:.0f}%")
        return info


class NextSentence(MaskedLM):
    """``--objective mlm+nsp``: masked LM and next-sentence prediction on segment pairs (BERT)."""

    head = "pretraining"
    framing = 3  # [CLS] A [SEP] B [SEP]

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        super().__init__(config, device, checkpoint)
        sentences = SentenceStarts(self.tokenizer)
        self.pairs = SegmentPairs(self.train_split, self.content, self.tokenizer.eos_id, sentences)
        self.val_pairs = SegmentPairs(self.val_split, self.content, self.tokenizer.eos_id, sentences) \
            if self.val_split else None

    def batches(self, rank: int, world_size: int) -> PairBatches:
        c = self.config
        return PairBatches(self, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps)

    def rows(self, pairs: SegmentPairs, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """``n`` rows: ids, token types and attention mask (n, block_size), next-sentence labels (n,). A pair
        cut short by its document's end is padded (mask 0), as BERT pads its instances."""
        tok = self.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.sep_id
        ids, types, mask, labels = [], [], [], []
        for _ in range(n):
            a, b, label = pairs.draw(rng)
            row = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
            padding = self.block_size - len(row)
            ids.append(row + [pad] * padding)
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * padding)
            mask.append([1] * len(row) + [0] * padding)
            labels.append(label)
        return torch.tensor(ids), torch.tensor(types), torch.tensor(mask), torch.tensor(labels)

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None):
        """As masked LM's, with the padding (``mask`` 0) never chosen and the mask passed on."""
        if mask is None:
            return super().corrupt(ids, generator)
        c = self.config
        ids, labels = mask_tokens(ids, self.no_mask[ids] | (mask == 0), self.tokenizer.mask_id, self.vocab, generator,
                                  c.mlm_probability, c.mask_replace_prob, c.random_replace_prob,
                                  self.word_starts(ids) if self.word_starts is not None else None)
        return {"ids": ids, "labels": labels, "mask": mask}

    def forward(self, model, batch):
        """(masked-LM loss summed over the batch's predicted tokens, next-sentence loss summed over its rows,
        correct masked-token and next-sentence predictions)."""
        chosen = batch["labels"] != -100
        out = model(batch["ids"], attention_mask=batch["mask"], token_type_ids=batch["types"], select=chosen)
        logits, target = out.logits.float(), batch["labels"][chosen]
        nsp = out.nsp_logits.float()
        return (F.cross_entropy(logits, target, reduction="sum"), F.cross_entropy(nsp, batch["nsp"], reduction="sum"),
                (logits.argmax(-1) == target).sum(), (nsp.argmax(-1) == batch["nsp"]).sum())

    def loss(self, model, batch):
        # Weighed by rows, a micro-batch's share of the step's masked-LM mean is its sum over all the step's
        # predicted tokens (counted when the step's rows were drawn), times the step's rows over its own.
        mlm_sum, nsp_sum, mlm_right, nsp_right = self.forward(model, batch)
        rows = batch["ids"].size(0)
        scale = batch["step_rows"] / (rows * batch["step_chosen"])
        metrics = {"mlm_loss": mlm_sum.detach() * scale, "nsp_loss": nsp_sum.detach() / rows,
                   "accuracy": mlm_right * scale, "nsp_accuracy": nsp_right.float() / rows}
        return mlm_sum * scale + nsp_sum / rows, metrics

    def loss_weight(self, batch) -> float:
        return float(batch["ids"].size(0))

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        """The fixed validation pairs (pair i drawn and masked by generators seeded with i)."""
        if self.val_pairs is None:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(5, dtype=torch.float64)  # masked-LM loss, right; next-sentence loss, right; predicted tokens
        for index in dist_.share(self.config.eval_windows):
            if index is None and not dist_.sharded:
                continue
            ids, types, mask, label = self.rows(self.val_pairs, np.random.default_rng([self.config.seed, 1, index or 0]), 1)
            batch = {**self.corrupt(ids, step_generator(self.config.seed, index or 0, 1), mask), "types": types, "nsp": label}
            labels = batch["labels"]
            with autocast:  # (under FSDP every rank makes as many forward passes; the padding's are dropped)
                mlm_sum, nsp_sum, mlm_right, nsp_right = self.forward(model, {k: v.to(self.device) for k, v in batch.items()})
            if index is None:
                continue
            totals += torch.tensor([mlm_sum.item(), mlm_right.item(), nsp_sum.item(), nsp_right.item(),
                                    (labels != -100).sum().item()], dtype=torch.float64)
        totals = dist_.all_sum(totals.to(self.device)).cpu()
        model.train(was_training)
        n = self.config.eval_windows
        mlm_loss = (totals[0] / totals[4]).item()
        nsp_loss = (totals[2] / n).item()
        return {"val_loss": mlm_loss + nsp_loss, "val_mlm_loss": mlm_loss, "val_perplexity": math.exp(min(mlm_loss, 50.0)),
                "val_accuracy": (totals[1] / totals[4]).item(), "val_nsp_loss": nsp_loss,
                "val_nsp_accuracy": (totals[3] / n).item()}

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f} (masked LM {record['val_mlm_loss']:.4f}, next sentence "
                f"{record['val_nsp_loss']:.4f}), masked-token accuracy {100 * record['val_accuracy']:.1f}%, "
                f"next-sentence accuracy {100 * record['val_nsp_accuracy']:.1f}%")

    def describe(self) -> dict:
        info = super().describe()
        info["summary"] = info["summary"].replace("masked LM", "masked LM and next-sentence prediction")
        return info


class SegmentPairs:
    """Segment pairs (A, B, label) from a split, cut at sentence starts (``SentenceStarts``) as BERT's are: A from
    a sentence start at a random place, ending at a random sentence start inside the pair's ``content`` tokens; B
    the text after it (label 0) or, with probability 1/2, text from a sentence start in another document
    (label 1); A and B together ``content`` tokens (B cut at the end, as BERT truncates pairs). Where a window
    holds no sentence start (a long line), the cut falls at a random token instead. A segment never runs past its
    document's end (the end-of-text token is in neither): a pair "is next" only inside one document, as BERT
    draws them, and a pair cut short by a document's end is shorter than ``content`` (its row padded)."""

    def __init__(self, split, content: int, eos_id: int | None, sentences: SentenceStarts | None = None):
        self.split, self.content = split, content
        starts = [max(len(s) - content, 0) for s in split.shards]
        self.cum_starts = np.cumsum(starts)
        if self.cum_starts[-1] == 0:
            raise LmforgeError(f"the {split.split} split has {split.tokens} tokens, too few for pairs of {content} "
                               f"tokens; lower block_size or prepare more data")
        # where each shard's documents end (the end-of-text token after each), to tell documents apart
        self.ends = [np.flatnonzero(np.asarray(s) == eos_id) if eos_id is not None else np.empty(0, np.int64)
                     for s in split.shards]
        self.sentences = [sentences(s) if sentences is not None else np.empty(0, np.int64) for s in split.shards]

    def place(self, rng: np.random.Generator) -> tuple[int, int]:
        """(shard, offset) of a window of ``content`` tokens inside one shard, starting at a sentence where one
        starts between there and the last place a window fits."""
        start = int(rng.integers(0, self.cum_starts[-1]))
        shard = int(np.searchsorted(self.cum_starts, start, side="right"))
        offset = start - (int(self.cum_starts[shard - 1]) if shard > 0 else 0)
        sentences = self.sentences[shard]
        k = int(np.searchsorted(sentences, offset))
        if k < len(sentences) and sentences[k] <= len(self.split.shards[shard]) - self.content:
            offset = int(sentences[k])
        return shard, offset

    def document(self, shard: int, offset: int) -> tuple[int, int]:
        return shard, int(np.searchsorted(self.ends[shard], offset, side="right"))

    def document_end(self, shard: int, offset: int, length: int) -> int:
        """Where a segment of at most ``length`` tokens from ``offset`` ends: at the first end-of-text token from
        ``offset`` on, if that comes first."""
        ends, end = self.ends[shard], min(offset + length, len(self.split.shards[shard]))
        k = int(np.searchsorted(ends, offset))
        return min(end, int(ends[k])) if k < len(ends) else end

    def start(self, rng: np.random.Generator) -> tuple[int, int]:
        """``place``, moved past an end-of-text token it falls on (to the next document's first token)."""
        shard, offset = self.place(rng)
        ends = self.ends[shard]
        k = int(np.searchsorted(ends, offset))
        return shard, offset + int(k < len(ends) and ends[k] == offset)

    def draw(self, rng: np.random.Generator) -> tuple[list[int], list[int], int]:
        for _ in range(10):  # a window of at least two tokens of one document (a corpus of tiny ones keeps the last)
            shard, offset = self.start(rng)
            limit = self.document_end(shard, offset, self.content)
            if limit - offset >= 2:
                break
        sentences = self.sentences[shard]
        inside = sentences[np.searchsorted(sentences, offset + 1) : np.searchsorted(sentences, limit)]
        # A's length (B's is the rest): up to a sentence start inside the window, or a random token
        if len(inside):
            cut = int(inside[rng.integers(len(inside))]) - offset
        else:
            cut = int(rng.integers(1, limit - offset)) if limit - offset >= 2 else limit - offset
        text = self.split.shards[shard]
        a = text[offset : offset + cut]
        if rng.random() < 0.5:
            return a.tolist(), text[offset + cut : limit].tolist(), 0
        here = self.document(shard, offset)
        for _ in range(10):  # another document (a one-document corpus keeps the last draw)
            other, at = self.start(rng)
            if self.document(other, at) != here:
                break
        b = self.split.shards[other][at : self.document_end(other, at, self.content - cut)]
        return a.tolist(), b.tolist(), 1


class PairBatches(StepPosition):
    """Micro-batches of segment pairs; the rows of a step depend only on ``(seed, step)``. Every process builds
    and masks all the step's rows (cheap next to the forward pass) and takes its own: the masked-LM mean is
    then over the whole step's predicted tokens whatever the layout."""

    def __init__(self, objective: NextSentence, batch_size: int, seed: int, rank: int, world_size: int, accum_steps: int):
        self.objective, self.batch_size, self.seed = objective, batch_size, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.batch_index = 0

    def next_batch(self, device) -> dict:
        o = self.objective
        step, micro = divmod(self.batch_index, self.accum_steps)
        self.batch_index += 1
        total = self.batch_size * self.accum_steps * self.world_size
        ids, types, mask, nsp = o.rows(o.pairs, np.random.default_rng([self.seed, step]), total)
        masked = o.corrupt(ids, step_generator(self.seed, step, 0), mask)
        first = (micro * self.world_size + self.rank) * self.batch_size
        mine = slice(first, first + self.batch_size)
        batch = {"ids": masked["ids"][mine], "types": types[mine], "mask": mask[mine], "labels": masked["labels"][mine],
                 "nsp": nsp[mine],
                 "step_rows": torch.tensor(float(total)),
                 "step_chosen": torch.tensor(float(max(int((masked["labels"] != -100).sum()), 1)))}
        return {k: v.to(device) for k, v in batch.items()}


class SpanCorruption(CausalLM):
    """``--objective span``: T5's span corruption with the encoder-decoder."""

    def __init__(self, config: TrainConfig, device: torch.device, checkpoint: Path | None):
        super().__init__(config, device, checkpoint)
        c, tok = config, self.tokenizer
        self.raw = span_raw_length(self.block_size, c.noise_density, c.mean_span_length)
        inputs, self.target_length = span_input_lengths(self.raw, c.noise_density, c.mean_span_length)
        if inputs != self.block_size:  # (a row too short for a span, its sentinel and the end token)
            raise LmforgeError(f"--objective span cannot make inputs of exactly block_size {self.block_size} tokens "
                               f"(rows of {self.raw} give {inputs}); raise --block-size")
        spans = span_lengths(self.raw, c.noise_density, c.mean_span_length)[1]
        if tok.sentinels < spans:
            raise LmforgeError(f"span corruption of rows of {self.raw} tokens needs {spans} sentinel tokens "
                               f"(<extra_id_0> ...) but the tokenizer of {c.data} has {tok.sentinels}; train one with "
                               f"`lmforge tokenizer train --sentinels 100` and prepare the data with it")
        if tok.eos_id is None:
            raise LmforgeError(f"the tokenizer of {c.data} has no end-of-text token, which ends inputs and targets")
        self.windows = eval_windows(self.val_split, self.raw - 1, c.eval_windows) if self.val_split else []

    def load(self, checkpoint: Path | None):
        from lmforge.model.encoder_decoder import EncoderDecoder, build_encoder_decoder

        return load_or_build(self.config, self.device, checkpoint, EncoderDecoder,
                             lambda model: f"{self.config.model} is not an encoder-decoder; --objective span trains one "
                                           f"(t5): start from a preset or a t5 folder",
                             lambda: build_encoder_decoder(seq2seq_config(self.config, self.tokenizer), self.device))

    def batches(self, rank: int, world_size: int) -> SpanBatches:
        c = self.config
        rows = TrainBatches(self.train_split, self.raw - 1, c.micro_batch_size, c.seed, rank, world_size,
                            c.grad_accum_steps)
        return SpanBatches(self, rows)

    def corrupt(self, rows: torch.Tensor, rng: np.random.Generator, count: int | None = None) -> dict[str, torch.Tensor]:
        """Rows of raw tokens (B, raw) → encoder inputs (B, block_size) and targets (B, target_length). ``count``
        rows of noise masks are drawn (the step's, of which these rows are the first)."""
        c, tok = self.config, self.tokenizer
        masks = [span_noise_mask(self.raw, rng, c.noise_density, c.mean_span_length) for _ in range(count or len(rows))]
        pairs = [corrupt_spans(row, mask, tok.sentinel_id, tok.eos_id) for row, mask in zip(rows.tolist(), masks)]
        return {"ids": torch.tensor([p[0] for p in pairs]), "labels": torch.tensor([p[1] for p in pairs])}

    def loss(self, model, batch):
        logits, loss = model(batch["ids"], labels=batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"accuracy": accuracy.detach()}

    def loss_weight(self, batch) -> float:
        return float(batch["labels"].numel())

    def batch_tokens(self, batch) -> int:
        return batch["ids"].numel() + batch["labels"].numel()

    def predict(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch["ids"], labels=batch["labels"])[0].flatten(0, 1), batch["labels"].flatten()

    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        return held_out_tokens(self, dist_, autocast, self.raw, lambda rows, index: self.corrupt(
            rows, np.random.default_rng([self.config.seed, 1, index])))

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, ppl {record['val_perplexity']:.2f}, "
                f"target-token accuracy {100 * record['val_accuracy']:.1f}%")

    def describe(self) -> dict:
        params = self.model.num_params()
        return {
            "model": self.model.config.to_dict(), "parameters": params, "flops_per_token": 6 * params,
            "data": {"train_tokens": self.train_split.tokens, "val_tokens": self.val_split.tokens if self.val_split else 0},
            "summary": f"encoder-decoder of {human_count(params)} parameters, span corruption (rows of {self.raw} "
                       f"tokens: inputs {self.block_size}, targets {self.target_length}); train split "
                       f"{human_count(self.train_split.tokens)} tokens",
        }

    def sample(self, step: int, out: Path, bar) -> None:
        pass


class SpanBatches:
    """Micro-batches of corrupted rows; the noise of a step is drawn for all its rows from ``(seed, step)`` and each
    micro-batch takes its own (the draws do not depend on the tokens, so only the count matters)."""

    def __init__(self, objective: SpanCorruption, rows: TrainBatches):
        self.objective, self.rows = objective, rows

    def next_batch(self, device) -> dict:
        step, first = self.rows.position
        mine = self.rows.next_rows().cpu()
        rng = np.random.default_rng([self.rows.seed, 2, step])
        for _ in range(first):  # the rows before this micro-batch's take their draws
            span_noise_mask(self.objective.raw, rng, self.objective.config.noise_density,
                            self.objective.config.mean_span_length)
        batch = self.objective.corrupt(mine, rng)
        return {k: v.to(device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.rows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rows.load_state_dict(state)


def seq2seq_config(c: TrainConfig, tokenizer):
    """An encoder-decoder of a decoder preset's shape (T5 v1.1's layout: gated GELU, own head), both stacks as
    deep as the preset."""
    from lmforge.model.encoder_decoder import Seq2SeqConfig

    shape: Config = Config.from_preset(c.model, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                                       n_embd=c.n_embd)
    if shape.family != "gpt2" or c.n_kv_head is not None:
        raise LmforgeError(f"preset {c.model} is a Llama-layout decoder; an encoder-decoder is built from the tiny, "
                           f"mini or gpt2 shapes (without n_kv_head)")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return Seq2SeqConfig(vocab_size=tokenizer.hf.get_vocab_size(with_added_tokens=True), d_model=shape.n_embd,
                         d_kv=shape.n_embd // shape.n_head, d_ff=shape.hidden, n_layer=shape.n_layer,
                         n_decoder_layer=shape.n_layer, n_head=shape.n_head, feed_forward="gated-gelu",
                         dropout=c.dropout, tied=False, scale_output=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_id, decoder_start_token_id=pad, block_size=shape.block_size)


def load_or_build(c: TrainConfig, device, checkpoint: Path | None, kind: type, refusal, build) -> torch.nn.Module:
    """The model a pretraining objective trains: the checkpoint's when resuming, ``build()`` for a preset, else
    the model folder ``c.model`` (whose shape the config may not change), refused with ``refusal(model)`` when
    it is not a ``kind``."""
    from lmforge.model.checkpoint import load_model

    if checkpoint is not None:
        with may_defer(c):
            return load_model(checkpoint / "model", device).train()
    if means_preset(c.model, c.out):
        with may_defer(c):
            return build()
    if not Path(c.model).exists():
        raise LmforgeError(f"model {c.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    model = load_model(c.model, device)
    if not isinstance(model, kind):
        raise LmforgeError(refusal(model))
    refuse_other_shape(model, {k: getattr(c, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "n_kv_head")},
                       c.model)
    return model.train()


def encoder_config(c: TrainConfig, tokenizer, head: str = "masked_lm") -> EncoderConfig:
    """A pretraining encoder of a decoder preset's shape (width, depth, heads, MLP, context), overrides applied."""
    shape: Config = Config.from_preset(c.model, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                                       n_embd=c.n_embd)
    if shape.family != "gpt2" or c.n_kv_head is not None:
        raise LmforgeError(f"preset {c.model} is a Llama-layout decoder; an encoder is built from the tiny, mini or "
                           f"gpt2 shapes (without n_kv_head)")
    return EncoderConfig(vocab_size=tokenizer.hf.get_vocab_size(with_added_tokens=True), block_size=shape.block_size,
                         n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, mlp_hidden=shape.hidden,
                         dropout=c.dropout, pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                         pooler=head == "pretraining", head=head)


def with_pretraining_head(model: Encoder, head: str) -> Encoder:
    """The encoder with ``head`` ("masked_lm", or "pretraining": masked LM and next-sentence prediction): the
    parts it has are kept, the missing ones start from BERT's initialisation (N(0, 0.02), zero biases)."""
    if model.config.head == head and (head == "pretraining" or model.pooler is None):
        return model
    weight = model.wte.weight
    model.config = model.config.with_head(head)
    model.classifier, model.qa_outputs = None, None
    new = []
    if model.mlm is None:
        model.mlm = MaskedLMHead(model.config)
        new.append(model.mlm)
    if head == "pretraining":
        if model.pooler is None:
            model.pooler = nn.Linear(model.config.n_embd, model.config.n_embd)
            new.append(model.pooler)
        model.nsp = nn.Linear(model.config.n_embd, 2)
        new.append(model.nsp)
    else:
        model.pooler, model.nsp = None, None
    with torch.no_grad():
        for part in new:
            part.to(device=weight.device, dtype=weight.dtype)
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=model.config.init_std)
                    nn.init.zeros_(module.bias)
            if part is model.mlm:
                nn.init.zeros_(model.mlm.bias)
    return model
