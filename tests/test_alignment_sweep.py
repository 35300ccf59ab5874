"""The alignment commands on model families and data the other tests leave out: a Llama-style folder whose
SentencePiece tokenizer puts <s> before a text and "▁" before its first word."""

import json

import pytest
import torch
from conftest import make_llama_with_bos

from lmforge.data.preference import TokenizeStats, read_pairs, tokenize_pairs
from lmforge.tokenizer import Tokenizer
from lmforge.train.preference import reward_scores

# prompts that end in a space: "▁" is a token of its own at the prompt's end, and the answer is a word's rest
SPACE_PAIRS = [{"prompt": "Hello ", "chosen": "world", "rejected": "Hello, world"},
               {"prompt": "Hello world, ", "chosen": "'s", "rejected": "world"}]


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest: torch on one thread, as the runs are)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama_with_bos(tmp_path_factory.mktemp("llama") / "model")


def test_an_answer_after_a_prompt_ending_in_a_space_gets_no_second_space_from_sentencepiece(llama, tmp_path):
    """The answer is tokenised apart from its prompt (the prompt's own tokens end in "▁"); alone, a SentencePiece
    tokenizer starts it with a word-start "▁", and the pair was learned as "Hello  world". Prompt + answer now read
    as the text they are, as TRL's DPOTrainer's do, the prompt's ids those generate feeds the model."""
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    datasets = pytest.importorskip("datasets")
    import transformers

    tok = Tokenizer.load(llama)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SPACE_PAIRS))
    pairs, stats = tokenize_pairs(tok, read_pairs(path).rows, 64)
    assert stats.boundary == 4  # every answer: the prompt's "▁" merges with its first word in prompt + answer
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(llama))
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama))
    trainer = trl.DPOTrainer(model=model, ref_model=transformers.AutoModelForCausalLM.from_pretrained(str(llama)),
                             args=args, train_dataset=datasets.Dataset.from_list(SPACE_PAIRS), processing_class=hf_tok)
    for row, p, t in zip(SPACE_PAIRS, pairs, (trainer.train_dataset[i] for i in range(len(SPACE_PAIRS)))):
        assert p.prompt == tok.encode_prompt(row["prompt"])  # what generate continues from
        for answer, ours, theirs in ((row["chosen"], p.chosen, t["chosen_ids"]), (row["rejected"], p.rejected, t["rejected_ids"])):
            assert ours[-1] == tok.eos_id
            assert tok.decode(p.prompt + ours) == hf_tok.decode(t["prompt_ids"] + theirs) == f"<s> {row['prompt']}{answer}</s>"


def test_reward_scores_read_an_answer_after_a_prompt_ending_in_a_space_without_a_second_space(llama):
    from lmforge.model.checkpoint import load_model
    from lmforge.model.heads import attach_head

    tok = Tokenizer.load(llama)
    model = load_model(llama, "cpu")
    attach_head(model, "sequence_classification", 1, ("reward",), tok.eos_id)
    stats = TokenizeStats()
    from lmforge.data.preference import encode_answers

    prompt_ids, (answer,) = encode_answers(tok, "Hello ", ["world"], stats)
    assert stats.boundary == 1 and tok.decode(prompt_ids + answer) == "<s> Hello world</s>"
    # the score is that of those tokens (the same as of the pair's chosen answer in training)
    whole = model(torch.tensor([prompt_ids + answer]), keep=torch.tensor([[len(prompt_ids) + len(answer) - 2]]))
    got = reward_scores(model, [{"prompt": "Hello ", "answer": "world"}], tok)
    assert got[0] == pytest.approx(whole.flatten().item(), abs=1e-6)


def test_chat_pairs_whose_template_renders_the_prompt_otherwise_split_as_trl_splits_them(tmp_path):
    """A template whose generation prompt opens a thinking block that an answered turn does not write (DeepSeek-R1's
    kind): the rendered prompt is no prefix of the conversation, and lmforge refused the pairs. They are split as
    TRL's DPOTrainer splits them: the prompt is what both begin with, token for token, each answer the rest (up to
    its end of turn: TRL keeps the newline the template writes after it, which generation never reaches)."""
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is not installed")
    datasets = pytest.importorskip("datasets")
    import transformers
    from test_tokenizer import byte_level_folder

    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    folder = byte_level_folder(tmp_path / "t", {"chat_template": template, "eos_token": "<|im_end|>",
                                                "pad_token": "<|endoftext|>"})
    rows = [{"prompt": [{"role": "user", "content": "the question"}],
             "chosen": [{"role": "assistant", "content": "the answer"}],
             "rejected": [{"role": "assistant", "content": "a fox"}]}]
    tok = Tokenizer.load(folder)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = tokenize_pairs(tok, read_pairs(path).rows, 64)
    assert stats.diverged == 1 and "thinking block" in stats.summary(64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = trl.DPOTrainer(model=transformers.LlamaForCausalLM(config), ref_model=transformers.LlamaForCausalLM(config),
                             args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=hf_tok)
    theirs, end = trainer.train_dataset[0], tok.end_of_turn_id
    assert pairs[0].prompt == theirs["prompt_ids"]
    for ours, their in ((pairs[0].chosen, theirs["chosen_ids"]), (pairs[0].rejected, theirs["rejected_ids"])):
        assert ours == their[: their.index(end) + 1] and ours[-1] == end
    # reward-score reads such a chat row the same way (it was refused too)
    from lmforge.data.preference import encode_answers
    from lmforge.model.checkpoint import load_model
    from lmforge.model.heads import attach_head

    trainer.model.save_pretrained(tmp_path / "policy")
    hf_tok.save_pretrained(tmp_path / "policy")
    model = load_model(tmp_path / "policy")
    attach_head(model, "sequence_classification", 1, ("reward",), tok.pad_id)
    prompt_ids, (answer,) = encode_answers(tok, rows[0]["prompt"], [rows[0]["chosen"]], TokenizeStats())
    assert (prompt_ids, answer) == (pairs[0].prompt, pairs[0].chosen)
    ids = prompt_ids + answer
    got = reward_scores(model, [{"prompt": rows[0]["prompt"], "answer": rows[0]["chosen"]}], tok)
    assert got[0] == pytest.approx(model(torch.tensor([ids])).flatten().item(), abs=1e-6)
