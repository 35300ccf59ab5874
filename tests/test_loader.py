import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenSplit, TrainBatches, eval_windows, window_batch
from lmforge.errors import LmforgeError


def test_batches_are_a_pure_function_of_seed_and_position(data_dir):
    split = TokenSplit(data_dir, "train")
    a = TrainBatches(split, 16, 4, seed=3)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    after = a.next_batch()
    b = TrainBatches(split, 16, 4, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], after[0])
    c = TrainBatches(split, 16, 4, seed=3)
    assert all(torch.equal(c.next_batch()[0], x) for x, _ in first)
    d = TrainBatches(split, 16, 4, seed=4)
    assert not torch.equal(d.next_batch()[0], first[0][0])


def test_targets_are_inputs_shifted_by_one_and_windows_come_from_the_data(data_dir):
    split = TokenSplit(data_dir, "train")
    x, y = TrainBatches(split, 16, 8, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    flat = np.concatenate(split.shards)
    for row in x.numpy():
        starts = np.flatnonzero(flat[: len(flat) - 16] == row[0])
        assert any(np.array_equal(flat[s : s + 16], row) for s in starts)


def test_ranks_and_micro_batches_split_the_same_step_rows(data_dir):
    split = TokenSplit(data_dir, "train")
    one = TrainBatches(split, 16, 4, seed=0)
    whole = [one.next_batch()[0] for _ in range(2)]  # two optimizer steps
    ranks = [TrainBatches(split, 16, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    accum = TrainBatches(split, 16, 2, seed=0, accum_steps=2)
    both = [TrainBatches(split, 16, 1, seed=0, rank=r, world_size=2, accum_steps=2) for r in range(2)]
    for step in range(2):
        assert torch.equal(torch.cat([ranks[0].next_batch()[0], ranks[1].next_batch()[0]]), whole[step])
        assert torch.equal(torch.cat([accum.next_batch()[0], accum.next_batch()[0]]), whole[step])
        micro = [(b.next_batch()[0], c.next_batch()[0]) for b, c in [(both[0], both[1])] * 2]
        assert torch.equal(torch.cat([micro[0][0], micro[0][1], micro[1][0], micro[1][1]]), whole[step])


def test_eval_windows_are_fixed_evenly_spread_and_non_overlapping(data_dir):
    split = TokenSplit(data_dir, "val")
    windows = eval_windows(split, 16, 10)
    assert windows == eval_windows(split, 16, 10) and len(windows) == 10
    offsets = [o for _, o in windows]
    assert offsets == sorted(offsets) and min(np.diff(offsets)) >= 16
    x, y = window_batch(split, windows, 16)
    assert x.shape == (10, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_too_little_data_for_the_window_is_a_clear_error(data_dir):
    split = TokenSplit(data_dir, "val")
    with pytest.raises(LmforgeError, match="too few"):
        TrainBatches(split, split.tokens + 5, 2, seed=0)


def test_truncated_shard_is_detected(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = next(copy.glob("train_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LmforgeError, match="missing or truncated"):
        TokenSplit(copy, "train")
