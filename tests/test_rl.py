"""`lmforge rl`: the mathematics on tensors, GRPO's losses against TRL's, batch layouts, exact resume, rewards,
the KL to the reference, and the command line.

Every claim is a number: advantages against a plain loop or a hand computation, losses and gradients against
TRL's GRPOTrainer, runs against the same run in another layout or after an interruption. The models are tiny
random GPT-2s (width 32, 2 layers); completions are at most 6 tokens, ended early by a stop string ("e") so
that they differ in length (where the normalisations differ)."""

import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import yaml
from conftest import make_hf_gpt2

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import rl as rl_module
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.config import RLConfig
from lmforge.train.rewards import arithmetic, exact_answer, parse_rewards, score
from lmforge.train.rl import (
    RL,
    clipped_surrogate,
    gae,
    group_advantages,
    leave_one_out,
    masked_whiten,
    rl,
    segment_sum,
    token_kl,
)

G = 4  # completions per prompt
# Timing and throughput: the only logged values that may differ between two runs of the same steps.
TIMING = ("elapsed", "tokens_per_second", "generation_seconds", "scoring_seconds", "preparation_seconds",
          "samples_per_second")


# -- fixtures and helpers ---------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest: torch on one thread, as the runs are)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    """A tiny random GPT-2 with the test tokenizer (its dropout 0.1, as transformers' default); tests only read it."""
    return make_hf_gpt2(tmp_path_factory.mktemp("base") / "gpt2", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def prompt_rows(n=16, seed=0):
    """Sums "A + B =" with their answer: the arithmetic and exact rewards read them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"{a} + {b} =", "answer": str(a + b)})
    return rows


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", prompt_rows())


def settings(out, **kw):
    """A run of a few milliseconds a step: 8 completions (2 prompts x 4) of at most 6 tokens per rollout."""
    base = dict(out=str(out), max_steps=4, lr=1e-3, warmup_steps=0, micro_batch_size=8, num_generations=G,
                max_new_tokens=6, stop="e", reward="regex:[aiou];regex:^\\s", sample_interval=1, checkpoint_interval=100,
                eval_interval=100, threads=1, dtype="float32", tensorboard=False, seed=0)
    base.update(kw)
    return base


def run_rl(model, train, out, **kw):
    rl(model=str(model), train=train, progress=False, **settings(out, **kw))
    return logs(out)


def logs(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_reward" in r]


def samples(run):
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def final_weights(run) -> dict:
    """Every tensor the run's latest checkpoint saved: the policy, and PPO's critic or value head."""
    from safetensors.torch import load_file

    folder = latest_checkpoint(run) / "model"
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


class Spy:
    """Wraps RL methods to keep the objective and every rollout buffer a run makes."""

    def __init__(self, monkeypatch):
        self.objective, self.buffers = None, []
        setup, make_rollout = RL.setup, RL.make_rollout

        def spy_setup(objective, *args):
            setup(objective, *args)
            self.objective = objective

        def spy_rollout(objective, *args):
            buffer = make_rollout(objective, *args)
            self.buffers.append(buffer)
            return buffer

        monkeypatch.setattr(RL, "setup", spy_setup)
        monkeypatch.setattr(RL, "make_rollout", spy_rollout)


# -- 1. the mathematics on tensors ----------------------------------------------------------------


def gae_by_loop(rewards, values, length, gamma, lam):
    """One completion's GAE, written out: δ_t = r_t + γ·V_{t+1} - V_t (V after the last token 0), Â_t = δ_t + γλ·Â_{t+1}."""
    advantages, following = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        following = rewards[t] + gamma * next_value - values[t] + gamma * lam * following
        advantages[t] = following
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_equals_a_loop_over_each_completion_and_returns_are_advantages_plus_values(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [6, 3, 1, 4]
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    rewards[~mask], values[~mask] = 100.0, -50.0  # padding that must not leak into any completion
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, length in enumerate(lengths):
        expected = gae_by_loop(rewards[row].tolist(), values[row].tolist(), length, gamma, lam)
        torch.testing.assert_close(advantages[row, :length], torch.tensor(expected), atol=1e-6, rtol=0)
    assert advantages[~mask].abs().max() == 0 and returns[~mask].abs().max() == 0
    torch.testing.assert_close(returns[mask], (advantages + values)[mask], atol=0, rtol=0)
    if gamma == lam == 1.0:  # Monte Carlo: the reward still to come minus the value
        to_come = rewards.masked_fill(~mask, 0).flip(1).cumsum(1).flip(1)
        torch.testing.assert_close(advantages[mask], (to_come - values)[mask], atol=1e-5, rtol=0)
    if lam == 0.0:  # one-step TD errors
        assert advantages[1, 0].item() == pytest.approx((rewards[1, 0] + gamma * values[1, 1] - values[1, 0]).item(), abs=1e-6)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 2, 2, 2, 2])
    # groups of 4: means 1/4, 1/2, 2; unbiased stds 1/2, sqrt(1/3), 0 (an all-equal group gives 0, not NaN)
    s1, s2 = 0.5 + 1e-4, math.sqrt(1 / 3) + 1e-4
    group = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2, 0, 0, 0, 0]
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0]
    batch_std = math.sqrt((19 - 12 * (11 / 12) ** 2) / 11)  # the unbiased std of all 12 rewards: sqrt(107/132)
    torch.testing.assert_close(group_advantages(r, 4, "group"), torch.tensor(group), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor(centred) / (batch_std + 1e-4),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor(centred), atol=1e-6, rtol=0)


def trl_source(name: str) -> str:
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    module = {"grpo": trl.GRPOTrainer._generate_and_score_completions, "rloo": trl.RLOOTrainer._generate_and_score_completions}
    return inspect.getsource(module[name])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_trl_grpo_trainers(scale):
    from trl.trainer.utils import nanstd

    # TRL 1.16's _generate_and_score_completions (sum_then_normalize), line for line; the lines are checked to be there
    source = trl_source("grpo")
    for line in ("mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
                 "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)", "std_rewards = nanstd(rewards).expand_as(rewards)",
                 "advantages = rewards - mean_grouped_rewards", "advantages = advantages / (std_rewards + 1e-4)"):
        assert line in source, line
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 3, (24,), generator=g).float() + 0.5 * torch.randn(24, generator=g).round()
    rewards[:G] = 1.0  # one group of equal rewards
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) if scale != "batch" else nanstd(rewards).expand_as(rewards)
    theirs = rewards - mean
    if scale != "none":
        theirs = theirs / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G, scale), theirs, atol=1e-6, rtol=0)
    assert group_advantages(rewards, G, scale)[:G].abs().max() == 0


def test_leave_one_out_by_hand_and_as_trl_rloo():
    r = torch.tensor([1.0, 2, 3, 6, 0, 0, 0, 4])
    # baselines: (12 - r_i) / 3 for the first prompt, (4 - r_i) / 3 for the second
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, -4 / 3, -4 / 3, -4 / 3, 4 - 0])
    torch.testing.assert_close(leave_one_out(r, 4), expected, atol=1e-6, rtol=0)
    # the same as G/(G-1) times the centred reward; and as TRL's RLOOTrainer writes it
    centred = r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)
    torch.testing.assert_close(leave_one_out(r, 4), (centred * 4 / 3).flatten(), atol=1e-6, rtol=0)
    assert "baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)" in trl_source("rloo")
    grouped = r.view(-1, 4)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (4 - 1)
    torch.testing.assert_close(leave_one_out(r, 4), r - baselines.flatten(), atol=1e-6, rtol=0)


def test_token_kl_k1_is_the_log_ratio_and_k3_is_never_negative_and_both_estimate_the_kl():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(1000, generator=g) - 2, torch.randn(1000, generator=g) - 2
    k1, k3 = token_kl(logp, ref, "k1"), token_kl(logp, ref, "k3")
    torch.testing.assert_close(k1, logp - ref, atol=0, rtol=0)
    torch.testing.assert_close(k3, torch.exp(-k1) + k1 - 1, atol=0, rtol=0)
    assert k3.min() >= 0 and token_kl(logp, logp, "k3").abs().max() == 0
    # Monte Carlo over samples of π: both means approach KL(π‖π_ref) of two categorical distributions
    for shift in (1.0, 0.1):  # far apart, and close (where k3's variance is far below k1's)
        logits = torch.randn(6, generator=g)
        p, q = logits.softmax(-1), (logits + shift * torch.randn(6, generator=g)).softmax(-1)
        true_kl = (p * (p.log() - q.log())).sum().item()
        x = torch.multinomial(p, 200_000, replacement=True, generator=g)
        for estimator in ("k1", "k3"):
            values = token_kl(p.log()[x], q.log()[x], estimator).double()
            error = values.std().item() / math.sqrt(len(x))
            assert abs(values.mean().item() - true_kl) < 4 * error, (shift, estimator, values.mean().item(), true_kl)
            if estimator == "k3" or shift == 1.0:  # k1 is too noisy to say much about close distributions
                assert error < 0.02 * true_kl, (shift, estimator)
        if shift == 0.1:
            assert token_kl(p.log()[x], q.log()[x], "k3").var() < 0.1 * token_kl(p.log()[x], q.log()[x], "k1").var()


def test_the_clipped_surrogate_has_no_gradient_where_the_clip_holds_the_ratio_and_minus_a_rho_elsewhere():
    eps_low, eps_high = 0.2, 0.28
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.2, 1.27, 1.29, 2.0])
    advantages = torch.tensor([2.0, -0.5]).repeat_interleave(len(ratios))
    ratio = ratios.repeat(2)
    old = torch.linspace(-3, -1, len(ratio))
    logp = (old + ratio.log()).requires_grad_(True)
    loss, clipped = clipped_surrogate(logp, old, advantages, eps_low, eps_high)
    loss.sum().backward()
    held = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    assert held.sum() == 4  # 1.29 and 2.0 with A > 0, 0.5 and 0.79 with A < 0
    torch.testing.assert_close(clipped, held.float(), atol=0, rtol=0)
    assert logp.grad[held].abs().max() == 0
    torch.testing.assert_close(logp.grad[~held], (-advantages * ratio)[~held], atol=1e-6, rtol=0)
    # the value: -min(ρA, clip(ρ)A)
    expected = -torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_masked_whiten_gives_mean_0_and_std_1_over_the_masked_entries_and_0_elsewhere():
    g = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(6, 9, generator=g) + 3
    mask = torch.rand(6, 9, generator=g) < 0.6
    out = masked_whiten(x, mask)
    assert out[mask].mean().abs() < 1e-6
    assert out[mask].std().item() == pytest.approx(1.0, abs=1e-6)  # unbiased, as torch.std
    assert out[~mask].abs().max() == 0
    torch.testing.assert_close(out[mask], (x[mask] - x[mask].mean()) / x[mask].std(), atol=1e-5, rtol=0)


