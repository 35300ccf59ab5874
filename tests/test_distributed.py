"""Training on several processes: FSDP2 and DDP against one process, checkpoints that change the number of
processes, two "nodes" over loopback, and a rank that dies. Each torchrun here is 2 CPU processes over gloo."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_hf_gpt2, train_config

from lmforge.errors import LmforgeError
from lmforge.train import distributed
from lmforge.train.checkpointing import checkpoint_dirs, damage
from lmforge.train.loop import pretrain

HERE = Path(__file__).parent


def log(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def assert_same_steps(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Same losses and gradient norms step for step (a gradient summed over ranks instead of averaged, which
    AdamW's scale invariance would hide in the losses, doubles the norm), and the same validation losses."""
    (train_a, val_a), (train_b, val_b) = log(a), log(b)
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b]
    for x, y in zip(train_a, train_b):
        assert abs(x["loss"] - y["loss"]) < tol, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) < tol * 10, (x["step"], x["grad_norm"], y["grad_norm"])
    assert [r["step"] for r in val_a] == [r["step"] for r in val_b]
    for x, y in zip(val_a, val_b):
        assert abs(x["val_loss"] - y["val_loss"]) < tol, (x["step"], x["val_loss"], y["val_loss"])


def torchrun(command: str, config: dict, tmp_path: Path, *flags: str, launcher: tuple[str, ...] = ("--standalone",),
             nproc: int = 2, script: tuple[str, ...] = ("-m", "lmforge"), timeout: float = 240, check: bool = True):
    name = Path(config["out"]).name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc), *script,
         command, "--config", str(path), "--quiet", *flags],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- FSDP2 against one process and DDP ----------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_and_ddp_match_one_process_and_the_checkpoint_is_a_transformers_folder(data_dir, tokenizer_dir, tmp_path):
    # Continuing a transformers GPT-2 folder: under FSDP each rank copies its rows of each tensor from the
    # memory-mapped safetensors (the model is never whole in one process).
    base = make_hf_gpt2(tmp_path / "gpt2", tokenizer_dir=tokenizer_dir, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    kw = dict(model=str(base), n_layer=None, n_head=None, n_embd=None, block_size=None, max_steps=6, eval_interval=3,
              checkpoint_interval=3)
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    # (FSDP with 2 accumulation steps of 1 row: gradients are reduced only on a step's last micro-batch)
    torchrun("pretrain", train_config(data_dir, tmp_path / "fsdp", micro_batch_size=1, grad_accum_steps=2,
                                      parallel="fsdp", **kw), tmp_path)
    torchrun("pretrain", train_config(data_dir, tmp_path / "ddp", micro_batch_size=2, parallel="ddp", **kw), tmp_path)
    assert_same_steps(tmp_path / "one", tmp_path / "fsdp")
    assert_same_steps(tmp_path / "one", tmp_path / "ddp")
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["world_size"] == 2

    # Only rank 0 writes the folder; each rank wrote its own shard of the model and optimizer state (DCP).
    last = checkpoint_dirs(tmp_path / "fsdp")[-1]
    assert sorted(p.name for p in (last / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint_dirs(tmp_path / "ddp")[-1] / "shards").exists()
    speed = json.loads((tmp_path / "fsdp" / "throughput.json").read_text())
    assert speed["step"] == 6 and speed["parallel"] == "fsdp" and speed["tokens_per_second"] > 0
    assert 0 < speed["mfu"] < 1 and len(speed["peak_memory_mb"]) == 2 and min(speed["peak_memory_mb"]) > 0

    # The gathered model folder is an ordinary transformers checkpoint with the weights one process reached.
    from transformers import GPT2LMHeadModel

    ours = GPT2LMHeadModel.from_pretrained(last / "model").eval()
    single = GPT2LMHeadModel.from_pretrained(checkpoint_dirs(tmp_path / "one")[-1] / "model").eval()
    idx = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, single(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["fsdp", "ddp"])
def test_torchrun_with_one_process_runs_the_named_layout(data_dir, tmp_path, layout):
    """One GPU: `torchrun --nproc-per-node 1 ... --parallel fsdp` runs FSDP (one shard, its sharded checkpoint)
    to try a multi-GPU command before taking it to several; the steps equal a plain single-process run's."""
    kw = dict(max_steps=3, eval_interval=3, checkpoint_interval=3)
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=2, **kw), progress=False)
    result = torchrun("pretrain", train_config(data_dir, tmp_path / layout, micro_batch_size=2, parallel=layout, **kw),
                      tmp_path, nproc=1)
    assert "nothing to share out" not in result.stderr
    assert_same_steps(tmp_path / "one", tmp_path / layout)
    assert json.loads((tmp_path / layout / "throughput.json").read_text())["parallel"] == layout
    assert (checkpoint_dirs(tmp_path / layout)[-1] / "shards").exists() == (layout == "fsdp")


