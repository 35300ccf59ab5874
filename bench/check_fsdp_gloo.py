"""Does FSDP2 over gloo on the CPU give one process's gradients with this torch? (lmforge's FSDP_MIN_TORCH)

    torchrun --standalone --nproc-per-node 2 bench/check_fsdp_gloo.py

Two processes shard a small lmforge GPT with ``fully_shard`` (each block, then the root), each runs half of a
batch forward and backward, and rank 0 compares every gathered gradient with one process's gradient of the
whole batch (mean loss, so they should be equal), then saves the sharded state with DCP. To check another
torch, make a virtual environment with that torch and numpy, tokenizers, safetensors, pyyaml, tqdm and jinja2,
and run this with PYTHONPATH pointing at this checkout. What it printed here (2026-11-26, PyPI wheels):
2.5.1 and 2.6.0 stop with an error, 2.7.1 and 2.8.0 give a gradient norm ratio of exactly 2.000 (summed over
the processes instead of averaged: pytorch/pytorch#162338), 2.9.1 and 2.13.0 agree within 1.5e-8.
"""

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.config import Config  # noqa: E402
from lmforge.model.gpt import build_model  # noqa: E402


def main() -> None:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = Config.from_preset("tiny", n_layer=2, n_embd=64, n_head=2, block_size=32, vocab_size=256, dropout=0.0)
    whole = build_model(config)
    sharded = copy.deepcopy(whole)
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    rows = 2 * world
    batch = torch.randint(0, config.vocab_size, (rows, 33), generator=torch.Generator().manual_seed(1))
    whole(batch[:, :-1], batch[:, 1:])[1].backward()
    mine = batch[rank * 2 : rank * 2 + 2]
    sharded(mine[:, :-1], mine[:, 1:])[1].backward()
    worst, ratios = 0.0, []
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
        gathered = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        worst = max(worst, (p.grad - gathered).abs().max().item())
        ratios.append((gathered.norm() / p.grad.norm()).item())
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)
    dcp.save({"model": get_model_state_dict(sharded)}, checkpoint_id=folder[0])
    dist.barrier()
    if rank == 0:
        verdict = "correct" if worst < 1e-5 else "WRONG"
        print(f"torch {torch.__version__}: {verdict}: max |FSDP gradient - one process's| {worst:.2e}, gradient norm "
              f"ratio {min(ratios):.3f}..{max(ratios):.3f}; DCP save ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
