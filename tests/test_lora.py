"""LoRA: adapters in PEFT's format that peft loads onto the exported model with the same logits."""

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings

import pytest
import torch
from conftest import make_hf_gpt2
from test_families import make

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_adapted, load_model, load_tokenizer_for
from lmforge.model.lora import add_lora, count_trainable, merge_lora, save_adapter
from lmforge.tokenizer import Tokenizer

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
    other = load_model(hf_gpt2)
    add_lora(other, "o", r=2, alpha=4)
    save_adapter(other, tmp_path / "o", hf_gpt2)  # attention's c_proj, not the MLP's
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["target_modules"] == ["attn.c_proj"]
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(hf_gpt2)),
                                        str(tmp_path / "adapter")).eval()
    idx = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["attn.c_proj", "c_fc"], ["mlp.c_proj"], r".*\.(c_attn|c_fc)",
                                     "all-linear"])
def test_peft_gpt2_adapters_are_read_with_peft_s_names(tmp_path, hf_gpt2, targets):
    """PEFT adapts every module whose path ends with a target name: GPT-2's "c_proj" is attention's output and
    the MLP's, "attn.c_proj" attention's alone. lmforge reads such an adapter with PEFT's logits."""
    from lmforge.model.lora import load_adapter

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_gpt2))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = load_model(hf_gpt2)
    load_adapter(model, tmp_path / "adapter")
    idx = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), peft_model.eval()(idx).logits, atol=1e-4, rtol=0)


