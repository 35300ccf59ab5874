"""Training on several processes: the process group, how the model is spread over it, and the sharded
part of checkpoints. The loop calls these; it has no branch of its own per kind of parallelism.

    ddp   every process holds the whole model, its gradients and AdamW's moments; gradients are averaged
    fsdp  FSDP2 (``fully_shard`` per block, then the root): each process holds 1/N of the parameters,
          gradients and moments, and gathers a block's weights only while that block runs

Under FSDP a model is built on the ``meta`` device and materialised shard by shard: fresh weights are
drawn whole one tensor at a time, with the same random numbers one process would draw, and each rank
keeps its rows; weights from a model folder are read from the memory-mapped safetensors, tensor by
tensor. Checkpoints are written with ``torch.distributed.checkpoint`` (each rank its shards), so a run
saved by N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import resource
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.errors import LmforgeError

# FSDP2 over gloo (CPU) fails outright on torch 2.5-2.6 and sums gradients instead of averaging them on
# 2.7-2.8 (pytorch/pytorch#162338); from 2.9 on it is correct. On CUDA (NCCL) fully_shard is public from 2.6.
FSDP_MIN_TORCH = {"cpu": (2, 9), "cuda": (2, 6)}
PARALLEL_CHOICES = ("auto", "ddp", "fsdp")


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    parallel: str = "none"  # none (one process), ddp or fsdp: set by the loop once the model is known
    joined: bool = False  # in a process group: several processes, or one that torchrun started for a layout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.joined

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``value``, on its device. NCCL reduces GPU tensors only: a CPU one (rewards,
        rollout statistics) goes through this rank's GPU and comes back."""
        if not self.enabled:
            return value
        if value.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = value.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            return on_gpu.to(value.device)
        value = value.clone()
        dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value``, on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def gather_to_main(self, value) -> list | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        if not self.enabled:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def share(self, n: int) -> list[int | None]:
        """This rank's share of items ``0..n-1`` (every world_size-th), padded with None so that every rank
        gets as many: under FSDP each forward pass is a collective that all ranks must make, so a rank with
        one item fewer runs a pass whose result it drops."""
        mine = list(range(self.rank, n, self.world_size))
        rounds = -(-n // self.world_size)
        return mine + [None] * (rounds - len(mine))


def setup_distributed(device_name: str, timeout_s: float = 600.0, layout: str = "auto") -> Distributed:
    """Join the process group when started by ``torchrun`` with more than one process (gloo on CPU, NCCL on
    GPU), or with one process and ``layout`` ddp or fsdp named: that runs the layout on one device (DDP's
    wrapper, FSDP's sharding into one shard, its checkpoints), to try a multi-GPU command before taking it to
    several. A collective that waits ``timeout_s`` for a rank that died ends the run instead of hanging."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ and "MASTER_ADDR" in os.environ
    if world_size <= 1 and not (by_torchrun and layout in ("ddp", "fsdp")):
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # (the same answer on every rank: one rank passing would wait for the others in init_process_group)
    if device_name.startswith("cuda:") and (world_size > 1 or device_name != f"cuda:{local_rank}"):
        raise LmforgeError(f"--device {device_name} under torchrun: each process trains on the GPU of its local "
                           f"rank (this one cuda:{local_rank}); pass --device cuda or auto, and choose the GPUs "
                           f"with CUDA_VISIBLE_DEVICES")
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device_name != "cpu"
        if use_nccl:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if use_nccl else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart > 0 and "MASTER_ADDR" in os.environ:
            # Workers restarted by torchrun --max-restarts meet in the same key-value store as the round that
            # failed, where its processes' addresses are still written: under a prefix of their own they cannot
            # connect to a dead process's port (gloo's "connectFullMesh failed ... Connection refused").
            rank = int(os.environ["RANK"])
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                                  timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"lmforge-restart-{restart}", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return Distributed(dist.get_rank(), dist.get_world_size(), joined=True)


def check_fsdp_torch(device: torch.device) -> None:
    kind = "cuda" if device.type == "cuda" else "cpu"
    need = FSDP_MIN_TORCH[kind]
    if torch_version() < need:
        why = ("FSDP2 over gloo fails on 2.5-2.6 and sums gradients instead of averaging them on 2.7-2.8, "
               "pytorch/pytorch#162338") if kind == "cpu" else "fully_shard is public from 2.6"
        raise LmforgeError(f"--parallel fsdp on {kind.upper()} needs torch >= {need[0]}.{need[1]}, this is "
                           f"{torch.__version__} ({why}); upgrade torch or use --parallel ddp")


def choose_parallel(requested: str, model: torch.nn.Module, world_size: int, device: torch.device,
                    joined: bool = False) -> tuple[str, str]:
    """(none|ddp|fsdp, why). ``auto``: DDP unless the model with its gradients and AdamW's two moments
    (16 bytes a parameter in fp32) would take more than 80% of one device's memory. ``joined``: one process
    in a process group of its own (torchrun with one process and a named layout) runs that layout."""
    if world_size <= 1 and not (joined and requested in ("ddp", "fsdp")):
        return "none", "one process"
    if requested in ("ddp", "fsdp"):
        if requested == "fsdp":
            check_fsdp_torch(device)
        return requested, "as configured" if world_size > 1 else "as configured, on one process"
    need = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    need += 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)
    have = device_memory(device, world_size)
    if need > 0.8 * have:
        check_fsdp_torch(device)
        return "fsdp", f"the model's training state ({need / 2**30:.1f} GiB) would not fit one device ({have / 2**30:.1f} GiB)"
    return "ddp", f"the model's training state ({need / 2**30:.1f} GiB) fits one device ({have / 2**30:.1f} GiB)"


def device_memory(device: torch.device, world_size: int) -> float:
    """Bytes one process may use: its GPU's memory, or this machine's RAM shared by its local processes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local, 1)


