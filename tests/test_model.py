import math
import time

import pytest
import torch

from lmforge.model.config import PRESETS, Config
from lmforge.model.gpt import KVCache, build_model


@pytest.mark.parametrize("preset,published", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
    ("llama-1b", 1_235_814_400), ("llama-3b", 3_212_749_824),  # Llama 3.2
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-70b", 68_976_648_192),  # Llama 2
])
def test_presets_have_the_published_parameter_counts(preset, published):
    config = Config.from_preset(preset)
    assert config.num_params() == published
    assert build_model(config, "meta").num_params() == published


def test_tiny_preset_is_a_few_million_parameters():
    assert 1e6 < Config.from_preset("tiny").num_params() < 1e7


LLAMA = dict(family="llama", pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)


@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": False}, {"mlp_hidden": 48}, {"family": "lmforge", "bias": False},
    {**LLAMA, "n_kv_head": 1}, {**LLAMA, "family": "qwen2", "qkv_bias": True, "tie_embeddings": False},
    {**LLAMA, "family": "lmforge", "pos_embedding": "sinusoidal", "head_dim": 12, "n_kv_head": 1},
])
def test_counted_parameters_equal_the_model_parameters(kw):
    config = Config(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=16, **kw)
    assert build_model(config).num_params() == config.num_params()


def test_flops_per_token_formula():
    c = Config.from_preset("gpt2")
    n = c.n_layer * (12 * c.n_embd**2) + c.vocab_size * c.n_embd
    assert c.flops_per_token(1024) == 6 * n + 12 * c.n_layer * 1024 * c.n_embd
    assert c.flops_per_token(1024, training=False) * 3 == c.flops_per_token(1024)


def test_a_70b_model_is_inspected_in_under_a_second_without_memory():
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    model = build_model(Config.from_preset("llama-70b"), "meta")
    n, flops = model.num_params(), model.config.flops_per_token(4096)
    assert time.perf_counter() - start < 1.0
    assert all(p.is_meta for p in model.parameters())
    assert n == 68_976_648_192 and flops > 6 * n
    # 70B fp32 weights would be 276 GB; the process grew by less than 100 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100_000


