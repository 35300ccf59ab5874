"""Preference learning against the reference: TRL's RewardTrainer and DPOTrainer losses and gradients,
the papers' formulas for conservative DPO and IPO, and saved models that transformers and PEFT load with
the same scores.

Every model is a random tiny one built here, in float32; TRL runs with ``bf16=False`` (its default on a
CPU with bf16 is autocast, which its reference model gets and its policy does not until training starts).
"""

import copy
import json
import logging
import math
import shutil
import warnings

import pytest
import torch
from conftest import make_hf_gpt2

from lmforge.cli import main
from lmforge.data.preference import read_pairs
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_adapted, load_model, save_model
from lmforge.model.hf import state_dict_to_hf
from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from lmforge.train.checkpointing import latest_checkpoint
from lmforge.train.config import DPOConfig, RewardConfig
from lmforge.train.preference import DPO, RewardModel, answer_logps, reward_scores

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft", reason="peft (a dev extra) is not installed")

# Prompts end on a word boundary, so tokenising prompt + answer as one text (TRL) or the answer after the
# prompt's own tokens (lmforge) gives the same ids; answers differ in length, so length-normalising matters.
PAIRS = [
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b", "rejected": "\n    pass"},
    {"prompt": "import json\nprint(json.dumps(", "chosen": "data))", "rejected": "x, indent=2))"},
    {"prompt": "The answer is", "chosen": " yes", "rejected": " no, it is not"},
    {"prompt": "for i in", "chosen": " range(10):", "rejected": " x:"},
]
MARGINS = [0.5, -0.25, 1.0, 0.0]
CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "add 2 3"}],
     "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "six"}]},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def?"}],
     "chosen": [{"role": "assistant", "content": "a keyword"}],
     "rejected": [{"role": "assistant", "content": "no idea at all"}]},
]
SCORE_ROWS = [  # (prompt, answer) rows of different lengths, scored in one padded batch
    {"prompt": "def add(a, b):", "answer": "\n    return a + b"},
    {"prompt": "The answer is", "answer": " yes"},
    {"prompt": "import json\nprint(json.dumps(", "answer": "data))"},
    {"prompt": "x", "answer": " = 1"},
]
RUN = {"threads": 1, "dtype": "float32", "tensorboard": False, "seed": 0, "val_fraction": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest: torch on one thread, as the runs are)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_tokenizer(folder, chat: bool = False):
    """lmforge's tokenizer.json wrapped for transformers, with the eos/pad tokens its tokenizer_config names."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                               eos_token=config["eos_token"], pad_token=config["pad_token"])
    if chat:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
               disable_tqdm=True, dataloader_num_workers=0, seed=0, **kw)


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def assert_near(ours, theirs, tol: float, what: str) -> float:
    d = max_diff(ours, theirs)
    print(f"{what}: max |lmforge - reference| = {d:.2e}")
    assert d <= tol, f"{what}: max difference {d:.3e} > {tol:.0e}"
    return d


def grads_in_hf_names(model) -> dict[str, torch.Tensor]:
    """The gradients of an lmforge decoder under transformers' parameter names (fused/transposed as HF stores them)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), clone.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return state_dict_to_hf(clone)


def assert_same_grads(ours_model, hf_model, what: str) -> None:
    ours = grads_in_hf_names(ours_model)
    theirs = {n: p.grad for n, p in hf_model.named_parameters() if p.requires_grad}
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    assert all(g is not None for g in theirs.values())
    worst = max(max_diff(ours[n], g) / (g.abs().max().item() + 1e-12) for n, g in theirs.items())
    largest = max(g.abs().max().item() for g in theirs.values())
    print(f"{what}: {len(theirs)} gradient tensors, worst relative difference {worst:.2e} "
          f"(largest gradient {largest:.2e})")
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, atol=1e-6 + 1e-4 * g.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- 1. the reward model: Bradley-Terry loss as TRL's RewardTrainer.compute_loss -----------------------


