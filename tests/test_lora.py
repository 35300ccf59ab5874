"""LoRA: adapters in PEFT's format that peft loads onto the exported model with the same logits."""

import json

import pytest
import torch
from test_families import make

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_adapted, load_model
from lmforge.model.lora import add_lora, count_trainable, merge_lora, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft (a dev extra) is not installed")


def randomize_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("score", "classifier")):
                p.normal_(0, 0.05)


@pytest.mark.parametrize("case", ["llama-gqa-untied-theta", "qwen2-biases-tied", "mistral-sliding-window"])
def test_peft_loads_lmforge_adapters_with_the_same_logits(case, tmp_path):
    make(tmp_path / "base", case)
    model = load_model(tmp_path / "base")
    add_lora(model, "q,k,v,o,fc,proj", r=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                        str(tmp_path / "adapter")).eval()
    idx = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        ours = model.eval()(idx)
        torch.testing.assert_close(ours, hf(idx).logits, atol=1e-4, rtol=0)
        # merging folds the adapters into the weights: same function, plain model
        merged = merge_lora(model)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(idx), ours, atol=1e-5, rtol=0)


def test_gpt2_adapters_cover_the_fused_c_attn_as_peft_does(tmp_path, hf_gpt2):
    model = load_model(hf_gpt2)
    add_lora(model, "q,v,fc", r=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", hf_gpt2)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(hf_gpt2)),
                                        str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_encoder_classifier_adapter_with_its_head(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    add_lora(model, "q,v,fc", r=4, alpha=8)
    trainable, total = count_trainable(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or n.startswith("classifier"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")),
                                        str(tmp_path / "adapter")).eval()
    ids = torch.randint(1, 99, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)
        # lmforge reads the adapter back too (merged on load)
        torch.testing.assert_close(load_model(tmp_path / "adapter")(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_lora_finetune_trains_only_adapters_and_merge_command(hf_gpt2, tmp_path, capsys):
    from test_finetune import chat_rows, jsonl, settings

    from lmforge.train.finetune import finetune

    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    finetune(model=str(hf_gpt2), train=data, method="lora", lora_r=4, lora_targets="q,v,o,fc,proj", progress=False,
             **settings(tmp_path, lr=1e-2, max_steps=30))
    out = capsys.readouterr().out
    assert "trainable (" in out and "%)" in out
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert 0 < run_info["trainable_parameters"] < 0.2 * run_info["parameters"]
    adapter = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "model"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                                         "tokenizer_config.json"]
    base = load_model(hf_gpt2).state_dict()
    adapted = load_adapted(adapter, merge=False)
    for name, p in adapted.state_dict().items():  # the base weights under the adapters are untouched
        key = name.replace(".base.", ".")
        if "lora_" not in name:
            assert torch.equal(p, base[key]), name
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    idx = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), adapted.eval()(idx), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())["chat_template"]


def test_bad_lora_settings(hf_gpt2):
    model = load_model(hf_gpt2)
    with pytest.raises(LmforgeError, match="unknown LoRA target"):
        add_lora(model, "q,attention")
    add_lora(model, "q")
    with pytest.raises(LmforgeError, match="already has LoRA adapters"):
        add_lora(model, "v")
