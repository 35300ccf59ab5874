"""`lmforge rl`: reinforcement learning from a reward, through the same loop as every other objective.

A batch stream of rollouts feeds the loop. Each rollout (per process) samples ``num_generations``
completions for each of its prompts with lmforge's engine from the current weights (sequence seeds
from (seed, prompt position), so a resumed run samples the same), scores them (rewards.py), and
computes what the losses need with the policy frozen: its per-token log-probabilities (π_old), the
reference's, the critic's values, the advantages. The rollout then serves ``ppo_epochs x minibatches``
optimizer steps, each of ``grad_accum_steps`` micro-batches; the buffer is saved in every checkpoint.

    ppo        InstructGPT-style RLHF: per-token reward -β·KL(π_old‖π_ref) (k1 or k3), the score added at
               the last token, GAE(γ, λ), whitened advantages, the clipped surrogate
               -min(ρ·Â, clip(ρ, 1-ε, 1+ε)·Â), a critic with a clipped value loss, an optional adaptive
               β (Ziegler et al., 2019). The critic is a copy of the reward model or of the policy with a
               value head, or a value head on the policy's own trunk.
    grpo       G completions per prompt; Â = (r - mean_group) / std (group, batch or none); the clipped
               surrogate with separate low/high ε; β·k3 KL to the reference in the loss (always k3, as TRL's;
               the logged kl is k3's mean over the rollout's completion tokens, as TRL logs it). Normalisations:
               grpo (mean over each completion's tokens, then over completions), dr_grpo (sum over tokens
               / max_new_tokens, then mean), bnpo and dapo (mean over every token of the optimizer step;
               in lmforge the two coincide, since the loop always normalises over the whole step: TRL's
               bnpo normalises each process's micro-batch, which depends on the batch layout).
    rloo       REINFORCE with the leave-one-out baseline: Â_i = r_i - mean_{j≠i} r_j, r including -β·KL (the
               kl_estimator's sum over the completion); the loss is the clipped surrogate of the whole
               completion, as TRL's RLOOTrainer: -min(ρ_i·Â_i, clip(ρ_i, 1-ε_low, 1+ε_high)·Â_i) with the
               sequence ratio ρ_i = exp(Σ_t log π(y_t) - Σ_t log π_old(y_t)), a mean over completions.
    reinforce  the same with a moving-average baseline b ← d·b + (1-d)·mean(r): the seeds' "IFT",
               ∇θ = E[(f(x, y) - b) ∇θ log p_θ(y|x)]; its advantage belongs to the whole completion too, so
               it takes the same sequence-level surrogate.

With one pass over each rollout (GRPO, RLOO and REINFORCE by default) the ratio ρ is 1 and the clipped
surrogate's gradient is the plain policy gradient (for RLOO and REINFORCE -Â_i ∇ log π(y_i|x), the loss's
value -mean(Â)). With several (ppo_epochs or minibatches > 1) RLOO and REINFORCE clip each completion's
ratio once, not each token's: a completion whose probability ratio to π_old left [1-ε_low, 1+ε_high] in
its advantage's direction gets no more gradient.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.data.corpus import json_type
from lmforge.data.examples import _raw_rows, messages_problem
from lmforge.data.preference import Pairs, encode_prompt
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, end_tokens, record_end_of_turn
from lmforge.model.checkpoint import load_model, model_kind, save_model
from lmforge.model.gpt import GPT
from lmforge.model.heads import attach_head
from lmforge.model.lora import adapters_off, save_adapter
from lmforge.train.config import RLConfig
from lmforge.train.finetune import FIXED_ON_RESUME, Finetune, _pad
from lmforge.train.loop import Distributed, resolve_config, train
from lmforge.train.rewards import parse_rewards, row_problem, score, user_functions
from lmforge.utils import stop_strings, warn

# -- prompts ------------------------------------------------------------------------------------


def check_prompt(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {json_type(row)}"
    if "prompt" not in row:
        return "missing field 'prompt'"
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return None if prompt.strip() else "'prompt' is empty"
    if isinstance(prompt, list) and prompt:
        return messages_problem(prompt, "prompt")  # (the message, and what is wrong with it)
    return (f"'prompt' must be a string or a non-empty list of {{\"role\", \"content\"}} messages, not "
            f"{json_type(prompt)}")


def read_prompts(path: str | os.PathLike, skip_bad_lines: bool = False) -> Pairs:
    """Prompt rows ``{"prompt": text or messages, ...}``; the other fields go to the reward."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} " + ("is a folder: give the .jsonl, .csv or .parquet file in it"
                                                      if path.is_dir() else "does not exist"))
    out = Pairs([], str(path), task="prompts")
    for number, row in _raw_rows(path):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].startswith("[{"):
            try:
                row["prompt"] = json.loads(row["prompt"])  # a CSV cell
            except json.JSONDecodeError:
                pass
        problem = row if isinstance(row, str) else check_prompt(row)
        if problem is None:
            out.rows.append(row)
            out.lines.append(number)
            continue
        if not skip_bad_lines:
            raise LmforgeError(f"{path}:{number}: {problem}; expected {{\"prompt\": \"...\"}} (or pass --skip-bad-lines)")
        out.skipped += 1
        out.skipped_lines.append(number)
    if not out.rows:
        raise LmforgeError(f"{path} holds no usable prompts" + (f" ({out.skipped} skipped as malformed)" if out.skipped else ""))
    return out