def test_segment_sum_adds_each_tokens_value_to_its_completion():
    values, rows = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([0, 0, 2, 2, 2])
    torch.testing.assert_close(segment_sum(values, rows, 3), torch.tensor([3.0, 0, 12]), atol=0, rtol=0)


# -- 2. the losses (GRPO's normalisations, PPO's) and what a rollout holds --------------------------


def bare_objective(**config) -> RL:
    """An RL objective with a config and nothing loaded: enough for micro_batch() and loss()."""
    objective = RL.__new__(RL)
    objective.config = RLConfig(model="unused", train="unused", reward="exact", **config)
    objective.beta = objective.config.beta
    return objective


def rollout_buffer(prompt_ids, completions, old_logp, advantages, ref_logp=None, pad=0) -> dict:
    """A rollout as make_rollout leaves it: right-padded prompt + completion ids, (N, T) per-token tensors."""
    from lmforge.train.finetune import _pad

    lengths = torch.tensor([len(c) for c in completions])
    cmask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    buffer = {"ids": _pad([p + c for p, c in zip(prompt_ids, completions)], pad),
              "starts": torch.tensor([len(p) for p in prompt_ids]),
              "lengths": torch.tensor([len(p) + len(c) for p, c in zip(prompt_ids, completions)]), "cmask": cmask,
              "old_logp": old_logp * cmask, "advantages": advantages[:, None] * cmask,
              "stats": torch.zeros(0, dtype=torch.float64), "stat_names": []}
    if ref_logp is not None:
        buffer["ref_logp"] = ref_logp * cmask
    return buffer


class LogitsTable(torch.nn.Module):
    """A 'model' whose logits at the selected positions are a parameter: the loss's gradient w.r.t. each log-prob is plain."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits.clone())

    def forward(self, ids, select):
        assert int(select.sum()) == len(self.table)
        return self.table


@pytest.mark.parametrize("algo, loss_norm, value, weights", [
    # completions of 1, 2 and 4 tokens with advantages 1, -0.5, 2; ρ = 1, so each token's loss is -A
    ("grpo", "grpo", -(1 - 0.5 + 2) / 3, [1 / 3, 1 / 6, 1 / 12]),  # each completion's token mean, then their mean
    ("grpo", "dr_grpo", -(1 - 1 + 8) / (3 * 5), [1 / 15] * 3),  # token sum / (completions x max_new_tokens 5)
    ("grpo", "bnpo", -(1 - 1 + 8) / 7, [1 / 7] * 3),  # the mean over the 7 tokens
    ("grpo", "dapo", -(1 - 1 + 8) / 7, [1 / 7] * 3),
    # -ρ(y)·A with the completion's ratio ρ(y) = exp(Σ log π - Σ log π_old) = 1: the value -mean(A), the gradient
    # -A ∇log π(y) (the token sum), then the mean over completions
    ("rloo", "grpo", -(1 - 0.5 + 2) / 3, [1 / 3] * 3),
    ("reinforce", "grpo", -(1 - 0.5 + 2) / 3, [1 / 3] * 3),
])
def test_each_normalisation_by_hand_on_a_tiny_batch(algo, loss_norm, value, weights):
    objective = bare_objective(algo=algo, loss_norm=loss_norm, max_new_tokens=5, kl_coef=0.0)
    completions, advantages = [[1], [2, 3], [4, 0, 1, 2]], torch.tensor([1.0, -0.5, 2.0])
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([t for c in completions for t in c])
    logp = logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    cmask = torch.arange(4)[None] < torch.tensor([1, 2, 4])[:, None]
    old = torch.zeros(3, 4).masked_scatter(cmask, logp)  # π_old = π: ratio 1
    batch = objective.micro_batch(rollout_buffer([[7, 8]] * 3, completions, old, advantages), [0, 1, 2], "cpu")
    assert batch["labels"].tolist() == labels.tolist()
    model = LogitsTable(logits)
    loss, metrics = objective.loss(model, batch)
    assert loss.item() == pytest.approx(value, abs=1e-6)
    assert objective.loss_weight(batch) == (7 if loss_norm in ("bnpo", "dapo") and algo == "grpo" else 3)
    loss.backward()
    # d loss / d log π(token) = -A_i x the completion's weight: the gradient of that weighted sum of log-probs
    table = logits.clone().requires_grad_(True)
    token_weight = torch.tensor([w * -a for w, a, c in zip(weights, advantages.tolist(), completions) for _ in c])
    (token_weight * table.log_softmax(-1).gather(-1, labels[:, None])[:, 0]).sum().backward()
    torch.testing.assert_close(model.table.grad, table.grad, atol=1e-7, rtol=1e-6)
    assert metrics["clip_fraction"].item() == 0 and metrics["approx_kl"].item() == 0


@pytest.mark.parametrize("algo", ["rloo", "reinforce"])
def test_rloo_and_reinforce_clip_each_completions_ratio_as_trl_rloo_trainer(algo):
    """With several passes over a rollout π ≠ π_old: TRL 1.16's RLOOTrainer._compute_loss clips the completion's
    ratio exp(Σ log π - Σ log π_old) once (its lines are checked to be there, then computed here on the same tensors),
    not each token's; lmforge's loss, gradient and clip fraction are that. REINFORCE's advantage is a completion's too:
    the same."""
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    source = inspect.getsource(trl.RLOOTrainer._compute_loss)
    for line in ("logps = (per_token_logps * completion_mask).sum(1)", "log_ratio = logps - old_logps",
                 "coef_1 = torch.exp(log_ratio)",
                 "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
                 "per_sequence_loss = -torch.min(per_sequence_loss1, per_sequence_loss2)",
                 "loss = per_sequence_loss.mean()",
                 "is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)",
                 "is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)"):
        assert line in source, line
    eps_low, eps_high = 0.2, 0.28
    objective = bare_objective(algo=algo, kl_coef=0.0, ppo_epochs=2, clip_eps=eps_low, clip_eps_high=eps_high)
    g = torch.Generator().manual_seed(3)
    lengths = [1, 3, 2, 5, 4, 3]
    completions = [torch.randint(0, 5, (n,), generator=g).tolist() for n in lengths]
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.3])
    logits = torch.randn(sum(lengths), 5, generator=g)
    labels = torch.tensor([t for c in completions for t in c])
    logp = logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    cmask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    # π_old: each completion's log-ratio log π(y) - log π_old(y) set (in and out of the clip range, with advantages of
    # both signs), spread over its tokens with ±0.35 that cancels: the tokens' own ratios are far from the completion's
    log_ratio = torch.tensor([0.5, -0.5, 0.1, 0.4, -0.4, 0.2])
    spread = torch.cat([torch.tensor([0.35 * (-1) ** j for j in range(n)]) - (0.35 if n % 2 else 0) / n
                        for n in lengths])
    old_flat = logp - log_ratio.repeat_interleave(torch.tensor(lengths)) / torch.tensor(lengths).repeat_interleave(
        torch.tensor(lengths)) + spread
    old = torch.zeros(cmask.shape).masked_scatter(cmask, old_flat)
    batch = objective.micro_batch(rollout_buffer([[7, 8]] * len(lengths), completions, old, advantages),
                                  list(range(len(lengths))), "cpu")
    model = LogitsTable(logits)
    loss, metrics = objective.loss(model, batch)
    loss.backward()
    # TRL's lines on (completions, tokens) tensors
    table = logits.clone().requires_grad_(True)
    token_logps = table.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    per_token_logps = torch.zeros(cmask.shape).masked_scatter(cmask, token_logps)
    completion_mask = cmask.float()
    logps = (per_token_logps * completion_mask).sum(1)
    old_logps = (old * completion_mask).sum(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    theirs = -torch.min(coef_1 * advantages, coef_2 * advantages).mean()
    theirs.backward()
    clipped = ((coef_1 < 1 - eps_low) & (advantages < 0)) | ((coef_1 > 1 + eps_high) & (advantages > 0))
    torch.testing.assert_close(coef_1.log().detach(), log_ratio, atol=1e-5, rtol=0)
    assert clipped.tolist() == [True, True, False, False, False, False]  # the clip holds the first two
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-6)
    torch.testing.assert_close(model.table.grad, table.grad, atol=1e-7, rtol=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(clipped.float().mean().item(), abs=1e-7)
    # clipping each token's ratio, then summing, is another loss (the one lmforge had)
    token_clipped, _ = clipped_surrogate(logp, old_flat, advantages.repeat_interleave(torch.tensor(lengths)), eps_low,
                                         eps_high)
    assert abs(segment_sum(token_clipped, batch["row_of_token"], len(lengths)).mean().item() - theirs.item()) > 0.1


class ActorCriticTable(LogitsTable):
    def __init__(self, logits, values):
        super().__init__(logits)
        self.values = torch.nn.Parameter(values.clone())

    def forward(self, ids, select):
        return super().forward(ids, select), self.values


def test_ppos_loss_by_hand_the_clipped_surrogate_plus_the_clipped_value_loss():
    """7 tokens (completions of 1, 2 and 4), ρ = 1: loss = mean(-Â) + vf_coef · ½·mean(max((V - R)², (V_clipped - R)²)),
    V_clipped = V_old + clip(V - V_old, ±0.2). Where the clipped value is the larger and V is outside the range, V gets
    no gradient (tokens 3 and 5)."""
    objective = bare_objective(algo="ppo", vf_coef=0.5, value_clip=0.2, kl_coef=0.0)
    completions = [[1], [2, 3], [4, 0, 1, 2]]
    cmask = torch.arange(4)[None] < torch.tensor([1, 2, 4])[:, None]

    def scatter(values):  # one value per completion token, to (completions, tokens)
        return torch.zeros(3, 4).masked_scatter(cmask, torch.tensor(values))

    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([t for c in completions for t in c])
    logp = logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    buffer = rollout_buffer([[7, 8]] * 3, completions, torch.zeros(3, 4).masked_scatter(cmask, logp), torch.zeros(3))
    buffer["advantages"] = scatter([1, -1, 0.5, 2, -2, 0, 1])  # per token, as GAE gives
    buffer["values"] = scatter([0.1, 0.0, 1.0, 0.0, 0.25, 0.5, -1.1])
    buffer["returns"] = scatter([1.0, 0.2, 0.5, -0.5, 0.0, 1.0, -1.0])
    values = torch.tensor([0.0, 0.5, 1.0, -0.3, 0.25, 0.9, -1.0])  # the critic now
    model = ActorCriticTable(logits, values)
    loss, metrics = objective.loss(model, objective.micro_batch(buffer, [0, 1, 2], "cpu"))
    # (V - R)² vs (V_clipped - R)²: 1|1, .09|0, .25|.25, .04|.09, .0625|.0625, .01|.09, 0|0
    value_loss = 0.5 * (1 + 0.09 + 0.25 + 0.09 + 0.0625 + 0.09 + 0) / 7
    assert metrics["value_loss"].item() == pytest.approx(value_loss, abs=1e-6)
    assert loss.item() == pytest.approx(-1.5 / 7 + 0.5 * value_loss, abs=1e-6)
    loss.backward()
    expected = 0.5 * (values - torch.tensor([1.0, 0.2, 0.5, -0.5, 0.0, 1.0, -1.0])) / 7
    expected[[3, 5]] = 0.0
    torch.testing.assert_close(model.values.grad, expected, atol=1e-7, rtol=0)


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def assert_same_grads(ours_model, hf_model) -> None:
    """lmforge's gradients under transformers' names (fused and transposed as GPT-2 stores them) equal the HF model's."""
    import copy

    from lmforge.model.hf import state_dict_to_hf

    clone = copy.deepcopy(ours_model)
    with torch.no_grad():
        for p, q in zip(ours_model.parameters(), clone.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    ours = state_dict_to_hf(clone)
    theirs = {n: p.grad for n, p in hf_model.named_parameters() if p.requires_grad}
    assert set(theirs) <= set(ours) and all(g is not None for g in theirs.values())
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, atol=1e-6 + 1e-4 * g.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


T_MAX = 6  # max_new_tokens / TRL's max_completion_length


@pytest.fixture(scope="module")
def trl_grpo(base, tokenizer_dir, tmp_path_factory):
    """TRL's GRPOTrainer on the same tiny GPT-2, dropout off, its KL without the importance-ratio factor (see below)."""
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                                  eos_token=config["eos_token"], pad_token=config["pad_token"])
    args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                          save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0, disable_dropout=True,
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=T_MAX, beta=0.0,
                          epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False)
    trainer = trl.GRPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                              reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=datasets.Dataset.from_list([{"prompt": "1 + 2 ="}] * 4), processing_class=hf_tok)
    trainer.model.train()
    return trainer


