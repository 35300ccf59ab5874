"""Training runs survive faults: a process killed while saving, damaged checkpoint files, a full disk,
NaN or inf in a step, and files other users of the group can read."""

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_config

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.train import loop
from lmforge.train.checkpointing import checkpoint_dirs, damage, latest_checkpoint
from lmforge.train.loop import pretrain

# Exact comparisons: fp32 (bf16 autocast is the default on CPUs with AMX), dropout on so that RNG state matters.
FAULT_RUN = dict(max_steps=12, checkpoint_interval=4, eval_interval=4, dropout=0.1, dtype="float32")


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> dict[int, float]:
    """Losses of the fault runs' settings, trained without a fault."""
    run = tmp_path_factory.mktemp("straight") / "run"
    pretrain(train_config(data_dir, run, **FAULT_RUN), progress=False)
    return losses(run)


def stop_after_saving(monkeypatch, last_step: int) -> None:
    """The process "dies" (KeyboardInterrupt) right after the checkpoint of ``last_step`` is complete."""
    save = loop.save_checkpoint

    def save_then_die(run, step, *args):
        save(run, step, *args)
        if step == last_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)


def hidden_leftovers(run: Path) -> list[str]:
    return [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# -- a process killed while it writes a checkpoint ------------------------------------------------

# Runs the fault run's training in a fresh process that SIGKILLs itself at one point of the second
# checkpoint's save (step 8): the first one (step 4) is the last complete checkpoint.
KILLER = r"""
import io, os, shutil, signal, sys
import torch
import lmforge.model.checkpoint as model_checkpoint
import lmforge.utils as utils
from lmforge.train.loop import pretrain

point, config = sys.argv[1], sys.argv[2]
calls = {}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def second_call(name):
    calls[name] = calls.get(name, 0) + 1
    return calls[name] == 2

save_file = model_checkpoint.save_file
def save_weights(tensors, path, **kw):  # half-way through writing model.safetensors
    save_file(tensors, path, **kw)
    if second_call("weights"):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 3 // 7)
        die()

torch_save = torch.save
def save_state(obj, f, *args, **kw):  # half-way through writing trainer.pt, the weights complete
    if second_call("state"):
        buffer = io.BytesIO()
        torch_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        die()
    torch_save(obj, f, *args, **kw)

replace_dir = utils.replace_dir
def rename(tmp, final):
    if final.name == "step_0000008" and point == "rename":  # everything written, not yet renamed into place
        die()
    replace_dir(tmp, final)
    if final.name == "step_0000008" and point == "prune":  # renamed into place, the old one not yet pruned
        die()

rmtree = shutil.rmtree
def delete(path, *args, **kw):  # half-way through deleting the old checkpoint
    if os.path.basename(path).startswith(".old-step_0000004"):
        os.remove(os.path.join(path, "model", "model.safetensors"))
        die()
    rmtree(path, *args, **kw)

patches = {"weights": (model_checkpoint, "save_file", save_weights), "state": (torch, "save", save_state),
           "rename": (utils, "replace_dir", rename), "prune": (utils, "replace_dir", rename),
           "deleting": (shutil, "rmtree", delete)}
module, name, patched = patches[point]
setattr(module, name, patched)
pretrain(config, progress=False)
"""


@pytest.mark.parametrize("point, resumes_from", [
    ("weights", 4), ("state", 4), ("rename", 4), ("prune", 8), ("deleting", 8),
])
def test_a_process_killed_while_saving_resumes_from_the_last_complete_checkpoint_with_identical_losses(
        point, resumes_from, data_dir, tmp_path, straight, capsys):
    run = tmp_path / "run"
    config = train_config(data_dir, run, keep_checkpoints=1, **FAULT_RUN)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    killed = subprocess.run([sys.executable, "-c", KILLER, point, str(tmp_path / "config.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # it died at that point, not before
    assert latest_checkpoint(run).name == f"step_{resumes_from:07d}"

    summary = pretrain(config, resume=True, progress=False)
    assert f"resuming from step {resumes_from} of {run}" in capsys.readouterr().out
    assert summary["steps"] == 12
    assert losses(run) == straight  # bit-identical, step for step
    # What the killed save left (a temporary folder, a half-deleted old checkpoint) is cleaned up.
    assert [d.name for d in checkpoint_dirs(run)] == ["step_0000012"] and hidden_leftovers(run) == []


# -- damaged checkpoint files ---------------------------------------------------------------------


def train_then_damage(data_dir, run: Path, monkeypatch, harm) -> dict:
    """Train the fault run to step 12 (checkpoints 4, 8, 12), stop, then ``harm(checkpoint folder)`` step 12."""
    config = train_config(data_dir, run, keep_checkpoints=3, **{**FAULT_RUN, "max_steps": 16})
    stop_after_saving(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, progress=False)
    monkeypatch.undo()
    harm(run / "checkpoints" / "step_0000012")
    return config


def truncate(checkpoint: Path) -> None:
    weights = checkpoint / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def flip_a_byte(checkpoint: Path) -> None:
    """One bit flipped in the middle of the optimizer state: same size, torch.load still reads it."""
    state = checkpoint / "trainer.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))


@pytest.mark.parametrize("harm, reason", [
    (truncate, "model/model.safetensors has .* bytes, .* when saved"),
    (flip_a_byte, "trainer.pt differs from what was saved"),
])
def test_a_damaged_checkpoint_is_detected_and_resume_falls_back_to_the_previous_one(
        harm, reason, data_dir, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    pretrain(train_config(data_dir, reference, keep_checkpoints=3, **{**FAULT_RUN, "max_steps": 16}), progress=False)
    run = tmp_path / "run"
    config = train_then_damage(data_dir, run, monkeypatch, harm)
    capsys.readouterr()

    pretrain(config, resume=True, progress=False)
    captured = capsys.readouterr()
    assert re.search(re.escape(f"warning: checkpoint {run}/checkpoints/step_0000012 is damaged: ") + reason, captured.err)
    assert f"resuming from step 8 of {run}" in captured.out
    assert losses(run) == losses(reference)
    # The damaged one is kept for inspection, out of the run's sequence; the new step 12 replaced it.
    assert (run / "checkpoints" / "step_0000012.damaged").is_dir()
    assert damage(run / "checkpoints" / "step_0000012") is None


def test_when_every_checkpoint_is_damaged_resume_says_so_in_one_line(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    config = train_then_damage(data_dir, run, monkeypatch, truncate)
    for checkpoint in checkpoint_dirs(run):
        flip_a_byte(checkpoint)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--resume", "--quiet"]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[-1].startswith(f"lmforge: error: nothing to resume: every checkpoint of {run} is damaged")
    assert all(line.startswith("warning: checkpoint") for line in error[:-1])
    assert (run / "config.yaml").read_text() == saved and len(checkpoint_dirs(run)) == 3


# -- a full disk ----------------------------------------------------------------------------------


def fill_the_disk_at(monkeypatch, what: str) -> None:
    """The second save finds the disk full while writing ``what``, as the libraries report it."""
    calls = {"n": 0}
    if what == "weights":
        import lmforge.model.checkpoint as model_checkpoint
        from safetensors import SafetensorError

        save_file = model_checkpoint.save_file

        def full(tensors, path, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                Path(path).write_bytes(b"\0" * 100)
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            save_file(tensors, path, **kw)

        monkeypatch.setattr(model_checkpoint, "save_file", full)
    else:
        torch_save = torch.save

        def full(obj, f, *args, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            torch_save(obj, f, *args, **kw)

        monkeypatch.setattr(torch, "save", full)


@pytest.mark.parametrize("what", ["weights", "trainer_state"])
def test_a_full_disk_during_a_save_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(
        what, data_dir, tmp_path, monkeypatch, capsys, straight):
    run = tmp_path / "run"
    config = train_config(data_dir, run, keep_checkpoints=1, **FAULT_RUN)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    fill_the_disk_at(monkeypatch, what)
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"lmforge: error: disk full: no space left on the device of {run}/checkpoints "
                            f"while saving step 8 (the previous checkpoint {run}/checkpoints/step_0000004 is intact)")
    assert "\n" not in error
    assert [d.name for d in checkpoint_dirs(run)] == ["step_0000004"] and hidden_leftovers(run) == []
    assert damage(run / "checkpoints" / "step_0000004") is None
    # Space freed: the run continues from there, as if nothing had happened.
    monkeypatch.undo()
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--quiet", "--resume"]) == 0
    assert losses(run) == straight


def _small_filesystem(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


# A checkpoint of the fault run takes about 800 KB: the second one finds the disk full in its weights
# (safetensors raises SafetensorError) or in trainer.pt (torch.save raises RuntimeError over the OSError).
@pytest.mark.parametrize("size", ["1100k", "1400k"])
def test_a_really_full_filesystem_gives_the_same_one_line_error(size, data_dir, tmp_path):
    """What the injected errors above stand for, on a small tmpfs (where this user may mount one)."""
    small = tmp_path / "small"
    if not _small_filesystem(small, size):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        run = small / "run"
        config = train_config(data_dir, run, keep_checkpoints=1, **FAULT_RUN)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(tmp_path / "c.yaml"),
                                 "--quiet"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        error = result.stderr.strip()
        assert error.startswith(f"lmforge: error: disk full: no space left on the device of {run}/checkpoints"), error
        assert "\n" not in error and "is intact" in error
        assert len(checkpoint_dirs(run)) == 1 and damage(checkpoint_dirs(run)[0]) is None and hidden_leftovers(run) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# -- NaN and inf --------------------------------------------------------------------------------------


def poison(monkeypatch, steps: set[int], where: str = "loss") -> None:
    """Make the loss (or only the gradient of the embeddings) of the given steps NaN (inf)."""
    real = loop.CausalLM.loss
    calls = {"n": 0, "hook": None}

    def loss(self, model, batch):
        calls["n"] += 1  # one micro-batch per step in these runs
        if calls["hook"] is not None:
            calls["hook"].remove()
            calls["hook"] = None
        value = real(self, model, batch)
        if calls["n"] in steps:
            if where == "loss":
                return value * float("nan")
            calls["hook"] = self.model.wte.weight.register_hook(lambda grad: grad * float("inf"))
        return value

    monkeypatch.setattr(loop.CausalLM, "loss", loss)


def read_checkpoint(checkpoint: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    return load_file(checkpoint / "model" / "model.safetensors"), state["optimizer"]["state"]


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_step_with_a_non_finite_loss_or_gradient_is_skipped_and_counted(where, data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, {5}, where)
    summary = pretrain(train_config(data_dir, run, max_steps=8, checkpoint_interval=1, keep_checkpoints=10,
                                    dtype="float32"), progress=False)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r and r["step"] != 5)
    # The skipped step changed nothing: the weights and AdamW's moments after it are those before it.
    weights4, moments4 = read_checkpoint(run / "checkpoints" / "step_0000004")
    weights5, moments5 = read_checkpoint(run / "checkpoints" / "step_0000005")
    assert all(torch.equal(weights4[k], weights5[k]) for k in weights4)
    for p in moments4:
        assert all(torch.equal(moments4[p][k], moments5[p][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert json.loads((run / "checkpoints" / "step_0000008" / "manifest.json").read_text())["step"] == 8
    assert torch.load(run / "checkpoints" / "step_0000008" / "trainer.pt", weights_only=True)["skipped_steps"] == 1


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_step_and_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(LmforgeError) as caught:
        pretrain(train_config(data_dir, run, max_steps=20, checkpoint_interval=2, max_bad_steps=3), progress=False)
    message = str(caught.value)
    assert message.startswith("step 5: the loss or gradients were not finite for 3 steps in a row (max_bad_steps 3)")
    assert f"The last good checkpoint is {run}/checkpoints/step_0000004" in message and "\n" not in message
    weights, _ = read_checkpoint(run / "checkpoints" / "step_0000004")
    assert all(torch.isfinite(w).all() for w in weights.values())


DDP_POISON = r"""
import os, sys
from lmforge.train import loop
real = loop.CausalLM.loss
calls = {"n": 0}
def loss(self, model, batch):  # only rank 1 sees a NaN, at step 3
    calls["n"] += 1
    value = real(self, model, batch)
    return value * float("nan") if calls["n"] == 3 and int(os.environ["RANK"]) == 1 else value
loop.CausalLM.loss = loss
loop.pretrain(sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_all_ranks_skip_a_step_that_is_non_finite_on_one_of_them(data_dir, tmp_path, monkeypatch):
    kw = dict(max_steps=8, eval_interval=8, checkpoint_interval=8, dtype="float32")
    poison(monkeypatch, {3})
    one = pretrain(train_config(data_dir, tmp_path / "one", micro_batch_size=4, **kw), progress=False)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(train_config(data_dir, tmp_path / "two", micro_batch_size=2, **kw)))
    (tmp_path / "driver.py").write_text(DDP_POISON)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "driver.py"), str(tmp_path / "two.yaml")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert one["skipped_steps"] == 1
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    # Had rank 1 applied its NaN update alone, its weights (and from then on every all-reduced gradient) would be NaN.
    assert list(b) == list(range(1, 9)) and all(abs(a[s] - b[s]) < 1e-5 for s in a if s != 3)
    assert torch.load(tmp_path / "two" / "checkpoints" / "step_0000008" / "trainer.pt", weights_only=True)["skipped_steps"] == 1


# -- permissions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)],
                         ids=["umask-022", "umask-027"])
def test_everything_lmforge_writes_has_the_permissions_the_umask_gives(umask, file_mode, dir_mode, corpus_dir, data_dir,
                                                                       tmp_path, hf_gpt2):
    from lmforge.data.prepare import prepare
    from lmforge.model.checkpoint import load_model
    from lmforge.model.lora import add_lora, save_adapter
    from lmforge.tokenizer import train_tokenizer

    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        pretrain(train_config(data_dir, out / "run", max_steps=2), progress=False)
        train_tokenizer([corpus_dir / "textwrap.py"], out / "tokenizer", vocab_size=300, progress=False)
        prepare([corpus_dir / "textwrap.py"], out / "tokenizer", out / "data", workers=0, progress=False)
        model = load_model(hf_gpt2)
        add_lora(model, "q,v")
        save_adapter(model, out / "adapter", hf_gpt2)
    finally:
        os.umask(old)
    wrong = []
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (dir_mode if path.is_dir() else file_mode):
            wrong.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
    assert wrong == []
    assert (out / "run" / "checkpoints" / "step_0000002" / "model" / "model.safetensors").exists()


class _OneProcess:
    """The process-group stand-in ``save_checkpoint`` needs for sharded saving, in one process."""

    is_main = True

    def broadcast(self, value):
        return value

    def barrier(self):
        pass


def test_a_checkpoint_written_in_the_background_is_not_a_checkpoint_until_its_shards_are_written(tmp_path):
    """--async-save: while the shards are being written the run's latest checkpoint is the one before (a process
    killed meanwhile leaves nothing to resume from that is half-written); ``finish`` seals it (manifest, rename),
    and a background write that failed for a full disk is the one-line error of a foreground one."""
    from concurrent.futures import Future

    from lmforge.train.checkpointing import save_checkpoint

    def model_folder(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    run = tmp_path / "run"
    save_checkpoint(run, 1, model_folder, {"step": 1}, keep=3)
    writing = Future()

    def shards(folder):
        (folder / "shards").mkdir()
        (folder / "shards" / "__0_0.distcp").write_bytes(b"x" * 10)
        return writing

    pending = save_checkpoint(run, 2, model_folder, {"step": 2}, keep=3, dist_=_OneProcess(), write_shards=shards,
                              background=True)
    assert latest_checkpoint(run).name == "step_0000001" and pending.tmp.is_dir()
    writing.set_result(None)
    assert pending.finish() == latest_checkpoint(run) and latest_checkpoint(run).name == "step_0000002"
    assert damage(latest_checkpoint(run)) is None and not pending.tmp.exists()
    assert "shards/__0_0.distcp" in json.loads((latest_checkpoint(run) / "manifest.json").read_text())["files"]

    # DCP reports a rank's failed write as a CheckpointException (a BaseException) around the OSError
    from torch.distributed.checkpoint.api import CheckpointException

    failed = Future()
    pending = save_checkpoint(run, 3, model_folder, {"step": 3}, keep=3, dist_=_OneProcess(),
                              write_shards=lambda folder: failed, background=True)
    failed.set_exception(CheckpointException("save failed", {0: (OSError(errno.ENOSPC, "No space left"), None)}))
    with pytest.raises(LmforgeError, match="disk full.*step 3.*step_0000002 is intact"):
        pending.finish()
    assert latest_checkpoint(run).name == "step_0000002" and not pending.tmp.exists()

    # a run that fails while a save is in flight waits for it and removes the unsealed folder
    writing = Future()
    pending = save_checkpoint(run, 4, model_folder, {"step": 4}, keep=3, dist_=_OneProcess(), write_shards=shards,
                              background=True)
    writing.set_exception(RuntimeError("the run is failing anyway"))
    pending.abandon()
    assert latest_checkpoint(run).name == "step_0000002" and not pending.tmp.exists()


def test_a_full_disk_while_dcp_writes_shards_is_the_one_line_disk_full_error(tmp_path, monkeypatch):
    """DCP's own writer, failing with ENOSPC, in the foreground and in the background (torch wraps the OSError)."""
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as filesystem

    from lmforge.train.checkpointing import save_checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)
    state = {"w": torch.ones(4)}

    def model_folder(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    with pytest.raises(LmforgeError, match="disk full.*step 1"):
        save_checkpoint(tmp_path / "run", 1, model_folder, {}, keep=2, dist_=_OneProcess(),
                        write_shards=lambda folder: dcp.save(state, checkpoint_id=str(folder / "shards"), no_dist=True))
    pending = save_checkpoint(tmp_path / "run", 2, model_folder, {}, keep=2, dist_=_OneProcess(), background=True,
                              write_shards=lambda folder: dcp.async_save(state, checkpoint_id=str(folder / "shards"),
                                                                         no_dist=True))
    with pytest.raises(LmforgeError, match="disk full.*step 2"):
        pending.finish()
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_sharded_checkpoint_that_does_not_fit_the_model_is_a_one_line_error(tmp_path):
    """DCP raises a CheckpointException (a BaseException, not an Exception) when saved shards do not fit the model
    being resumed: it is a one-line error naming the checkpoint, not a traceback."""
    import warnings

    from lmforge.train.distributed import SHARDS, Distributed, save_sharded
    from lmforge.train.loop import _restore

    saved, other = torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)
    optimizers = [torch.optim.AdamW(m.parameters()) for m in (saved, other)]
    saved(torch.ones(1, 4)).sum().backward()
    optimizers[0].step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (one process, no process group: DCP says it assumes so)
        save_sharded(tmp_path / "step" / SHARDS, saved, optimizers[0])
        with pytest.raises(LmforgeError, match="sharded state in .*shards cannot be read into this run"):
            _restore({}, tmp_path / "step", other, optimizers[1], None, torch.device("cpu"), Distributed())
