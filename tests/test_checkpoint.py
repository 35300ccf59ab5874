"""Checkpoints are Hugging Face folders: parity with transformers in both directions."""

import json
import pickle

import pytest
import torch
from conftest import make_hf_gpt2

from lmforge.errors import LmforgeError
from lmforge.model.checkpoint import load_model, save_model
from lmforge.model.config import Config
from lmforge.model.gpt import build_model
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


def hf_logits(folder, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}, {"n_inner": 40, "activation_function": "gelu"}])
def test_lmforge_loads_hf_gpt2_with_the_same_logits(tmp_path, kw):
    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101, **kw)
    idx = torch.randint(0, 101, (2, 30))
    ours = load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf_logits(folder, idx), atol=1e-4, rtol=0)
    # Transposed Conv1D weights must be stored contiguously: fused AdamW pairs param and grad memory.
    assert all(p.is_contiguous() for p in ours.parameters())


def test_transformers_loads_an_lmforge_checkpoint_with_the_same_logits(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=1024, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    with torch.no_grad():  # move LayerNorm and biases off their init so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_model(model, tmp_path / "ours", Tokenizer.load(tokenizer_dir))
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    idx = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "ours", idx), model(idx), atol=1e-4, rtol=0)
    # The round trip through our own loader is exact.
    again = load_model(tmp_path / "ours")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] == 0


def test_pytorch_model_bin_sharded_and_unprefixed_weights(tmp_path):
    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101)
    idx = torch.randint(0, 101, (1, 20))
    expected = hf_logits(folder, idx)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    # pytorch_model.bin (read with weights_only=True), with keys lacking "transformer." as in the original gpt2 upload
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}, bin_dir / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(load_model(bin_dir)(idx), expected, atol=1e-4, rtol=0)
    # sharded safetensors with an index, written by transformers and by lmforge
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "sharded")
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)
    save_model(model, tmp_path / "ours-sharded", max_shard_bytes=20_000)
    assert len(list((tmp_path / "ours-sharded").glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(hf_logits(tmp_path / "ours-sharded", idx), expected, atol=1e-4, rtol=0)


def test_convert_keeps_a_bf16_folders_precision_and_never_writes_into_its_source(tmp_path):
    """transformers 5 writes the precision as "dtype" (4 wrote "torch_dtype"): convert keeps it either way; and a
    folder made inside the one it copies from is refused (it would copy itself)."""
    from lmforge.model.checkpoint import convert

    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    spec = json.loads((tmp_path / "bf16" / "config.json").read_text())
    spec.pop("torch_dtype", None)
    spec["dtype"] = "bfloat16"
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(spec))
    convert(tmp_path / "bf16", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(LmforgeError, match="lies inside the model folder .* it is made from"):
        convert(tmp_path / "bf16", tmp_path / "bf16" / "sub")
    assert not (tmp_path / "bf16" / "sub").exists()
    # weights fp16 cannot hold are refused, not written as inf
    with torch.no_grad():
        hf.lm_head.weight[0, 0] = 70000.0
    hf.save_pretrained(tmp_path / "big")
    with pytest.raises(LmforgeError, match=r"beyond fp16's range \(±65504\): as float16 they would be inf"):
        convert(tmp_path / "big", tmp_path / "big16", dtype="float16")
    assert not (tmp_path / "big16").exists()
    convert(tmp_path / "big", tmp_path / "big-bf16", dtype="bfloat16")


def test_loading_never_runs_code_from_a_pickle(tmp_path):
    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101)
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (exec, ("open('" + str(tmp_path / "pwned") + "', 'w').close()",))

    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(LmforgeError, match="refusing to load"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_and_unsupported_folders_give_clear_errors(tmp_path):
    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(LmforgeError, match="model_type 'mamba' is not supported; lmforge reads: gpt2"):
        load_model(folder)
    for model_type in ("t5", "bert"):  # a supported type whose fields are missing: one line, not a traceback
        bare = {k: v for k, v in config.items() if k != "architectures"}
        (folder / "config.json").write_text(json.dumps({**bare, "model_type": model_type}))
        with pytest.raises(LmforgeError, match=f"missing field .*is this a {model_type} config.json"):
            load_model(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(LmforgeError, match="not a valid safetensors file"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="no model.safetensors or pytorch_model.bin"):
        load_model(folder)
    with pytest.raises(LmforgeError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path):
    folder = make_hf_gpt2(tmp_path / "hf", vocab_size=101)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(LmforgeError, match=r"missing h\.2\."):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(LmforgeError, match="do not fit"):
        load_model(folder)


def test_a_checkpoint_or_the_checkpoints_folder_of_a_run_loads_and_a_file_is_one_line(tmp_path, data_dir):
    """A newcomer passes --model runs/x/checkpoints/step_N (or runs/x/checkpoints, or a file in a model folder):
    each was "has no config.json and no checkpoints". A checkpoint loads its model, the checkpoints folder its
    latest, and a file names the folder to give."""
    from conftest import train_config

    from lmforge.errors import LmforgeError
    from lmforge.model.checkpoint import resolve_model_dir
    from lmforge.train.loop import pretrain

    pretrain(train_config(data_dir, tmp_path / "run", max_steps=4, checkpoint_interval=2, eval_interval=100),
             progress=False)
    steps = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert resolve_model_dir(steps[0]) == steps[0] / "model"
    assert resolve_model_dir(tmp_path / "run" / "checkpoints") == steps[-1] / "model" == resolve_model_dir(tmp_path / "run")
    with pytest.raises(LmforgeError, match="is a file; give the folder that holds the model"):
        resolve_model_dir(steps[0] / "model" / "config.json")