# -- the mathematics ----------------------------------------------------------------------------


def token_kl(logp: torch.Tensor, ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π: k1 = log π - log π_ref; k3 = e^{-k1} + k1 - 1
    (unbiased and never negative; Schulman's "Approximating KL divergence")."""
    log_ratio = logp - ref
    if estimator == "k1":
        return log_ratio
    return torch.exp(-log_ratio) + log_ratio - 1


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) completions whose tokens fill each row's first
    ``mask.sum(1)`` places: δ_t = r_t + γ·V_{t+1} - V_t (V after the last token is 0), Â_t = δ_t + γλ·Â_{t+1}.
    Returns (advantages, returns = advantages + values), zero outside ``mask``."""
    mask = mask.float()
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, group: int, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's std ("group"), the batch's ("batch")
    or nothing ("none"); groups are consecutive runs of ``group`` completions."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "group":
        return centred / (grouped.std(1).repeat_interleave(group) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def leave_one_out(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO: r_i - mean of the other completions of the same prompt."""
    grouped = rewards.view(-1, group)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).flatten()


def clipped_surrogate(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token loss -min(ρÂ, clip(ρ, 1-ε_low, 1+ε_high)Â), ρ = π/π_old, and where the clip is active
    (there the gradient is zero)."""
    ratio = torch.exp(logp - old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, dist_: Distributed | None = None) -> torch.Tensor:
    """x to mean 0 and std 1 over the ``mask``ed entries (of every process)."""
    m = mask.float()
    sums = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    if dist_ is not None:
        sums = dist_.all_sum(sums)
    mean = sums[0] / sums[2]
    var = (sums[1] / sums[2] - mean * mean) * sums[2] / max(sums[2] - 1, 1)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype) * m


def segment_sum(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, rows, values)


# -- the models being trained ---------------------------------------------------------------------


class ActorCritic(nn.Module):
    """PPO's policy with its critic: a separate model with a value head, or a head on the policy's trunk."""

    def __init__(self, policy: GPT, critic: GPT | None = None, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    @property
    def config(self):
        return self.policy.config

    def forward(self, ids: torch.Tensor, select: torch.Tensor, policy_only: bool = False):
        """(policy logits, values) at the ``select``ed positions; the logits alone with ``policy_only`` (the
        reference pass of LoRA: under FSDP every pass goes through this root module, which gathers the weights)."""
        if policy_only:
            return self.policy(ids, select=select)
        # (the values are returned as tensors of their own, not views: FSDP warns of views, which an in-place
        # operation would cut from its backward hook)
        if self.value_head is not None:
            hidden = self.policy.hidden_states(ids)[select]
            return self.policy.lm_logits(hidden), self.value_head(hidden).squeeze(-1).clone()
        logits = self.policy(ids, select=select)
        return logits, self.critic.score(self.critic.hidden_states(ids)[select]).squeeze(-1).clone()


# -- rollouts as the loop's batches -----------------------------------------------------------------


class RolloutStream:
    """Micro-batches cut from rollouts: a rollout is made when the last one has served its steps."""

    def __init__(self, objective: RL, rank: int, world_size: int):
        c = objective.config
        self.objective, self.rank, self.world_size = objective, rank, world_size
        self.micro = c.micro_batch_size
        self.per_pass = c.grad_accum_steps * c.minibatches  # micro-batches in one pass over a rollout
        self.per_rollout = self.per_pass * c.epochs_per_rollout
        self.rows = self.micro * self.per_pass
        self.seed = c.seed
        self.rollout, self.served, self.buffer = 0, 0, None

    def next_batch(self, device):
        if self.buffer is None or self.served == self.per_rollout:
            self.buffer = self.objective.make_rollout(self.rollout, self.rank, self.world_size, self.rows)
            self.rollout += 1
            self.served = 0
        epoch, within = divmod(self.served, self.per_pass)
        order = np.random.default_rng([self.seed, self.rollout - 1, epoch]).permutation(self.rows)
        self.served += 1
        return self.objective.micro_batch(self.buffer, order[within * self.micro : (within + 1) * self.micro], device)

    def state_dict(self) -> dict:
        """With every rank's rollout buffer while it still has steps to serve (gathered to rank 0, which writes the
        checkpoint: all ranks call this)."""
        middle = self.buffer is not None and self.served < self.per_rollout
        return {"seed": self.seed, "rollout": self.rollout, "served": self.served, "per_rollout": self.per_rollout,
                "buffers": self.objective.dist.gather_to_main(self.buffer) if middle else [],
                "objective": self.objective.rl_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.rollout, self.served = int(state["seed"]), int(state["rollout"]), int(state["served"])
        self.objective.load_rl_state(state["objective"])
        buffers = state["buffers"] if "buffers" in state else [state["buffer"]]  # (checkpoints of one process)
        if self.served == state.get("per_rollout", self.per_rollout) or not buffers:  # the next step makes one
            self.buffer, self.served = None, self.per_rollout
        elif len(buffers) == self.world_size:
            self.buffer = buffers[self.rank]
        else:
            raise LmforgeError(
                f"the checkpoint was saved by {len(buffers)} process(es) in the middle of a rollout, whose "
                f"completions were sampled by each of them; resume it on {len(buffers)} process(es), or resume "
                f"on {self.world_size} from a checkpoint saved at the end of a rollout (every "
                f"{self.objective.config.minibatches * self.objective.config.epochs_per_rollout} steps)")


# -- the objective --------------------------------------------------------------------------------


class RL(Finetune):
    task = "rl"
    defers_model = False  # rollouts run the model as it is built

    def __init__(self, config: RLConfig, device, checkpoint, prompts):
        self.checkpoint = checkpoint
        self.autocast = None  # set by the loop: rollouts compute log-probs in the training precision
        super().__init__(config, device, checkpoint, prompts)

    def read_val(self, path: str, task: str) -> list:
        return read_prompts(path, self.config.skip_bad_lines).rows

    def load(self, checkpoint):
        model = super().load(checkpoint)
        if not isinstance(model, GPT) or model.score is not None:
            what = model_kind(model) if not isinstance(model, GPT) else "a classifier or reward model (it has a score head)"
            raise LmforgeError(f"RL trains a causal language model; {self.config.model} is {what}")
        return model

    # setup ------------------------------------------------------------------------------------

    def setup(self, train_rows: list, val_rows: list) -> None:
        c = self.config
        self.policy = self.model
        self.chat = any(isinstance(row["prompt"], list) for row in (*train_rows, *val_rows))  # (any row, not the first)
        if self.chat:
            record_end_of_turn(self.policy, self.tokenizer)
        self.prompts = self.encode(train_rows, "training")
        self.val_prompts = self.encode(val_rows, "validation")
        self.n_train, self.n_val = len(self.prompts), len(self.val_prompts)
        self.rewards = parse_rewards(c.reward, c.reward_weights, self.device)
        self.beta = c.beta
        self.baseline: float | None = None
        self.ref_model = None
        self.uses_reference = self.beta > 0 or c.target_kl > 0
        if self.uses_reference and c.method != "lora":
            self.ref_model = self.frozen(load_model(c.model, self.device))
        if c.algo == "ppo":
            self.model = self.actor_critic()
        self.rollout_stats: dict[str, float] = {}
        # the policy's structure without memory: the rollout copy is made from it (see rollout_model)
        from lmforge.train.distributed import meta_twin

        self._policy_twin, self._rollout_copies = meta_twin(self.policy), {}
        self.samples_every = max(1, c.sample_interval // (c.epochs_per_rollout * c.minibatches))

    def encode(self, rows: list, split: str) -> list[dict]:
        keep = self.block_size - self.config.max_new_tokens
        if keep < 1:
            raise LmforgeError(f"max_new_tokens {self.config.max_new_tokens} leaves no room for a prompt in the "
                               f"model's context of {self.block_size}")
        out, cut = [], 0
        ends = end_tokens(self.policy, self.tokenizer)  # (where generation ends too: the tokenizer's and the model's)
        for row in rows:
            _, ids, end = encode_prompt(self.tokenizer, row["prompt"])
            if len(ids) > keep:
                ids, cut = ids[-keep:], cut + 1
            stops = sorted({t for t in (end, *ends) if t is not None})
            out.append({"ids": ids, "row": row, "stops": stops})
        if cut:
            print(f"{split} prompts: {cut} cut from the left to leave {self.config.max_new_tokens} new tokens in the "
                  f"context", flush=True)
        return out

    @staticmethod
    def frozen(model):
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def actor_critic(self) -> ActorCritic:
        c = self.config
        critic = c.critic
        models = [r.name.removeprefix("model:") for r in self.rewards if r.batch_fn is not None]
        if critic == "auto":
            critic = "reward" if len(models) == 1 else "policy"
        saved = self.checkpoint / "model" if self.checkpoint is not None else None
        if critic == "shared":
            head = nn.Linear(self.policy.config.n_embd, 1, device=self.device)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            if saved is not None:
                from safetensors.torch import load_file

                head.load_state_dict(load_file(saved / "value_head.safetensors", device=str(self.device)))
            return ActorCritic(self.policy, value_head=head)
        if saved is not None:
            model = load_model(saved / "critic", self.device)
        elif critic == "reward":
            if len(models) != 1:
                raise LmforgeError("--critic reward needs exactly one reward model among the rewards; use --critic policy")
            model = load_model(models[0], self.device)
            from lmforge.model.checkpoint import load_tokenizer_for

            if load_tokenizer_for(model).sha256 != self.tokenizer.sha256:
                raise LmforgeError(f"the reward model {models[0]} has another tokenizer than the policy, so it cannot be "
                                   f"its critic; use --critic policy")
        else:
            model = load_model(c.model, self.device)
            pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
            attach_head(model, "sequence_classification", 1, ("value",), pad)
        for p in model.parameters():
            p.requires_grad_(True)
        from lmforge.train.finetune import set_dropout

        return ActorCritic(self.policy, critic=set_dropout(model, c.dropout).train())

    # rollouts ---------------------------------------------------------------------------------

    def rl_state(self) -> dict:
        return {"beta": self.beta, "baseline": self.baseline}

    def load_rl_state(self, state: dict) -> None:
        self.beta, self.baseline = float(state["beta"]), state["baseline"]

    def batches(self, rank: int, world_size: int):
        self.dist = Distributed(rank, world_size)
        return RolloutStream(self, rank, world_size)

    def prompt_order(self, epoch: int) -> np.ndarray:
        """The prompts of pass ``epoch`` over the file, in a seeded order."""
        if getattr(self, "_order", (None,))[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.config.seed, 1_000_003, epoch]).permutation(self.n_train))
        return self._order[1]

    def generate(self, prompts: list[dict], first: int, greedy: bool = False) -> list[dict]:
        """Completions (``num_generations`` per prompt, or one greedy) from the current weights."""
        from lmforge.infer.sampling import SamplingParams

        c = self.config
        n = 1 if greedy else c.num_generations
        stops = stop_strings(c.stop, several=True)
        # the cache holds the longest prompt and its completion, not the whole context
        longest = max(len(p["ids"]) for p in prompts) + c.max_new_tokens
        rows = max(n, min(len(prompts) * n, 64))
        engine = Engine(self.rollout_model(rows), self.tokenizer, max_batch=rows, max_len=longest, text_as_it_comes=False)
        requests = []
        for j, p in enumerate(prompts):
            params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=0.0 if greedy else c.temperature,
                                    top_k=c.top_k, top_p=c.top_p, stop=stops, stop_token_ids=p["stops"], n=n,
                                    seed=None if greedy else (c.seed * 1_000_003 + (first + j) * n) % (2**62),
                                    # the text rewards read leaves special tokens out, as TRL decodes completions
                                    skip_special_tokens=True)
            requests.append(engine.add(list(p["ids"]), params))
        engine.run(requests)
        out = []
        for p, request in zip(prompts, requests):
            for s in request.sequences:
                tokens = s.tokens + ([s.stop_token] if s.stop_token is not None else [])
                out.append({"prompt": p, "tokens": tokens, "text": s.text, "truncated": s.finish_reason == "length"})
        return out

    def rollout_model(self, rows: int) -> GPT:
        """The model the engine samples from: the policy itself, or a copy of its current weights

        - in bf16, when training runs in bf16 autocast and bf16 products of the rollout's shape (``rows``
          sequences) are measured faster here (always on a GPU): completions are then drawn from the rounding
          of the weights that the bf16 training pass scores them with, at half the memory traffic (2x the
          tokens/s of fp32 for the gpt2 shape at 32 rows on a 2-core Xeon with AMX);
        - whole on every rank, under FSDP: each rank samples completions of lengths of its own, and a sharded
          model's every forward pass is a collective that all ranks would have to make together. The weights
          are gathered once a rollout (every rank calls this at the same points), at the cost of one whole
          copy of the policy per rank while training runs (in bf16 where the rule above says so).

        A copy's products run through the kernels measured fastest here (``gpt.use_fast_kernels``): on the CPU,
        weights packed into oneDNN's layout where that is measured fastest, packed again from the policy's at
        each rollout."""
        sharded = any(hasattr(p, "full_tensor") for p in self.policy.parameters())
        dtype = torch.bfloat16 if self.bf16_rollouts(rows) else None
        if not sharded and dtype is None:
            return self.policy
        copy = self._rollout_copies.get(dtype)  # (one per precision: the choice may differ by the rollout's rows)
        made = copy is None
        if made:
            import copy as copying

            copy = copying.deepcopy(self._policy_twin).to_empty(device=self.device)
            copy = (copy.to(dtype) if dtype is not None else copy).requires_grad_(False).eval()
            self._rollout_copies[dtype] = copy
        from lmforge.model.gpt import use_fast_kernels
        from lmforge.precision import pack_weight
        from lmforge.train.distributed import full_value

        hint = min(rows, 16)  # (oneDNN's layout hint, as ``use_fast_kernels`` gives it)
        with torch.no_grad():
            for (name, mine), theirs in zip([*copy.named_parameters(), *copy.named_buffers()],
                                            [*self.policy.parameters(), *self.policy.buffers()], strict=True):
                value = full_value(theirs.detach())
                if mine.layout == torch._mkldnn:  # packed for oneDNN (below): packed again from the new values
                    module = copy.get_submodule(name.rpartition(".")[0])
                    module.weight = torch.nn.Parameter(pack_weight(value.to(mine.dtype), hint), requires_grad=False)
                else:
                    mine.copy_(value)
            if copy.packed_head is not None:  # (a tied head's packed copy of the embedding)
                copy.packed_head = pack_weight(copy.wte.weight, hint)
        if made:  # the kernels measured fastest here for the copy's precision (bf16: its weights packed)
            use_fast_kernels(copy, rows)
        return copy

    def bf16_rollouts(self, rows: int) -> bool:
        if getattr(self.autocast, "fast_dtype", None) != torch.bfloat16:
            return False
        if self.device.type == "cpu":
            from lmforge.precision import MARGIN, measure

            shape = self.policy.config
            return measure("matmul", shape.n_embd, shape.hidden, rows).get("bfloat16", 0.0) >= MARGIN
        return True

    def score(self, completions: list[dict]) -> tuple[torch.Tensor, dict[str, list[float]], int]:
        c = self.config
        rows = [x["prompt"]["row"] for x in completions]
        totals, parts, errors = score(self.rewards, [r["prompt"] for r in rows], [x["text"] for x in completions], rows,
                                      c.reward_errors, c.error_penalty)
        rewards = torch.tensor(totals, dtype=torch.float32)
        if c.missing_eos_penalty:
            rewards -= c.missing_eos_penalty * torch.tensor([float(x["truncated"]) for x in completions])
        return rewards, parts, errors

    @torch.no_grad()
    def make_rollout(self, index: int, rank: int, world_size: int, rows: int) -> dict:
        c = self.config
        G = c.num_generations
        per_rank = rows // G
        first = (index * world_size + rank) * per_rank  # global position of this rank's first prompt
        prompts = []
        for g in range(first, first + per_rank):
            epoch, pos = divmod(g, self.n_train)
            prompts.append(self.prompts[int(self.prompt_order(epoch)[pos])])
        t0 = time.perf_counter()
        completions = self.generate(prompts, first)
        t1 = time.perf_counter()
        rewards, parts, errors = self.score(completions)
        t2 = time.perf_counter()
        buffer = self.tensors(completions)
        self.frozen_pass(buffer)
        self.advantages(buffer, rewards)
        self.model.train()
        t3 = time.perf_counter()
        stats = self.rollout_statistics(buffer, completions, rewards, parts, errors)
        stats.update({"kl_coef": self.beta, "generation_seconds": t1 - t0, "scoring_seconds": t2 - t1,
                      "preparation_seconds": t3 - t2, "samples_per_second": len(completions) / (t3 - t0)})
        self.rollout_stats = stats
        buffer["stats"] = torch.tensor(list(stats.values()), dtype=torch.float64)
        buffer["stat_names"] = list(stats)
        kl = stats.get("kl")
        if kl is not None and c.algo == "grpo":  # (target_kl is a KL per completion: the per-token mean x mean length)
            kl *= stats["completion_length"]
        self.adapt_beta(kl, len(completions) * world_size)
        if rank == 0 and index % self.samples_every == 0:
            self.write_samples(index, completions, rewards)
        return buffer

    def rollout_statistics(self, buffer: dict, completions: list[dict], rewards: torch.Tensor,
                           parts: dict[str, list[float]], errors: int) -> dict[str, float]:
        """The rollout's rewards, lengths, KL and the critic's explained variance over every process's
        completions (sums all-reduced, so 2 processes log what 1 would)."""
        names = ["count", "reward", "reward_sq", "length", "truncated", "errors"]
        values = [len(rewards), rewards.sum(), (rewards ** 2).sum(), buffer["cmask"].sum(),
                  sum(x["truncated"] for x in completions), errors]
        if len(parts) > 1:
            names += [f"reward_{key}" for key in parts]
            values += [sum(v) for v in parts.values()]
        for key in ("kl", "explained_variance_sums"):
            if key in buffer:
                extra = buffer.pop(key).double()
                names += [f"{key}{i}" for i in range(extra.numel())] if key != "kl" else ["kl"]
                values += list(extra.reshape(-1)) if key != "kl" else [extra.sum()]
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist_ = getattr(self, "dist", None)
        if dist_ is not None:
            totals = dist_.all_sum(totals)
        t = dict(zip(names, totals.tolist()))
        n = t["count"]
        mean = t["reward"] / n
        stats = {"reward_mean": mean,
                 "reward_std": math.sqrt(max(t["reward_sq"] - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0}
        stats.update({k: t[k] / n for k in names if k.startswith("reward_") and k != "reward_sq"})
        stats.update(completion_length=t["length"] / n, truncated_share=t["truncated"] / n, reward_errors=t["errors"])
        if "kl" in t:
            # GRPO: k3's mean over every completion token, as TRL's GRPOTrainer logs the KL its loss holds;
            # the others: the KL estimate of a completion (the sum over its tokens), as their reward holds it
            stats["kl"] = t["kl"] / t["length"] if self.config.algo == "grpo" else t["kl"] / n
        if "explained_variance_sums0" in t:
            res, res_sq, ret, ret_sq, tokens = (t[f"explained_variance_sums{i}"] for i in range(5))
            var = lambda s1, s2: (s2 - s1 * s1 / tokens) / max(tokens - 1, 1)  # noqa: E731
            stats["explained_variance"] = 1 - var(res, res_sq) / max(var(ret, ret_sq), 1e-8)
        return stats

    def tensors(self, completions: list[dict]) -> dict:
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else (self.tokenizer.eos_id or 0)
        seqs = [x["prompt"]["ids"] + x["tokens"] for x in completions]
        lengths = torch.tensor([len(x["tokens"]) for x in completions])
        width = int(lengths.max())
        return {"ids": _pad(seqs, pad), "starts": torch.tensor([len(x["prompt"]["ids"]) for x in completions]),
                "lengths": torch.tensor([len(s) for s in seqs]),
                "cmask": torch.arange(width)[None] < lengths[:, None]}

    def learned(self, starts: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Positions whose next token is a completion token: start-1 .. length-2 of each row."""
        position = torch.arange(width)[None]
        return (position >= starts[:, None] - 1) & (position <= lengths[:, None] - 2)

    @property
    def on_policy(self) -> bool:
        """Each rollout serves one optimizer step and nothing but the loss needs π_old: the loss then takes
        π_old as the policy's own log-probabilities, detached (ratio exactly 1, the gradient A·∇log π), and
        the no-grad pass over the rollout is skipped, as TRL does with one iteration."""
        c = self.config
        return c.algo != "ppo" and not self.uses_reference and c.epochs_per_rollout * c.minibatches == 1

    def frozen_pass(self, buffer: dict) -> None:
        """π_old, π_ref and the critic's values of every completion token, in the training precision."""
        c = self.config
        if self.on_policy:
            return
        N, Tc = buffer["cmask"].shape
        old = torch.zeros(N, Tc)
        ref = torch.zeros(N, Tc) if self.uses_reference else None
        values = torch.zeros(N, Tc) if c.algo == "ppo" else None
        self.model.eval()
        with self.holding_casts():  # (the weights' bf16 copies: once for the pass, not once a micro-batch)
            self._frozen_passes(buffer, old, ref, values)
        buffer["old_logp"] = old
        if ref is not None:
            buffer["ref_logp"] = ref
        if values is not None:
            buffer["values"] = values

    def _frozen_passes(self, buffer: dict, old: torch.Tensor, ref: torch.Tensor | None, values: torch.Tensor | None):
        c = self.config
        N = buffer["cmask"].size(0)
        for i in range(0, N, c.micro_batch_size):
            rows = torch.arange(i, min(i + c.micro_batch_size, N))
            batch = self.micro_batch(buffer, rows, self.device, frozen=True)
            cmask = buffer["cmask"][rows]
            with self.autocast_context():
                logp, value = self.policy_pass(self.model, batch)
                old[rows] = _scatter(logp, cmask)
                if value is not None:
                    values[rows] = _scatter(value, cmask)
                if ref is not None:
                    if self.ref_model is not None:
                        ref_logp = _answer_logp(self.ref_model(batch["ids"], select=batch["learned"]) / c.temperature,
                                                batch["labels"])
                    else:
                        with adapters_off(self.policy):
                            kwargs = {"policy_only": True} if isinstance(self.model, ActorCritic) else {}
                            ref_logp = _answer_logp(self.model(batch["ids"], select=batch["learned"], **kwargs)
                                                    / c.temperature, batch["labels"])
                    ref[rows] = _scatter(ref_logp, cmask)

    def autocast_context(self):
        return self.autocast if self.autocast is not None else nullcontext()

    def advantages(self, buffer: dict, rewards: torch.Tensor) -> None:
        c = self.config
        cmask = buffer["cmask"]
        kl_tokens = None
        if "ref_logp" in buffer:
            # GRPO's loss penalises β·k3 of each token (logged as its per-token mean, see rollout_statistics); the
            # others shape the reward with the kl_estimator's sum over each completion
            estimator = "k3" if c.algo == "grpo" else c.kl_estimator
            kl_tokens = token_kl(buffer["old_logp"], buffer["ref_logp"], estimator) * cmask
            buffer["kl"] = kl_tokens.sum(1)
        G = c.num_generations
        dist_ = getattr(self, "dist", None)
        if c.algo == "ppo":
            lengths = cmask.sum(1)
            token_rewards = -self.beta * kl_tokens if kl_tokens is not None else torch.zeros_like(buffer["old_logp"])
            token_rewards[torch.arange(len(rewards)), lengths - 1] += rewards
            adv, returns = gae(token_rewards, buffer["values"], cmask, c.gamma, c.lam)
            if c.whiten_advantages:
                adv = masked_whiten(adv, cmask, dist_)
            buffer["advantages"], buffer["returns"] = adv, returns
            residual, kept = (returns - buffer["values"])[cmask].double(), returns[cmask].double()
            buffer["explained_variance_sums"] = torch.stack([residual.sum(), (residual ** 2).sum(), kept.sum(),
                                                             (kept ** 2).sum(), torch.tensor(float(kept.numel()))])
            return
        if c.algo == "grpo":
            if c.scale_rewards == "batch" and dist_ is not None and dist_.enabled:
                centred = group_advantages(rewards, G, "none")
                sums = dist_.all_sum(torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(len(rewards)))]).double())
                mean = sums[0] / sums[2]
                std = ((sums[1] / sums[2] - mean ** 2) * sums[2] / (sums[2] - 1)).clamp(min=0).sqrt()
                seq_adv = centred / (std.float() + 1e-4)
            else:
                seq_adv = group_advantages(rewards, G, c.scale_rewards)
        else:
            shaped = rewards - self.beta * buffer["kl"] if kl_tokens is not None and self.beta > 0 else rewards
            if c.algo == "rloo":
                seq_adv = leave_one_out(shaped, G)
            else:  # reinforce: a moving-average baseline, the same on every process
                mean = shaped.mean()
                if dist_ is not None and dist_.enabled:
                    mean = dist_.all_sum(mean.double().reshape(1))[0].float() / dist_.world_size
                if self.baseline is None:
                    self.baseline = float(mean)
                seq_adv = shaped - self.baseline
                self.baseline = c.baseline_decay * self.baseline + (1 - c.baseline_decay) * float(mean)
        buffer["advantages"] = seq_adv[:, None].expand_as(cmask).float() * cmask

    def adapt_beta(self, kl: float | None, completions: int) -> None:
        """Ziegler et al.'s proportional controller: β moves toward the value that keeps the KL at target_kl."""
        c = self.config
        if c.target_kl > 0 and kl is not None:
            error = max(-0.2, min(0.2, kl / c.target_kl - 1))
            self.beta *= 1 + error * completions / c.kl_horizon

    def write_run_files(self, out: Path) -> None:
        """On resume, drop the samples of rollouts made after the checkpoint: they are made again."""
        path = out / "samples.jsonl"
        if self.checkpoint is None or not path.exists():
            return
        from lmforge.utils import atomic_write_text

        step = int(self.checkpoint.name.rsplit("_", 1)[-1])

        def before(line: str) -> bool:  # (a line cut short by a killed run is no sample: dropped too)
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(sample, dict) and isinstance(sample.get("step", 0), int) and sample.get("step", 0) < step

        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and before(line)]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write_samples(self, index: int, completions: list[dict], rewards: torch.Tensor) -> None:
        c = self.config
        step = index * c.epochs_per_rollout * c.minibatches
        out = Path(c.out)
        if not out.is_dir():
            return
        with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
            for x, r in list(zip(completions, rewards.tolist()))[: 2 * c.num_generations]:
                f.write(json.dumps({"step": step, "prompt": x["prompt"]["row"]["prompt"], "completion": x["text"],
                                    "reward": r, "truncated": x["truncated"]}, ensure_ascii=False) + "\n")

    # training ---------------------------------------------------------------------------------

    def micro_batch(self, buffer: dict, rows, device, frozen: bool = False) -> dict:
        rows = torch.as_tensor(rows, dtype=torch.long)
        starts, lengths = buffer["starts"][rows], buffer["lengths"][rows]
        width = int(lengths.max())
        ids = buffer["ids"][rows, :width]
        learned = self.learned(starts, lengths, width)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(learned[:, :-1], ids[:, 1:], -100)
        batch = {"ids": ids, "learned": learned, "labels": labels[learned]}
        cmask = buffer["cmask"][rows]
        batch["row_of_token"] = torch.arange(len(rows))[:, None].expand_as(cmask)[cmask]
        batch["seq_len"] = cmask.sum(1).float()
        if not frozen:
            for key in ("old_logp", "ref_logp", "advantages", "values", "returns"):
                if key in buffer:
                    batch[key] = buffer[key][rows][cmask]
            batch["stats"] = buffer["stats"]
            batch["stat_names"] = buffer["stat_names"]
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def policy_pass(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(batch["ids"], select=batch["learned"])
        logits, values = out if isinstance(out, tuple) else (out, None)
        return _answer_logp(logits / self.config.temperature, batch["labels"]), values

    def by_tokens(self) -> bool:
        c = self.config
        return c.algo == "ppo" or (c.algo == "grpo" and c.loss_norm in ("bnpo", "dapo"))

    def loss_weight(self, batch) -> float:
        return float(batch["labels"].numel()) if self.by_tokens() else float(batch["seq_len"].numel())

    def batch_tokens(self, batch) -> int:
        return int(batch["labels"].numel())

    def loss(self, model, batch):
        c = self.config
        out = model(batch["ids"], select=batch["learned"])
        logits, values = out if isinstance(out, tuple) else (out, None)
        # the distribution the rollouts sampled from: softmax(logits / temperature), for π, π_old and π_ref alike
        log_probs = F.log_softmax(logits.float() / c.temperature, -1)
        logp = log_probs.gather(-1, batch["labels"][:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        eps_high = c.clip_eps_high or c.clip_eps
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()  # (see on_policy)
        rows, n = batch["row_of_token"], batch["seq_len"].numel()
        if c.algo in ("rloo", "reinforce"):
            # the surrogate of the whole completion, as TRL's RLOOTrainer: ρ = exp(Σ log π - Σ log π_old), clipped
            # once, times the completion's advantage (every token holds it: taken from any of them)
            advantage = torch.zeros(n, device=logp.device).scatter(0, rows, batch["advantages"].float())
            per_completion, clipped = clipped_surrogate(segment_sum(logp, rows, n), segment_sum(old, rows, n),
                                                        advantage, c.clip_eps, eps_high)
            loss = per_completion.mean()
        else:
            per_token, clipped = clipped_surrogate(logp, old, batch["advantages"], c.clip_eps, eps_high)
            if c.algo == "grpo" and self.beta > 0 and "ref_logp" in batch:
                per_token = per_token + self.beta * token_kl(logp, batch["ref_logp"], "k3")
            if self.by_tokens():
                loss = per_token.mean()
            elif c.loss_norm == "grpo":
                loss = (segment_sum(per_token, rows, n) / batch["seq_len"]).mean()
            else:  # dr_grpo
                loss = (segment_sum(per_token, rows, n) / c.max_new_tokens).mean()

        def per_item(x):  # a per-token quantity, averaged over the same items as the loss
            return x.mean() if self.by_tokens() else (segment_sum(x, rows, n) / batch["seq_len"]).mean()

        metrics = {"clip_fraction": clipped.mean() if c.algo in ("rloo", "reinforce") else per_item(clipped),
                   "approx_kl": per_item(0.5 * (logp - old) ** 2), "entropy": per_item(entropy)}
        if values is not None:
            old_values, returns = batch["values"], batch["returns"]
            kept = old_values + torch.clamp(values.float() - old_values, -c.value_clip, c.value_clip)
            value_loss = 0.5 * torch.maximum((values.float() - returns) ** 2, (kept - returns) ** 2).mean()
            loss = loss + c.vf_coef * value_loss
            metrics["value_loss"] = value_loss
        stats = batch["stats"]
        metrics.update({name: stats[i].float() for i, name in enumerate(batch["stat_names"])})
        return loss, {k: v.detach() for k, v in metrics.items()}

    # evaluation and saving --------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dist_: Distributed, autocast) -> dict | None:
        if not self.val_prompts:
            return None
        completions = self.generate(self.val_prompts, 0, greedy=True)
        rewards, parts, _ = self.score(completions)
        self.policy.train()
        record = {"val_reward": rewards.mean().item(),
                  "val_completion_length": float(np.mean([len(x["tokens"]) for x in completions]))}
        if len(parts) > 1:
            record.update({f"val_reward_{key}": float(np.mean(v)) for key, v in parts.items()})
        return record

    def format_train(self, loss: float) -> str:
        # The surrogate loss is no progress measure (with one pass over a rollout and centred advantages it is
        # 0 by construction): show what the last rollout earned.
        stats = self.rollout_stats
        kl = f", KL {stats['kl']:.4f}" if "kl" in stats else ""
        return f"rollout reward {stats.get('reward_mean', float('nan')):.4f}{kl}"

    def describe(self) -> dict:
        info = super().describe()
        from lmforge.model.lora import count_trainable
        from lmforge.utils import human_count

        trainable, _ = count_trainable(self.model)
        parts = f"policy {human_count(self.policy.num_params())}"
        if isinstance(self.model, ActorCritic):
            critic = self.model.critic.num_params() if self.model.critic is not None else \
                sum(p.numel() for p in self.model.value_head.parameters())
            parts += f" + critic {human_count(critic)}" if self.model.critic is not None else " + a value head"
        info["summary"] = (f"{parts} parameters, {trainable:,} trainable; {self.config.algo} by {self.config.method}; "
                           f"{self.n_train} training / {self.n_val} validation prompts")
        return info

    def format_eval(self, record: dict) -> str:
        return f"val reward {record['val_reward']:.4f} (greedy), completion length {record['val_completion_length']:.1f}"

    def save(self, folder: Path) -> None:
        c = self.config
        tokenizer = self.save_tokenizer()
        # (self.model, not self.policy: under FSDP the loop swaps in a whole copy of self.model for saving)
        policy = self.model.policy if isinstance(self.model, ActorCritic) else self.model
        if c.method == "lora":
            save_adapter(policy, folder, c.model, tokenizer)
        else:
            save_model(policy, folder, tokenizer)
        if isinstance(self.model, ActorCritic):
            if self.model.critic is not None:
                save_model(self.model.critic, folder / "critic", tokenizer)
            else:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in self.model.value_head.state_dict().items()},
                          folder / "value_head.safetensors")

    def save_tokenizer(self):
        from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE

        if self.chat and not self.tokenizer.chat_template:
            self.tokenizer.config["chat_template"] = DEFAULT_CHAT_TEMPLATE
        return self.tokenizer


def _answer_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def _scatter(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    out[mask] = flat.float().cpu()
    return out


def rl(config: RLConfig | dict | str | os.PathLike | None = None, *, resume: bool = False, overwrite: bool = False,
       progress: bool = True, **overrides) -> dict:
    """Improve a causal LM against a reward with PPO, GRPO, RLOO or REINFORCE; returns the loop's summary."""
    config = resolve_config(config, resume, overrides, cls=RLConfig)
    prompts = read_prompts(config.train, config.skip_bad_lines)
    if prompts.skipped:
        warn(f"skipped {prompts.skipped} malformed prompt(s) of {config.train} (lines {prompts.skipped_lines[:5]}"
             f"{' ...' if prompts.skipped > 5 else ''})")
    # the fields the rewards read, in every row, before the run starts (not at the rollout that meets one): the
    # built-in rewards' and your functions' (imported here, as the run would, to read their parameters)
    functions = user_functions(config.reward)
    files = [(config.train, prompts)] + ([(config.val, read_prompts(config.val, config.skip_bad_lines))] if config.val else [])
    for path, rows in files:
        for row, line in zip(rows.rows, rows.lines):
            problem = row_problem(config.reward, row, functions)
            if problem is not None:
                raise LmforgeError(f"{path}:{line}: {problem}")
    fixed = FIXED_ON_RESUME + ("algo", "num_generations", "critic", "minibatches", "ppo_epochs", "micro_batch_size",
                               "grad_accum_steps")
    return train(config, lambda c, device, ckpt: RL(c, device, ckpt, prompts), resume=resume, overwrite=overwrite,
                 progress=progress, fixed_on_resume=fixed)