def test_a_peft_target_that_names_a_module_outside_the_blocks_is_refused(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, num_labels=2)
    base = transformers.BertForSequenceClassification(config)
    base.save_pretrained(tmp_path / "base")
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["dense"])).save_pretrained(tmp_path / "adapter")
    from lmforge.model.lora import load_adapter

    with pytest.raises(LmforgeError, match=re.escape("adapter target_modules ['dense'] also adapts pooler.dense, outside the Transformer blocks")):
        load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    # a regular expression on PEFT's whole paths ("bert.pooler.dense"), and weights of a module the config does
    # not name: refused too (they loaded without the pooler's adapter, 0.03 off PEFT's logits)
    base = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base"))
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=r"bert\..*dense")).save_pretrained(tmp_path / "re")
    with pytest.raises(LmforgeError, match="also adapts pooler.dense, outside the Transformer blocks"):
        load_adapter(load_model(tmp_path / "base"), tmp_path / "re")
    config = json.loads((tmp_path / "re" / "adapter_config.json").read_text())
    (tmp_path / "re" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["intermediate.dense", "output.dense"]}))
    with pytest.raises(LmforgeError, match="the adapter adapts bert.pooler.dense, which lmforge does not adapt"):
        load_adapter(load_model(tmp_path / "base"), tmp_path / "re")


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
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # names PEFT matches to exactly the adapted products ("dense" would also reach attention's output, the MLP's
    # output and the pooler, which PEFT would then adapt too, and warn of their missing weights)
    assert saved["modules_to_save"] == ["classifier"] and saved["target_modules"] == ["intermediate.dense", "query", "value"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(
            transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")),
            str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
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
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "lmforge_adapter.json", "tokenizer.json", "tokenizer_config.json"]
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
    # the chat-tuned adapter ends a turn at <|im_end|>: the merged model's generation config says so too
    turn_end = load_tokenizer_for(merged).end_of_turn_id
    assert json.loads((adapter / "lmforge_adapter.json").read_text())["end_token_ids"][-1] == turn_end
    assert turn_end in json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert turn_end in merged.end_token_ids


def test_bad_lora_settings(hf_gpt2):
    model = load_model(hf_gpt2)
    with pytest.raises(LmforgeError, match="unknown LoRA target"):
        add_lora(model, "q,attention")
    add_lora(model, "q")
    with pytest.raises(LmforgeError, match="already has LoRA adapters"):
        add_lora(model, "v")


def test_peft_settings_lmforge_does_not_apply_are_refused_not_ignored(tmp_path, hf_gpt2):
    """alpha_pattern, rank_pattern, bias, layers_to_transform, a regular expression matching some blocks only and
    modules_to_save beyond a task head change PEFT's model: an adapter using them is refused in one line; so is a
    config whose r, lora_alpha or lora_dropout cannot be used. LoRA settings of a run are checked the same way."""
    from test_finetune import jsonl, sentiment_rows

    from lmforge.model.lora import load_adapter
    from lmforge.train.finetune import finetune

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_gpt2))
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "plain")
    good = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    for change, name in [({"alpha_pattern": {"c_attn": 8}}, "alpha_pattern"), ({"rank_pattern": {"c_attn": 4}}, "rank_pattern"),
                         ({"bias": "all"}, "bias"), ({"layers_to_transform": [0]}, "layers_to_transform"),
                         ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
                         ({"target_modules": r"transformer\.h\.0\..*c_attn"}, "adapts a product in every block or in none"),
                         ({"target_modules": r".*"}, "outside the Transformer blocks"),
                         ({"r": 0}, "r must be a whole number of 1 or more"), ({"lora_alpha": None}, "lora_alpha a number"),
                         ({"lora_dropout": 2.0}, "lora_dropout in [0, 1)")]:
        (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(LmforgeError, match=re.escape(name)):
            load_adapter(load_model(hf_gpt2), tmp_path / "plain")
    for key, value, message in [("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
                                ("lora_alpha", 0.0, "lora_alpha must be positive")]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            finetune(model=str(hf_gpt2), train=jsonl(tmp_path / "c.jsonl", sentiment_rows(8)), method="lora",
                     out=str(tmp_path / "r"), max_steps=1, progress=False, **{key: value})


# -- the exact base: recorded, checked, PEFT-clean -------------------------------------------------


def fake_run(run, step, seed, tokenizer_dir):
    """A run folder's checkpoint (what `lmforge pretrain` leaves): RUN/checkpoints/step_N/model + trainer.pt."""
    checkpoint = run / "checkpoints" / f"step_{step:07d}"
    make_hf_gpt2(checkpoint / "model", tokenizer_dir=tokenizer_dir, seed=seed)
    torch.save({}, checkpoint / "trainer.pt")
    return checkpoint / "model"


def peft_merged(base, adapter):
    """transformers + PEFT: the adapter on ``base``, merged (merge_and_unload)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    return peft.PeftModel.from_pretrained(hf, str(adapter)).merge_and_unload().eval()


def same_logits(ours, theirs):
    idx = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(ours(idx), theirs(idx).logits, atol=1e-4, rtol=0)


@pytest.fixture
def lora_on_run(tmp_path, tokenizer_dir):
    """A base run at step 10, and a LoRA fine-tune of it (adapter folder returned)."""
    from test_finetune import chat_rows, jsonl, settings

    from lmforge.train.finetune import finetune

    step10 = fake_run(tmp_path / "base-run", 10, 0, tokenizer_dir)
    finetune(model=str(tmp_path / "base-run"), train=jsonl(tmp_path / "chat.jsonl", chat_rows(16)), method="lora",
             lora_r=4, lora_targets="q,v,fc", progress=False,
             **settings(tmp_path, lr=1e-2, max_steps=4, eval_interval=4, checkpoint_interval=4))
    adapter = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "model"
    return tmp_path / "base-run", step10, adapter


def test_adapter_config_holds_only_peft_keys_and_peft_loads_it_silently(lora_on_run, caplog):
    run, step10, adapter = lora_on_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert config["base_model_name_or_path"] == str(step10.resolve())  # the checkpoint, not the run folder
    meta = json.loads((adapter / "lmforge_adapter.json").read_text())
    assert meta["base_model"]["folder"] == str(step10.resolve()) and meta["targets"] == ["q", "v", "fc"]
    assert set(meta["base_model"]["weights"]) == {"model.safetensors"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(step10))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(hf, str(adapter))
    from_peft = [str(w.message) for w in caught if "peft" in w.filename or "Unexpected keyword" in str(w.message)]
    assert not from_peft and not [r for r in caplog.records if r.name.startswith("peft")], from_peft


def test_merge_uses_the_checkpoint_the_adapter_was_trained_on_after_the_run_moved_on(lora_on_run, tmp_path, tokenizer_dir,
                                                                                      capsys):
    run, step10, adapter = lora_on_run
    step20 = fake_run(run, 20, 1, tokenizer_dir)  # the base run was extended: its latest checkpoint is other weights
    expected = peft_merged(step10, adapter)
    for i, extra in enumerate([[], ["--base", str(run)], ["--base", str(step10)]]):
        out = tmp_path / f"merged{i}"
        assert main(["merge", str(tmp_path / "run"), "--out", str(out), *extra]) == 0, capsys.readouterr().err
        assert f"into {step10.resolve()}" in capsys.readouterr().out
        assert same_logits(load_model(out), expected), extra
    # the base of another run (or the extended run's latest checkpoint) is refused, in one line
    capsys.readouterr()
    assert main(["merge", str(adapter), "--out", str(tmp_path / "wrong"), "--base", str(step20)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not that model" in err and "--base" in err and "--force" in err, err
    assert not (tmp_path / "wrong").exists()
    # --force merges anyway, warning loudly
    assert main(["merge", str(adapter), "--out", str(tmp_path / "forced"), "--base", str(step20), "--force"]) == 0
    assert "NOT the model that was fine-tuned" in capsys.readouterr().err
    assert same_logits(load_model(tmp_path / "forced"), peft_merged(step20, adapter))


def test_a_base_that_is_gone_or_was_rewritten_is_refused_everywhere(lora_on_run, tmp_path, tokenizer_dir, capsys):
    run, step10, adapter = lora_on_run
    copy = tmp_path / "copy-of-step10"
    shutil.copytree(step10, copy)
    os.utime(copy / "model.safetensors", ns=(0, 0))  # a copy with another date is hashed, and matches
    # the same folder rewritten with other weights (say `pretrain --overwrite`): chat, serve, generate refuse it
    make_hf_gpt2(step10, tokenizer_dir=tokenizer_dir, seed=2)
    with pytest.raises(LmforgeError, match="is not that model: its model.safetensors has SHA-256"):
        load_model(adapter)
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(adapter), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "is not that model" in capsys.readouterr().err
    assert main(["merge", str(adapter), "--out", str(tmp_path / "m"), "--base", str(copy)]) == 0
    # the base checkpoint pruned away: say so, and how to go on
    shutil.rmtree(run)
    with pytest.raises(LmforgeError, match="is not on this machine .*deleted as the run trained on.*; give the exact base folder"):
        load_model(adapter)


def test_an_adapter_trained_on_an_adapter_checks_that_adapter(lora_on_run, tmp_path):
    """A second LoRA fine-tune of a first adapter records the first's file; a rewritten first adapter is refused
    (it recorded nothing, so any adapter under that name was taken)."""
    from test_finetune import chat_rows, jsonl, settings

    from lmforge.train.finetune import finetune

    run, step10, first = lora_on_run
    finetune(model=str(first), train=jsonl(tmp_path / "chat2.jsonl", chat_rows(16, seed=1)), method="lora", lora_r=4,
             progress=False, **settings(tmp_path, out=str(tmp_path / "second"), lr=1e-2, max_steps=2, eval_interval=2,
                                        checkpoint_interval=2))
    second = sorted((tmp_path / "second" / "checkpoints").iterdir())[-1] / "model"
    meta = json.loads((second / "lmforge_adapter.json").read_text())
    assert set(meta["base_model"]["weights"]) == {"adapter_model.safetensors"}
    load_model(second)  # the first adapter as it was: fine
    # merged, it keeps the first base's precision and generation settings (it read the first adapter's config.json)
    assert main(["merge", str(second), "--out", str(tmp_path / "merged")]) == 0
    merged, base = (json.loads((f / "generation_config.json").read_text()) for f in (tmp_path / "merged", step10))
    assert merged == {**base, "eos_token_id": [base["eos_token_id"], Tokenizer.load(second).end_of_turn_id]}
    from safetensors.torch import load_file, save_file

    tensors = load_file(first / "adapter_model.safetensors")
    save_file({k: v + 0.5 for k, v in tensors.items()}, first / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="is not that model: its adapter_model.safetensors has SHA-256"):
        load_model(second)


def test_adapters_saved_before_lmforge_adapter_json_still_load(lora_on_run, tmp_path, tokenizer_dir, capsys):
    run, step10, adapter = lora_on_run
    old = tmp_path / "old-adapter"
    shutil.copytree(adapter, old)
    meta = json.loads((old / "lmforge_adapter.json").read_text())
    config = json.loads((old / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=str(run), lmforge_targets=meta["targets"])  # the old layout
    (old / "adapter_config.json").write_text(json.dumps(config))
    (old / "lmforge_adapter.json").unlink()
    expected = peft_merged(step10, adapter)
    capsys.readouterr()
    assert same_logits(load_model(old), expected)
    # a run folder as its base cannot be checked: said every time, since the run may have moved on
    assert "records no weight hashes" in capsys.readouterr().err
    config["base_model_name_or_path"] = str(step10)  # an old adapter naming a model folder: nothing to say
    (old / "adapter_config.json").write_text(json.dumps(config))
    assert same_logits(load_model(old), expected)
    assert capsys.readouterr().err == ""


def test_convert_merges_an_adapter_into_its_base(lora_on_run, tmp_path, tokenizer_dir, capsys):
    run, step10, adapter = lora_on_run
    fake_run(run, 20, 1, tokenizer_dir)
    capsys.readouterr()
    assert main(["convert", str(adapter), str(tmp_path / "converted")]) == 0, capsys.readouterr().err
    assert f"is a LoRA adapter: merged it into its base model {step10.resolve()}" in capsys.readouterr().out
    converted = tmp_path / "converted"
    assert not any(p.name.startswith(("adapter_", "lmforge_adapter")) for p in converted.iterdir())
    assert (converted / "tokenizer.json").exists()
    assert same_logits(load_model(converted), peft_merged(step10, adapter))
    # a base that is not the adapter's: the same refusal as merge
    make_hf_gpt2(step10, tokenizer_dir=tokenizer_dir, seed=3)
    assert main(["convert", str(adapter), str(tmp_path / "c2")]) == 2
    assert "is not that model" in capsys.readouterr().err


def test_merge_or_convert_onto_the_adapters_own_base_is_refused_before_any_write(lora_on_run, tmp_path, capsys):
    run, step10, adapter = lora_on_run
    before = {p.name: p.read_bytes() for p in step10.iterdir() if p.is_file()}
    capsys.readouterr()
    for argv, message in ((["convert", str(adapter), str(step10), "--overwrite"], "which this reads from"),
                          (["merge", str(adapter), "--out", str(step10), "--overwrite"], "which this reads from"),
                          # the base is inside --out, a run folder: no model folder --overwrite may replace
                          (["merge", str(adapter), "--out", str(run), "--overwrite"], "is not a model folder")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in step10.iterdir() if p.is_file()} == before


def test_a_base_deleted_with_its_run_checkpoint_is_said_to_be_so(lora_on_run, capsys):
    import shutil

    run, step10, adapter = lora_on_run
    shutil.rmtree(step10.parent)
    capsys.readouterr()
    assert main(["generate", "--model", str(adapter), "hi", "--max-new-tokens", "2"]) == 2
    assert "deleted as the run trained on" in capsys.readouterr().err


def test_the_base_check_reads_the_weight_files_loading_reads(lora_on_run):
    run, step10, adapter = lora_on_run
    # an unused copy in the other format does not make the base "another model"
    torch.save({}, step10 / "pytorch_model.bin")
    assert load_model(adapter) is not None


def test_a_folder_with_both_a_model_and_an_adapter_says_the_adapter_is_not_applied(tmp_path, hf_gpt2, capsys):
    model = load_model(hf_gpt2)
    add_lora(model, "q,v", r=2, alpha=4)
    save_adapter(model, tmp_path / "adapter", hf_gpt2)
    both = tmp_path / "both"
    shutil.copytree(hf_gpt2, both)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, both / name)
    capsys.readouterr()
    load_model(both)
    assert "holds a model (config.json) and a LoRA adapter (adapter_config.json): loading the model alone" \
        in capsys.readouterr().err


# -- PEFT adapters as published: every setting applied or refused -----------------------------------------------


def peft_adapter(base, out, config, auto=None):
    """A PEFT adapter of the Llama folder ``base`` whose trainable weights moved off their initial values."""
    model = (auto or transformers.AutoModelForCausalLM).from_pretrained(str(base))
    adapted = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    adapted.save_pretrained(str(out))
    return adapted.eval()


def test_peft_rslora_and_a_seq_cls_adapter_on_its_causal_lm_load_with_peft_s_outputs(tmp_path):
    """rsLoRA scales by lora_alpha / √r (before: refused); PEFT's usual classifier flow (a SEQ_CLS adapter trained
    on the causal LM loaded with AutoModelForSequenceClassification) gets its trained head, reading the last
    token before the base's pad_token_id (before: the head was dropped and language-model logits came out)."""
    make(tmp_path / "base", "llama-gqa-untied-theta")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    idx = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    peft_model = peft_adapter(tmp_path / "base", tmp_path / "rs", peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                                target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "rs")(idx), peft_model(idx).logits, atol=1e-5, rtol=0)
    classifier = transformers.AutoModelForSequenceClassification
    peft_model = peft_adapter(tmp_path / "base", tmp_path / "cls", peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), auto=classifier)
    ours = load_model(tmp_path / "cls")
    assert ours.config.head == "sequence_classification" and ours.config.num_labels == 2
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), peft_model(idx).logits, atol=1e-5, rtol=0)
    # merged, it is a classifier folder; PEFT's adapter has no tokenizer: the base's is used
    Tokenizer(__import__("tokenizers").Tokenizer(__import__("tokenizers").models.WordLevel(
        {f"w{i}": i for i in range(97)}, unk_token="w1"))).save(tmp_path / "base")
    assert main(["merge", str(tmp_path / "cls"), "--out", str(tmp_path / "merged")]) in (0, None)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx).logits, peft_model(idx).logits, atol=1e-5, rtol=0)
    # as published: the base named by its Hub id, given with --base (its tokenizer is that folder's too)
    shutil.copytree(tmp_path / "cls", tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/m"}))
    assert main(["merge", str(tmp_path / "hub"), "--base", str(tmp_path / "base"), "--out",
                 str(tmp_path / "merged2")]) in (0, None)
    assert (tmp_path / "merged2" / "tokenizer.json").exists()


@pytest.mark.parametrize("change, message", [
    (dict(trainable_token_indices=[5, 7]), "trainable_token_indices"),
    (dict(init_lora_weights="pissa"), "init_lora_weights 'pissa'"),
    (dict(alora_invocation_tokens=[10, 11]), "alora_invocation_tokens"),
    (dict(lora_bias=True), "lora_bias True"),
    (dict(use_dora=True), "use_dora True"),
    (dict(target_modules=["gate_proj"]), "computes gate_proj and up_proj as one product"),
    (dict(exclude_modules=["model.layers.0.self_attn.q_proj"]), "adapts a product in every block or in none"),
])
def test_peft_adapters_using_what_lmforge_does_not_apply_are_refused(tmp_path, change, message):
    """Each of these loaded before with other logits than PEFT's (0.03 to 0.5 apart), or with a message naming
    another cause; now each is refused in one line that names what it sets."""
    make(tmp_path / "base", "llama-gqa-untied-theta")
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    settings.update(change)
    peft_adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(**settings))
    with pytest.raises(LmforgeError, match=re.escape(message)):
        load_model(tmp_path / "adapter")