@pytest.mark.parametrize("case", ["plain", "margin", "center"])
def test_reward_loss_and_gradients_equal_trl_reward_trainer(case, tmp_path, tokenizer_dir):
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    rows = [dict(r, margin=m) for r, m in zip(PAIRS, MARGINS)] if case == "margin" else PAIRS
    center = 0.3 if case == "center" else 0.0
    data = jsonl(tmp_path / "pairs.jsonl", rows)
    config = RewardConfig(model=str(base), train=str(data), out=str(tmp_path / "run"), center_rewards=center, **RUN)
    ours = RewardModel(config, torch.device("cpu"), None, read_pairs(data))
    with torch.no_grad():  # rewards of order 1 rather than the fresh head's 0.02, so the loss is not just log 2
        ours.model.score.weight.mul_(50)
    # the same weights, score head included, as a transformers GPT2ForSequenceClassification
    save_model(ours.model, tmp_path / "reward", ours.tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward"), num_labels=1)
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert torch.equal(hf.score.weight, ours.model.score.weight)
    args = trl_args(trl.RewardConfig, tmp_path, center_rewards_coefficient=center or None)
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=hf_tokenizer(tokenizer_dir))
    # TRL tokenises prompt + answer + EOS as one text: the same ids as lmforge's prompt ids + answer ids (+ EOS)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    eos = ours.tokenizer.eos_id
    assert [e["chosen_ids"] for e in examples] == [p.prompt + p.chosen for p in ours.train_pairs]
    assert [e["rejected_ids"] for e in examples] == [p.prompt + p.rejected for p in ours.train_pairs]
    assert all(p.chosen[-1] == eos and p.rejected[-1] == eos for p in ours.train_pairs)
    assert hf.config.pad_token_id == ours.model.config.pad_token_id == ours.tokenizer.pad_id

    trainer.model.train()
    ours.model.train()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    loss, metrics = ours.pair_loss(ours.model, ours.collate(list(range(len(rows)))))
    assert 0.05 < abs(loss.item() - math.log(2)), "rewards too small for the comparison to mean anything"
    assert_near(loss.item(), theirs.item(), 1e-5, f"reward loss ({case})")
    assert_near(metrics["reward_accuracy"], trainer._metrics["train"]["accuracy"][-1], 1e-6, "pair accuracy")
    assert_near(metrics["reward_margin"], trainer._metrics["train"]["margin"][-1], 1e-5, "reward margin")
    loss.backward()
    theirs.backward()
    # (relative: lmforge packs chosen and rejected behind one pass of the prompt, so sums run in another order)
    scale = hf.score.weight.grad.abs().max().item()
    assert_near(ours.model.score.weight.grad, hf.score.weight.grad, 1e-6 * max(1.0, scale), f"score head gradient ({case})")
    assert_same_grads(ours.model, hf, f"reward model gradients ({case})")


# -- 2. DPO: the sigmoid loss and its gradient as TRL's DPOTrainer ---------------------------------------