def test_building_a_model_does_not_import_torch_dynamo():
    """Every command that builds a model builds it on the meta device first; there ``normal_`` imports
    ``torch._dynamo`` (1.4-2.1 s of every `generate`'s start on a 2-core CPU), so nothing is drawn there. Fresh
    process: the three model files; a model made directly on the CPU is still drawn by its ``init_weights``."""
    import subprocess
    import sys

    script = """
import sys, torch
from lmforge.model.config import Config
from lmforge.model.gpt import GPT, build_model
from lmforge.model.encoder import EncoderConfig, build_encoder
from lmforge.model.encoder_decoder import Seq2SeqConfig, build_encoder_decoder
build_model(Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
direct = GPT(Config(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=64))  # (init_weights: std 0.02)
assert abs(direct.wte.weight.std().item() - 0.02) < 0.002 and abs(direct.wpe.weight.std().item() - 0.02) < 0.004
build_encoder(EncoderConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, mlp_hidden=32))
build_encoder_decoder(Seq2SeqConfig(vocab_size=64, d_model=16, d_kv=8, d_ff=32, n_layer=1, n_decoder_layer=1, n_head=2))
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "no dynamo"


def test_init_is_gpt2_style_and_seeded():
    config = Config(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=64)
    torch.manual_seed(0)
    a = build_model(config)
    torch.manual_seed(0)
    b = build_model(config)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert abs(a.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002
    assert abs(a.blocks[0].mlp.proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert torch.all(a.blocks[0].attn.qkv.bias == 0) and torch.all(a.ln_f.weight == 1)


def test_kv_cache_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    config = Config(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16)
    model = build_model(config).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(config, 2, 20)
        steps = [model(idx[:, :8], kv_cache=cache, start=0)]  # prefill
        steps.append(model(idx[:, 8:13], kv_cache=cache, start=8))  # a chunk after cached keys
        steps += [model(idx[:, t : t + 1], kv_cache=cache, start=t) for t in range(13, 20)]  # one by one
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_loss_ignores_minus_100_and_last_only_matches():
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=8))
    idx = torch.randint(0, 50, (1, 10))
    targets = idx.clone()
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], idx[0, 5:])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model(idx, last_only=True), logits[:, -1:])


def test_presets_are_all_valid():
    for name in PRESETS:
        assert Config.from_preset(name).num_params() > 0


@pytest.mark.parametrize("kw", [
    {**LLAMA, "n_kv_head": 2},
    {**LLAMA, "family": "mistral", "sliding_window": 5, "n_kv_head": 1},
    {**LLAMA, "family": "lmforge", "pos_embedding": "sinusoidal"},
    {**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8}},
])
def test_kv_cache_decoding_equals_the_full_forward_for_every_switch(kw):
    torch.manual_seed(0)
    config = Config(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=16, **kw)
    model = build_model(config).eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(config, 2, 20)
        steps = [model(idx[:, :8], kv_cache=cache, start=0), model(idx[:, 8:13], kv_cache=cache, start=8)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache, start=t) for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    {},
    {**LLAMA, "n_kv_head": 2},
    {**LLAMA, "family": "mistral", "sliding_window": 5, "n_kv_head": 1},
    {**LLAMA, "family": "lmforge", "pos_embedding": "sinusoidal"},
])
def test_keep_computes_only_the_kept_positions_through_the_last_block(kw):
    """``keep`` gives exactly the full pass's outputs at those positions, with its gradients, also from a
    cache and with a packed mask; the last block's attention and MLP see only the kept rows."""
    torch.manual_seed(0)
    config = Config(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=16, **kw)
    model = build_model(config).eval()
    idx = torch.randint(0, 50, (3, 20))
    keep = torch.tensor([[19, 4], [0, 7], [12, 12]])
    gather = lambda t: t.gather(1, keep[:, :, None].expand(-1, -1, t.size(2)))  # noqa: E731
    full = model(idx)
    part = model(idx, keep=keep)
    assert part.shape == (3, 2, 50)
    torch.testing.assert_close(part, gather(full), atol=1e-6, rtol=1e-5)
    # the same through the gradients of every weight
    g_full = torch.autograd.grad(gather(full).square().sum(), list(model.parameters()), allow_unused=True)
    g_part = torch.autograd.grad(part.square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g_full, g_part):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    # with explicit positions and a mask (packed rows)
    positions = torch.arange(20).repeat(3, 1)
    mask = torch.ones(20, 20, dtype=torch.bool).tril().repeat(3, 1, 1, 1)
    torch.testing.assert_close(model(idx, positions=positions, attn_mask=mask, keep=keep), gather(full),
                               atol=1e-6, rtol=1e-5)
    # the last position of a chunk decoded from a cache
    with torch.no_grad():
        cache = KVCache(config, 3, 20)
        model(idx[:, :15], kv_cache=cache, start=0)
        step = model(idx[:, 15:], kv_cache=cache, start=15, keep=torch.tensor([[4], [0], [2]]))
    torch.testing.assert_close(step[:, 0], full[[0, 1, 2], [19, 15, 17]], atol=1e-5, rtol=1e-5)
    # the last block really computes fewer rows: its MLP sees (3, 2, n_embd)
    seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model(idx, keep=keep)
    hook.remove()
    assert seen == [(3, 2, 16)]


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    config = Config(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, sliding_window=4,
                    **{**LLAMA, "family": "mistral"})
    model = build_model(config).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 2] = (idx[0, 2] + 1) % 50
    with torch.no_grad():
        a, b = model(idx), model(changed)
    # With one layer, position p sees positions p-3..p: changing position 2 moves outputs 2..5 only.
    moved = [(a[0, p] - b[0, p]).abs().max().item() > 1e-6 for p in range(12)]
    assert moved == [p in (2, 3, 4, 5) for p in range(12)]


