"""Llama, Qwen2 and Mistral checkpoints: parity with transformers, both directions.

Each case is a random tiny model saved with ``save_pretrained``; lmforge must give the same logits
(1e-4, fp32), the same greedy tokens as ``generate(do_sample=False)``, and an exported folder that
transformers reloads with the same logits.
"""

import json

import pytest
import torch

from lmforge.infer.generate import SamplingParams, generate_ids
from lmforge.model.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-untied-theta": ("LlamaConfig", "LlamaForCausalLM",
                               dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50000.0)),
    "llama-mqa-tied-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                                   dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-biases-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=6)),
    # Qwen2's window applies from layer max_window_layers on: here every layer, then none (swish is silu)
    "qwen2-sliding-every-layer": ("Qwen2Config", "Qwen2ForCausalLM",
                                  dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    "qwen2-window-on-no-layer-swish": ("Qwen2Config", "Qwen2ForCausalLM",
                                       dict(num_key_value_heads=4, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                                            hidden_act="swish")),
}


def make(folder, case, seed=0):
    config_cls, model_cls, kw = CASES[case]
    torch.manual_seed(seed)
    args = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2, **kw)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**args)).eval()
    with torch.no_grad():  # move norms and biases off their initial values so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_greedy_tokens_and_export_match_transformers(case, tmp_path):
    hf = make(tmp_path / "hf", case)
    ours = load_model(tmp_path / "hf")
    idx = torch.randint(3, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)
    prompt = idx[:1, :5]
    expected = hf.generate(prompt, do_sample=False, max_new_tokens=25, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))
    got = list(generate_ids(ours, prompt[0].tolist(), SamplingParams(max_new_tokens=25, temperature=0), set()))
    assert got == expected[0, 5:].tolist()
    save_model(ours, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["model_type"] == hf.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=1e-4, rtol=0)


def test_imported_switches_are_the_ones_in_config_json(tmp_path):
    make(tmp_path / "a", "llama-mqa-tied-llama3-rope")
    c = load_model(tmp_path / "a").config
    assert (c.family, c.n_kv_head, c.tie_embeddings, c.pos_embedding, c.norm, c.mlp) == ("llama", 1, True, "rope", "rmsnorm", "swiglu")
    assert c.rope_scaling["factor"] == 8.0
    make(tmp_path / "b", "qwen2-biases-tied")
    c = load_model(tmp_path / "b").config
    assert (c.family, c.qkv_bias, c.bias) == ("qwen2", True, False)
    make(tmp_path / "c", "mistral-sliding-window")
    assert load_model(tmp_path / "c").config.sliding_window == 6
    make(tmp_path / "d", "llama-gqa-untied-theta")
    assert load_model(tmp_path / "d").config.rope_theta == 50000.0


def test_sharded_and_bin_llama_folders(tmp_path):
    hf = make(tmp_path / "hf", "llama-gqa-untied-theta")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    idx = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(load_model(tmp_path / "sharded")(idx), expected, atol=1e-4, rtol=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(load_model(bin_dir)(idx), expected, atol=1e-4, rtol=0)


def test_unsupported_variants_are_named(tmp_path):
    from lmforge.errors import LmforgeError

    make(tmp_path / "hf", "llama-gqa-untied-theta")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias/mlp_bias=true is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope scaling 'yarn' is not supported"),
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported; lmforge reads: gpt2, llama, qwen2, mistral"),
    ]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LmforgeError, match=message):
            load_model(tmp_path / "hf")


def test_a_config_without_window_or_positions_reads_as_transformers_reads_it(tmp_path):
    """transformers' defaults for absent keys: Mistral's window is 4096 (lmforge read none) and its positions
    131072; Qwen2's positions 32768 (lmforge assumed 2048 and refused longer inputs)."""
    from lmforge.errors import LmforgeError

    make(tmp_path / "mistral", "mistral-sliding-window")
    make(tmp_path / "qwen2", "qwen2-untied")
    for name, window, positions in [("mistral", 4096, 131072), ("qwen2", None, 32768)]:
        path = tmp_path / name / "config.json"
        config = json.loads(path.read_text())
        config.pop("sliding_window", None)
        config.pop("max_position_embeddings")
        path.write_text(json.dumps(config))
        hf = transformers.AutoConfig.from_pretrained(tmp_path / name)
        assert (hf.sliding_window if name == "mistral" else None) == window and hf.max_position_embeddings == positions
        ours = load_model(tmp_path / name).config
        assert (ours.sliding_window, ours.block_size) == (window, positions)
    # an input past the positions a model has: one LmforgeError (it was a ValueError)
    make(tmp_path / "llama", "llama-gqa-untied-theta")
    with pytest.raises(LmforgeError, match="positions up to 70 exceed the model's context of 64 tokens"):
        load_model(tmp_path / "llama")(torch.zeros(1, 70, dtype=torch.long))


def test_a_bare_llama_model_folder_loads_with_its_tied_head(tmp_path):
    """LlamaModel's save_pretrained names tensors without "model."; with tied embeddings it is a whole LM."""
    from safetensors.torch import load_file, save_file

    hf = make(tmp_path / "hf", "llama-mqa-tied-llama3-rope")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items() if k != "lm_head.weight"},
              tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaModel"]}))
    idx = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "hf")(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_an_lmforge_only_configuration_round_trips(tmp_path):
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model

    config = Config(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, family="lmforge",
                    pos_embedding="sinusoidal", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(config)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config == config
    idx = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx))