def perturbed_policy(base, folder, seed=1, scale=0.03):
    """A policy that differs from its reference ``base``: the same weights plus noise (a transformers folder)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(folder)
    return folder


def dpo_objective(base, policy, data, out, **kw):
    """lmforge's DPO objective on ``data`` with the reference ``base`` and the policy's weights from ``policy``."""
    config = DPOConfig(model=str(base), train=str(data), out=str(out), **{**RUN, **kw})
    objective = DPO(config, torch.device("cpu"), None, read_pairs(data))
    objective.model.load_state_dict(load_model(policy).state_dict())
    objective.model.train()
    return objective


def trl_dpo(base, policy, rows, tokenizer, tmp_path, **kw):
    return trl.DPOTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(str(policy)),
                          ref_model=transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                          args=trl_args(trl.DPOConfig, tmp_path, **kw), train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_loss_gradients_and_logged_rewards_equal_trl(beta, tmp_path, tokenizer_dir):
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    policy = perturbed_policy(base, tmp_path / "policy", scale=0.1)
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ours = dpo_objective(base, policy, data, tmp_path / "run", beta=beta, reference="copy")
    trainer = trl_dpo(base, policy, PAIRS, hf_tokenizer(tokenizer_dir), tmp_path, beta=beta)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    for mine, theirs in zip(ours.train_pairs, examples):
        assert mine.prompt == theirs["prompt_ids"]
        assert (mine.chosen, mine.rejected) == (theirs["chosen_ids"], theirs["rejected_ids"])

    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    batch = ours.collate(list(range(len(PAIRS))))
    loss, metrics = ours.pair_loss(ours.model, batch)
    with torch.no_grad():
        ratios = (answer_logps(ours.model, batch) - answer_logps(ours.ref_model, batch)).view(2, -1)
    assert (ratios[0] - ratios[1]).abs().max() > 0.5, "policy and reference too close for the comparison to mean much"
    assert_near(loss.item(), theirs.item(), 1e-5, f"DPO sigmoid loss (beta {beta})")
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for mine, key, tol in [("reward_chosen", "rewards/chosen", 1e-5), ("reward_rejected", "rewards/rejected", 1e-5),
                           ("reward_margin", "rewards/margins", 1e-5), ("reward_accuracy", "rewards/accuracies", 1e-6),
                           ("logp_chosen", "logps/chosen", 1e-4), ("logp_rejected", "logps/rejected", 1e-4)]:
        assert_near(metrics[mine].item(), logged[key], tol, f"{mine} vs TRL's {key}")
    loss.backward()
    theirs.backward()
    assert_same_grads(ours.model, trainer.model, f"DPO gradients (beta {beta})")

    # the reference's log-probs computed once (reference precomputed) give the same loss as a copy
    cached = dpo_objective(base, policy, data, tmp_path / "run2", beta=beta, reference="precomputed")
    assert_near(cached.pair_loss(cached.model, batch)[0].item(), loss.item(), 1e-6, "precomputed reference vs copy")


def test_answer_ids_equal_trl_and_differ_only_where_documented(tmp_path, tokenizer_dir):
    """Strings: the same ids as TRL. Messages: TRL's answers keep the newline ChatML puts after <|im_end|>; lmforge's
    stop at <|im_end|> (generation stops there). A prompt ending in a space: lmforge keeps the prompt's own tokens
    and tokenises the answer alone; TRL moves the space into the answer (" 1") and drops it from the prompt."""
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    tok = Tokenizer.load(tokenizer_dir)
    hf_tok = hf_tokenizer(tokenizer_dir, chat=True)
    boundary = [{"prompt": "x = ", "chosen": "1", "rejected": "None"}]

    def both(rows, name):
        data = jsonl(tmp_path / f"{name}.jsonl", rows)
        config = DPOConfig(model=str(base), train=str(data), out=str(tmp_path / name), **RUN)
        ours = DPO(config, torch.device("cpu"), None, read_pairs(data))
        trainer = trl_dpo(base, base, rows, hf_tok, tmp_path)
        return ours, [trainer.train_dataset[i] for i in range(len(rows))]

    ours, theirs = both(PAIRS, "strings")
    assert [(p.prompt, p.chosen, p.rejected) for p in ours.train_pairs] == \
        [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs]

    ours, theirs = both(CHAT_PAIRS, "chat")
    newline, im_end = tok.encode("\n"), tok.end_of_turn_id
    assert newline == [tok.encode("<|im_end|>\n")[-1]]  # one token after <|im_end|>
    for row, p, t in zip(CHAT_PAIRS, ours.train_pairs, theirs):
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
        assert p.prompt == t["prompt_ids"] == tok.encode(rendered)
        assert p.chosen[-1] == p.rejected[-1] == im_end
        assert t["chosen_ids"] == p.chosen + newline and t["rejected_ids"] == p.rejected + newline
    # an implicit prompt (the messages both conversations share) is split off as TRL's extract_prompt does
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT_PAIRS]
    ours_implicit, theirs_implicit = both(implicit, "implicit")
    assert ours_implicit.train_pairs == ours.train_pairs and theirs_implicit == theirs

    ours, theirs = both(boundary, "boundary")
    (p,), (t,) = ours.train_pairs, theirs
    assert p.prompt == tok.encode("x = ") and t["prompt_ids"] == p.prompt[:-1] == tok.encode("x =")
    assert p.chosen == tok.encode("1") + [tok.eos_id] and t["chosen_ids"] == tok.encode(" 1") + [tok.eos_id]
    assert p.rejected == tok.encode("None") + [tok.eos_id] and t["rejected_ids"] == tok.encode(" None") + [tok.eos_id]

    # the reward model's sequences: TRL renders prompt + answer whole, so its messages end with that newline too
    data = tmp_path / "chat.jsonl"
    config = RewardConfig(model=str(base), train=str(data), out=str(tmp_path / "r"), **RUN)
    rm = RewardModel(config, torch.device("cpu"), None, read_pairs(data))
    save_model(rm.model, tmp_path / "reward", rm.tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward"), num_labels=1)
    trainer = trl.RewardTrainer(model=hf, args=trl_args(trl.RewardConfig, tmp_path),
                                train_dataset=datasets.Dataset.from_list(CHAT_PAIRS), processing_class=hf_tok)
    for p, t in zip(rm.train_pairs, (trainer.train_dataset[i] for i in range(len(CHAT_PAIRS)))):
        assert t["chosen_ids"] == p.prompt + p.chosen + newline and t["rejected_ids"] == p.prompt + p.rejected + newline


HH_PAIRS = [  # Anthropic HH style: no prompt, each answer the whole text
    {"chosen": "\n\nHuman: add 2 3\n\nAssistant: 5", "rejected": "\n\nHuman: add 2 3\n\nAssistant: six"},
    {"chosen": "\n\nHuman: def?\n\nAssistant: a keyword", "rejected": "\n\nHuman: def?\n\nAssistant: no idea at all"},
    {"chosen": "The answer is yes", "rejected": "The answer is no"},
]


def test_an_implicit_prompt_is_split_as_trls_extract_prompt():
    """Strings and message lists sharing starts of every length (none, some, one answer the other's whole start), split
    by lmforge and by trl.data_utils.extract_prompt: the same prompt and answers. Where the answers differ from their
    first item TRL's loop ends at index 0 and, if the chosen answer ends in a space, takes chosen[:-1] as the prompt
    (its idx - 1 wraps around): lmforge gives such a pair no prompt, as TRL does whenever that last item is not a
    space."""
    import random

    from trl.data_utils import extract_prompt

    from lmforge.data.preference import split_implicit_prompt

    rng = random.Random(0)
    words = ["a", "b", " ", "ab", "  "]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": "y"}, {"role": "user", "content": "r"}]
    cases = [dict(r) for r in HH_PAIRS]
    for _ in range(400):
        shared = "".join(rng.choices(words, k=rng.randint(0, 4)))
        cases.append({"chosen": shared + "".join(rng.choices(words, k=rng.randint(1, 3))),
                      "rejected": shared + "".join(rng.choices(words, k=rng.randint(1, 3)))})
        turns = rng.choices(messages, k=rng.randint(0, 2))
        cases.append({"chosen": turns + rng.choices(messages, k=rng.randint(1, 2)),
                      "rejected": turns + rng.choices(messages, k=rng.randint(1, 2))})
    compared = quirk = 0
    for case in cases:
        if case["chosen"] == case["rejected"]:
            continue  # (refused as no preference)
        ours = split_implicit_prompt(case)
        theirs = extract_prompt(case)
        if case["chosen"][0] != case["rejected"][0] and case["chosen"][-1] == " ":
            quirk += 1
            assert ours["prompt"] == case["chosen"][:0] and theirs["prompt"] == case["chosen"][:-1]
            continue
        assert {k: ours[k] for k in ("prompt", "chosen", "rejected")} == theirs, case
        compared += 1
    assert compared > 600 and quirk > 0
    assert sum(bool(split_implicit_prompt(c)["prompt"]) for c in cases if c["chosen"] != c["rejected"]) > 300


def test_string_pairs_with_an_implicit_prompt_tokenise_as_trl(tmp_path, tokenizer_dir):
    """HH-style pairs: DPO's prompt and answer ids are TRL's DPOTrainer's (it splits them with extract_prompt), and the
    reward model reads prompt + answer: the ids TRL's RewardTrainer reads for the whole text, then the end-of-text."""
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    tok = Tokenizer.load(tokenizer_dir)
    data = jsonl(tmp_path / "hh.jsonl", HH_PAIRS)
    ours = DPO(DPOConfig(model=str(base), train=str(data), out=str(tmp_path / "dpo"), **RUN), torch.device("cpu"), None,
               read_pairs(data))
    trainer = trl_dpo(base, base, HH_PAIRS, hf_tokenizer(tokenizer_dir), tmp_path)
    theirs = [trainer.train_dataset[i] for i in range(len(HH_PAIRS))]
    assert [(p.prompt, p.chosen, p.rejected) for p in ours.train_pairs] == \
        [(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in theirs]
    config = RewardConfig(model=str(base), train=str(data), out=str(tmp_path / "r"), **RUN)
    rm = RewardModel(config, torch.device("cpu"), None, read_pairs(data))
    save_model(rm.model, tmp_path / "reward", rm.tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward"), num_labels=1)
    trainer = trl.RewardTrainer(model=hf, args=trl_args(trl.RewardConfig, tmp_path),
                                train_dataset=datasets.Dataset.from_list(HH_PAIRS),
                                processing_class=hf_tokenizer(tokenizer_dir))
    for row, p, t in zip(HH_PAIRS, rm.train_pairs, (trainer.train_dataset[i] for i in range(len(HH_PAIRS)))):
        assert p.prompt + p.chosen == tok.encode(row["chosen"]) + [tok.eos_id] == t["chosen_ids"]
        assert p.prompt + p.rejected == tok.encode(row["rejected"]) + [tok.eos_id] == t["rejected_ids"]


# -- 3. conservative DPO and IPO: the papers' formulas -----------------------------------------------


def sequence_logps(model, pairs) -> torch.Tensor:
    """(pairs, 2): log π(chosen | prompt) and log π(rejected | prompt), summed over the answer's tokens, one
    sequence at a time (no padding, no labels tensor)."""
    out = []
    with torch.no_grad():
        for p in pairs:
            row = []
            for answer in (p.chosen, p.rejected):
                ids = torch.tensor([p.prompt + answer])
                logp = torch.log_softmax(model(ids)[0].float(), -1)
                start = len(p.prompt)
                row.append(sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.size(1))))
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def test_cdpo_and_ipo_follow_the_papers_with_summed_log_probs_unlike_trl(tmp_path, tokenizer_dir):
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    policy = perturbed_policy(base, tmp_path / "policy", scale=0.05)
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    beta, eps, tau = 0.3, 0.2, 1.0  # tau: IPO's beta, large enough that h, not 1/(2 tau), dominates its loss
    cdpo = dpo_objective(base, policy, data, tmp_path / "c", loss="cdpo", beta=beta, label_smoothing=eps)
    ipo = dpo_objective(base, policy, data, tmp_path / "i", loss="ipo", beta=tau)
    pairs = cdpo.train_pairs
    policy_logps, ref_logps = sequence_logps(cdpo.model.eval(), pairs), sequence_logps(cdpo.ref_model, pairs)
    batch = cdpo.collate(list(range(len(pairs))))
    with torch.no_grad():  # the batched, padded log-probs are the sums computed one sequence at a time
        batched = answer_logps(cdpo.model, batch).view(2, -1).T
    assert_near(batched, policy_logps, 1e-4, "answer_logps vs one-by-one sums")
    ratios = policy_logps - ref_logps
    h = ratios[:, 0] - ratios[:, 1]
    assert h.abs().min() > 0.05
    expected_cdpo = (-(1 - eps) * torch.sigmoid(beta * h).log() - eps * torch.sigmoid(-beta * h).log()).mean()
    expected_ipo = ((h - 1 / (2 * tau)) ** 2).mean()
    with torch.no_grad():
        got_cdpo = cdpo.pair_loss(cdpo.model, batch)[0].item()
        got_ipo = ipo.pair_loss(ipo.model.eval(), batch)[0].item()
    assert_near(got_cdpo, expected_cdpo, 1e-5, "cdpo vs -(1-e) log s(bh) - e log s(-bh)")
    assert_near(got_ipo, expected_ipo, 1e-4 * expected_ipo.item(), "ipo vs (h - 1/(2b))^2 (relative to its size)")
    plain = (-torch.sigmoid(beta * h).log()).mean().item()
    assert abs(got_cdpo - plain) > 1e-3  # label smoothing changes the number

    # TRL divides each log-ratio of IPO by the answer's length in tokens (EOS included); the answers here differ
    # in length, so its number is another one
    tok = hf_tokenizer(tokenizer_dir)
    trainer = trl_dpo(base, policy, PAIRS, tok, tmp_path, loss_type="ipo", beta=tau)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer.model.eval()
    with torch.no_grad():
        trl_ipo = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    lengths = torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.float64)
    assert (lengths[:, 0] != lengths[:, 1]).all()
    per_token = ratios / lengths
    normalised = ((per_token[:, 0] - per_token[:, 1] - 1 / (2 * tau)) ** 2).mean()
    assert_near(trl_ipo, normalised, 1e-5, "TRL ipo vs length-normalised")
    assert abs(trl_ipo - got_ipo) > 0.1 * got_ipo, (trl_ipo, got_ipo)
    # ... and its "sigmoid" ignores label_smoothing: the plain DPO number, not conservative DPO's
    trainer = trl_dpo(base, policy, PAIRS, tok, tmp_path, loss_type="sigmoid", beta=beta, label_smoothing=eps)
    trainer.model.eval()
    with torch.no_grad():
        trl_smoothed = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    assert_near(trl_smoothed, plain, 1e-5, "TRL sigmoid with label_smoothing vs plain sigmoid")
    assert abs(trl_smoothed - got_cdpo) > 1e-3