def test_sinusoidal_positions_follow_the_paper():
    from lmforge.model.gpt import sinusoidal_positions

    pe = sinusoidal_positions(torch.arange(50), 16)
    p, i = 37, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-5)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-5)


def test_family_switches_that_do_not_fit_are_refused():
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="family 'gpt2' needs pos_embedding='learned'.*use family 'lmforge'"):
        Config(pos_embedding="sinusoidal")
    with pytest.raises(LmforgeError, match="family 'qwen2' needs has_qkv_bias=True"):
        Config(**{**LLAMA, "family": "qwen2"})
    with pytest.raises(LmforgeError, match="n_head 4 must be a multiple of n_kv_head 3"):
        Config(n_head=4, n_embd=16, n_kv_head=3, **LLAMA)


@pytest.mark.parametrize("kw", [{}, {**LLAMA, "n_kv_head": 2}, {**LLAMA, "family": "mistral", "sliding_window": 3},
                                {**LLAMA, "family": "lmforge", "pos_embedding": "sinusoidal"}])
def test_packed_rows_with_document_masking_equal_separate_documents(kw):
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=16, **kw)).eval()
    docs = [torch.randint(0, 50, (n,)) for n in (5, 7, 4)]
    row = torch.cat(docs)[None]
    segment = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    q, k = torch.arange(16)[:, None], torch.arange(16)[None, :]
    mask = ((segment[:, None] == segment[None, :]) & (k <= q))[None, None]
    with torch.no_grad():
        packed = model(row, positions=positions, attn_mask=mask)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def _losses_and_grads(model, run):
    model.zero_grad()
    loss = run(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["tied", "untied", "encoder", "encoder-decoder"])
def test_an_aligned_head_gives_the_same_loss_and_gradients(which, monkeypatch):
    """On GPUs the loop pads the head's rows to a multiple of 64 inside its products (``aligned_linear``); the
    vocabulary here, 100, is not one: losses, logits and every gradient equal the plain product's."""
    from lmforge.model.encoder import EncoderConfig, build_encoder
    from lmforge.model.encoder_decoder import Seq2SeqConfig, build_encoder_decoder

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12))
    if which in ("tied", "untied"):
        model = build_model(Config(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                   tie_embeddings=which == "tied"))
        run = lambda m: m(ids, ids.roll(1, 1))[1]  # noqa: E731
        heads = [model]
    elif which == "encoder":
        model = build_encoder(EncoderConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                            mlp_hidden=32, head="masked_lm"))
        labels = torch.where(torch.rand(ids.shape) < 0.5, ids, -100)
        run = lambda m: m(ids, labels=labels).loss  # noqa: E731
        heads = [model.mlm]
    else:
        model = build_encoder_decoder(Seq2SeqConfig(vocab_size=100, d_model=16, d_kv=8, d_ff=32, n_layer=1,
                                                    n_decoder_layer=1, n_head=2))
        run = lambda m: m(ids, labels=ids.flip(1))[1]  # noqa: E731
        heads = [model]
    model.eval()  # (no dropout: the two runs see the same numbers)
    plain_loss, plain = _losses_and_grads(model, run)
    for head in heads:
        head.head_multiple = 64
    padded, pad = [], torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda x, p, *a, **k: padded.append(x.shape) or pad(x, p, *a, **k))
    aligned_loss, aligned = _losses_and_grads(model, run)
    assert torch.Size([100, 16]) in padded  # (the padded product did run)
    assert torch.allclose(plain_loss, aligned_loss, atol=1e-6)
    assert plain.keys() == aligned.keys() and len(plain) > 3
    for name in plain:
        assert torch.allclose(plain[name], aligned[name], atol=1e-6), name