def trl_inputs(trainer, g):
    """Four completions of 1, 2, 6 and 3 tokens after 3-token prompts; π_old and π_ref a little off π."""
    prompts = torch.randint(10, 1000, (4, 3), generator=g)
    lengths = [1, 2, T_MAX, 3]
    completions = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]
    ids = torch.full((4, T_MAX), trainer.processing_class.pad_token_id)
    mask = torch.zeros(4, T_MAX, dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, torch.cat([prompts, ids], 1),
                                                          torch.cat([torch.ones_like(prompts), mask], 1), T_MAX)[0]
    old = (logp + torch.empty(4, T_MAX).uniform_(-0.4, 0.4, generator=g)) * mask  # ratios in [0.67, 1.5]: some clipped
    ref = (logp + torch.empty(4, T_MAX).uniform_(-0.5, 0.5, generator=g)) * mask
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": ids,
              "completion_mask": mask, "advantages": torch.tensor([1.0, -0.5, 2.0, -1.5]), "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return inputs, prompts.tolist(), completions


def trl_loss(trainer, inputs, loss_type, beta, accumulation=1):
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation = accumulation
    return trainer._compute_loss(trainer.model, inputs)


def ours_loss(base, inputs, prompts, completions, loss_norm, beta, rows=(0, 1, 2, 3)):
    objective = bare_objective(algo="grpo", loss_norm=loss_norm, max_new_tokens=T_MAX, kl_coef=beta, clip_eps=0.2,
                               clip_eps_high=0.28)
    width = max(len(c) for c in completions)
    old, ref = inputs["old_per_token_logps"][:, :width], inputs["ref_per_token_logps"][:, :width]
    buffer = rollout_buffer(prompts, completions, old, inputs["advantages"], ref)
    batch = objective.micro_batch(buffer, list(rows), "cpu")
    model = load_model(base).eval()  # no dropout, as TRL's disable_dropout
    loss, metrics = objective.loss(model, batch)
    return loss, metrics, model, objective.loss_weight(batch)


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_norm", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_losses_gradients_and_metrics_equal_trl_grpo_trainers(base, trl_grpo, loss_norm, beta):
    """TRL 1.16's compute loss: grpo = each completion's token mean, then the mean; bnpo = the micro-batch's token mean;
    dr_grpo = token sum / (completions x max_completion_length); dapo = token sum / the generation batch's tokens.
    β·k3 is added per token. (TRL's default use_bias_correction_kl=True multiplies the k3 term by the ratio ρ: same value
    at ρ = 1, another gradient; lmforge follows the GRPO paper, as TRL with use_bias_correction_kl=False.)"""
    trl_grpo.model.zero_grad()
    inputs, prompts, completions = trl_inputs(trl_grpo, torch.Generator().manual_seed(0))
    theirs = trl_loss(trl_grpo, inputs, loss_norm, beta)
    ours, metrics, model, _ = ours_loss(base, inputs, prompts, completions, loss_norm, beta)
    assert max_diff(ours.item(), theirs.item()) < 1e-6, (ours.item(), theirs.item())
    logged = {k: v[-1] for k, v in trl_grpo._metrics["train"].items()}
    assert 0 < logged["clip_ratio/region_mean"] < 1  # some ratios are clipped: the clip is part of the comparison
    # TRL logs token means; lmforge averages its metrics over the loss's own items: tokens for bnpo and dapo, completions
    # (each completion's token mean) for grpo and dr_grpo, so that they do not depend on the micro-batch layout.
    mask = inputs["completion_mask"].bool()
    with torch.no_grad():
        logp, entropy, _ = trl_grpo._get_per_token_logps_and_entropies(
            trl_grpo.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), T_MAX, compute_entropy=True)
    ratio, advantage = torch.exp(logp - inputs["old_per_token_logps"]), inputs["advantages"][:, None]
    clipped = (((ratio < 0.8) & (advantage < 0)) | ((ratio > 1.28) & (advantage > 0))).float()
    assert (clipped * mask).sum() / mask.sum() == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6)
    assert (entropy * mask).sum() / mask.sum() == pytest.approx(logged["entropy"], abs=1e-5)
    for name, per_token in (("clip_fraction", clipped), ("entropy", entropy)):
        if loss_norm in ("bnpo", "dapo"):
            expected = (per_token * mask).sum() / mask.sum()
        else:
            expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        assert metrics[name].item() == pytest.approx(expected.item(), abs=1e-5), name
    ours.backward()
    theirs.backward()
    assert_same_grads(model, trl_grpo.model)


def test_bnpo_is_the_mean_over_the_steps_tokens_where_trl_means_each_micro_batch(base, trl_grpo):
    """Two micro-batches of 3 and 9 tokens (accumulated into one step). lmforge weighs each micro-batch's token mean by
    its tokens, whatever the layout: its bnpo (= its dapo) is the step's token mean, which is TRL's dapo. TRL's bnpo
    averages the micro-batches' token means (and on several processes each process's), so it depends on the layout."""
    inputs, prompts, completions = trl_inputs(trl_grpo, torch.Generator().manual_seed(0))
    halves = [{k: v[rows] if k != "num_items_in_batch" else v for k, v in inputs.items()} for rows in ([0, 1], [2, 3])]
    with torch.no_grad():
        whole = trl_loss(trl_grpo, inputs, "bnpo", 0.0).item()
        trl_bnpo = sum(trl_loss(trl_grpo, h, "bnpo", 0.0, accumulation=2).item() for h in halves)
        trl_dapo = sum(trl_loss(trl_grpo, h, "dapo", 0.0, accumulation=2).item() for h in halves)
        trl_grpo_split = sum(trl_loss(trl_grpo, h, "grpo", 0.0, accumulation=2).item() for h in halves)
        steps = {}
        for norm in ("bnpo", "dapo", "grpo"):
            parts = [ours_loss(base, inputs, prompts, completions, norm, 0.0, rows) for rows in ([0, 1], [2, 3])]
            assert [w for *_, w in parts] == ([3, 9] if norm != "grpo" else [2, 2])
            steps[norm] = sum(loss.item() * w for loss, _, _, w in parts) / sum(w for *_, w in parts)  # as the loop does
    assert steps["bnpo"] == pytest.approx(whole, abs=1e-6) and steps["dapo"] == pytest.approx(whole, abs=1e-6)
    assert trl_dapo == pytest.approx(whole, abs=1e-6)
    assert abs(trl_bnpo - whole) > 0.05, (trl_bnpo, whole)  # TRL's bnpo of the same step, split in two
    assert steps["grpo"] == pytest.approx(trl_grpo_split, abs=1e-6)  # equal micro-batches: grpo agrees split or not