# -- 4. a trained reward model loads in transformers with the same scores ---------------------------------


def make_hf_llama(folder, tokenizer_dir, seed=0):
    import shutil

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms off their initial ones, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def make_hf_bert(folder, corpus_dir, seed=0):
    """A tiny transformers BertModel (with its pooler) and a WordPiece tokenizer trained here on the corpus."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    wordpiece.train([str(p) for p in sorted(corpus_dir.iterdir())], trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    folder.mkdir(parents=True)
    wordpiece.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "pad_token": "[PAD]", "unk_token": "[UNK]",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}))
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     pad_token_id=wordpiece.token_to_id("[PAD]"))
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def reward_run(base, tmp_path, *extra):
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    args = ["reward", "--model", str(base), "--train", str(data), "--out", str(out), "--max-steps", "3",
            "--micro-batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0", "--eval-interval", "3",
            "--threads", "1", "--dtype", "float32", "--tensorboard", "false", "--val-fraction", "0", "--quiet", *extra]
    assert main(args) == 0
    return latest_checkpoint(out) / "model"


def hf_decoder_scores(hf, tok, rows) -> torch.Tensor:
    """transformers' scores of prompt + answer + EOS, right-padded in one batch."""
    enc = tok([r["prompt"] + r["answer"] + tok.eos_token for r in rows], padding=True, return_tensors="pt")
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding is exercised
    with torch.no_grad():
        return hf(**enc).logits.squeeze(-1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_trained_reward_model_loads_in_transformers_with_the_same_scores(family, tmp_path, tokenizer_dir, corpus_dir):
    if family == "gpt2":
        base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    elif family == "llama":
        base = make_hf_llama(tmp_path / "base", tokenizer_dir)
    else:
        base = make_hf_bert(tmp_path / "base", corpus_dir)
    folder = reward_run(base, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert hf.config.num_labels == 1 and config["architectures"][0] == type(hf).__name__
    assert type(hf).__name__ == {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                                 "bert": "BertForSequenceClassification"}[family]
    ours = reward_scores(folder, SCORE_ROWS, batch_size=len(SCORE_ROWS))
    one_by_one = [reward_scores(folder, [r])[0] for r in SCORE_ROWS]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if family == "bert":
        prompts, answers = [r["prompt"] for r in SCORE_ROWS], [r["answer"] for r in SCORE_ROWS]
        enc = tok(prompts, answers, padding=True, return_tensors="pt")  # [CLS] prompt [SEP] answer [SEP], type ids
        assert len(set(enc["attention_mask"].sum(1).tolist())) > 1
        with torch.no_grad():
            theirs = hf(**enc).logits.squeeze(-1)
    else:
        assert hf.config.pad_token_id == tok.pad_token_id is not None
        theirs = hf_decoder_scores(hf, tok, SCORE_ROWS)
    assert_near(ours, theirs, 1e-4, f"{family} reward scores, batched, vs transformers")
    assert_near(one_by_one, theirs, 1e-4, f"{family} reward scores, one by one, vs transformers")
    assert max(theirs) - min(theirs) > 1e-3  # the rows get different scores: the comparison can fail
    # the scores come from trained weights, not the base's
    trained, initial = load_model(folder).state_dict(), load_model(base).state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in initial.items() if k in trained)


# -- 5. LoRA: PEFT loads the adapters of `lmforge reward` and `lmforge dpo` silently, with the same outputs -----


def load_silently(load, caplog, fresh_head: str | None = None):
    """``load()``, asserting PEFT warned about nothing (missing or unexpected adapter keys above all), and that
    transformers reported no weight missing from the base but ``fresh_head`` (a head the adapter brings)."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = load()
    from_peft = [str(w.message) for w in caught if "peft" in w.filename or "adapter keys" in str(w.message)]
    from_peft += [r.getMessage() for r in caplog.records if r.name.startswith("peft")]
    assert not from_peft, from_peft
    missing = [line.split("|")[0].strip() for r in caplog.records if r.name.startswith("transformers")
               for line in r.getMessage().splitlines() if "MISSING" in line and "|" in line]
    assert missing == ([fresh_head] if fresh_head else []), missing
    return model.eval()


def test_lora_reward_adapter_loads_in_peft_with_the_same_scores(tmp_path, tokenizer_dir, caplog):
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    adapter = reward_run(base, tmp_path, "--method", "lora", "--lora-r", "4", "--lora-targets", "q,v,fc")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    ours = reward_scores(adapter, SCORE_ROWS, batch_size=len(SCORE_ROWS))
    # the adapter on the unmerged model gives the same scores as the merged one reward_scores loads
    unmerged = load_adapted(adapter, merge=False)
    assert_near(reward_scores(unmerged, SCORE_ROWS), ours, 1e-5, "LoRA reward, unmerged vs merged")
    tok = transformers.AutoTokenizer.from_pretrained(str(adapter))
    # The base folder is a causal LM: transformers gives it a fresh 2-label head with no pad id unless told
    # (num_labels=1 and the pad id the adapter was trained with, as for any PEFT sequence-classification adapter).
    head = {"num_labels": 1, "pad_token_id": tok.pad_token_id}
    auto = load_silently(lambda: peft.AutoPeftModelForSequenceClassification.from_pretrained(str(adapter), **head),
                         caplog, fresh_head="score.weight")
    assert_near(ours, hf_decoder_scores(auto, tok, SCORE_ROWS), 1e-4, "LoRA reward vs AutoPeftModel...Classification")
    wrapped = load_silently(lambda: peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(str(base), **head), str(adapter)), caplog,
        fresh_head="score.weight")
    theirs = hf_decoder_scores(wrapped, tok, SCORE_ROWS)
    assert_near(ours, theirs, 1e-4, "LoRA reward vs PeftModel on AutoModelForSequenceClassification")
    with torch.no_grad(), wrapped.disable_adapter():  # the trained adapter and head are what the scores come from
        assert max_diff(hf_decoder_scores(wrapped, tok, SCORE_ROWS), theirs) > 1e-3


def test_lora_dpo_adapter_loads_in_peft_with_the_same_logits(tmp_path, tokenizer_dir, caplog):
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["dpo", "--model", str(base), "--train", str(data), "--out", str(tmp_path / "run"), "--method", "lora",
            "--lora-r", "4", "--lora-targets", "q,v,o,fc,proj", "--max-steps", "3", "--micro-batch-size", "2",
            "--lr", "5e-2", "--warmup-steps", "0", "--eval-interval", "3", "--beta", "0.5", "--threads", "1",
            "--dtype", "float32", "--tensorboard", "false", "--val-fraction", "0", "--quiet"]
    assert main(args) == 0
    adapter = latest_checkpoint(tmp_path / "run") / "model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    ids = torch.tensor([Tokenizer.load(adapter).encode("def add(a, b):\n    return a + b<|endoftext|>")])
    with torch.no_grad():
        ours = load_model(adapter)(ids)  # merged on load
        unmerged = load_adapted(adapter, merge=False)(ids)
        base_logits = load_model(base)(ids)
    assert_near(unmerged, ours, 1e-5, "LoRA DPO, unmerged vs merged")
    auto = load_silently(lambda: peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)), caplog)
    wrapped = load_silently(lambda: peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)), caplog)
    with torch.no_grad():
        assert_near(ours, auto(ids).logits, 1e-4, "LoRA DPO logits vs AutoPeftModelForCausalLM")
        assert_near(ours, wrapped(ids).logits, 1e-4, "LoRA DPO logits vs PeftModel")
    assert max_diff(ours, base_logits) > 1e-3  # the adapter was trained: it changes the logits


@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_a_reference_model_of_its_own_gives_trls_loss_with_that_ref_model(reference, tmp_path, tokenizer_dir):
    """TRL's DPOTrainer takes any ref_model; lmforge's reference was always the model the run starts from.
    --reference-model names another folder: the loss is TRL's with that ref_model, live or precomputed; a
    reference of another vocabulary is one line, before anything is written."""
    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    policy = perturbed_policy(base, tmp_path / "policy", scale=0.1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, policy / name)
    data = jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = DPOConfig(model=str(policy), reference_model=str(base), train=str(data), out=str(tmp_path / "run"),
                       reference=reference, **RUN)
    ours = DPO(config, torch.device("cpu"), None, read_pairs(data))
    trainer = trl_dpo(base, policy, PAIRS, hf_tokenizer(tokenizer_dir), tmp_path)
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    ours.model.train()
    loss, _ = ours.pair_loss(ours.model, ours.collate(list(range(len(PAIRS)))))
    assert abs(loss.item() - math.log(2)) > 1e-3  # (the policy is not its reference)
    assert_near(loss.item(), theirs.item(), 1e-5, f"DPO loss with a reference model of its own ({reference})")
    other = make_hf_gpt2(tmp_path / "other", tokenizer_dir=tokenizer_dir, vocab_size=2048)
    bad = DPOConfig(model=str(policy), reference_model=str(other), train=str(data), out=str(tmp_path / "bad"), **RUN)
    with pytest.raises(LmforgeError, match="vocabulary of 2048 tokens, not the policy's 1024"):
        DPO(bad, torch.device("cpu"), None, read_pairs(data))
    assert not (tmp_path / "bad").exists()