# -- building a model without holding it whole ------------------------------------------------------
# (``deferred_init`` in model/gpt.py makes builders leave models on the meta device.)

def is_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _local_part(whole, like) -> torch.Tensor:
    """This rank's part of ``whole``, laid out as the sharded parameter ``like`` (no communication). ``whole``
    may be a ``RowConcat`` (a fused matrix of a folder being opened): then only this rank's rows are copied."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if hasattr(whole, "rows"):
        n = whole.shape[0]
        if isinstance(like, DTensor) and like.placements == (Shard(0),):  # FSDP2's rows, torch.chunk's split
            per = -(-n // like.device_mesh.size())
            start = min(like.device_mesh.get_local_rank() * per, n)
            return whole.rows(start, min(start + per, n))
        whole = whole.rows(0, n)
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


class _WholeDraws(torch.overrides.TorchFunctionMode):
    """While ``init_weights`` runs on a sharded model: each random fill of a sharded parameter draws the
    whole tensor, as one process would, and keeps this rank's rows. The weights then equal single-process
    training's for the same seed whatever the number of processes, and only one tensor is whole at a time."""

    RANDOM = {"normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
              "trunc_normal_", "orthogonal_", "bernoulli_", "exponential_", "random_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if not isinstance(target, DTensor) or getattr(func, "__name__", "") not in self.RANDOM:
            return func(*args, **kwargs)
        whole = torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
        if args:
            func(whole, *args[1:], **kwargs)
        else:
            func(**{**kwargs, "tensor": whole})
        target.to_local().copy_(_local_part(whole, target))
        return target


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give a model built on the meta device (sharded or not) its memory and its weights: those of the
    folder it was opened from, tensor by tensor, or a fresh initialisation equal to one process's."""
    pending = getattr(model, "pending_weights", None)
    init_rng = getattr(model, "init_rng_state", None)
    # weights that already have values (a task head or LoRA adapters added to a folder opened for sharding,
    # drawn as one process draws them: see new_weights_device) are kept, this rank's part of each
    kept = {name: local.clone() for name, local in _locals(model) if not local.is_meta}
    model.to_empty(device=device)
    if pending is not None:
        for name, local in _locals(model):
            if name not in kept:
                local.copy_(_local_part(pending[name].to(local.dtype), model.get_parameter(name)))
        del model.pending_weights
    else:
        if init_rng is not None:  # the random numbers one process would have drawn when it built the model
            torch.set_rng_state(init_rng)
        with _WholeDraws():
            model.init_weights()
    for name, local in _locals(model):
        if name in kept:
            local.copy_(kept[name])


def _locals(model: torch.nn.Module):
    """(name, this rank's tensor) of each parameter, sharded (a DTensor) or not."""
    for name, param in model.named_parameters():
        yield name, (param.to_local() if hasattr(param, "to_local") else param)


# -- wrapping ---------------------------------------------------------------------------------------


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated Transformer blocks of any lmforge model (decoder, encoder, both stacks of T5)."""
    return [m for name, m in model.named_modules() if name.rsplit(".", 2)[-2:-1] == ["blocks"]]


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them: activation memory
    falls from every block's to one block's, for about one more forward pass of compute."""
    wrapped = 0
    for block in blocks(model):
        if getattr(block, "checkpointed", False):
            continue
        # a method bound to the block (not a closure over it): a deep copy of the model then recomputes
        # its own blocks, not the original's
        block.forward = types.MethodType(_recomputed_forward, block)
        block.checkpointed = True
        wrapped += 1
    return wrapped


def _recomputed_forward(block, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    forward = type(block).forward
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to save memory on
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


def shard(model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """FSDP2: ``fully_shard`` each block, then the root (embeddings, final norm, head). On GPUs with bf16 the
    gathered weights and the compute are bf16 and gradients are reduced in fp32; on CPU all is fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = None
    if device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    from torch.distributed.fsdp import register_fsdp_forward_method

    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
        for method in getattr(block, "other_forwards", ()):  # (the permutation LM's two-stream pass)
            register_fsdp_forward_method(block, method)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def wrap(model: torch.nn.Module, dist_: Distributed, device: torch.device) -> torch.nn.Module:
    """The module the training steps call: the model itself (one process, or FSDP, which shards it in
    place), or a DDP wrapper."""
    if dist_.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def no_sync(train_model: torch.nn.Module, dist_: Distributed, last_micro: bool):
    """Gradients are averaged across ranks only on a step's last micro-batch."""
    if last_micro or not dist_.enabled:
        return contextlib.nullcontext()
    if dist_.parallel == "ddp":
        return train_model.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        train_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            train_model.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (the whole value) from a tensor that may be a DTensor (a gradient norm under FSDP)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s structure (adapters, heads and all) on the meta device: no memory. Kept beside a
    sharded model, it becomes the plain model that a gathered state is loaded into for saving."""
    import copy

    memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                    if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in [*model.parameters(), *model.buffers()]}
    # (not the weights of a folder opened for sharding: a deep copy would read every one of them into memory)
    pending = model.__dict__.pop("pending_weights", None)
    try:
        return copy.deepcopy(model, memo)
    finally:
        if pending is not None:
            model.pending_weights = pending


@contextlib.contextmanager
def whole_model(objective, twin: torch.nn.Module, dist_: Distributed):
    """Within: on rank 0, ``objective.model`` is a plain model holding every weight whole (gathered from all
    ranks to CPU), so that ``objective.save`` writes an ordinary Hugging Face folder. Every rank enters it
    (gathering is collective); on leaving, the sharded model is back and the whole copy is dropped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = objective.model
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist_.is_main:
        yield
        return
    twin.load_state_dict(whole, assign=True)
    objective.model = twin
    try:
        yield
    finally:
        objective.model = model
        twin.to("meta")


# -- distributed checkpoints (DCP) ------------------------------------------------------------------

SHARDS = "shards"  # the checkpoint's sub-folder with the model and optimizer state, one file per rank


def save_sharded(folder: Path, model: torch.nn.Module, optimizer, background: bool = False, timeout_s: float = 600.0):
    """Model and optimizer state, each rank writing its own shards (all ranks call this). In the
    ``background``: the state is copied (to CPU memory) and the future of its writing by a thread is returned
    (``dcp.async_save``; the copy costs this rank's share of the model and optimizer state in memory meanwhile);
    its collectives give up on a lost process after ``timeout_s``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if not background:
        dcp.save(state, checkpoint_id=str(folder))
        return None
    saving = dcp.async_save(state, checkpoint_id=str(folder), process_group=_saving_group(timeout_s))
    return getattr(saving, "upload_completion", saving)  # (newer torch may answer with both stages' futures)


_SAVING_GROUP: dict = {}  # {"world": the process group it was made in, "group": it}


def _saving_group(timeout_s: float):
    """The process group DCP's background writing coordinates over: a gloo group of its own (made once per
    process group, every rank getting here together). It runs collectives on CPU tensors, which the writing
    needs, and it is not the group the training steps use: collectives of two threads on one group would
    interleave."""
    from datetime import timedelta

    world = dist.group.WORLD
    if _SAVING_GROUP.get("world") is not world:  # the first save, or a process group made anew since
        _SAVING_GROUP.update(world=world, group=dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
    return _SAVING_GROUP["group"]


def load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Fill the (sharded or whole) model and optimizer from a DCP folder written by any number of
    processes: DCP reads the parts of the saved shards that this rank's layout needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what is meant
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer(state: dict, model: torch.nn.Module, optimizer) -> None:
    """Load an optimizer state saved whole by one process (``optimizer.state_dict()``: parameters by index)
    into an optimizer of a sharded model: indices become parameter names, then each rank keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    index_to_name = {}
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    by_name = {
        "state": {index_to_name[int(k)]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[int(k)] for k in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# -- what a run measures about itself ---------------------------------------------------------------

# Dense bf16 peak of GPUs people train on (FLOP/s), from their vendors' data sheets.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                  "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): a GPU's data-sheet peak, or on CPU a large matrix product
    timed now in the training precision (so the CPU's MFU is against what it was measured to reach)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if bf16 else flops / 2, f"{name} data-sheet peak"
        return 0.0, f"{name}: peak unknown"
    return _cpu_peak(bf16, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _cpu_peak(bf16: bool, threads: int) -> tuple[float, str]:
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(2048, 2048, generator=g).to(dtype)
    b = torch.randn(2048, 2048, generator=g).to(dtype)
    times = []
    with torch.inference_mode():
        for _ in range(6):  # the fastest of several: the peak is what the machine reaches, not its average
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times[1:]), f"the fastest of 5 2048x2048 matrix products timed at start, {threads} thread(s)"


class SavedForBackward:
    """Within: counts the bytes of the tensors autograd keeps for the backward pass (each storage once), the
    activation memory that ``lmforge plan`` models. (Activation checkpointing keeps its blocks' inputs itself,
    outside autograd's saved tensors: those are not in the count.)"""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def __enter__(self):
        def pack(t: torch.Tensor):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.device.type != "meta":
                storage = local.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def state_bytes(model: torch.nn.Module, optimizer) -> int:
    """This process's bytes of parameters, gradients and optimizer state (its shards under FSDP)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    total = sum(local(p).nbytes for p in model.parameters())
    total += sum(local(p.grad).nbytes for p in model.parameters() if p.grad is not None)
    for state in optimizer.state.values():
        total += sum(local(v).nbytes for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: torch.device) -> int:
    """Start measuring the peak afresh (a process may have used more before this run, in tests or notebooks);
    returns the memory held now, which the run's figures are read against."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        pass
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else peak_memory_bytes(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held (since ``reset_peak_memory``): the GPU allocator's peak, or on
    CPU the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