@pytest.mark.parametrize("loss_norm", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_the_first_steps_logged_loss_is_the_normalisation_of_the_rollouts_advantages(base, prompts, tmp_path,
                                                                                     monkeypatch, loss_norm):
    """At step 1 π = π_old = π_ref (ρ = 1, k3 = 0): each token's loss is -Â of its completion."""
    spy = Spy(monkeypatch)
    steps, _ = run_rl(base, prompts, tmp_path / "run", algo="grpo", loss_norm=loss_norm, kl_coef=0.04, max_steps=1)
    buffer = spy.buffers[0]
    rewards = torch.tensor([s["reward"] for s in samples(tmp_path / "run")])
    assert len(rewards) == 8 and len(set(rewards.tolist())) > 1
    advantages, lengths = buffer["advantages"][:, 0], buffer["cmask"].sum(1).float()
    torch.testing.assert_close(advantages, group_advantages(rewards, G, "group"), atol=1e-6, rtol=0)
    assert len(set(lengths.tolist())) > 1  # completions of different lengths: the normalisations differ
    expected = {"grpo": -advantages.mean(), "bnpo": -(advantages * lengths).sum() / lengths.sum(),
                "dapo": -(advantages * lengths).sum() / lengths.sum(),
                "dr_grpo": -(advantages * lengths).sum() / (len(lengths) * T_MAX)}[loss_norm]
    assert steps[0]["loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert steps[0]["kl"] == 0.0 and steps[0]["clip_fraction"] == 0.0
    assert steps[0]["completion_length"] == pytest.approx(lengths.mean().item(), abs=1e-6)


@pytest.mark.parametrize("algo", ["ppo", "rloo", "rloo-k3", "reinforce", "grpo", "grpo-kl"])
def test_each_rollouts_advantages_follow_from_its_rewards_log_probs_and_values(base, prompts, tmp_path, monkeypatch, algo):
    """Recomputed by hand from what the rollout holds (π_old, π_ref, values) and the rewards in samples.jsonl:
    ppo: GAE(γ 0.9, λ 0.8) of per-token rewards -β·k1 with the score at the last token, whitened; returns = GAE + V.
    rloo: leave-one-out of r - β·Σk1 (Σk3 with kl_estimator k3; the logged kl is that sum's mean).
    reinforce: r - b, b ← 0.9·b + 0.1·mean(r), b starting at the first mean.
    grpo (scale batch): (r - group mean) / (the rollout's std + 1e-4); with β > 0 the logged kl is k3's mean over every
    completion token (the KL its loss penalises, and TRL's GRPOTrainer's logged kl), not a sum over each completion."""
    spy = Spy(monkeypatch)
    kw = {"ppo": dict(ppo_epochs=1, gamma=0.9, lam=0.8, kl_coef=0.1), "rloo": dict(kl_coef=0.1),
          "rloo-k3": dict(kl_coef=0.1, kl_estimator="k3"), "reinforce": {}, "grpo": dict(scale_rewards="batch"),
          "grpo-kl": dict(scale_rewards="batch", kl_coef=0.1)}[algo]
    estimator = "k3" if algo == "grpo-kl" else kw.get("kl_estimator", "k1")
    algo = algo.removesuffix("-k3").removesuffix("-kl")
    if algo == "grpo":
        assert 'self._metrics[mode]["kl"].append(global_masked_mean(per_token_kl))' in \
            inspect.getsource(pytest.importorskip("trl").GRPOTrainer._compute_loss)
    steps, _ = run_rl(base, prompts, tmp_path / "run", algo=algo, max_steps=3, lr=1e-2, **kw)
    written = samples(tmp_path / "run")
    assert len(spy.buffers) == 3 and len(written) == 24  # each rollout written whole
    baseline = None
    for index, buffer in enumerate(spy.buffers):
        rewards = torch.tensor([s["reward"] for s in written[8 * index : 8 * index + 8]])
        cmask, lengths = buffer["cmask"], buffer["cmask"].sum(1)
        if "ref_logp" in buffer:
            log_ratio = buffer["old_logp"] - buffer["ref_logp"]
            kl = (log_ratio if estimator == "k1" else torch.exp(-log_ratio) + log_ratio - 1) * cmask
            assert (kl >= 0).all() or estimator == "k1"
            logged = kl.sum() / cmask.sum() if algo == "grpo" else kl.sum(1).mean()
            assert steps[index]["kl"] == pytest.approx(logged.item(), abs=1e-6)
            assert (kl.abs().max() > 1e-3) == (index > 0)  # the policy is its reference only at the first rollout
        if algo == "ppo":
            values = buffer["values"]
            raw = torch.zeros_like(values)
            for i in range(8):
                token_rewards = (-0.1 * kl[i]).tolist()
                token_rewards[lengths[i] - 1] += rewards[i].item()
                raw[i, : lengths[i]] = torch.tensor(gae_by_loop(token_rewards, values[i].tolist(), int(lengths[i]), 0.9, 0.8))
            whitened = (raw[cmask] - raw[cmask].mean()) / raw[cmask].std()
            torch.testing.assert_close(buffer["advantages"][cmask], whitened, atol=1e-4, rtol=0)
            torch.testing.assert_close(buffer["returns"][cmask], (raw + values)[cmask], atol=1e-5, rtol=0)
            continue
        if algo == "rloo":
            shaped = (rewards - 0.1 * kl.sum(1)).view(2, 4)
            expected = shaped - (shaped.sum(1, keepdim=True) - shaped) / 3
        elif algo == "reinforce":
            baseline = rewards.mean() if baseline is None else baseline
            expected = rewards - baseline
            baseline = 0.9 * baseline + 0.1 * rewards.mean()
        else:
            expected = (rewards.view(2, 4) - rewards.view(2, 4).mean(1, keepdim=True)) / (rewards.std() + 1e-4)
        advantages = buffer["advantages"]
        torch.testing.assert_close(advantages[:, 0], expected.flatten().float(), atol=1e-5, rtol=0)
        assert (advantages == advantages[:, :1] * cmask).all()  # the completion's advantage on each of its tokens
    assert len({s["reward"] for s in written}) > 1  # rewards that vary: advantages that are not all 0


def test_the_log_probs_are_those_of_the_distribution_the_rollouts_sample_from(base, prompts, tmp_path, monkeypatch):
    """At temperature 0.5 the completions are drawn from softmax(logits / 0.5): π_old, π_ref and π in the loss are that
    distribution's log-probs (as TRL's GRPO, RLOO and PPO trainers divide the logits by the temperature), else the
    ratio and the KL estimates are taken against a distribution nothing was sampled from."""
    spy = Spy(monkeypatch)
    run_rl(base, prompts, tmp_path / "run", algo="grpo", kl_coef=0.05, temperature=0.5, max_steps=1)
    buffer = spy.buffers[0]
    batch = spy.objective.micro_batch(buffer, list(range(8)), "cpu", frozen=True)
    with torch.no_grad():
        logits = load_model(base).eval()(batch["ids"], select=batch["learned"])
    tempered = (logits / 0.5).log_softmax(-1).gather(-1, batch["labels"][:, None])[:, 0]
    plain = logits.log_softmax(-1).gather(-1, batch["labels"][:, None])[:, 0]
    assert max_diff(tempered, plain) > 0.05  # the comparison can tell them apart
    assert max_diff(buffer["old_logp"][buffer["cmask"]], tempered) < 1e-5
    assert max_diff(buffer["ref_logp"][buffer["cmask"]], tempered) < 1e-5


def test_validation_rewards_are_those_of_greedy_completions_of_the_policy_at_that_step(base, prompts, tmp_path):
    from lmforge.infer.generate import generate

    _, evals = run_rl(base, prompts, tmp_path / "run", val=prompts, max_steps=2, eval_interval=2, lr=0.1,
                      checkpoint_interval=2)
    assert [r["step"] for r in evals] == [0, 2]
    rewards = parse_rewards(settings(tmp_path)["reward"])
    rows, greedy = prompt_rows(), []
    for record, model in ((evals[0], base), (evals[1], tmp_path / "run")):
        texts = [g.text for g in generate(str(model), [r["prompt"] for r in rows], max_new_tokens=6, temperature=0,
                                          stop=["e"])]
        greedy.append(texts)
        totals, parts, _ = score(rewards, [r["prompt"] for r in rows], texts, rows, "stop", -1.0)
        assert record["val_reward"] == pytest.approx(sum(totals) / len(rows), abs=1e-6)
        assert record["val_reward_aiou"] == pytest.approx(sum(parts["aiou"]) / len(rows), abs=1e-6)
    assert greedy[0] != greedy[1]  # the policy moved between the two evaluations


# -- 3. batch layouts -----------------------------------------------------------------------------

LAYOUT_CASES = {  # each algorithm's settings; the rollout is 8 completions, the lr moves the weights by ~1e-3
    "ppo": dict(algo="ppo", ppo_epochs=2),  # 2 rollouts of 2 steps; critic: a copy of the policy with a value head
    "ppo-shared": dict(algo="ppo", ppo_epochs=2, critic="shared"),
    "grpo": dict(algo="grpo", loss_norm="grpo", kl_coef=0.05),
    "grpo-bnpo": dict(algo="grpo", loss_norm="bnpo"),
    "grpo-dapo": dict(algo="grpo", loss_norm="dapo", clip_eps_high=0.28),
    "grpo-dr_grpo": dict(algo="grpo", loss_norm="dr_grpo", scale_rewards="batch"),
    "rloo": dict(algo="rloo"),
    "reinforce": dict(algo="reinforce"),
}


def base_weights(base) -> dict:
    from safetensors.torch import load_file

    return {f"model.safetensors:{k}": v for k, v in load_file(base / "model.safetensors").items()}


def assert_same_run(one, other, one_weights, other_weights, what=""):
    """Two runs' logged steps (every value but timings) and final weights agree within 1e-5."""
    assert [r["step"] for r in one] == [r["step"] for r in other]
    differ = {}  # every value that differs, to see the whole picture at once
    for x, y in zip(one, other):
        assert x.keys() == y.keys()
        for key in comparable(x):
            if abs(x[key] - y[key]) > 1e-5:
                differ.setdefault(key, (x["step"], x[key], y[key]))
    assert one_weights.keys() == other_weights.keys()
    worst = max((one_weights[k] - other_weights[k]).abs().max().item() for k in one_weights)
    if worst >= 1e-5:
        differ["final weights"] = worst
    assert not differ, f"{what}: {sorted(differ)} differ: {differ}"


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_micro_batch_layouts_give_the_same_steps(base, prompts, tmp_path, case):
    """8 completions a step as 8 x 1, 1 x 8 and 2 x 4 (micro_batch_size x grad_accum_steps): the same rollouts (same
    seed), the same logged loss, gradient norm, rewards and metrics at every step, the same final weights."""
    runs = {}
    for micro, accum in ((8, 1), (1, 8), (2, 4)):
        out = tmp_path / f"{micro}x{accum}"
        runs[micro, accum] = (run_rl(base, prompts, out, micro_batch_size=micro, grad_accum_steps=accum,
                                     **LAYOUT_CASES[case])[0], final_weights(out))
    one, weights = runs[8, 1]
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    assert len({r["completion_length"] for r in one}) > 1 or one[0]["completion_length"] % 1 > 0  # lengths vary
    start = base_weights(base)
    moved = max((weights[k] - start[k]).abs().max().item() for k in weights if k in start)
    assert moved > 5e-4, moved  # equal weights are not just the starting ones
    for layout in ((1, 8), (2, 4)):
        assert_same_run(one, runs[layout][0], weights, runs[layout][1], f"{case} {layout}")


@pytest.mark.parametrize("case", ["grpo-bnpo", "reinforce"])
def test_on_policy_runs_skip_the_old_log_prob_pass_and_train_as_with_it(base, prompts, tmp_path, monkeypatch, case):
    """With one optimizer step per rollout and no reference, π_old is the policy's own log-probs detached (ratio 1):
    the no-grad pass over the rollout is skipped, and the run's steps and weights are those of a run that makes it.
    clip_fraction and approx_kl are then exactly 0."""
    spy = Spy(monkeypatch)
    skipped = run_rl(base, prompts, tmp_path / "skipped", **LAYOUT_CASES[case])[0]
    assert spy.objective.on_policy and all("old_logp" not in b for b in spy.buffers)
    assert all(r["clip_fraction"] == 0 and r["approx_kl"] == 0 for r in skipped)
    monkeypatch.setattr(RL, "on_policy", property(lambda self: False))
    spy.buffers.clear()
    made = run_rl(base, prompts, tmp_path / "made", **LAYOUT_CASES[case])[0]
    assert all("old_logp" in b for b in spy.buffers)
    for r in skipped + made:
        r.pop("clip_fraction"), r.pop("approx_kl")  # 0 against ~1e-12: rounding of two passes
    assert_same_run(skipped, made, final_weights(tmp_path / "skipped"), final_weights(tmp_path / "made"), case)


@pytest.mark.parametrize("bf16_speed", [4.0, 0.5])
def test_in_bf16_training_rollouts_sample_from_a_bf16_copy_of_the_current_weights_when_that_is_faster(
        base, prompts, tmp_path, monkeypatch, bf16_speed):
    """Training in bf16 autocast, the engine samples from the policy's current weights rounded to bf16 when bf16
    products of the rollout's shape are measured faster (the probe is stubbed here), else from the fp32 policy."""
    import lmforge.precision as precision
    from lmforge.infer.engine import Engine

    monkeypatch.setattr(precision, "measure", lambda *a, **k: {"float32": 1.0, "bfloat16": bf16_speed})
    # the copy's weights packed for oneDNN where this CPU can (re-packed from the policy's at each rollout)
    packs = precision.pack_weight(torch.ones(4, 2, dtype=torch.bfloat16), 1) is not None
    monkeypatch.setattr(precision, "linear_kernels", lambda dtype, *a: {g: ["packed" if packs and dtype == torch.bfloat16
                                                                            else "plain", 2.0] for g in ("head", "body")})
    spy, seen = Spy(monkeypatch), []
    init = Engine.__init__
    dense = lambda t: t.to_dense() if t.layout == torch._mkldnn else t  # noqa: E731

    def record(engine, model, *args, **kwargs):
        policy = spy.objective.policy
        seen.append((model is policy, next(model.parameters()).dtype,
                     max((dense(a).float() - b.to(torch.bfloat16).float()).abs().max().item()
                         for a, b in zip([*model.parameters(), *([model.packed_head] if model.packed_head is not None
                                                                 else [])],
                                         [*policy.parameters(), *([policy.wte.weight] if model.packed_head is not None
                                                                  else [])])),
                     {k: v.detach().clone() for k, v in policy.state_dict().items()},
                     sum(p.layout == torch._mkldnn for p in model.parameters())))
        init(engine, model, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", record)
    run_rl(base, prompts, tmp_path / "run", algo="grpo", max_steps=2, lr=1e-2, dtype="bfloat16")
    assert len(seen) == 2
    if bf16_speed > 1:
        assert all(not is_policy and dtype == torch.bfloat16 and gap == 0 for is_policy, dtype, gap, *_ in seen)
        assert all((packed > 0) == packs for *_, packed in seen)
    else:
        assert all(is_policy and dtype == torch.float32 for is_policy, dtype, *_ in seen)
    first, second = seen[0][3], seen[1][3]
    assert max((first[k] - second[k]).abs().max().item() for k in first) > 1e-4  # the copy follows a moving policy


def torchrun(config: dict, tmp_path, *flags):
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge", "rl",
         "--config", str(path), "--quiet", *flags],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


TORCHRUN_CASES = {**{k: LAYOUT_CASES[k] for k in ("grpo", "grpo-dr_grpo", "ppo")},
                  # β adapted toward target_kl from the rollout's KL (critic shared: defect-free apart from the controller)
                  "ppo-adaptive-kl": dict(algo="ppo", critic="shared", ppo_epochs=1, target_kl=0.02, kl_horizon=16,
                                          max_steps=6, lr=3e-3)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TORCHRUN_CASES))
def test_two_processes_of_4_match_one_process_of_8(base, prompts, tmp_path, case):
    """Each process samples its own prompts' completions (4 each); the advantages, whitening and baselines that span the
    rollout are taken over both. Every logged value (rollout statistics included) and the final weights are those of
    one process of 8."""
    one = run_rl(base, prompts, tmp_path / "one", **TORCHRUN_CASES[case])[0]
    torchrun({"model": str(base), "train": prompts, **settings(tmp_path / "two", micro_batch_size=4, **TORCHRUN_CASES[case])},
             tmp_path)
    two = logs(tmp_path / "two")[0]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    if "target_kl" in TORCHRUN_CASES[case]:
        assert len({r["kl_coef"] for r in one}) > 2  # β moved at each rollout
    # (the logged tokens are every rank's completion tokens: compared with the rest)
    assert_same_run(one, two, final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), case)


