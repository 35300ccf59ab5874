"""Learning from preference pairs, through the same loop as pretraining and fine-tuning.

    RewardModel   `lmforge reward`: a scalar head r(x, y) on the last real token of prompt + answer
                  (a decoder) or on the pooler of [CLS] prompt [SEP] answer [SEP] (an encoder), trained
                  with the Bradley-Terry loss  -log σ(r_chosen - r_rejected - margin)
                  (+ c · mean((r_chosen + r_rejected)²), the centring term, when c > 0)
    DPO           `lmforge dpo`: a causal LM trained directly on the pairs against a frozen reference
                  π_ref, with h = [log π(y_c|x) - log π_ref(y_c|x)] - [log π(y_r|x) - log π_ref(y_r|x)]
                  (sequence log-probabilities: sums over the answer's tokens):
                    sigmoid  -log σ(β h)                                  (Rafailov et al., 2023)
                    cdpo     -(1-ε) log σ(β h) - ε log σ(-β h)            (Mitchell, 2023: conservative DPO)
                    ipo      (h - 1/(2β))²                                (Azar et al., 2023, eq. 17)
                  TRL's "sigmoid" ignores label_smoothing and its "ipo" divides each log-ratio by the
                  answer's length; lmforge follows the papers (sums), so cdpo and ipo are tested against
                  these formulas and sigmoid against TRL.

Chosen and rejected answers of a micro-batch go through the model in one forward pass. A decoder sees
each pair as one row (``packed_pairs``): the prompt and the answers' common first tokens once, then the
rest of each answer, the rejected one masked from the chosen one and placed at its own positions, so
every answer token sees what it would see alone (a quarter fewer tokens when prompt and answers are
of one length; nearly half for long prompts). Every loss is a mean over pairs, and the loop weighs each
micro-batch by its pairs, so any split into micro-batches and processes gives the same step.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.preference import TokenizedPair, TokenizeStats, encode_answers, read_pairs, tokenize_pairs
from lmforge.errors import LmforgeError
from lmforge.infer.engine import record_end_of_turn
from lmforge.model.checkpoint import load_model, model_kind
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT
from lmforge.model.heads import attach_head
from lmforge.model.lora import adapters_off
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from lmforge.train.config import DPOConfig, RewardConfig
from lmforge.train.finetune import FIXED_ON_RESUME, ExampleBatches, Finetune, _pad, _to, refuse_pooling
from lmforge.train.loop import Distributed, resolve_config, train
from lmforge.utils import warn

REFERENCE_CACHE = "reference_logps.safetensors"


class PairObjective(Finetune):
    """What the reward model and DPO share: pairs read, tokenised, batched and evaluated."""
    defers_model = False  # (see DPO and RewardModel)

    metric_names: tuple[str, ...] = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin")

    def read_val(self, path: str, task: str) -> list:
        return read_pairs(path, self.config.skip_bad_lines).rows

    def setup(self, train_rows: list, val_rows: list) -> None:
        # rows in turns anywhere (not only the first) were rendered through a chat template: the saved tokenizer
        # keeps it and DPO's policy its end-of-turn token
        self.chat = any(isinstance(row["prompt"], list) for row in (*train_rows, *val_rows))
        self.train_pairs = self.featurize(train_rows, "training")
        self.val_pairs = self.featurize(val_rows, "validation")
        if not self.train_pairs:
            raise LmforgeError(f"no training pair fits max_length {self.max_length} tokens; {self.longer_hint()}")
        self.n_train, self.n_val = len(self.train_pairs), len(self.val_pairs)

    def featurize(self, rows: list, split: str) -> list:
        pairs, stats = tokenize_pairs(self.tokenizer, rows, self.max_length, self.config.truncation)
        self.report(stats, split)
        return pairs

    def report(self, stats: TokenizeStats, split: str) -> None:
        summary = stats.summary(self.max_length)
        if summary:
            print(f"{split} pairs: {summary}", flush=True)

    def pad_id(self) -> int:
        pad = getattr(self.model.config, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.tokenizer.eos_id or 0)
        return pad

    def collate(self, indices: list[int], pairs=None) -> dict:
        """The batch of pairs ``indices`` (a decoder's: ``packed_pairs``)."""
        raise NotImplementedError

    def batches(self, rank: int, world_size: int):
        c = self.config
        return ExampleBatches(self.n_train, c.micro_batch_size, c.seed, rank, world_size, c.grad_accum_steps, self.collate)

    def loss_weight(self, batch) -> float:
        return batch["margin"].numel()  # pairs

    def batch_tokens(self, batch) -> int:
        return int(batch["lengths"].sum())

    def pair_loss(self, model, batch, split: str = "train"):
        raise NotImplementedError

    def loss(self, model, batch):
        return self.pair_loss(model, batch, "train")

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        """The loss and metrics over every validation pair (each rank its share, summed)."""
        if not self.val_pairs:
            return None
        self.model.eval()
        # (under FSDP every rank makes as many forward passes: a rank short of a batch runs pair 0 and drops it)
        share = dist_.share(self.n_val) if dist_.sharded else list(range(self.n_val))[dist_.rank :: dist_.world_size]
        mine = [i for i in share if i is not None]
        sums = {k: torch.zeros((), device=self.device) for k in ("loss", *self.metric_names)}  # the same on every rank
        for i in range(0, len(share), self.config.micro_batch_size):
            chunk = share[i : i + self.config.micro_batch_size]
            real = [k for k in chunk if k is not None]
            batch = _to(self.collate(real or [0], self.val_pairs), self.device)
            with autocast:
                loss, metrics = self.pair_loss(self.model, batch, "val")
            if not real:
                continue
            n = batch["margin"].numel()
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] += value.float() * n
        self.model.train()
        names = list(sums)
        totals = dist_.all_sum(torch.stack([*sums.values(), torch.tensor(float(len(mine)), device=self.device)]))
        return {f"val_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(names)}

    def format_eval(self, record: dict) -> str:
        return (f"val loss {record['val_loss']:.4f}, pair accuracy {record['val_reward_accuracy']:.4f}, "
                f"reward margin {record['val_reward_margin']:.4f}")

    def save_tokenizer(self) -> Tokenizer:
        if self.chat and not self.tokenizer.chat_template:
            self.tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE  # what the pairs were rendered with
        return self.tokenizer


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    return {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
            "reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean()}


# -- the reward model ---------------------------------------------------------------------------


class RewardModel(PairObjective):
    task = "reward"
    head = "sequence_classification"
    defers_model = True  # its setup reads no weights

    def attach(self, model) -> None:
        if getattr(model.config, "head", None) == self.head and model.config.num_labels == 1:
            # already a reward model: train it on. One without a pad id (transformers leaves it unset) gets the
            # tokenizer's pad, else end-of-text, as TRL's RewardTrainer sets it: saved with the model, so that
            # transformers reads each padded row's score where lmforge does (its last token that is not padding)
            if isinstance(model, GPT) and model.config.pad_token_id is None:
                from dataclasses import replace

                tok = self.tokenizer_of(model)
                pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
                model.config = replace(model.config, pad_token_id=pad)
            return
        if isinstance(model, GPT):
            refuse_pooling(self.config.pooling)
            tok = self.tokenizer_of(model)
            pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
            attach_head(model, self.head, 1, ("reward",), pad)
        elif not isinstance(model, Encoder):
            raise LmforgeError(f"a reward model is a decoder or an encoder (bert) with a score head; "
                               f"{self.config.model} is {model_kind(model)}")
        else:
            # transformers' BertForSequenceClassification reads the pooler; without one, the [CLS] token
            pooling = self.config.pooling if self.config.pooling != "auto" else ("pooler" if model.pooler is not None else "first")
            attach_head(model, self.head, 1, ("reward",), None, pooling)

    @staticmethod
    def tokenizer_of(model) -> Tokenizer:
        from lmforge.model.checkpoint import load_tokenizer_for

        return load_tokenizer_for(model)

    def load(self, checkpoint):
        model = super().load(checkpoint)
        c = model.config
        if getattr(c, "head", None) != self.head or getattr(c, "num_labels", None) != 1:
            raise LmforgeError(f"{checkpoint} is not a reward model (one score); start a new run")
        return model

    def featurize(self, rows: list, split: str) -> list:
        if isinstance(self.model, GPT):
            return super().featurize(rows, split)
        return self.encoder_pairs(rows, split)

    def encoder_pairs(self, rows: list, split: str) -> list:
        """[CLS] prompt [SEP] answer [SEP] for each answer; the prompt cut from the left to fit."""
        stats, out = TokenizeStats(), []
        for row in rows:
            encoded = [encoder_input(self.tokenizer, row["prompt"], row[k]) for k in ("chosen", "rejected")]
            longest = max(len(ids) for ids, _, _ in encoded)
            excess = longest - self.max_length
            prompt_len = min(n for _, _, n in encoded)
            if excess > 0 and (self.config.truncation == "drop" or excess >= prompt_len):
                stats.dropped += 1
                continue
            if excess > 0:
                stats.truncated += 1
                encoded = [(ids[:1] + ids[1 + excess:], types[:1] + types[1 + excess:], n - excess) for ids, types, n in encoded]
            (c, ct, _), (r, rt, _) = encoded
            out.append((c, ct, r, rt, float(row.get("margin", 0.0))))
        self.report(stats, split)
        return out

    def collate(self, indices: list[int], pairs=None) -> dict:
        pairs = self.train_pairs if pairs is None else pairs
        if isinstance(self.model, GPT):
            return packed_pairs([pairs[i] for i in indices], self.pad_id(), self.model.config.pad_token_id)
        chosen = [pairs[i] for i in indices]
        seqs = [p[0] for p in chosen] + [p[2] for p in chosen]
        types = [p[1] for p in chosen] + [p[3] for p in chosen]
        lengths = torch.tensor([len(s) for s in seqs])
        return {"ids": _pad(seqs, self.model.config.pad_token_id or 0), "types": _pad(types, 0), "lengths": lengths,
                "mask": (torch.arange(max(map(len, seqs)))[None] < lengths[:, None]).long(),
                "margin": torch.tensor([p[4] for p in chosen], dtype=torch.float32)}

    @staticmethod
    def rewards(model, batch) -> torch.Tensor:
        """The chosen answers' rewards, then the rejected ones'."""
        if "types" in batch:
            return model(batch["ids"], batch["mask"], batch["types"]).logits.squeeze(-1).float()
        scores = model(batch["ids"], positions=batch["positions"], attn_mask=batch["mask"], keep=batch["keep"])
        return scores[..., 0].float().T.flatten()  # (pairs, 2) → chosen then rejected

    def pair_loss(self, model, batch, split: str = "train"):
        chosen, rejected = self.rewards(model, batch).chunk(2)
        loss = -F.logsigmoid(chosen - rejected - batch["margin"]).mean()
        if self.config.center_rewards > 0:
            loss = loss + self.config.center_rewards * ((chosen + rejected) ** 2).mean()
        return loss, {k: v.detach() for k, v in pair_metrics(chosen, rejected).items()}


def packed_pairs(pairs: list, pad: int, score_pad: int | None = None, answers: bool = False) -> dict:
    """Decoder rows of pairs: shared ‖ rest of chosen ‖ rest of rejected, each pair in one row, where the
    shared part is the prompt and the answers' common first tokens: it passes through the model once. The
    rest of the rejected answer takes the positions after the shared part and attends to it and itself,
    never to the chosen answer: each answer token sees exactly the tokens it would see alone.

    ``keep`` names the positions the caller reads. For a reward model, where the scores are read: each
    answer's last token that is not ``score_pad`` (the head's rule, ``last_tokens``: a pad token that is
    also end-of-text is not read). With ``answers`` (DPO), the position that predicts each answer token,
    chosen then rejected (a shared position twice), with the token in ``targets`` (-100 for padding) and
    ``side`` 0 for chosen, 1 for rejected."""
    seqs, positions, keep, hidden, targets, side = [], [], [], [], [], []
    for p in pairs:
        common = next((i for i, (a, b) in enumerate(zip(p.chosen, p.rejected)) if a != b), min(len(p.chosen), len(p.rejected)))
        P, S, C, R = len(p.prompt), len(p.prompt) + common, len(p.chosen) - common, len(p.rejected) - common
        seqs.append(p.prompt + p.chosen + p.rejected[common:])
        positions.append(list(range(S + C)) + list(range(S, S + R)))
        hidden.append((S + C, S + C + R, S, S + C))  # rejected queries hide the chosen keys

        def row_index(i: int) -> int:  # position i of prompt + rejected → its index in the row
            return i if i < S else i + C

        if answers:
            # answer token j sits at P + j of its own sequence and is predicted by the position before it
            # (with no prompt, the first answer token has none and is not counted, as in the unpacked rows)
            first = 1 if P == 0 else 0
            keep.append([P + j - 1 for j in range(first, len(p.chosen))]
                        + [row_index(P + j - 1) for j in range(first, len(p.rejected))])
            targets.append(p.chosen[first:] + p.rejected[first:])
            side.append([0] * (len(p.chosen) - first) + [1] * (len(p.rejected) - first))
        else:
            keep.append([_last_real(p.prompt + p.chosen, score_pad), row_index(_last_real(p.prompt + p.rejected, score_pad))])
    ids = _pad(seqs, pad)
    W = ids.size(1)
    mask = torch.ones(W, W, dtype=torch.bool).tril().repeat(len(pairs), 1, 1)
    for row, (q0, q1, k0, k1) in enumerate(hidden):
        mask[row, q0:q1, k0:k1] = False
    batch = {"ids": ids, "positions": _pad(positions, 0), "mask": mask[:, None], "keep": _pad(keep, 0),
             "lengths": torch.tensor([len(p.prompt) + len(p.chosen) for p in pairs]
                                     + [len(p.prompt) + len(p.rejected) for p in pairs]),
             "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}
    if answers:
        batch.update(targets=_pad(targets, -100), side=_pad(side, 1))
    return batch


def _last_real(seq: list[int], pad: int | None) -> int:
    return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad), 0)


def encoder_input(tokenizer: Tokenizer, prompt, answer) -> tuple[list[int], list[int], int]:
    """(ids, token types, tokens before the first answer token) of [CLS] prompt [SEP] answer [SEP]."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt
    answer_text = "\n".join(m["content"] for m in answer) if isinstance(answer, list) else answer
    enc = tokenizer.hf.encode(prompt_text, answer_text, add_special_tokens=True)
    first_answer = next((i for i, s in enumerate(enc.sequence_ids) if s == 1), len(enc.ids))
    return enc.ids, enc.type_ids, first_answer - 1  # the [CLS] token is not the prompt's


# -- DPO ----------------------------------------------------------------------------------------


def answer_logps(model, batch) -> torch.Tensor:
    """Each answer's sequence log-probability (the sum over its tokens), chosen answers then rejected ones,
    from packed pairs (``packed_pairs(answers=True)``): logits only at the positions that predict answer
    tokens, nothing spent on the prompts."""
    logits = model(batch["ids"], positions=batch["positions"], attn_mask=batch["mask"], keep=batch["keep"])
    targets = batch["targets"]
    per_token = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                 reduction="none").view_as(targets)
    rejected = batch["side"].bool()
    return torch.cat([per_token.masked_fill(rejected, 0).sum(1), per_token.masked_fill(~rejected, 0).sum(1)])


def dpo_loss(h: torch.Tensor, loss: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from h = chosen log-ratio minus rejected log-ratio (see the module's docstring)."""
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "cdpo":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise LmforgeError(f"unknown DPO loss {loss!r}; use sigmoid, ipo or cdpo")


class DPO(PairObjective):
    task = "dpo"
    metric_names = PairObjective.metric_names + ("logp_chosen", "logp_rejected")

    defers_model = True  # a precomputed reference waits for the sharded model when it is opened for sharding

    def __init__(self, config: DPOConfig, device, checkpoint, pairs):
        self.checkpoint = checkpoint
        super().__init__(config, device, checkpoint, pairs)

    def collate(self, indices: list[int], pairs=None) -> dict:
        """Each pair in one row (``packed_pairs``): the prompt passes through the policy and the reference once."""
        pairs = self.train_pairs if pairs is None else pairs
        return {**packed_pairs([pairs[i] for i in indices], self.pad_id(), answers=True), "index": torch.tensor(indices)}

    def load(self, checkpoint):
        model = super().load(checkpoint)
        if not isinstance(model, GPT) or model.score is not None:
            what = model_kind(model) if not isinstance(model, GPT) else "a classifier or reward model (it has a score head)"
            raise LmforgeError(f"DPO trains a causal language model; {self.config.model} is {what}")
        return model

    def setup(self, train_rows: list, val_rows: list) -> None:
        super().setup(train_rows, val_rows)
        if self.chat:  # (the policy answers in turns: its saved generation config ends them)
            record_end_of_turn(self.model, self.tokenizer)
        c = self.config
        self.reference = c.reference if c.reference != "auto" else (
            "adapter" if c.method == "lora" and not c.reference_model else "copy")
        self.ref_model = None
        self.ref_logps: dict[str, torch.Tensor] = {}
        if self.reference == "copy":
            self.ref_model = self.base_model()
        elif self.reference == "precomputed":
            self.ref_logps = self.read_precomputed()
            if self.ref_logps is None and not any(p.is_meta for p in self.model.parameters()):
                self.ref_logps = self.precomputed()
            # else the model is opened for sharding (FSDP): its pass over the pairs runs when the loop first asks,
            # after sharding, every rank passing over every pair (a sharded forward pass is a collective)

    def base_model(self):
        """The frozen reference: ``reference_model``, else the model the run started from (never a resumed
        checkpoint). A reference of another vocabulary than the policy's is refused: it would score other tokens."""
        c = self.config
        model = load_model(c.reference_model or c.model, self.device)
        if c.reference_model and (not isinstance(model, GPT) or model.score is not None):
            raise LmforgeError(f"--reference-model {c.reference_model} is not a causal language model; give one")
        if c.reference_model and model.config.vocab_size != self.model.config.vocab_size:
            raise LmforgeError(f"--reference-model {c.reference_model} has a vocabulary of {model.config.vocab_size} "
                               f"tokens, not the policy's {self.model.config.vocab_size}; give a model with the "
                               f"policy's tokenizer")
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def cache_key(self) -> str:
        digest = hashlib.sha256(str(Path(self.config.reference_model or self.config.model).resolve()).encode())
        for pairs in (self.train_pairs, self.val_pairs):
            for p in pairs:
                digest.update(repr((p.prompt, p.chosen, p.rejected)).encode())
        return digest.hexdigest()

    def read_precomputed(self) -> dict[str, torch.Tensor] | None:
        """A resumed run's reference log-probs, read back from its folder (None: not there, or for other pairs)."""
        from safetensors import safe_open

        cache = Path(self.config.out) / REFERENCE_CACHE
        if self.checkpoint is not None and cache.exists():
            with safe_open(cache, "pt") as f:
                if (f.metadata() or {}).get("key") == self.cache_key():
                    return {name: f.get_tensor(name) for name in f.keys()}
        return None

    def precomputed(self) -> dict[str, torch.Tensor]:
        """Reference log-probs of every pair, computed once, outside autocast (in the weights' own precision, as
        when it runs in setup, even if it runs at the first step of a bf16 run)."""
        if self.checkpoint is None and not getattr(self.model, "lora", None) and not self.config.reference_model:
            model = self.model  # a fresh run: the policy is still the reference
        else:
            model = self.base_model() if self.config.method != "lora" or self.config.reference_model else self.model
        out = {}
        was_training = self.model.training
        with torch.no_grad(), adapters_off(model), torch.autocast(self.device.type, enabled=False):
            model.eval()
            for name, pairs in (("train", self.train_pairs), ("val", self.val_pairs)):
                values = []
                for i in range(0, len(pairs), self.config.micro_batch_size):
                    batch = _to(self.collate(list(range(i, min(i + self.config.micro_batch_size, len(pairs)))), pairs),
                                self.device)
                    values.append(answer_logps(model, batch).view(2, -1).T.cpu())
                out[name] = torch.cat(values) if values else torch.zeros(0, 2)
        self.model.train(was_training)
        return out

    def write_run_files(self, out: Path) -> None:
        if self.reference == "precomputed" and self.ref_logps is not None:  # (else written once computed)
            from safetensors.torch import save_file

            from lmforge.utils import atomic_dir

            # save_file writes in place: write to a temporary folder, then move the file over
            with atomic_dir(out / ".reference_tmp") as tmp:
                save_file({k: v.contiguous() for k, v in self.ref_logps.items()}, tmp / REFERENCE_CACHE,
                          metadata={"key": self.cache_key()})
            os.replace(out / ".reference_tmp" / REFERENCE_CACHE, out / REFERENCE_CACHE)
            (out / ".reference_tmp").rmdir()

    def reference_logps(self, batch, split: str) -> torch.Tensor:
        if self.reference == "precomputed":
            if self.ref_logps is None:  # the model was opened for sharding: now it is sharded (see setup)
                self.ref_logps = self.precomputed()
                if int(os.environ.get("RANK", "0")) == 0:
                    self.write_run_files(Path(self.config.out))
            table = self.ref_logps["train" if split == "train" else "val"]
            rows = table[batch["index"].cpu()].to(self.device)
            return torch.cat([rows[:, 0], rows[:, 1]])
        with torch.no_grad():
            if self.reference == "adapter":
                with adapters_off(self.model):
                    return answer_logps(self.model, batch)
            return answer_logps(self.ref_model, batch)

    def pair_loss(self, model, batch, split: str = "train"):
        c = self.config
        logps = answer_logps(model, batch)
        ref = self.reference_logps(batch, split)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.float().chunk(2)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = dpo_loss(h, c.loss, c.beta, c.label_smoothing).mean()
        metrics = pair_metrics(c.beta * (chosen - ref_chosen).detach(), c.beta * (rejected - ref_rejected).detach())
        metrics.update(logp_chosen=chosen.detach().mean(), logp_rejected=rejected.detach().mean())
        return loss, metrics

    def format_eval(self, record: dict) -> str:
        if record["val_reward_chosen"] == 0 and record["val_reward_rejected"] == 0:
            accuracy = "n/a (the policy is still its reference)"  # every implicit reward is 0: a tie, counted wrong
        else:
            accuracy = f"{record['val_reward_accuracy']:.4f}"
        return (f"val loss {record['val_loss']:.4f}, preference accuracy {accuracy}, "
                f"margin {record['val_reward_margin']:.4f}, log p chosen {record['val_logp_chosen']:.2f}, "
                f"rejected {record['val_logp_rejected']:.2f}")


# -- the Python API -----------------------------------------------------------------------------


def _run(objective, cls, config, resume: bool, overwrite: bool, progress: bool, overrides: dict) -> dict:
    config = resolve_config(config, resume, overrides, cls=cls)
    pairs = read_pairs(config.train, config.skip_bad_lines)
    if pairs.skipped:
        warn(f"skipped {pairs.skipped} malformed pair(s) of {config.train} (lines {pairs.skipped_lines[:5]}"
             f"{' ...' if pairs.skipped > 5 else ''})")
    return train(config, lambda c, device, ckpt: objective(c, device, ckpt, pairs), resume=resume,
                 overwrite=overwrite, progress=progress, fixed_on_resume=FIXED_ON_RESUME + ("reference", "loss"))


def train_reward(config: RewardConfig | dict | str | os.PathLike | None = None, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, **overrides) -> dict:
    """Train a reward model on preference pairs; returns the loop's summary (run folder, last evaluation, ...)."""
    return _run(RewardModel, RewardConfig, config, resume, overwrite, progress, overrides)


def dpo(config: DPOConfig | dict | str | os.PathLike | None = None, *, resume: bool = False,
        overwrite: bool = False, progress: bool = True, **overrides) -> dict:
    """Train a causal LM on preference pairs with DPO (or IPO, cDPO); returns the loop's summary."""
    return _run(DPO, DPOConfig, config, resume, overwrite, progress, overrides)


@torch.no_grad()
def reward_scores(model, rows: list[dict], tokenizer: Tokenizer | None = None, batch_size: int = 16,
                  max_length: int | None = None, device=None, source: str = "", say_cut: bool = False,
                  lines: list[int] | None = None) -> list[float]:
    """Rewards of ``rows`` ``{"prompt", "answer"}`` (strings or message lists) from a reward model: a folder
    (a model, an adapter or a run) or a loaded model; batched. A prompt too long is cut from the left (with
    ``say_cut``, said in a warning). ``source``: the rows' file, and ``lines`` each row's line in it, named in
    errors (without them: the row's position in ``rows``)."""
    from lmforge.model.checkpoint import load_tokenizer_for

    if not isinstance(model, torch.nn.Module):
        model = load_model(model, device or "cpu")
    c = model.config
    if getattr(c, "head", None) != "sequence_classification" or getattr(c, "num_labels", None) != 1:
        raise LmforgeError(f"{getattr(model, 'source', 'the model')} is not a reward model (a sequence classification "
                           f"head with one output); train one with `lmforge reward`")
    tokenizer = tokenizer or load_tokenizer_for(model)
    model.eval()
    device = next(model.parameters()).device
    limit = min(max_length or c.block_size, c.block_size)
    stats = TokenizeStats()
    inputs = []
    cut = 0
    def place(i: int) -> str:
        if lines is not None and source:
            return f"{source}:{lines[i]}"
        return f"{source} row {i + 1}" if source else f"row {i + 1}"

    for i, row in enumerate(rows):
        row = _scoring_row(row, place(i))
        if isinstance(model, Encoder):
            ids, types, prompt_len = encoder_input(tokenizer, row["prompt"], row["answer"])
            excess = len(ids) - limit
            if excess > 0:
                if excess >= prompt_len:
                    raise LmforgeError(f"{place(i)}: the answer alone is longer than {limit} tokens")
                ids, types = ids[:1] + ids[1 + excess:], types[:1] + types[1 + excess:]
                cut += 1
            inputs.append((ids, types))
            continue
        prompt_ids, (answer,) = encode_answers(tokenizer, row["prompt"], [row["answer"]], stats)
        excess = len(prompt_ids) + len(answer) - limit
        if excess >= len(prompt_ids):
            raise LmforgeError(f"{place(i)}: the answer alone is longer than {limit} tokens")
        cut += excess > 0
        inputs.append((prompt_ids[max(excess, 0):] + answer, None))
    if cut and say_cut:
        from lmforge.utils import warn

        warn(f"{cut} of {len(rows)} prompt(s) with their answer exceed the reward model's {limit} tokens: their "
             f"prompts were cut from the left (their start dropped)")
    scores = []
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        ids = _pad([x[0] for x in chunk], pad).to(device)
        if isinstance(model, Encoder):
            lengths = torch.tensor([len(x[0]) for x in chunk], device=device)
            mask = (torch.arange(ids.size(1), device=device)[None] < lengths[:, None]).long()
            out = model(ids, mask, _pad([x[1] for x in chunk], 0).to(device)).logits
        else:  # only the scored positions through the last block: each row's own last token (as in training,
            # ``packed_pairs``), found in the row before it was padded, so any pad id (or none) reads the same
            last = torch.tensor([_last_real(x[0], c.pad_token_id) for x in chunk], device=device)
            out = model(ids, keep=last[:, None])
        scores += out.flatten(1).float().squeeze(-1).tolist()
    return scores


def scoring_problem(row) -> str | None:
    """What is wrong with a ``{"prompt", "answer"}`` row to score (None when it is fine): strings, or a message-list
    prompt with a string (the assistant's reply) or message-list answer."""
    from lmforge.data.corpus import json_type
    from lmforge.data.preference import _messages_problem

    if not isinstance(row, dict):
        return f"expected a JSON object {{\"prompt\": ..., \"answer\": ...}}, got {json_type(row)}"
    missing = [k for k in ("prompt", "answer") if k not in row]
    if missing:
        return f"missing field {', '.join(map(repr, missing))}; expected {{\"prompt\": ..., \"answer\": ...}}"
    prompt, answer = row["prompt"], row["answer"]
    if isinstance(prompt, list):
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        return _messages_problem(prompt, "prompt") or _messages_problem(answer, "answer")
    if not isinstance(prompt, str):
        return f"'prompt' must be a string or a list of messages, not {json_type(prompt)}"
    if not isinstance(answer, str):
        return f"'answer' must be a string (or, after a list of messages, a list of messages), not {json_type(answer)}"
    return None


def _scoring_row(row, where: str) -> dict:
    """``row`` checked (``scoring_problem``, said at ``where``), its answer to a message-list prompt as messages."""
    problem = scoring_problem(row)
    if problem:
        raise LmforgeError(f"{where}: {problem}")
    prompt, answer = row["prompt"], row["answer"]
    if isinstance(prompt, list) and isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    return {"prompt": prompt, "answer": answer}


__all__ = ["RewardModel", "DPO", "train_reward", "dpo", "reward_scores", "dpo_loss", "answer_logps", "TokenizedPair"]