def word_tokenizer(folder, vocab=97):
    """A tokenizer.json of words "w0" ... (ids 0 ...), "w1" its unknown, "w2" its end of text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))


def test_generation_config_settings_apply_as_transformers_applies_them(tmp_path, capsys):
    """A greedy model's repetition_penalty and max_new_tokens in generation_config.json were dropped (only a
    do_sample: true file was read); settings lmforge does not apply (num_beams, no_repeat_ngram_size) are said."""
    from lmforge import generate

    hf = make(tmp_path / "m", "llama-gqa-untied-theta")
    word_tokenizer(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    prompt = torch.tensor([[9, 10, 11]])
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**settings, "repetition_penalty": 1.5}))
    hf.generation_config.repetition_penalty = 1.5
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt),
                           eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    got = generate(str(tmp_path / "m"), "w9 w10 w11", max_new_tokens=20, temperature=0)
    assert got.token_ids == expected and len(set(expected)) > 3  # (the penalty changed the greedy answer)
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**settings, "max_new_tokens": 5,
                                                                         "num_beams": 3, "no_repeat_ngram_size": 2}))
    capsys.readouterr()
    assert len(generate(str(tmp_path / "m"), "w9 w10 w11", temperature=0).token_ids) == 5
    err = capsys.readouterr().err
    assert "sets num_beams 3, which lmforge does not apply" in err and "--num-beams" in err
    # no_repeat_ngram_size and min_new_tokens are applied, as transformers applies them, greedy or beams
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**settings, "no_repeat_ngram_size": 1,
                                                                         "min_new_tokens": 3}))
    hf.generation_config.repetition_penalty = 1.0
    for beams in (1, 2):
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=beams, no_repeat_ngram_size=1,
                               min_new_tokens=3,
                               attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 3:].tolist()
        plain = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=beams,
                            attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 3:].tolist()
        got = generate(str(tmp_path / "m"), "w9 w10 w11", max_new_tokens=12, temperature=0, num_beams=beams)
        assert got.token_ids == expected != plain, beams


def test_the_python_api_fits_its_default_length_to_a_small_context(tmp_path):
    """generate()'s default max_new_tokens (128) failed on a model of 64 positions; it takes what the context
    leaves, as the command does."""
    from lmforge import generate

    make(tmp_path / "m", "qwen2-untied")
    word_tokenizer(tmp_path / "m")
    out = generate(str(tmp_path / "m"), "w9 w10 w11", temperature=0)
    assert len(out.token_ids) + 3 <= 64 and out.finish_reason in ("length", "stop")


def test_the_generate_command_takes_no_repeat_ngram_size_min_new_tokens_and_early_stopping(tmp_path, capsys):
    """transformers' no_repeat_ngram_size, min_new_tokens and beam search's early_stopping were only in the Python
    API; `lmforge generate` has them as flags (and refuses an empty --stop, which it used to ignore)."""
    from lmforge.cli import main

    hf = make(tmp_path / "m", "llama-gqa-untied-theta")
    word_tokenizer(tmp_path / "m")
    prompt = torch.tensor([[9, 10, 11]])
    for beams, early in ((1, "false"), (2, "true"), (3, "never")):
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=beams, no_repeat_ngram_size=1,
                               min_new_tokens=4, early_stopping={"true": True, "false": False}.get(early, early),
                               attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 3:].tolist()
        capsys.readouterr()
        code = main(["generate", "w9 w10 w11", "--model", str(tmp_path / "m"), "--temperature", "0", "--raw",
                     "--max-new-tokens", "12", "--no-repeat-ngram-size", "1", "--min-new-tokens", "4",
                     "--num-beams", str(beams), "--early-stopping", early])
        out = capsys.readouterr()
        assert code == 0, out.err
        words = out.out.split()
        assert words == [f"w{t}" for t in expected if t != hf.generation_config.eos_token_id], (beams, out.out)
        assert len(set(words)) == len(words)  # (no token twice: the prompt's are barred too)
    for flags, said in ((["--stop", ""], "--stop"), (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size")):
        assert main(["generate", "w9", "--model", str(tmp_path / "m"), *flags]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_beam_search_takes_the_repetition_penalty_as_transformers_does(tmp_path):
    """transformers' beam search applies repetition_penalty (to each beam's log-probabilities); lmforge refused it
    with beams, and dropped a folder's silently. Both give transformers' beams now."""
    from lmforge import generate

    hf = make(tmp_path / "m", "llama-gqa-untied-theta")
    word_tokenizer(tmp_path / "m")
    prompt = torch.tensor([[9, 10, 11, 9, 10]])
    for beams, penalty in ((2, 1.3), (3, 0.8)):
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=beams, repetition_penalty=penalty,
                               attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 5:].tolist()
        plain = hf.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=beams,
                            attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 5:].tolist()
        got = generate(str(tmp_path / "m"), "w9 w10 w11 w9 w10", max_new_tokens=10, num_beams=beams,
                       repetition_penalty=penalty)
        assert got.token_ids == expected != plain, (beams, penalty)
    settings = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**settings, "repetition_penalty": 1.3}))
    got = generate(str(tmp_path / "m"), "w9 w10 w11 w9 w10", max_new_tokens=10, num_beams=2)
    assert got.token_ids == hf.generate(prompt, max_new_tokens=10, do_sample=False, num_beams=2, repetition_penalty=1.3,
                                        attention_mask=torch.ones_like(prompt), pad_token_id=0)[0, 5:].tolist()