FSDP_CASES = {
    # the policy is FSDP's root; the reference a frozen copy
    "grpo": LAYOUT_CASES["grpo"],
    # policy and critic under one root; LoRA's reference (adapters off) and the value head go through that root
    "ppo-lora": dict(algo="ppo", critic="shared", ppo_epochs=2, method="lora", lora_targets="q,v,fc", kl_coef=0.05,
                     lr=1e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_under_fsdp_two_processes_of_4_match_one_process_of_8(base, prompts, tmp_path, case):
    """Under FSDP each rank samples from a whole copy of the policy's current weights (its rollouts' lengths are
    its own, and a sharded forward pass is a collective): every logged value and the saved weights (gathered to
    rank 0) are those of one process of 8."""
    one = run_rl(base, prompts, tmp_path / "one", **FSDP_CASES[case])[0]
    torchrun({"model": str(base), "train": prompts, "parallel": "fsdp",
              **settings(tmp_path / "two", micro_batch_size=4, **FSDP_CASES[case])}, tmp_path)
    two = logs(tmp_path / "two")[0]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert (latest_checkpoint(tmp_path / "two") / "shards").is_dir()  # it did run sharded
    assert_same_run(one, two, final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), case)


@pytest.mark.slow
def test_under_fsdp_a_run_stopped_in_the_middle_of_a_rollout_resumes_exactly(base, prompts, tmp_path):
    """2 processes, 4 steps a rollout (2 epochs x 2 minibatches), stopped at step 2 and resumed: the same steps and
    weights as a run that went on (each rank took back its own rollout from the checkpoint; the lr is constant,
    so max_steps may grow)."""
    kw = dict(algo="ppo", ppo_epochs=2, minibatches=2, micro_batch_size=2, checkpoint_interval=2, lr=3e-3, min_lr=3e-3,
              max_steps=8, parallel="fsdp")
    torchrun({"model": str(base), "train": prompts, **settings(tmp_path / "a", **kw)}, tmp_path)
    torchrun({"model": str(base), "train": prompts, **settings(tmp_path / "b", **{**kw, "max_steps": 2})}, tmp_path)
    torchrun({"model": str(base), "train": prompts, **settings(tmp_path / "b", **kw)}, tmp_path, "--resume")
    assert_same_run(logs(tmp_path / "a")[0], logs(tmp_path / "b")[0], final_weights(tmp_path / "a"),
                    final_weights(tmp_path / "b"), "resumed")


class _Ranks:
    """Stand-in for the objective's process group, seen from rank 0: ``gather_to_main`` returns every rank's."""

    def __init__(self, everyone):
        self.everyone = everyone

    def gather_to_main(self, value):
        return self.everyone


def test_a_checkpoint_keeps_every_ranks_rollout_and_each_rank_resumes_its_own(base, prompts, tmp_path, monkeypatch):
    """Each process samples its own completions: a checkpoint saved mid-rollout holds every rank's buffer and each
    rank takes back its own (not rank 0's, which an earlier version gave to all); on another number of processes it
    is refused in one line, and a checkpoint at a rollout's end resumes anywhere (the next step samples anew)."""
    from lmforge.train.rl import RolloutStream

    spy = Spy(monkeypatch)
    run_rl(base, prompts, tmp_path / "run", **{**RESUME_CASES["ppo"][0], "max_steps": 1})
    objective = spy.objective
    stream = RolloutStream(objective, 0, 2)
    stream.buffer, stream.served, stream.rollout = {"rank": 0}, 1, 1
    objective.dist = _Ranks([{"rank": 0}, {"rank": 1}])
    state = stream.state_dict()
    assert state["buffers"] == [{"rank": 0}, {"rank": 1}]
    for rank in (0, 1):
        resumed = RolloutStream(objective, rank, 2)
        resumed.load_state_dict(state)
        assert resumed.buffer == {"rank": rank} and resumed.served == 1
    with pytest.raises(LmforgeError, match="saved by 2 process.*resume it on 2"):
        RolloutStream(objective, 0, 1).load_state_dict(state)
    stream.served = stream.per_rollout  # at the rollout's end: nothing is kept, any layout resumes
    state = stream.state_dict()
    assert state["buffers"] == []
    resumed = RolloutStream(objective, 0, 1)
    resumed.load_state_dict(state)
    assert resumed.buffer is None and resumed.served == resumed.per_rollout


# -- 4. exact resume ------------------------------------------------------------------------------


def interrupt_after(monkeypatch, step):
    """The process dies right after the checkpoint of ``step`` is saved."""
    from lmforge.train import loop

    save = loop.save_checkpoint

    def save_then_die(run, at, *args):
        save(run, at, *args)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", save)


RESUME_CASES = {
    # a checkpoint at a rollout's end; the reference (kl_coef) and a validation set
    "grpo": (dict(algo="grpo", kl_coef=0.05, max_steps=6, checkpoint_interval=3, eval_interval=3, lr=3e-3), 3),
    # 2 epochs x 2 minibatches of micro-batches of 4: 4 steps a rollout, the checkpoint at step 2 falls mid-rollout;
    # the adaptive β and the critic are in the state too
    "ppo": (dict(algo="ppo", ppo_epochs=2, minibatches=2, micro_batch_size=4, max_steps=8, checkpoint_interval=2,
                 eval_interval=4, target_kl=0.02, kl_horizon=16, lr=3e-3), 2),
    "reinforce": (dict(algo="reinforce", max_steps=6, checkpoint_interval=3, eval_interval=3, lr=3e-3), 3),  # its baseline
    # a value head on the policy's trunk, saved beside the policy
    "ppo-shared": (dict(algo="ppo", critic="shared", ppo_epochs=2, minibatches=2, micro_batch_size=4, max_steps=8,
                        checkpoint_interval=2, eval_interval=4, lr=3e-3), 2),
    # adapters, the reference being the base with them off
    "rloo-lora": (dict(algo="rloo", method="lora", lora_targets="q,v,o,fc", max_steps=6, checkpoint_interval=3,
                       eval_interval=3, lr=3e-2), 3),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_an_interrupted_run_resumes_exactly(base, prompts, tmp_path, monkeypatch, case):
    kw, at = RESUME_CASES[case]
    kw = dict(kw, val=prompts)
    a = run_rl(base, prompts, tmp_path / "a", **kw)
    restore = interrupt_after(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        run_rl(base, prompts, tmp_path / "b", **kw)
    restore()
    assert latest_checkpoint(tmp_path / "b").name == f"step_{at:07d}"
    rl(model=str(base), train=prompts, resume=True, progress=False, **settings(tmp_path / "b", **kw))
    b = logs(tmp_path / "b")
    assert [r["step"] for r in b[0]] == list(range(1, kw["max_steps"] + 1))
    assert [comparable(r) for r in a[0]] == [comparable(r) for r in b[0]]  # rewards, losses, KL, β: bit for bit
    assert a[1] == b[1] and len(a[1]) >= 2  # the greedy validation rewards
    assert samples(tmp_path / "a") == samples(tmp_path / "b")
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len({r["loss"] for r in a[0]}) > 2 and len({s["completion"] for s in samples(tmp_path / "a")}) > 8
    if case == "ppo":
        assert len({r["kl_coef"] for r in a[0]}) > 1  # β moved, and was restored
        assert any(k.startswith("critic/") for k in wa)
    if case == "ppo-shared":
        assert any(k.startswith("value_head.safetensors:") for k in wa)
    if case == "rloo-lora":
        assert any("lora_B" in k and wa[k].abs().max() > 0 for k in wa)  # the adapters trained


def test_a_run_killed_in_the_middle_of_a_step_resumes_exactly_and_writes_each_sample_once(base, prompts, tmp_path,
                                                                                          monkeypatch):
    """Dying after the step-4 rollout was made (and its samples written), before step 4 ends: the resumed run makes that
    rollout again from the step-3 checkpoint; samples.jsonl, like metrics.jsonl, must not hold it twice."""
    kw = dict(algo="grpo", max_steps=6, checkpoint_interval=3, lr=3e-3)
    a = run_rl(base, prompts, tmp_path / "a", **kw)
    loss, calls = RL.loss, []

    def die_in_step_4(self, model, batch):
        calls.append(1)
        if len(calls) == 4:  # one micro-batch a step
            raise KeyboardInterrupt
        return loss(self, model, batch)

    monkeypatch.setattr(RL, "loss", die_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_rl(base, prompts, tmp_path / "b", **kw)
    monkeypatch.setattr(RL, "loss", loss)
    assert [r["step"] for r in logs(tmp_path / "b")[0]] == [1, 2, 3]
    assert len(samples(tmp_path / "b")) == 4 * 8  # rollouts 0..3 were written
    rl(model=str(base), train=prompts, resume=True, progress=False, **settings(tmp_path / "b", **kw))
    b = logs(tmp_path / "b")
    assert [comparable(r) for r in a[0]] == [comparable(r) for r in b[0]]
    assert samples(tmp_path / "a") == samples(tmp_path / "b")


# -- 5. rewards -----------------------------------------------------------------------------------


def test_the_built_in_rewards_by_hand():
    assert exact_answer("q", "so it is 12", answer="12") == 1.0
    assert exact_answer("q", "it is 12.0", answer=12) == 1.0  # numbers compare as numbers
    assert exact_answer("q", "1,200 in all", answer="1200") == 1.0  # thousands separators ignored
    assert exact_answer("q", "12, no: 13", answer="12") == 0.0  # the last number is the answer
    assert exact_answer("q", "Paris\nis the capital", answer="Paris") == 1.0  # no number: the first line
    assert exact_answer("q", "paris", answer="Paris") == 0.0
    with pytest.raises(LmforgeError, match='needs an "answer" field'):
        exact_answer("q", "12")
    assert arithmetic("3 + 4 =", " 7 apples") == 1.0
    assert arithmetic("3 + 4 =", " 77") == 0.0 and arithmetic("3 + 4 =", " 8, no, 7") == 0.0  # the first number counts
    assert arithmetic("-3 + 4 =", " 1") == 1.0
    assert arithmetic("add them", " 12", a=5, b=7) == 1.0 and arithmetic("add them", "12", answer=12) == 1.0
    with pytest.raises(LmforgeError, match="arithmetic reward needs"):
        arithmetic("add them", "12")
    assert arithmetic([{"role": "system", "content": "add"}, {"role": "user", "content": "3 + 4 ="}], " 7") == 1.0
    rewards = parse_rewards("exact;arithmetic;regex:^\\s*\\d+$", "1;0.5;2")
    assert [(r.name, r.weight) for r in rewards] == [("exact", 1.0), ("arithmetic", 0.5), ("regex:^\\s*\\d+$", 2.0)]
    rows = [{"prompt": "3 + 4 =", "answer": "7"}, {"prompt": "3 + 4 =", "answer": "7"}, {"prompt": "1 + 1 =", "answer": "2"}]
    completions = [" 7", " 7 or 8", " two"]
    totals, parts, errors = score(rewards, [r["prompt"] for r in rows], completions, rows, "stop", -1.0)
    assert parts == {"exact": [1.0, 0.0, 0.0], "arithmetic": [1.0, 1.0, 0.0], "s__d": [1.0, 0.0, 0.0]}
    assert totals == [1 + 0.5 + 2, 0.5, 0.0] and errors == 0
    # rewards whose names read alike as metrics keep a metric each
    alike = parse_rewards("regex:[aiou];regex:[aiou]$;regex:^$")
    assert [r.key for r in alike] == ["aiou", "aiou_2", "reward"]
    assert score(alike, ["p"], ["ix"], [{}], "stop", 0.0)[1] == {"aiou": [1.0], "aiou_2": [0.0], "reward": [0.0]}


def test_a_regex_reward_keeps_its_white_space():
    """"regex:^ " (a completion starting with a space) must not become "regex:^", which every completion matches;
    nor "regex:x " (x then a space) "regex:x"."""
    reward = parse_rewards("regex:^ ;regex:x ")
    rows = [{"prompt": "p"}] * 3
    assert [r(["p"] * 3, [" x", "x", "x "], rows) for r in reward] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("spec, weights, message", [
    ("", "", "no reward given"),
    ("exact;arithmetic", "1", "--reward-weights has 1 value(s) for 2 reward(s)"),
    ("exact", "one", "--reward-weights must be numbers"),
    ("regex:(", "", "reward regex:(: not a valid regular expression"),
    ("bogus", "", "unknown reward 'bogus'"),
    ("no_such_module_for_rl:score", "", "reward no_such_module_for_rl:score: cannot import no_such_module_for_rl"),
    ("exact", "nan", "--reward-weights must be finite numbers, not 'nan'"),
    ("exact;arithmetic", "1;inf", "--reward-weights must be finite numbers"),
    ("regex:", "", "reward regex: needs a pattern"),
    ("./my_rewards.py:score", "", "names a Python module as you would import it, not a file (for a function score in "
                                  "my_rewards.py: my_rewards:score"),
    (".my_rewards:score", "", "names a Python module as you would import it"),
    (":score", "", "names a Python module as you would import it"),
    ("my_rewards:", "", "names a Python module as you would import it"),
])
def test_reward_specs_that_cannot_work_are_refused(spec, weights, message):
    with pytest.raises(LmforgeError, match=re.escape(message)):
        parse_rewards(spec, weights)


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A module of reward functions in the run's folder (found from the current folder, as a user's would be)."""
    (tmp_path / "rl_user_rewards.py").write_text(
        "import math\n"
        "def scaled_length(prompt, completion, scale, **fields):\n"
        "    return scale * len(completion)\n"
        "def boom(prompt, completion, **fields):\n"
        "    if prompt == '7 + 1 =':\n"
        "        raise ValueError('no good')\n"
        "    return 1.0\n"
        "def not_a_number(prompt, completion, **fields):\n"
        "    return math.nan if prompt == '7 + 1 =' else 1.0\n"
        "def picky(prompt, completion, **fields):\n"
        "    if len(completion) % 2:\n"
        "        raise ValueError('odd')\n"
        "    return math.inf if completion == '' else 1.0\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module's folder is added to sys.path for this test only
    yield tmp_path
    sys.modules.pop("rl_user_rewards", None)


def test_a_reward_module_that_fails_to_import_is_one_line_naming_where(user_rewards):
    (user_rewards / "rl_broken_rewards.py").write_text("def score(prompt, completion):\n    return (\n")
    with pytest.raises(LmforgeError, match=r"importing rl_broken_rewards failed \(rl_broken_rewards.py:2\): SyntaxError"):
        parse_rewards("rl_broken_rewards:score")
    (user_rewards / "rl_raising_rewards.py").write_text("raise RuntimeError('needs a GPU')\n")
    with pytest.raises(LmforgeError, match="importing rl_raising_rewards failed: RuntimeError: needs a GPU"):
        parse_rewards("rl_raising_rewards:score")


def test_a_module_named_like_one_python_already_has_is_refused_naming_the_file_imported(user_rewards):
    """./json.py holds score, but `import json` is the standard library's (imported long before): say which file was
    imported and that yours needs another name, not "json has no function score"."""
    (user_rewards / "json.py").write_text("def score(prompt, completion, **fields):\n    return 1.0\n")
    with pytest.raises(LmforgeError) as e:
        parse_rewards("json:score")
    message = str(e.value)
    assert message.startswith(f"reward json:score: `import json` gives {json.__file__}, not your json.py")
    assert "rename your file (for example json_reward.py, then json_reward:score)" in message
    assert "has no function" not in message
    # a module of its own (here, the fixture's) imports from the current folder as before
    assert parse_rewards("rl_user_rewards:boom")[0].fn.__module__ == "rl_user_rewards"


@pytest.mark.parametrize("function, rows, line, message", [
    # a parameter no row field fills (the third row lacks "answer"): caught in the file, not at the rollout meeting it
    ("needs_answer", [{"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "2 + 2 =", "answer": "4"},
                      {"prompt": "3 + 3 ="}], 3,
     "reward rl_user_rewards:needs_answer: needs_answer() needs the field(s) 'answer' (its parameters), which this row "
     "lacks (its other fields: none but 'prompt'); add them to every row, or give the parameter(s) a default"),
    # a row field the function takes no parameter for (lmforge passes them all) and no **fields
    ("no_fields", [{"prompt": "1 + 1 =", "answer": "2"}], 1,
     "reward rl_user_rewards:no_fields: lmforge passes every field of the row, no_fields(prompt=..., completion=..., "
     "**row_fields), but no_fields() takes no parameter 'answer'; add **fields to its parameters"),
], ids=["a-parameter-no-row-fills", "a-field-no-parameter-takes"])
def test_a_user_function_the_rows_fields_cannot_call_is_refused_before_the_run_folder(base, user_rewards, capsys,
                                                                                        function, rows, line, message):
    with open(user_rewards / "rl_user_rewards.py", "a") as f:
        f.write("def needs_answer(prompt, completion, answer):\n    return float(answer in completion)\n"
                "def no_fields(prompt, completion):\n    return 1.0\n")
    data = jsonl(user_rewards / "prompts.jsonl", rows)
    good = jsonl(user_rewards / "good.jsonl", [{"prompt": "1 + 1 =", "answer": "2"}] if function == "needs_answer"
                 else [{"prompt": "1 + 1 ="}])
    for train, val, where in ((data, None, f"{data}:{line}"), (good, data, f"{data}:{line}")):  # train, then val rows
        out = user_rewards / "run"
        argv = ["rl", "--model", str(base), "--train", train, "--out", str(out), "--reward",
                f"rl_user_rewards:{function}", "--max-new-tokens", "4", "--threads", "1", "--quiet",
                *(["--val", val] if val else [])]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"lmforge: error: {where}: {message}\n", err
        assert not out.exists()
    # the same rows with what the function needs train
    fixed = [{**r, "answer": r.get("answer", "6")} for r in rows] if function == "needs_answer" else \
        [{"prompt": r["prompt"]} for r in rows]
    run_rl(base, jsonl(user_rewards / "fixed.jsonl", fixed), user_rewards / "run", reward=f"rl_user_rewards:{function}",
           max_steps=1, micro_batch_size=4)
    assert len(samples(user_rewards / "run")) == 4


def test_a_user_function_gets_the_rows_fields_and_rewards_add_up_with_their_weights(base, user_rewards):
    rows = [{"prompt": f"{i} + {i} =", "answer": str(2 * i), "scale": 0.25 * (i + 1)} for i in range(8)]
    data = jsonl(user_rewards / "prompts.jsonl", rows)
    steps, _ = run_rl(base, data, user_rewards / "run", reward="rl_user_rewards:scaled_length;regex:[aiou]",
                      reward_weights="0.5;2", max_steps=1)
    scale = {r["prompt"]: r["scale"] for r in rows}
    written = samples(user_rewards / "run")
    assert len(written) == 8  # the whole rollout: 2 prompts x 4
    lengths = [scale[s["prompt"]] * len(s["completion"]) for s in written]
    vowels = [float(bool(re.search("[aiou]", s["completion"]))) for s in written]
    for s, f, g in zip(written, lengths, vowels):
        assert s["reward"] == pytest.approx(0.5 * f + 2 * g, abs=1e-6)
    assert len(set(vowels)) == 2 and len(set(lengths)) > 2  # both rewards vary
    record = steps[0]
    assert record["reward_rl_user_rewards_scaled_length"] == pytest.approx(sum(lengths) / 8, abs=1e-6)
    assert record["reward_aiou"] == pytest.approx(sum(vowels) / 8, abs=1e-6)
    assert record["reward_mean"] == pytest.approx(0.5 * sum(lengths) / 8 + 2 * sum(vowels) / 8, abs=1e-5)
    assert record["reward_std"] == pytest.approx(torch.tensor([s["reward"] for s in written]).std().item(), abs=1e-5)
    assert record["reward_errors"] == 0


@pytest.mark.parametrize("function, what", [("boom", "raised ValueError: no good"), ("not_a_number", "returned nan")])
def test_a_reward_that_fails_stops_the_run_with_one_line_naming_the_prompt(base, user_rewards, capsys, function, what):
    data = jsonl(user_rewards / "prompts.jsonl", [{"prompt": "2 + 2 ="}, {"prompt": "7 + 1 ="}])
    argv = ["rl", "--model", str(base), "--train", data, "--out", str(user_rewards / "run"), "--reward",
            f"rl_user_rewards:{function}", "--max-steps", "2", "--max-new-tokens", "4", "--threads", "1", "--dtype",
            "float32", "--tensorboard", "false", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: "), err
    assert f"reward rl_user_rewards:{function} {what} for the prompt '7 + 1 ='" in err
    assert "--reward-errors penalty" in err
    assert not (user_rewards / "run" / "checkpoints").exists()


def test_with_reward_errors_penalty_a_failing_reward_is_counted_and_scored_the_penalty(base, prompts, user_rewards,
                                                                                          capsys):
    steps, _ = run_rl(base, prompts, user_rewards / "run", reward="rl_user_rewards:picky", reward_errors="penalty",
                      error_penalty=-3.0, max_steps=2, max_new_tokens=4)
    written = samples(user_rewards / "run")
    failed = [len(s["completion"]) % 2 == 1 or s["completion"] == "" for s in written]  # raised, or returned inf
    assert [s["reward"] for s in written] == [-3.0 if bad else 1.0 for bad in failed]
    assert 0 < sum(failed) < len(failed)
    assert [r["reward_errors"] for r in steps] == [sum(failed[:8]), sum(failed[8:])]
    # said once, with the first failure, not once a completion
    err = capsys.readouterr().err
    assert err.count("warning: reward rl_user_rewards:picky ") == 1 and "scored -3.0 (--reward-errors penalty)" in err


def test_prompts_in_turns_after_a_first_prompt_of_text_save_the_chat_template_and_end_of_turn(base, tmp_path):
    """Whichever row comes first: prompts rendered through the chat template save it with the policy, and the policy's
    generation ends at the end of a turn, as a file of conversations alone does."""
    rows = prompt_rows(1) + [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                             for r in prompt_rows(7, seed=1)]
    run_rl(base, jsonl(tmp_path / "mixed.jsonl", rows), tmp_path / "run", max_steps=1)
    folder = latest_checkpoint(tmp_path / "run") / "model"
    saved = Tokenizer.load(folder)
    assert saved.chat_template and "<|im_start|>" in saved.chat_template
    assert saved.end_of_turn_id in json.loads((folder / "generation_config.json").read_text())["eos_token_id"]


def test_missing_eos_penalty_is_subtracted_from_truncated_completions_only(base, prompts, tmp_path):
    # one step: the first rollout, sampled from the same weights (the penalty changes the updates, hence later rollouts)
    run_rl(base, prompts, tmp_path / "plain", max_steps=1)
    run_rl(base, prompts, tmp_path / "penalised", max_steps=1, missing_eos_penalty=0.75)
    plain, penalised = samples(tmp_path / "plain"), samples(tmp_path / "penalised")
    assert [s["completion"] for s in plain] == [s["completion"] for s in penalised]  # the same sampling
    truncated = [s["truncated"] for s in plain]
    assert 0 < sum(truncated) < len(truncated)  # some cut at max_new_tokens, some ended by the stop string
    for p, q in zip(plain, penalised):
        assert q["reward"] == pytest.approx(p["reward"] - (0.75 if p["truncated"] else 0.0), abs=1e-6)


def test_stop_strings_end_completions_before_them(base, prompts, tmp_path):
    run_rl(base, prompts, tmp_path / "free", max_steps=1, stop="")  # one rollout from the starting weights each
    run_rl(base, prompts, tmp_path / "stopped", max_steps=1, stop="e;t")
    free, stopped = samples(tmp_path / "free"), samples(tmp_path / "stopped")
    ended = 0
    for f, s in zip(free, stopped):
        assert "e" not in s["completion"] and "t" not in s["completion"]
        assert f["completion"].startswith(s["completion"])  # the same tokens up to the stop
        if not s["truncated"]:  # ended by a stop string: the free completion goes on with it
            assert f["completion"][len(s["completion"])] in "et"
            ended += 1
        else:
            assert s["completion"] == f["completion"]
    assert 4 <= ended < len(stopped)  # most end at a stop string, some run to max_new_tokens


def test_a_reward_model_scores_the_completions_and_ppo_starts_its_critic_from_it(base, prompts, tmp_path, tokenizer_dir,
                                                                                   monkeypatch):
    from lmforge.train.preference import reward_scores

    rm = make_reward_model(tmp_path / "rm", tokenizer_dir)
    critics = []
    actor_critic = RL.actor_critic

    def keep_critic(self):
        model = actor_critic(self)
        critics.append({k: v.clone() for k, v in model.critic.state_dict().items()})
        return model

    monkeypatch.setattr(RL, "actor_critic", keep_critic)
    run_rl(base, prompts, tmp_path / "run", algo="ppo", reward=f"model:{rm}", max_steps=1)
    written = samples(tmp_path / "run")
    expected = reward_scores(rm, [{"prompt": s["prompt"], "answer": s["completion"]} for s in written])
    assert [s["reward"] for s in written] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 4
    assert critics and critics[0].keys() == load_model(rm).state_dict().keys()  # critic auto: a copy of the reward model
    assert all(torch.equal(critics[0][k], v) for k, v in load_model(rm).state_dict().items())
    assert (latest_checkpoint(tmp_path / "run") / "model" / "critic").is_dir()


def make_reward_model(folder, tokenizer_dir):
    """A random tiny transformers GPT-2 reward model (one score) with the test tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        num_labels=1, pad_token_id=0)
    GPT2ForSequenceClassification(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


# -- 6. the KL to the reference -------------------------------------------------------------------


def first_token_kl(run, base, tok, rows) -> float:
    """KL(π‖π_ref) of the first completion token's distribution, exactly, averaged over the prompts."""
    policy, reference = load_model(run).eval(), load_model(base).eval()
    total = 0.0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tok.encode(row["prompt"])])
            logp, ref = policy(ids)[0, -1].log_softmax(-1), reference(ids)[0, -1].log_softmax(-1)
            total += (logp.exp() * (logp - ref)).sum().item()
    return total / len(rows)


def test_a_larger_kl_coef_keeps_the_policy_closer_to_the_reference(base, prompts, tok, tmp_path):
    """RLOO, the reward (a completion starting with white space: a first-token property) shaped by -β·k1, 12 steps of
    16 completions at a large lr, two seeds: the larger β, the smaller the exact KL of the first token's distribution
    and the rollouts' KL. (k3 is tested for what it is, an estimate of the KL's value: as a reward its expected gradient
    is ∇KL(π‖ref) - ∇KL(ref‖π), which nearly vanishes near the reference, and its help says so.)"""
    kl, logged = {}, {}
    for beta in (0.0, 0.3, 3.0):
        for seed in (0, 1):
            out = tmp_path / f"beta{beta}-{seed}"
            steps, _ = run_rl(base, prompts, out, algo="rloo", kl_coef=beta, reward="regex:^\\s", micro_batch_size=16,
                              max_steps=12, lr=1e-2, seed=seed)
            kl[beta] = kl.get(beta, 0.0) + first_token_kl(out, base, tok, prompt_rows()) / 2
            if beta:
                assert steps[0]["kl"] == 0.0
                logged[beta] = logged.get(beta, 0.0) + sum(r["kl"] for r in steps[-4:]) / 8  # the last 4 rollouts' KL
            else:
                assert "kl" not in steps[0]  # no reference is loaded for β = 0
    print(f"first-token KL: {kl}; rollouts' KL over the last 4 steps: {logged}")
    assert kl[0.0] > 1.2 * kl[0.3] and kl[0.3] > 1.3 * kl[3.0] > 0
    assert logged[0.3] > logged[3.0]
    help_text = {f.name: f.metadata["help"] for f in fields(RLConfig)}["kl_estimator"]
    assert "prefer k1" in help_text and "nearly vanishes" in help_text


def test_with_lora_the_reference_is_the_base_with_its_adapters_off(base, prompts, tmp_path, monkeypatch):
    def no_second_model(*args, **kw):
        raise AssertionError("a second model was loaded")

    monkeypatch.setattr(rl_module, "load_model", no_second_model)  # what rl.py loads a reference or critic with
    spy = Spy(monkeypatch)
    steps, _ = run_rl(base, prompts, tmp_path / "run", algo="rloo", method="lora", lora_targets="q,v,o,fc", kl_coef=0.05,
                      lr=3e-2)
    assert spy.objective.ref_model is None and spy.objective.uses_reference
    assert steps[0]["kl"] == 0.0  # the adapters start at zero: the policy is its reference, exactly
    assert all(r["kl"] != 0.0 for r in steps[1:])  # and then moves away from it
    # the last rollout's reference log-probs are the base model's own
    buffer = spy.buffers[-1]
    batch = spy.objective.micro_batch(buffer, list(range(8)), "cpu", frozen=True)
    with torch.no_grad():
        logits = load_model(base).eval()(batch["ids"], select=batch["learned"])
        base_logp = -torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert max_diff(buffer["ref_logp"][buffer["cmask"]], base_logp) < 1e-6
    assert max_diff(buffer["old_logp"][buffer["cmask"]], base_logp) > 1e-2  # while the policy's differ


# -- 7. the command line --------------------------------------------------------------------------


def test_the_rl_command_trains_a_policy_that_generate_loads_and_writes_its_samples(base, prompts, tmp_path, capsys):
    from lmforge.infer.generate import generate

    run = tmp_path / "run"
    argv = ["rl", "--model", str(base), "--train", prompts, "--reward", "arithmetic;regex:[aiou]", "--out", str(run),
            "--max-steps", "2", "--micro-batch-size", "8", "--max-new-tokens", "4", "--lr", "1e-2", "--sample-interval", "1",
            "--threads", "1", "--dtype", "float32", "--tensorboard", "false", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"done: 2 steps; latest checkpoint {run / 'checkpoints' / 'step_0000002'}" in out
    assert "grpo by full; 16 training / 0 validation prompts" in out
    steps, _ = logs(run)
    assert [r["step"] for r in steps] == [1, 2]
    written = samples(run)
    assert len(written) == 16 and all(set(s) == {"step", "prompt", "completion", "reward", "truncated"} for s in written)
    rows = {r["prompt"]: r for r in prompt_rows()}
    for s in written:  # each reward is the sum of the two, recomputed from the row and the completion
        expected = arithmetic(**{**rows[s["prompt"]], "completion": s["completion"]})
        assert s["reward"] == expected + float(bool(re.search("[aiou]", s["completion"])))
    assert [s["step"] for s in written] == [0] * 8 + [1] * 8
    policy, original = load_model(run), load_model(base)
    assert policy.score is None  # still a language model
    moved = max((a - b).abs().max().item() for a, b in zip(policy.state_dict().values(), original.state_dict().values()))
    assert moved > 1e-3
    assert main(["generate", "--model", str(run), "1 + 2 =", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed == generate(str(run), "1 + 2 =", max_new_tokens=4, temperature=0).text + "\n"


@pytest.mark.parametrize("argv, message", [
    ([], "bad config: reward is required"),
    (["--reward", "bogus"], "unknown reward 'bogus': use exact, arithmetic, regex:PATTERN, model:DIR or MODULE:FUNCTION"),
    (["--reward", "exact", "--num-generations", "1"],
     "bad config: grpo compares completions of a prompt: num_generations must be at least 2"),
    (["--reward", "exact", "--algo", "rloo", "--num-generations", "1"], "rloo compares completions of a prompt"),
    (["--reward", "exact", "--micro-batch-size", "6"],
     ("a rollout of 6 completions (micro_batch_size x grad_accum_steps x minibatches) must hold whole groups of "
      "num_generations 4")),
    (["--reward", "exact", "--model", "{rm}"],
     "RL trains a causal language model; {rm} is a classifier or reward model (it has a score head)"),
    (["--reward", "model:{base}"], "{base} is not a reward model (one score)"),
    (["--reward", "no_such_module_for_rl:score"], "reward no_such_module_for_rl:score: cannot import no_such_module_for_rl"),
    (["--reward", "exact", "--train", "{bad}"], "{bad}:2: missing field 'prompt'"),
    (["--reward", "exact", "--train", "{empty}"], "{empty}:1: 'prompt' is empty"),
    (["--reward", "exact", "--max-new-tokens", "64"], "max_new_tokens 64 leaves no room for a prompt in the model's context"),
    (["--reward", "exact;arithmetic", "--reward-weights", "1"], "--reward-weights has 1 value(s) for 2 reward(s)"),
    (["--reward", "exact", "--temperature", "0"], "temperature must be positive"),
    (["--reward", "exact", "--epochs", "1"], "--epochs does nothing here"),
    (["--reward", "exact", "--num-generations", "0"], "bad config: num_generations must be at least 1"),
    (["--reward", "exact", "--temperature", "inf"], "bad config: temperature must be a finite number, not inf"),
    (["--reward", "exact", "--train", "{late}"], "{late}:3: the exact reward needs an \"answer\" field"),
    (["--reward", "arithmetic", "--train", "{late}"], "{late}:3: the arithmetic reward needs"),
    (["--reward", "exact", "--train", "{folder}"], "prompts file {folder} is a folder: give the .jsonl, .csv or .parquet"),
    (["--reward", "exact", "--gamma", "0.5"], "bad config: gamma applies to --algo ppo only, not grpo; leave it out"),
    (["--reward", "exact", "--algo", "ppo", "--loss-norm", "dapo"], "loss_norm applies to --algo grpo only, not ppo"),
    # target_kl multiplies β: from 0 it would never move it, and the run would go on without the controller
    (["--reward", "exact", "--target-kl", "0.1"],
     "target_kl 0.1 adapts the KL coefficient by multiplying it, so it cannot move a coefficient of 0 (--algo grpo's "
     "default); give --kl-coef > 0"),
    (["--reward", "exact", "--algo", "rloo", "--kl-coef", "0", "--target-kl", "0.1"],
     "cannot move a coefficient of 0 (--kl-coef 0); give --kl-coef > 0"),
    (["--reward", "exact", "--kl-coef", "0.1", "--kl-estimator", "k3"],
     "bad config: kl_estimator applies to --algo ppo or rloo or reinforce only, not grpo; leave it out"),
    (["--reward", "lenr.py:score"], "reward lenr.py:score: MODULE:FUNCTION names a Python module as you would import "
                                    "it, not a file (for a function score in lenr.py: lenr:score, run from the folder "
                                    "that holds lenr.py)"),
], ids=["no-reward", "unknown-reward", "grpo-one-generation", "rloo-one-generation", "partial-group",
        "reward-model-as-policy", "policy-as-reward-model", "unimportable-function", "bad-prompt-line", "empty-prompt",
        "no-room-for-the-prompt", "weights-count", "zero-temperature", "ignored-key", "no-generations",
        "infinite-temperature", "a-late-row-without-answer", "a-late-row-without-operands", "a-folder",
        "a-ppo-setting-for-grpo", "a-grpo-setting-for-ppo", "target-kl-from-beta-0", "target-kl-from-beta-0-rloo",
        "kl-estimator-for-grpo", "a-file-name-as-module"])
def test_command_mistakes_exit_2_with_one_line_and_write_no_run_folder(base, prompts, tmp_path, tokenizer_dir, capsys,
                                                                       argv, message):
    fill = {"base": str(base), "bad": jsonl(tmp_path / "bad.jsonl", [{"prompt": "1 + 1 ="}, {"text": "2 + 2 ="}]),
            "empty": jsonl(tmp_path / "empty.jsonl", [{"prompt": "  "}]),
            "folder": str(tmp_path), "late": jsonl(tmp_path / "late.jsonl", [{"prompt": "1 + 1 =", "answer": "2"},
                                                    {"prompt": [{"role": "user", "content": "2 + 2 ="}], "answer": "4"},
                                                    {"prompt": "add nine and nine", "answr": "18"}])}
    if "{rm}" in "".join(argv):
        fill["rm"] = str(make_reward_model(tmp_path / "rm", tokenizer_dir))
    out = tmp_path / "run"
    argv = ["rl", "--model", str(base), "--train", prompts, "--out", str(out), "--threads", "1", "--max-new-tokens", "4",
            "--quiet",
            *[a.format(**fill) for a in argv]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: "), err
    assert message.format(**fill) in err, err
    assert not out.exists()


@pytest.mark.parametrize("prompt, problem", [
    (5, "'prompt' must be a string or a non-empty list of {\"role\", \"content\"} messages, not a number (5)"),
    (None, "'prompt' must be a string or a non-empty list of {\"role\", \"content\"} messages, not null"),
    ([{"role": "user", "content": 5}], "'prompt' message 0's 'content' must be a string, not a number (5)"),
    ([{"role": "robot", "content": "q"}], "'prompt' message 0 has role 'robot'"),
], ids=["number", "null", "content", "role"])
def test_a_prompt_of_the_wrong_type_is_named_with_its_type(tmp_path, prompt, problem):
    from lmforge.train.rl import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "add 1 2"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(LmforgeError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2: {problem}"), str(e.value)


def test_rewards_read_completions_without_special_tokens_as_trl_decodes_them(tmp_path, tokenizer_dir, prompts):
    """TRL decodes completions with skip_special_tokens=True before its reward functions read them; lmforge gave
    them the special tokens' text too (a model writing <|im_start|>, which is no stop token, scored on it)."""
    from conftest import make_special_token_writer

    model = make_special_token_writer(tmp_path / "m", tokenizer_dir)
    run_rl(model, prompts, tmp_path / "run", max_steps=1, reward="regex:im_start", stop="")
    rows = samples(tmp_path / "run")
    assert rows and all(r["completion"] == "" and r["reward"] == 0.0 for r in rows), rows[:2]