def test_peft_adapter_files_lmforge_cannot_read_exactly_are_refused_in_one_line(tmp_path, capsys):
    """Embeddings saved in the adapter, a target list of another model's names beside this one's (read as PEFT
    reads it), a malformed target_modules, a base that is the adapter itself, and pickled weights."""
    make(tmp_path / "base", "llama-gqa-untied-theta")
    peft_adapter(tmp_path / "base", tmp_path / "emb", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros(97, 32)},
              tmp_path / "emb" / "adapter_model.safetensors")
    with pytest.raises(LmforgeError, match=re.escape("holds model.embed_tokens.weight, weights of its own")):
        load_model(tmp_path / "emb")
    peft_model = peft_adapter(tmp_path / "base", tmp_path / "mixed", peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "c_attn"]))
    idx = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "mixed")(idx), peft_model(idx).logits, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    for name, change, message in [
            ("ints", {"target_modules": [5]}, "target_modules must be a regular expression or a list of module names"),
            ("itself", {"base_model_name_or_path": str(tmp_path / "itself")}, "its base models form a loop")]:
        shutil.copytree(tmp_path / "mixed", tmp_path / name)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert main(["generate", "--model", str(tmp_path / name), "--tokenizer", str(tmp_path / "base"),
                     "--max-new-tokens", "1", "w"]) == 2
        assert message in capsys.readouterr().err
    shutil.copytree(tmp_path / "mixed", tmp_path / "bin")
    torch.save(load_file(tmp_path / "bin" / "adapter_model.safetensors"), tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="holds its weights as adapter_model.bin"):
        load_model(tmp_path / "bin")
