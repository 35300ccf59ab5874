"""Windows of tokens from prepared shards, for training and validation.

The rows of optimizer step ``s`` are a pure function of ``(seed, s)``: the loader's whole
position is one integer, saved in every checkpoint, so resume is exact. Each step's rows are
drawn once for all micro-batches and processes, and each (micro-batch, rank) takes its own
slice, so 2 processes × batch 2, 1 process × 2 accumulation steps × batch 2, and 1 process ×
batch 4 all train on exactly the same rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmforge.data.prepare import META_FORMAT
from lmforge.errors import LmforgeError
from lmforge.utils import read_json


def read_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        if data_dir.exists():
            raise LmforgeError(f"--data {data_dir} is a file; give the folder `lmforge prepare` wrote")
        raise LmforgeError(f"data folder {data_dir} does not exist; create it with `lmforge prepare --out {data_dir}`")
    meta = read_json(data_dir / "meta.json", "prepared-data metadata")
    if meta.get("format") != META_FORMAT:
        raise LmforgeError(f"{data_dir}/meta.json is not lmforge prepared data; run `lmforge prepare` again")
    return meta


class TokenSplit:
    """The shards of one split, memory-mapped (never read whole into memory)."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        data_dir = Path(data_dir)
        self.meta = read_meta(data_dir)
        info = self.meta["splits"].get(split)
        if info is None:
            raise LmforgeError(f"{data_dir} has no {split!r} split")
        self.split = split
        self.bytes = info["bytes"]
        self.shards: list[np.ndarray] = []
        for shard in info["shards"]:
            path = data_dir / shard["file"]
            expected = shard["tokens"] * np.dtype(self.meta["dtype"]).itemsize
            if not path.exists() or path.stat().st_size != expected:
                raise LmforgeError(f"{path} is missing or truncated; run `lmforge prepare` again")
            self.shards.append(np.memmap(path, dtype=self.meta["dtype"], mode="r"))
        self.tokens = sum(len(s) for s in self.shards)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


class StepPosition:
    """The saved position of a loader whose rows depend only on ``(seed, optimizer step)``: kept by step, so
    that a run resumed with another number of processes or accumulation steps goes on with the rows its
    next step would have had. Loaders set ``seed``, ``accum_steps`` and count ``batch_index`` (micro-batches
    handed out by this rank)."""

    seed: int
    accum_steps: int
    batch_index: int

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_index": self.batch_index, "step": self.batch_index // self.accum_steps}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.batch_index = int(state["step"]) * self.accum_steps if "step" in state else int(state["batch_index"])


class TrainBatches(StepPosition):
    """Random windows of ``block_size + 1`` tokens; the rows of a step depend only on ``(seed, step)``."""

    def __init__(self, split: TokenSplit, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, accum_steps: int = 1):
        self.split, self.block_size, self.seed = split, block_size, seed
        self.batch_size, self.rank, self.world_size, self.accum_steps = batch_size, rank, world_size, accum_steps
        # A window must lie inside one shard; count the valid start positions of each.
        starts = [max(len(s) - block_size, 0) for s in split.shards]
        self.cum_starts = np.cumsum(starts)
        if self.cum_starts[-1] == 0:
            raise LmforgeError(
                f"the {split.split} split has {split.tokens} tokens, too few for windows of block_size+1="
                f"{block_size + 1}; lower block_size or prepare more data"
            )
        self.batch_index = 0  # micro-batches handed out so far by this rank


    def next_batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch (inputs, targets), each (batch_size, block_size) int64."""
        t = self.next_rows(device)
        return t[:, :-1], t[:, 1:]

    @property
    def position(self) -> tuple[int, int]:
        """(optimizer step, this rank's first row among the step's rows) of the next micro-batch."""
        step, micro = divmod(self.batch_index, self.accum_steps)
        return step, (micro * self.world_size + self.rank) * self.batch_size

    def next_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's next micro-batch of whole windows: (batch_size, block_size + 1) int64."""
        step, micro = divmod(self.batch_index, self.accum_steps)
        self.batch_index += 1
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.cum_starts[-1], size=self.batch_size * self.accum_steps * self.world_size)
        first = (micro * self.world_size + self.rank) * self.batch_size
        starts = starts[first : first + self.batch_size]
        shard_ids = np.searchsorted(self.cum_starts, starts, side="right")
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for r, (shard, pos) in enumerate(zip(shard_ids, starts)):
            offset = pos - (self.cum_starts[shard - 1] if shard > 0 else 0)
            rows[r] = self.split.shards[shard][offset : offset + self.block_size + 1]
        t = torch.from_numpy(rows)
        if torch.device(device).type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        return t


def eval_windows(split: TokenSplit, block_size: int, max_windows: int) -> list[tuple[int, int]]:
    """Fixed, evenly spaced (shard, offset) windows over a split: the same set at every evaluation."""
    all_windows = [(s, o) for s, shard in enumerate(split.shards) for o in range(0, len(shard) - block_size, block_size)]
    if not all_windows:
        raise LmforgeError(
            f"the {split.split} split has {split.tokens} tokens, too few for one window of {block_size + 1}; "
            f"lower block_size or raise --val-fraction in `lmforge prepare`"
        )
    if len(all_windows) <= max_windows:
        return all_windows
    step = len(all_windows) / max_windows
    return [all_windows[int(i * step)] for i in range(max_windows)]


def window_batch(split: TokenSplit, windows: list[tuple[int, int]], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([split.shards[s][o : o + block_size + 1].astype(np.int64) for s, o in windows])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]