@pytest.mark.slow
def test_a_llama_folder_trains_under_fsdp_as_in_one_process(data_dir, tmp_path):
    base = make_hf_llama(tmp_path / "llama")
    kw = dict(model=str(base), n_layer=None, n_head=None, n_embd=None, block_size=None, max_steps=4, eval_interval=2,
              checkpoint_interval=4)
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    torchrun("pretrain", train_config(data_dir, tmp_path / "fsdp", micro_batch_size=2, parallel="fsdp", **kw), tmp_path)
    assert_same_steps(tmp_path / "one", tmp_path / "fsdp")


@pytest.mark.slow
def test_fsdp_runs_resume_on_another_number_of_processes(data_dir, tmp_path):
    """A fresh preset model is drawn whole one tensor at a time under FSDP (the weights equal one process's),
    and a run saved by 2 processes continues on 1 and one saved by 1 continues on 2, as if uninterrupted."""
    kw = dict(max_steps=6, eval_interval=3, checkpoint_interval=3)
    pretrain(train_config(data_dir, tmp_path / "straight", micro_batch_size=4, **kw), progress=False)

    # 2 processes (2 rows each) for 3 steps, then 1 process: grad_accum_steps 2 keeps the 4 rows of a step
    # (with activation checkpointing under FSDP: a block's recomputation in the backward pass needs its weights;
    # with the shards of a checkpoint at every step written in the background, each sealed at the next or the end)
    torchrun("pretrain", train_config(data_dir, tmp_path / "two_one", micro_batch_size=2, parallel="fsdp",
                                      activation_checkpointing=True, async_save=True, **{**kw, "checkpoint_interval": 1}),
             tmp_path, "--max-steps", "3")
    saved = checkpoint_dirs(tmp_path / "two_one")
    assert [d.name for d in saved] == ["step_0000002", "step_0000003"]  # (2 kept)
    assert all((d / "shards").is_dir() and damage(d) is None for d in saved)
    assert not list((tmp_path / "two_one" / "checkpoints").glob(".*"))  # no temporary folder left
    pretrain(train_config(data_dir, tmp_path / "two_one", micro_batch_size=2, **kw), resume=True, progress=False)
    assert_same_steps(tmp_path / "straight", tmp_path / "two_one")

    # 1 process for 3 steps (whole optimizer state in trainer.pt), then 2 under FSDP, each keeping its part
    pretrain(train_config(data_dir, tmp_path / "one_two", micro_batch_size=4, **{**kw, "max_steps": 3}), progress=False)
    result = torchrun("pretrain", train_config(data_dir, tmp_path / "one_two", micro_batch_size=4, parallel="fsdp", **kw),
                      tmp_path, "--resume", check=False)
    # 2 processes x 4 rows cannot make the run's 4-row steps: refused, saying what would (torchrun exits 1)
    assert result.returncode != 0 and "lmforge: error: the run's steps are of 4 rows" in result.stderr
    assert "pass --micro-batch-size 2" in result.stderr
    torchrun("pretrain", train_config(data_dir, tmp_path / "one_two", micro_batch_size=2, parallel="fsdp", **kw),
             tmp_path, "--resume")
    assert_same_steps(tmp_path / "straight", tmp_path / "one_two")


