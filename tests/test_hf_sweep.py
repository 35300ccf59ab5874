"""Hugging Face folders as users bring them: heads tied in name only, tensors lmforge does not use, config.json
fields and weight files of the wrong shape. Each loads with transformers' logits or is refused in one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families import make

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(folder, **changes):
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, **changes}, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_head_of_its_own_under_tie_word_embeddings_true_is_used_as_transformers_5_uses_it(tmp_path, family):
    """config.json says tie_word_embeddings true but the file holds an lm_head that differs from the embeddings:
    transformers 5 does not tie them and predicts with that head; lmforge dropped it and predicted with the
    embeddings (logits 0.8 off). It now reads it as an untied head and writes tie_word_embeddings false."""
    if family == "llama":
        make(tmp_path / "hf", "llama-gqa-untied-theta")
    else:
        from conftest import make_hf_gpt2

        make_hf_gpt2(tmp_path / "hf", vocab_size=97, tie_word_embeddings=False)
        edit_weights(tmp_path / "hf", **{"lm_head.weight": torch.randn(97, 32)})
    edit_config(tmp_path / "hf", tie_word_embeddings=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = load_model(tmp_path / "hf")
    assert not ours.config.tie_embeddings
    idx = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        expected = theirs(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=0)
        save_model(ours, tmp_path / "out")
        again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
        torch.testing.assert_close(again(idx).logits, expected, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_masked_lm_head_of_its_own_is_refused_whatever_tie_word_embeddings_says(tmp_path):
    """BERT's decoder differing from the word embeddings under tie_word_embeddings true: transformers 5 predicts with
    it; lmforge's encoder (which predicts with the embeddings) loaded it with logits 0.6 off."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, tie_word_embeddings=False)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    edit_config(tmp_path / "bert", tie_word_embeddings=True)
    with pytest.raises(LmforgeError, match="the masked-LM head has weights of its own"):
        load_model(tmp_path / "bert")


