"""Precision chosen by measuring this machine: the probe, its cache, and what training and inference do with it."""

import json

import pytest
import torch
from conftest import train_config

import lmforge.precision as precision
from lmforge.cli import main
from lmforge.precision import choose_autocast, choose_weights, measure


def fake_speeds(monkeypatch, **speed):
    """Make the probe see these speeds relative to fp32 (and count the products it times)."""
    timed = []

    def time_product(k, n, dtype, rows=1):
        name = next(key for key, value in precision.DTYPES.items() if value == dtype)
        timed.append((rows, k, n, name))
        return 1.0 / speed.get(name, 1.0)

    monkeypatch.setattr(precision, "time_product", time_product)
    monkeypatch.setattr(precision, "candidates", lambda: ["float32", *speed])
    monkeypatch.setattr(precision, "matvec_speedup", lambda dtype, k, n: 1.0)  # linear and mv alike
    return timed


def test_one_row_decoding_takes_the_matrix_vector_kernel_when_it_is_measured_faster(monkeypatch, tmp_path):
    """``use_matvec`` changes the kernel, not the numbers: the same logits and greedy tokens, for the
    blocks' Linear layers and the tied head; the engine applies it to bf16 weights when mv is faster here."""
    import copy

    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model, use_matvec

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert precision.matvec_speedup(torch.bfloat16, 64, 300) > 0  # measured for real, then cached
    assert "matvec bfloat16" in next(iter(json.loads((tmp_path / "precision.json").read_text())))
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64)).to(torch.bfloat16).eval()
    fast = copy.deepcopy(model)
    use_matvec(fast)
    calls = []
    monkeypatch.setattr(torch, "mv", lambda *a, _mv=torch.mv: calls.append(1) or _mv(*a))
    x = torch.randint(0, 300, (1, 1))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=0.02, rtol=0.02)
        assert len(calls) == 2 * 4 + 1  # four products a block, and the head
        fast(torch.randint(0, 300, (2, 3)))  # several rows: linear, as before
    assert len(calls) == 9

    class Ids:
        eos_id = None

        def decode(self, ids):
            return ""

    for speedup, expected in ((3.0, True), (1.0, False)):
        monkeypatch.setattr(precision, "matvec_speedup", lambda dtype, k, n, s=speedup: s)
        plain = copy.deepcopy(model)
        engine = Engine(plain, Ids(), max_batch=1)
        assert plain.matvec is expected
        request = engine.add([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
        engine.run([request])
        reference = Engine(copy.deepcopy(model), Ids(), max_batch=1)
        ref = reference.add([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
        reference.run([ref])
        assert request.sequences[0].tokens == ref.sequences[0].tokens


def test_the_probe_is_real_fast_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    speed = measure("matmul", 64, 256, 128)
    assert speed["float32"] == 1.0 and speed["bfloat16"] > 0
    saved = json.loads((tmp_path / "precision.json").read_text())
    (key,) = saved
    assert "torch " + torch.__version__ in key and "matmul 128x64x256" in key
    timed = fake_speeds(monkeypatch, bfloat16=9.0)
    assert measure("matmul", 64, 256, 128) == speed and not timed  # read back, not measured again
    assert measure("gemv", 64, 256)["bfloat16"] == 9.0 and timed  # another shape is measured


def test_training_takes_bf16_autocast_only_where_it_is_measured_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    fake_speeds(monkeypatch, bfloat16=3.9)
    choice = choose_autocast(cpu, "auto", 256, 1024, 2048)
    assert choice.dtype == "bfloat16" and "bf16 autocast: 3.9x faster matrix products on this CPU" in choice.reason
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "other-machine"))
    fake_speeds(monkeypatch, bfloat16=0.6)
    choice = choose_autocast(cpu, "auto", 256, 1024, 2048)
    assert choice.dtype == "float32" and "run 0.60x as fast" in choice.reason
    assert choose_autocast(cpu, "bfloat16", 256, 1024, 2048).dtype == "bfloat16"  # the user's word wins


def test_inference_keeps_the_checkpoints_precision_unless_it_is_slow_here(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    fake_speeds(monkeypatch, bfloat16=1.6)
    assert choose_weights(cpu, "auto", "bfloat16", 768, 50257).dtype == "bfloat16"
    assert choose_weights(cpu, "auto", "float32", 768, 50257).dtype == "float32"  # never lowered by itself
    assert choose_weights(cpu, "auto", None, 768, 50257).dtype == "float32"
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "slow-bf16"))
    fake_speeds(monkeypatch, bfloat16=0.3)
    choice = choose_weights(cpu, "auto", "bfloat16", 768, 50257)
    assert choice.dtype == "float32" and "decodes at 0.30x fp32's speed" in choice.reason and choice.news
    assert choose_weights(cpu, "bfloat16", "bfloat16", 768, 50257).dtype == "bfloat16"
    # a precision the probe does not time here (fp16 on a CPU without fp16 arithmetic) is said so, not "0.00x"
    choice = choose_weights(cpu, "auto", "float16", 768, 50257)
    assert choice.dtype == "float32" and "fp16, which this CPU has no native arithmetic for" in choice.reason


def test_pretrain_says_which_precision_it_chose_and_records_it(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    fake_speeds(monkeypatch, bfloat16=2.5)
    from lmforge.train.loop import pretrain

    pretrain(train_config(data_dir, tmp_path / "run", max_steps=2, dtype="auto"), progress=False)
    assert "precision: bf16 autocast: 2.5x faster matrix products on this CPU" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dtype"] == "bfloat16 autocast"


@pytest.mark.parametrize("stored, speed, expected", [("bfloat16", 2.0, torch.bfloat16), ("bfloat16", 0.2, torch.float32)])
def test_generate_loads_a_bf16_checkpoint_in_the_measured_precision(hf_gpt2, tmp_path, monkeypatch, capsys,
                                                                   stored, speed, expected):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    fake_speeds(monkeypatch, bfloat16=speed)
    config = json.loads((hf_gpt2 / "config.json").read_text())
    (hf_gpt2 / "config.json").write_text(json.dumps({**config, "torch_dtype": stored}))
    import lmforge.model.checkpoint as checkpoint

    loaded = []
    real = checkpoint.load_generator  # (generate loads decoders and encoder-decoders)
    monkeypatch.setattr(checkpoint, "load_generator", lambda *a, **k: loaded.append(a[2] if len(a) > 2 else k.get("dtype"))
                        or real(*a, **k))
    assert main(["generate", "def", "--model", str(hf_gpt2), "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert loaded == [expected]
    assert "precision: " in capsys.readouterr().err
    assert main(["generate", "def", "--model", str(hf_gpt2), "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    assert loaded[-1] == torch.float32
    assert main(["generate", "def", "--model", str(hf_gpt2), "--int8", "--dtype", "bfloat16"]) == 2


PLAIN = {"head": ["plain", 1.0], "body": ["plain", 1.0]}


def test_inference_runs_fp32_products_through_the_kernel_measured_fastest(monkeypatch, tmp_path, hf_gpt2,
                                                                          tokenizer_dir):
    """``use_fast_kernels`` changes the kernel, not the numbers: for a decoder and an encoder-decoder (tied and
    untied head), whichever kernel the probe (real, cached) names for the head and for the body -- BLAS on weights
    stored transposed (strides change, values do not) or oneDNN's (the modules' forward, the tied head flagged) --
    logits and greedy tokens stay those of the plain model, one row at a time and several; outside no-grad mode the
    products are F.linear's, so gradients are too. bf16 weights, "plain" or a speedup under the margin: nothing
    changes. `generate` on a folder applies it; a model object it is given is left alone (it may train on)."""
    import copy

    from lmforge import generate
    from lmforge.model.checkpoint import load_model
    from lmforge.model.gpt import use_fast_kernels

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    measured = precision.linear_kernels(torch.float32, 64, 300, 4)  # measured for real, then cached
    assert set(measured) == {"head", "body"} and all(k in precision.FP32_KERNELS and s > 0 for k, s in measured.values())
    cache = tmp_path / "precision.json"
    key = next(iter(json.loads(cache.read_text())))
    assert "fp32 kernels plain/transposed/" in key and "rows 1-4 x64x300" in key
    assert ("/packed " in key) == (precision.pack_weight(torch.ones(4, 2), 1) is not None)  # fp32 may be packed too
    cache.write_text(json.dumps({key: {"head": ["fastest", 9], "body": []}}))  # edited by hand: BLAS as stored
    assert precision.linear_kernels(torch.float32, 64, 300, 4) == {"head": ["plain", 1.0], "body": ["plain", 1.0]}
    from test_encoder_decoder import make_hf_t5

    import shutil

    folders = [hf_gpt2]
    for shape in ("v1.0", "v1.1"):
        folders.append(make_hf_t5(tmp_path / shape, shape, vocab_size=1024))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folders[-1] / name)
    kernels = ["transposed"] + (["onednn"] if precision.onednn_linear_available() else []) + (
        ["packed"] if precision.pack_weight(torch.ones(4, 2), 1) is not None else [])
    for folder in folders:
        model = load_model(folder).eval()
        seq2seq = not hasattr(model, "wte")
        ids = torch.randint(2, 100, (3, 7))
        logits = (lambda m: m(ids, labels=ids)[0]) if seq2seq else (lambda m: m(ids)[0])
        greedy = dict(max_new_tokens=6, temperature=0)
        for head, body in [(h, b) for h in kernels for b in kernels] + [("plain", kernels[-1]), (kernels[-1], "plain")]:
            monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows, h=head, b=body: (
                {"head": [h, 2.0], "body": [b, 2.0]} if dtype == torch.float32 else PLAIN))
            for rows in (1, 8):
                other = copy.deepcopy(model).to(torch.bfloat16)
                assert use_fast_kernels(other, rows) == "as loaded"
                assert all(p.is_contiguous() for p in other.parameters())
            fast = copy.deepcopy(model)
            said = use_fast_kernels(fast, 8)
            assert ("head" in said) == (head != "plain") and ("body" in said) == (body != "plain"), said
            untied = getattr(fast, "lm_head", None)
            head_weight = untied.weight if untied is not None else (fast.shared if seq2seq else fast.wte).weight
            body_weights = [m.weight for m in fast.modules() if type(m) is torch.nn.Linear and m is not untied]
            for group, kernel, weights in (("head", head, [head_weight]), ("body", body, body_weights)):
                if kernel == "packed" and group == "head" and untied is None:  # a packed copy; the embedding reads
                    assert fast.packed_head.layout == torch._mkldnn and head_weight.layout == torch.strided
                elif kernel == "packed":
                    assert all(w.layout == torch._mkldnn for w in weights)
                else:
                    assert all(w.layout == torch.strided and w.is_contiguous() != (kernel == "transposed") for w in weights)
            assert fast.onednn_head == (head == "onednn")
            assert fast.state_dict().keys() == model.state_dict().keys()
            for (name, a), b in zip(model.state_dict().items(), fast.state_dict().values()):  # (packed: given back plain)
                assert b.layout == torch.strided and torch.equal(a, b), name
            if "packed" in (head, body):  # a compiled graph cannot take packed weights: oneDNN's kernel on plain ones
                unpacked = copy.deepcopy(model)
                said = use_fast_kernels(unpacked, 8, pack=False)
                assert "packed" not in said and all(p.layout == torch.strided for p in unpacked.parameters())
                assert unpacked.onednn_head == (head in ("onednn", "packed"))
            with torch.no_grad():
                torch.testing.assert_close(logits(fast), logits(model), atol=1e-5, rtol=1e-5)
            for prompts in (["b c"], ["a", "b c"]):
                assert [g.token_ids for g in generate(fast, prompts, **greedy)] == \
                    [g.token_ids for g in generate(model, prompts, **greedy)]
            if head == body == "onednn":  # with gradients: F.linear's products, the same gradients
                plain, trained = copy.deepcopy(model), copy.deepcopy(fast)  # (eval: no dropout draws)
                for m in (plain, trained):
                    (m(ids, labels=ids)[1] if seq2seq else m(ids, ids)[1]).backward()
                for a, b in zip(plain.parameters(), trained.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
        for slow in ([kernels[-1], 1.05], ["plain", 1.0]):
            monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows, s=slow: {"head": s, "body": s})
            unchanged = copy.deepcopy(model)
            assert use_fast_kernels(unchanged, 8) == "as loaded" and not unchanged.onednn_head
            assert all(p.is_contiguous() for p in unchanged.parameters())
    monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows: {"head": ["transposed", 2.0],
                                                                                "body": ["transposed", 2.0]})
    calls = []
    monkeypatch.setattr("lmforge.infer.generate.use_fast_kernels", lambda m, rows: calls.append(rows))
    generate(str(hf_gpt2), ["a", "b"], n=2, max_new_tokens=2, temperature=0.5)
    model = load_model(hf_gpt2)
    generate(model, ["a", "b"], max_new_tokens=2, temperature=0)
    assert calls == [4] and all(p.is_contiguous() for p in model.parameters())


def test_bf16_inference_packs_weights_for_onednn_where_measured_faster(monkeypatch, tmp_path, hf_gpt2, tokenizer_dir):
    """bf16 weights packed into oneDNN's layout (``use_fast_kernels``, whichever of head and body the probe names):
    for a decoder (tied head: a packed copy beside the embedding) and encoder-decoders (tied and untied), logits and
    greedy tokens stay the plain bf16 model's, one row and several; ``state_dict`` gives back the plain weights
    exactly; ``pack=False`` (a compiled graph) and fp32's kernels leave bf16 weights alone."""
    import copy
    import shutil

    from lmforge import generate
    from lmforge.model.checkpoint import load_model
    from lmforge.model.gpt import use_fast_kernels

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    if precision.pack_weight(torch.ones(4, 2, dtype=torch.bfloat16), 1) is None:
        pytest.skip("this torch or CPU cannot pack bf16 weights for oneDNN")
    measured = precision.linear_kernels(torch.bfloat16, 64, 300, 4)  # measured for real, then cached
    assert all(k in precision.HALF_KERNELS and s > 0 for k, s in measured.values())
    from test_encoder_decoder import make_hf_t5

    folders = [hf_gpt2]
    for shape in ("v1.0", "v1.1"):
        folders.append(make_hf_t5(tmp_path / shape, shape, vocab_size=1024))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folders[-1] / name)
    for folder in folders:
        model = load_model(folder, dtype=torch.bfloat16).eval()
        seq2seq = not hasattr(model, "wte")
        ids = torch.randint(2, 100, (3, 7))
        logits = (lambda m: m(ids, labels=ids)[0]) if seq2seq else (lambda m: m(ids)[0])
        plain_state = {k: v.clone() for k, v in model.state_dict().items()}
        for head, body in (("packed", "packed"), ("packed", "plain"), ("plain", "packed")):
            monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows, h=head, b=body: (
                {"head": [h, 2.0], "body": [b, 2.0]} if dtype == torch.bfloat16 else PLAIN))
            assert use_fast_kernels(copy.deepcopy(model), 8, pack=False) == "as loaded"
            assert use_fast_kernels(copy.deepcopy(model).float(), 8) == "as loaded"
            fast = copy.deepcopy(model)
            said = use_fast_kernels(fast, 8)
            assert ("head packed" in said) == (head == "packed") and ("body packed" in said) == (body == "packed"), said
            untied = getattr(fast, "lm_head", None)
            body_weights = [m.weight for m in fast.modules() if type(m) is torch.nn.Linear and m is not untied]
            assert all((w.layout == torch._mkldnn) == (body == "packed") for w in body_weights)
            if untied is not None:
                assert (untied.weight.layout == torch._mkldnn) == (head == "packed")
            else:
                assert (fast.packed_head is not None) == (head == "packed")
                assert (fast.shared if seq2seq else fast.wte).weight.layout == torch.strided  # the embedding reads it
            state = fast.state_dict()
            assert state.keys() == plain_state.keys()
            assert all(v.layout == torch.strided and torch.equal(v, plain_state[k]) for k, v in state.items())
            with torch.no_grad():
                torch.testing.assert_close(logits(fast).float(), logits(model).float(), atol=2e-2, rtol=2e-2)
            greedy = dict(max_new_tokens=6, temperature=0)
            for prompts in (["b c"], ["a", "b c"]):
                assert [g.token_ids for g in generate(fast, prompts, **greedy)] == \
                    [g.token_ids for g in generate(model, prompts, **greedy)]


def test_bf16_training_attention_takes_the_math_backend_where_it_is_measured_faster(monkeypatch, tmp_path):
    """``gpt.attention`` picks SDPA's math backend only for bf16/fp16 training on the CPU, where the probe (real,
    cached per shape) says so; the loss and the gradients are those of the flash kernel within bf16's rounding."""
    import copy

    import lmforge.model.gpt as gpt
    from lmforge.model.config import Config

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert precision.attention_math_speedup(torch.bfloat16, 2, 16, 32) > 0  # measured for real, then cached
    assert "attention bfloat16 4x2x32x16" in next(iter(json.loads((tmp_path / "precision.json").read_text())))
    asked = []
    monkeypatch.setattr(gpt, "_math_attention_is_faster", lambda *key: asked.append(key) or key[-1] <= 64)
    torch.manual_seed(0)
    model = gpt.build_model(Config(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    ids = torch.randint(0, 300, (3, 37))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    model(ids)  # fp32 training
    assert asked == []
    grads = {}
    for name, faster in (("math", True), ("flash", False)):
        trained = copy.deepcopy(model)
        monkeypatch.setattr(gpt, "_math_attention_is_faster", lambda *key, f=faster: asked.append(key) or f)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            loss = trained(ids, ids)[1]
        loss.backward()
        kernels = {e.key for e in prof.key_averages() if "flash_attention" in e.key}
        assert bool(kernels) == (name == "flash"), kernels
        grads[name] = (loss.item(), [p.grad.float() for p in trained.parameters()])
    assert asked and all(key == (torch.bfloat16, 4, 16, 64) for key in asked)  # 37 keys: the 64 bucket
    assert abs(grads["math"][0] - grads["flash"][0]) < 1e-2
    for a, b in zip(grads["math"][1], grads["flash"][1]):
        torch.testing.assert_close(a, b, atol=2e-2 * float(b.abs().max()) + 1e-6, rtol=0)


def test_bf16_decoding_attention_takes_the_kernel_measured_fastest(monkeypatch, tmp_path):
    """A decoding step's one query a row (no grad, bf16 on the CPU) goes through SDPA's flash kernel, its math
    backend or ``matmul_attention``, whichever the probe (real, cached per rows, heads, length) says; the step's
    logits are the flash kernel's within bf16's rounding, grouped query heads included. Prefill (several queries)
    and fp32 never ask. ``matmul_attention`` itself equals SDPA in fp32 (bool mask, float bias, groups)."""
    import torch.nn.functional as F

    import lmforge.model.gpt as gpt
    from lmforge.model.config import Config

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    kernel, speedup = precision.decode_attention_kernel(torch.bfloat16, 2, 4, 2, 16, 64)  # measured, then cached
    assert kernel in precision.DECODE_ATTENTION and speedup >= (1.0 if kernel == "flash" else precision.MARGIN)
    assert "decode attention kernel bfloat16 2x4/2x64x16" in next(iter(json.loads((tmp_path / "precision.json").read_text())))
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads in ((4, 2), (4, 4), (8, 1)):
        q, k, v = torch.randn(3, heads, 1, 8, generator=g), *torch.randn(2, 3, kv_heads, 11, 8, generator=g)
        mask = torch.rand(3, 1, 1, 11, generator=g) > 0.4
        mask[..., 0] = True
        bias = torch.randn(1, heads, 1, 11, generator=g)
        for kw in (dict(attn_mask=mask), dict(attn_mask=bias, scale=1.0), {}):
            torch.testing.assert_close(gpt.matmul_attention(q, k, v, enable_gqa=kv_heads != heads, **kw),
                                       F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads, **kw))
    torch.manual_seed(0)
    model = gpt.build_model(Config(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                   dropout=0.0, norm="rmsnorm", pos_embedding="rope", mlp="swiglu", bias=False,
                                   family="llama")).eval()
    ids = torch.randint(0, 300, (3, 37))
    asked = []
    with torch.no_grad():
        monkeypatch.setattr(gpt, "_decoding_attention", lambda *key: asked.append(key) or "math")
        model(ids)  # fp32
        model.to(torch.bfloat16)
        model(ids)  # several queries a row
        assert asked == []
        steps = {}
        for name in ("math", "matmul", "flash"):
            monkeypatch.setattr(gpt, "_decoding_attention", lambda *key, n=name: asked.append(key) or n)
            cache = gpt.KVCache(model.config, 3, 64, ids.device, torch.bfloat16)
            model(ids, kv_cache=cache, start=0)
            with torch.profiler.profile() as prof:
                steps[name] = model(ids[:, :1], kv_cache=cache, start=37).float()
            kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
            assert any("flash" in k for k in kernels) == (name == "flash"), kernels
            assert any("math" in k for k in kernels) == (name == "math"), kernels
    assert asked and all(key == (torch.bfloat16, 4, 4, 2, 16, 64) for key in asked)  # 3 rows, 38 keys: buckets
    for name in ("math", "matmul"):
        torch.testing.assert_close(steps[name], steps["flash"], atol=3e-2 * float(steps["flash"].abs().max()), rtol=0)


def test_a_compiled_engine_decodes_a_model_whose_products_go_through_onednn(monkeypatch):
    """`serve --compile` on a model whose products were sent to oneDNN: the compiled graph takes F.linear (inductor
    cannot lower oneDNN's op), the tokens are the plain model's."""
    import copy

    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model, use_fast_kernels

    if not precision.onednn_linear_available():
        pytest.skip("this torch has no oneDNN linear kernel")
    monkeypatch.setattr(precision, "linear_kernels", lambda dtype, k, n, rows: {"head": ["onednn", 2.0],
                                                                                "body": ["onednn", 2.0]})
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    fast = copy.deepcopy(model)
    assert use_fast_kernels(fast, 1) == "head through oneDNN, body through oneDNN"

    def tokens(m, compile):
        engine = Engine(m, type("T", (), {"eos_id": None, "decode": lambda self, ids: ""})(), max_batch=1,
                        compile=compile)
        request = engine.add([5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[]))
        engine.run([request])
        return request.sequences[0].tokens

    assert tokens(fast, True) == tokens(model, False)


def test_a_gpu_that_only_emulates_bf16_trains_and_decodes_in_fp32(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes for a T4 or V100 (emulation, far slower): capability decides."""
    from lmforge.precision import choose_autocast, choose_weights

    gpu = torch.device("cuda", 0)
    for capability, train, weights in (((7, 5), "float32", "float32"), ((8, 0), "bfloat16", "bfloat16"),
                                       ((9, 0), "bfloat16", "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert choose_autocast(gpu, "auto", 64, 256, 128).dtype == train
        assert choose_weights(gpu, "auto", "bfloat16", 64, 256).dtype == weights