@pytest.fixture(scope="module")
def encoder_data(corpus_dir, tmp_path_factory) -> Path:
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("encoder")
    train_tokenizer([corpus_dir], root / "tok", vocab_size=1024, progress=False, encoder=True, sentinels=20)
    prepare([corpus_dir], root / "tok", root / "data", val_fraction=0.1, workers=0, progress=False)
    return root / "data"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["plm", "span"])
def test_encoder_objectives_under_fsdp_match_one_process(encoder_data, tmp_path, objective):
    """XLNet's two-stream pass runs each block through a method besides forward (FSDP must gather for it too);
    T5 shards two stacks of blocks."""
    kw = dict(objective=objective, block_size=34 if objective == "plm" else 32, max_steps=4, eval_interval=2,
              checkpoint_interval=2)
    pretrain(train_config(encoder_data, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    torchrun("pretrain", train_config(encoder_data, tmp_path / "fsdp", micro_batch_size=2, parallel="fsdp", **kw), tmp_path)
    assert_same_steps(tmp_path / "one", tmp_path / "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_under_fsdp_matches_one_process(tmp_path, tokenizer_dir, method):
    """LoRA: the frozen base is sharded with the adapters; only the adapters train, and the saved adapter is the
    same. Full: the model folder is opened without copying it whole, each rank copying its rows of each tensor.
    Both stop half-way and resume."""
    from safetensors.torch import load_file
    from test_finetune import chat_rows, jsonl, settings

    from lmforge.train.finetune import finetune

    base = make_hf_gpt2(tmp_path / "gpt2", tokenizer_dir=tokenizer_dir)
    data = jsonl(tmp_path / "chat.jsonl", chat_rows())
    kw = dict(model=str(base), train=data, method=method, lora_r=4, lora_targets="q,v,o,fc,proj", dropout=0.0)
    steps = dict(lr=1e-2 if method == "lora" else 1e-3, max_steps=4, eval_interval=2, checkpoint_interval=2)
    finetune(**kw, progress=False, **settings(tmp_path, out=str(tmp_path / "one"), micro_batch_size=8, **steps))
    # stopped at step 2 and resumed: the resumed run opens its base (and, for LoRA, the saved adapter) for sharding
    fsdp = {**kw, **settings(tmp_path, out=str(tmp_path / "fsdp"), micro_batch_size=4, parallel="fsdp", **steps)}
    torchrun("finetune", fsdp, tmp_path, "--max-steps", "2")
    torchrun("finetune", fsdp, tmp_path, "--resume")
    assert_same_steps(tmp_path / "one", tmp_path / "fsdp")
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a = load_file(checkpoint_dirs(tmp_path / "one")[-1] / "model" / weights)
    b = load_file(checkpoint_dirs(tmp_path / "fsdp")[-1] / "model" / weights)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


# -- more than one machine ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_over_loopback_match_one_process(data_dir, tmp_path):
    """Two torchrun launchers, one process each, meeting through the c10d rendezvous as two machines would."""
    kw = dict(max_steps=4, eval_interval=2, checkpoint_interval=2)
    pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    config = tmp_path / "nodes.yaml"
    config.write_text(yaml.safe_dump(train_config(data_dir, tmp_path / "nodes", micro_batch_size=2, **kw)))
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lmforge-test",
         "-m", "lmforge", "pretrain", "--config", str(config), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert_same_steps(tmp_path / "one", tmp_path / "nodes")
    assert json.loads((tmp_path / "nodes" / "run.json").read_text())["world_size"] == 2


def two_nodes(args: list[str], cwds: list[Path], timeout: float = 240) -> list[tuple[int, str]]:
    """Two torchrun launchers of one process each, meeting over loopback; each runs in its own folder."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lmforge-test", "-m", "lmforge", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd) for rank, cwd in enumerate(cwds)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    return [(node.returncode, err) for node, (_, err) in zip(nodes, outputs)]


def test_machines_that_do_not_share_the_run_folder_are_refused(data_dir, tmp_path):
    """Each "machine" runs in a folder of its own and --out is relative: each would write a run folder of its own,
    whose checkpoints (under FSDP each rank's shards) could never be resumed. Refused on both, fresh and resumed."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**train_config(data_dir, "run", micro_batch_size=2, max_steps=2,
                                                     eval_interval=2, checkpoint_interval=2), "out": "run"}))
    for returncode, err in two_nodes(["pretrain", "--config", str(config), "--quiet"], [a, b]):
        assert returncode != 0 and "process(es) 1 of 2 cannot see the files process 0 writes there" in err, err[-2000:]
        assert "Put --out on a file system all the machines share" in err
    assert not (a / "run").exists() and not (b / "run").exists()  # (the probe's folder is gone: nothing written)
    # a run that machine a trained alone, resumed by both: b does not see its checkpoint
    pretrain({**train_config(data_dir, a / "run", micro_batch_size=4, max_steps=2, eval_interval=2,
                             checkpoint_interval=2)}, overwrite=True, progress=False)
    for returncode, err in two_nodes(["pretrain", "--out", "run", "--resume", "--max-steps", "4", "--quiet"], [a, b]):
        assert returncode != 0 and "cannot see the checkpoint" in err, err[-2000:]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_and_max_restarts_resumes_it(data_dir, tmp_path):
    """Rank 1 dies right after the step-3 checkpoint on the first attempt: rank 0 stops with a one-line error
    (not a hang), torchrun starts both again, and --resume auto continues from step 3 as if nothing happened."""
    kw = dict(max_steps=6, eval_interval=3, checkpoint_interval=3)
    pretrain(train_config(data_dir, tmp_path / "straight", micro_batch_size=4, **kw), progress=False)
    # torchrun looks at its workers every --monitor-interval seconds and stops the others once one has died; 0.1 s
    # (its default) can beat rank 0 to its own error on a loaded machine (seen once in CI), so it looks every 3 s.
    result = torchrun("pretrain", train_config(data_dir, tmp_path / "restarted", micro_batch_size=2, dist_timeout=60, **kw),
                      tmp_path, "--resume", "auto",
                      launcher=("--standalone", "--max-restarts", "1", "--monitor-interval", "3"),
                      script=(str(HERE / "dying_rank.py"),))
    assert "rank 1 dies after step 3" in result.stderr
    assert "another process of the run stopped or did not answer" in result.stderr
    assert "resuming from step 3" in result.stdout
    assert_same_steps(tmp_path / "straight", tmp_path / "restarted")


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_run_after_dist_timeout(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DYING_RANK", "hang")  # rank 1 stops answering after step 3 (and would sleep 120 s)
    kw = dict(max_steps=6, eval_interval=3, checkpoint_interval=3, dist_timeout=5)
    start = time.monotonic()
    result = torchrun("pretrain", train_config(data_dir, tmp_path / "hung", micro_batch_size=2, **kw), tmp_path,
                      script=(str(HERE / "dying_rank.py"),), check=False)
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert "rank 1 hangs after step 3" in result.stderr
    assert "another process of the run stopped or did not answer within dist_timeout (5 s)" in result.stderr
    assert "The last checkpoint is " + str(tmp_path / "hung" / "checkpoints" / "step_0000003") in result.stderr


# -- in one process ------------------------------------------------------------------------------------


def test_fsdp_refuses_a_torch_that_gets_it_wrong(monkeypatch):
    monkeypatch.setattr(distributed, "torch_version", lambda: (2, 8))
    with pytest.raises(LmforgeError, match=r"--parallel fsdp on CPU needs torch >= 2\.9, .*pytorch/pytorch#162338"):
        distributed.check_fsdp_torch(torch.device("cpu"))
    monkeypatch.setattr(distributed, "torch_version", lambda: (2, 9))
    distributed.check_fsdp_torch(torch.device("cpu"))


def test_auto_picks_fsdp_only_when_the_training_state_would_not_fit(monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 1M parameters: 16 MB of weights, gradients and AdamW moments
    monkeypatch.setattr(distributed, "device_memory", lambda device, world: 1e9)
    assert distributed.choose_parallel("auto", model, 2, torch.device("cpu"))[0] == "ddp"
    monkeypatch.setattr(distributed, "device_memory", lambda device, world: 1e7)
    assert distributed.choose_parallel("auto", model, 2, torch.device("cpu"))[0] == "fsdp"
    assert distributed.choose_parallel("fsdp", model, 1, torch.device("cpu"))[0] == "none"


def test_a_deferred_model_materialises_to_the_weights_built_directly():
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model, deferred_init

    config = Config.from_preset("tiny", vocab_size=100, n_layer=2, n_embd=32, n_head=2, block_size=16)
    torch.manual_seed(3)
    direct = build_model(config)
    torch.manual_seed(3)
    with deferred_init():
        deferred = build_model(config)
    assert distributed.is_meta(deferred)
    torch.randn(10)  # random numbers drawn in between do not change the weights
    distributed.materialize(deferred, torch.device("cpu"))
    for (name, a), (_, b) in zip(direct.named_parameters(), deferred.named_parameters()):
        assert torch.equal(a, b), name


def make_hf_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


def test_a_folder_opened_for_sharding_is_copied_tensor_by_tensor(tmp_path):
    """Llama's q/k/v and gate/up are fused in lmforge: while deferred, the fusion is a view of the memory-mapped
    parts (each rank copies only its rows), and materialising gives exactly the weights of a plain load."""
    from lmforge.model.checkpoint import load_model
    from lmforge.model.gpt import deferred_init
    from lmforge.model.hf import RowConcat

    folder = make_hf_llama(tmp_path / "llama")
    with deferred_init():
        opened = load_model(folder)
    assert distributed.is_meta(opened)
    assert isinstance(opened.pending_weights["blocks.0.attn.qkv.weight"], RowConcat)
    distributed.materialize(opened, torch.device("cpu"))
    plain = load_model(folder)
    for (name, a), (_, b) in zip(plain.named_parameters(), opened.named_parameters()):
        assert torch.equal(a, b), name
    fused = RowConcat([torch.arange(6.0).view(3, 2), torch.arange(6.0, 10.0).view(2, 2)])
    assert torch.equal(fused.rows(2, 4), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_folder_opened_for_sharding_takes_a_head_and_adapters_drawn_as_one_process_draws_them(tmp_path, family):
    """A classification head and LoRA adapters added to a folder opened for sharding are drawn whole on the CPU
    (they are small; the same random numbers as one process), the frozen layers they wrap keep their memory-mapped
    weights under their new names, and materialising gives exactly the model built from a plain load."""
    from lmforge.model.checkpoint import load_model
    from lmforge.model.gpt import deferred_init
    from lmforge.model.heads import attach_head
    from lmforge.model.lora import add_lora

    folder = make_hf_llama(tmp_path / "llama") if family == "llama" else make_hf_gpt2(tmp_path / "gpt2")

    def build(defer: bool):
        torch.manual_seed(5)
        with deferred_init(defer):
            model = load_model(folder)
        attach_head(model, "sequence_classification", 3, None, 0)
        add_lora(model, "q,v,fc", 4, 8.0)
        if defer:
            assert distributed.is_meta(model) and not model.score.weight.is_meta
            assert "blocks.0.attn.qkv.base.weight" in model.pending_weights
            # the loop's plain twin for saving has the structure only: a deep copy of the opened folder's weights
            # would read all of them into memory (it did, in every rank)
            twin = distributed.meta_twin(model)
            assert not hasattr(twin, "pending_weights") and model.pending_weights
            distributed.materialize(model, torch.device("cpu"))
        return model

    plain, opened = build(False), build(True)
    names = [name for name, _ in plain.named_parameters()]
    assert names == [name for name, _ in opened.named_parameters()] and any("lora_A" in n for n in names)
    for (name, a), (_, b) in zip(plain.named_parameters(), opened.named_parameters()):
        assert torch.equal(a, b), name
    assert plain.score.weight.abs().sum() > 0


def test_a_lora_run_resumed_for_sharding_opens_its_base_without_loading_it(tmp_path, tokenizer_dir):
    """Resuming a LoRA run under torchrun: the adapter and head are read whole from the checkpoint, the base stays
    memory-mapped until it is sharded, and materialising gives exactly the model of a plain load."""
    from lmforge.model.checkpoint import load_adapted, load_model
    from lmforge.model.gpt import deferred_init
    from lmforge.model.heads import attach_head
    from lmforge.model.lora import add_lora, save_adapter
    from lmforge.tokenizer import Tokenizer

    base = make_hf_gpt2(tmp_path / "gpt2", tokenizer_dir=tokenizer_dir)
    trained = load_model(base)
    attach_head(trained, "sequence_classification", 3, None, 0)
    add_lora(trained, "q,v,fc", 4, 8.0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # adapters and head as training left them (B no longer zero)
    save_adapter(trained, tmp_path / "adapter", base, Tokenizer.load(tokenizer_dir))
    plain = load_adapted(tmp_path / "adapter", merge=False, base=str(base))
    with deferred_init():
        opened = load_adapted(tmp_path / "adapter", merge=False, base=str(base))
    assert distributed.is_meta(opened) and not opened.score.weight.is_meta
    distributed.materialize(opened, torch.device("cpu"))
    for (name, a), (_, b) in zip(plain.named_parameters(), opened.named_parameters()):
        assert torch.equal(a, b), name
    assert any(b.abs().sum() > 0 for name, b in opened.named_parameters() if "lora_B" in name)


def test_share_pads_every_rank_to_as_many_items():
    shares = [distributed.Distributed(rank, 3).share(7) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, None], [2, 5, None]]


def test_activation_checkpointing_changes_memory_not_results(data_dir, tmp_path):
    kw = dict(max_steps=4, eval_interval=2)
    pretrain(train_config(data_dir, tmp_path / "plain", **kw), progress=False)
    pretrain(train_config(data_dir, tmp_path / "recomputed", activation_checkpointing=True, **kw), progress=False)
    assert_same_steps(tmp_path / "plain", tmp_path / "recomputed", tol=1e-6)


def test_a_copy_of_a_model_with_activation_checkpointing_runs_its_own_blocks():
    """RL samples from a bf16 deep copy of the policy: the copy's blocks must recompute with the copy's
    weights (a closure over the original block made the copy run the original's)."""
    import copy

    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model

    torch.manual_seed(0)
    model = build_model(Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    assert distributed.checkpoint_activations(model) == 2
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.mul_(3)
    x = torch.randint(0, 50, (2, 6))
    for grad in (False, True):  # generation, and training (where the checkpoint recomputes)
        with torch.set_grad_enabled(grad):
            assert not torch.allclose(twin(x), model(x))
    plain = copy.deepcopy(twin)
    for block in plain.blocks:
        del block.forward  # back to the class's forward
    torch.testing.assert_close(twin(x), plain(x))
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        assert half(x).dtype == torch.bfloat16


def test_resume_auto_starts_a_run_then_continues_it(data_dir, tmp_path, capsys):
    from lmforge.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(train_config(data_dir, tmp_path / "run", max_steps=2)))
    assert main(["pretrain", "--config", str(config), "--resume", "auto", "--quiet"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main(["pretrain", "--config", str(config), "--resume", "auto", "--quiet", "--max-steps", "4"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert [r["step"] for r in log(tmp_path / "run")[0]] == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(config), "--resume", "maybe"])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


def test_plan_measured_counts_a_lora_run_s_frozen_base_as_weights_alone(tmp_path, tokenizer_dir, capsys):
    """A LoRA run trains its adapters only: the frozen base holds its fp32 weights (4 bytes a parameter), not
    weights, gradients and AdamW's moments (16); the plan counts the run's trained parameters that way."""
    from test_finetune import chat_rows, jsonl, settings

    from lmforge.cli import main
    from lmforge.train.finetune import finetune

    base = make_hf_gpt2(tmp_path / "base", tokenizer_dir=tokenizer_dir)
    finetune(model=str(base), train=jsonl(tmp_path / "c.jsonl", chat_rows(24)), method="lora", progress=False,
             **settings(tmp_path, max_steps=2, eval_interval=2, checkpoint_interval=2))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["trainable_parameters"] < run["parameters"] / 10
    capsys.readouterr()
    assert main(["plan", "--measured", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    states = next(line for line in out.splitlines() if line.startswith("states"))
    assert f"({run['trainable_parameters']:,} trained)" in out and "(plan error +0%)" in states, out


def test_plan_measured_sets_the_plan_beside_a_run(data_dir, tmp_path, capsys):
    from lmforge.cli import main

    pretrain(train_config(data_dir, tmp_path / "run", max_steps=4, eval_interval=2, activation_checkpointing=True),
             progress=False)
    speed = json.loads((tmp_path / "run" / "throughput.json").read_text())
    assert speed["step"] == 4 and speed["parallel"] == "none" and speed["activation_checkpointing"] is True
    assert speed["tokens_per_second"] > 0 and 0 < speed["mfu"] < 1 and len(speed["peak_memory_mb"]) == 1
    capsys.readouterr()
    assert main(["plan", "--measured", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "activation checkpointing on" in out and "plan error" in out and "MFU of" in out
    # the training state is counted exactly: 16 bytes a parameter (fp32 weights, gradients, AdamW's m and v)
    params = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]
    assert speed["states_mb"][0] * 2**20 == pytest.approx(16 * params, rel=1e-6)
    assert "(plan error +0%)" in out.splitlines()[2] and 0 < speed["activation_mb"][0]
    from lmforge.eval.report import write_report

    report = write_report(tmp_path / "run").read_text()
    assert "| model FLOPs utilisation (the steps from the evaluation before step 4 to it) | " in report and "| parallelism | one process, activation checkpointing |" in report
    assert main(["plan", "--measured", str(data_dir)]) == 2
    assert "has no throughput.json" in capsys.readouterr().err
    # an encoder's run (its config has fields a decoder's has not): one line, not the config's internals
    encoder = tmp_path / "encoder-run"
    encoder.mkdir()
    (encoder / "throughput.json").write_text((tmp_path / "run" / "throughput.json").read_text())
    (encoder / "run.json").write_text(json.dumps({"model": {"vocab_size": 50, "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                            "block_size": 16, "type_vocab_size": 2, "pooler": True}}))
    assert main(["plan", "--measured", str(encoder)]) == 2
    assert "did not train a decoder" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "plan needs --model" in capsys.readouterr().err


def test_torchrun_refuses_a_gpu_other_than_the_local_ranks(monkeypatch):
    """Every rank would train on the one GPU named while NCCL binds each to its own: refused before joining."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LmforgeError, match=r"--device cuda:0 under torchrun: each process trains on the GPU of its "
                                           r"local rank \(this one cuda:1\); pass --device cuda or auto"):
        distributed.setup_distributed("cuda:0")


def test_a_mistake_every_process_meets_is_said_once(data_dir, tmp_path):
    """Under torchrun each process of a machine met the same wrong path and printed the same line."""
    result = torchrun("pretrain", train_config(data_dir, tmp_path / "run", data=str(tmp_path / "missing")), tmp_path,
                      check=False)
    assert result.returncode != 0 and result.stderr.count("lmforge: error:") == 1, result.stderr[-2000:]
    assert "data folder" in result.stderr and "does not exist" in result.stderr