def test_a_score_head_in_a_language_models_folder_is_refused_not_dropped(tmp_path):
    """A classifier's score.weight in a folder whose config.json reads as a causal LM was dropped without a word."""
    make(tmp_path / "hf", "llama-gqa-untied-theta")
    edit_weights(tmp_path / "hf", **{"score.weight": torch.randn(2, 32)})
    with pytest.raises(LmforgeError, match="weights do not match config.json .*unexpected score.weight"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("change", [{"rope_parameters": "default"}, {"rope_scaling": [8.0]},
                                    {"architectures": [None]}])
def test_config_fields_of_the_wrong_json_type_are_one_line(tmp_path, change):
    """A string or list where config.json needs an object was an AttributeError traceback."""
    make(tmp_path / "hf", "llama-gqa-untied-theta")
    edit_config(tmp_path / "hf", **change)
    with pytest.raises(LmforgeError, match="config.json: a field has the wrong type"):
        load_model(tmp_path / "hf")


def test_weight_files_that_are_not_named_tensors_are_one_line(tmp_path):
    """A pytorch_model.bin holding a list, or tensors nested under a key, and an index whose weight_map is not a
    mapping were ValueError, TypeError and AttributeError tracebacks; a Git LFS pointer (a clone made without
    git-lfs) was "not plain tensors (... weights_only set to False will likely succeed ...)" or "corrupt"."""
    make(tmp_path / "hf", "llama-gqa-untied-theta")
    for name in ("model.safetensors", "pytorch_model.bin"):
        folder = tmp_path / f"lfs-{name}"
        folder.mkdir()
        shutil.copy(tmp_path / "hf" / "config.json", folder)
        (folder / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
        with pytest.raises(LmforgeError, match=f"{name} is a Git LFS pointer, not the weights"):
            load_model(folder)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    for contents, message in [(list(weights.values()), "it holds list"),
                              ({"state_dict": weights}, "it holds 'state_dict': dict")]:
        folder = tmp_path / "bin"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(tmp_path / "hf" / "config.json", folder)
        torch.save(contents, folder / "pytorch_model.bin")
        with pytest.raises(LmforgeError, match=rf"\.bin is not a state dict of named tensors \({message}\)"):
            load_model(folder)
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "model-00001-of-00001.safetensors")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001-of-00001"]}))
    with pytest.raises(LmforgeError, match="its weight_map must map tensor names to shard files"):
        load_model(tmp_path / "hf")


def test_whole_numbers_written_as_floats_or_strings_load(tmp_path):
    """GPT-2's n_inner and Llama's head_dim were taken as written: 40.0 or "8" crashed building the model with a
    TypeError traceback (every other size was read with int())."""
    from conftest import make_hf_gpt2

    idx = torch.randint(3, 97, (1, 10))
    make_hf_gpt2(tmp_path / "gpt2", vocab_size=97, n_inner=40)
    make(tmp_path / "llama", "llama-gqa-untied-theta")
    for folder, change in [(tmp_path / "gpt2", {"n_inner": 40.0}), (tmp_path / "llama", {"head_dim": "8"})]:
        with torch.no_grad():
            expected = load_model(folder)(idx)
            edit_config(folder, **change)
            torch.testing.assert_close(load_model(folder)(idx), expected, atol=0, rtol=0)


def test_a_bert_checkpoint_as_google_published_it_loads_as_transformers_loads_it(tmp_path):
    """bert-base-uncased's layout: architectures BertForMaskedLM, LayerNorm parameters named gamma and beta, and the
    next-sentence head beside the masked-LM one. transformers renames the first and leaves the head unused; lmforge
    refused the folder (unexpected ...LayerNorm.gamma, cls.seq_relationship.weight)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40)
    original = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    original.save_pretrained(tmp_path / "bert")
    edit_config(tmp_path / "bert", architectures=["BertForMaskedLM"])
    weights = load_file(tmp_path / "bert" / "model.safetensors")
    tf_names = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in weights.items()}
    save_file(tf_names, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "bert")).eval()
    ours = load_model(tmp_path / "bert")
    ids = torch.randint(1, 99, (2, 9))
    with torch.no_grad():
        expected = original(input_ids=ids).prediction_logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-4, rtol=0)


def test_the_original_t5_checkpoints_unused_cross_attention_bias_is_passed_over(tmp_path):
    """t5-small and its siblings carry decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight, which
    no T5 uses (transformers ignores it); lmforge refused the folder as holding an unexpected tensor."""
    from test_encoder_decoder import assert_parity_both_ways, make_hf_t5

    folder = make_hf_t5(tmp_path / "t5", "v1.0")
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    edit_weights(folder, **{unused: torch.randn(8, 4)})
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert_parity_both_ways(load_model(folder), theirs, tmp_path / "out")


@pytest.mark.parametrize("keep_bias", [True, False])
def test_a_masked_lm_heads_decoder_bias_is_the_bias_it_adds(tmp_path, keep_bias):
    """A file holding cls.predictions.decoder.bias that differs from cls.predictions.bias: transformers adds the
    decoder's, lmforge added the other (logits 2.6 off); with the decoder's alone lmforge refused the folder."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    weights = load_file(tmp_path / "bert" / "model.safetensors")
    weights["cls.predictions.decoder.bias"] = torch.randn(99)
    if not keep_bias:
        del weights["cls.predictions.bias"]
    save_file(weights, tmp_path / "bert" / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "bert")).eval()
    ids = torch.randint(1, 99, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "bert")(ids).logits, theirs(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate"])
def test_every_name_transformers_gives_gelu_loads_with_its_logits(tmp_path, name):
    """GPT-2's activation_function and BERT's hidden_act: transformers' six names of the two GELUs (exact and tanh)
    each load with transformers' logits; gelu_python, gelu_accurate (and gelu_fast for BERT) were refused."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      activation_function=name)).eval()
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32, hidden_act=name)).eval()
    idx = torch.randint(0, 64, (2, 12))
    for model, out in ((gpt2, lambda m: m(idx).logits), (bert, lambda m: m(idx).last_hidden_state)):
        model.save_pretrained(tmp_path / name / type(model).__name__)
        ours = load_model(tmp_path / name / type(model).__name__).eval()
        with torch.no_grad():
            theirs = out(model)
            mine = ours(idx) if model is gpt2 else ours(idx).hidden
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_tied_model_whose_file_holds_only_the_head_loads_as_transformers_ties_it(tmp_path, family):
    """tie_word_embeddings true and a file holding the shared matrix as lm_head.weight alone (no embeddings):
    transformers ties the embeddings to the head; lmforge refused it as missing its embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
        embeddings = "transformer.wte.weight"
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=32,
                                          tie_word_embeddings=True)).eval()
        embeddings = "model.embed_tokens.weight"
    hf.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    shared = weights.pop(embeddings, None)
    weights["lm_head.weight"] = shared if shared is not None else weights["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "m" / "model.safetensors",
              metadata={"format": "pt"})
    again = type(hf).from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits)  # (transformers ties them)
        torch.testing.assert_close(load_model(tmp_path / "m")(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)
