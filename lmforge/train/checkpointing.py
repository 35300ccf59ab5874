"""Training checkpoints: a Hugging Face model folder plus, beside it, the training-only state.

    RUN/checkpoints/step_0000500/model/         config.json, model.safetensors, tokenizer.json, ...
    RUN/checkpoints/step_0000500/trainer.pt     optimizer, loader position, RNG states, step, time
    RUN/checkpoints/step_0000500/shards/        under FSDP: model and optimizer state, one file per rank (DCP)
    RUN/checkpoints/step_0000500/manifest.json  size and SHA-256 of every file above

Each checkpoint is assembled in a hidden temporary folder and renamed into place, so a process
killed while saving never leaves a broken latest checkpoint. The manifest catches what happens to
the files later (truncation, bit rot): resume checks it and falls back to the newest intact
checkpoint. Only the last K are kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.utils import (
    atomic_dir,
    atomic_write_json,
    first_line,
    fsync_dir,
    give_usual_permissions,
    read_json,
    replace_dir,
    sha256_file,
    warn,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lmforge-checkpoint-v1"


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        model = d / "model"
        if m and (d / "trainer.pt").exists() and ((model / "config.json").exists() or (model / "adapter_config.json").exists()):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _save_trainer_state(state: dict, path: Path) -> None:
    """torch.save, raising the OSError of a failed write (a full disk) rather than the "unexpected pos"
    RuntimeError that torch raises on top of it while closing the half-written archive."""
    failed = []

    class Stream:
        def write(self, data):
            try:
                return f.write(data)
            except OSError as e:
                failed.append(e)
                raise

        def flush(self):
            f.flush()

    with open(path, "wb") as f:
        try:
            torch.save(state, Stream())
        except Exception:
            if failed:
                raise failed[0] from None
            raise
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, save_model, trainer_state: dict, keep: int, *, dist_=None,
                    write_shards=None, background: bool = False):
    """``save_model(folder)`` writes the model folder (a full model, or a LoRA adapter).

    With ``write_shards`` (sharded training) every rank calls this: all write into the one temporary
    folder that rank 0 made (``write_shards(folder)``: each rank its shards; ``save_model``: every rank
    takes part, rank 0 writes), and rank 0 alone adds the trainer state and manifest and renames it into place.
    With ``background`` too, ``write_shards`` returns a future of shards still being written: the checkpoint is
    returned as a ``PendingCheckpoint``, which its ``finish()`` seals and renames into place once they are.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    main = dist_ is None or dist_.is_main
    if background:
        return _start_in_background(run_dir, step, save_model, trainer_state, keep, dist_, write_shards)
    with _disk_full_is_an_error(run_dir, step):
        with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
            if write_shards is not None:
                tmp = Path(dist_.broadcast(str(tmp) if main else None))
                write_shards(tmp)
            save_model(tmp / "model")
            if main:
                _save_trainer_state(trainer_state, tmp / "trainer.pt")
                _write_manifest(tmp, step)
    if main:
        _prune(root, keep)
    return final


def _write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    atomic_write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "step": step, "files": files})


def _full_disk(error: BaseException) -> bool:
    """Whether ``error`` is a full disk or quota: an OSError, or DCP's CheckpointException around one (a rank's
    failure to write its shards)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    for failure in failures.values() if isinstance(failures, dict) else ():
        cause = failure[0] if isinstance(failure, tuple) else failure  # (exception, its traceback)
        if isinstance(cause, BaseException) and _full_disk(cause):
            return True
    return False


@contextlib.contextmanager
def _disk_full_is_an_error(run_dir: Path, step: int):
    try:
        yield
    except BaseException as e:
        if not _full_disk(e):
            raise
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise LmforgeError(f"disk full: no space left on the device of {run_dir / 'checkpoints'} while saving step "
                           f"{step} ({kept}); free some space, then continue with --resume") from None


def _start_in_background(run_dir: Path, step: int, save_model, trainer_state: dict, keep: int, dist_, write_shards):
    started = time.perf_counter()
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = None
    if dist_.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"  # hidden: a killed run's is removed by the next save
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    tmp = Path(dist_.broadcast(str(tmp) if dist_.is_main else None))
    future = None
    try:
        with _disk_full_is_an_error(run_dir, step):
            future = write_shards(tmp)
            save_model(tmp / "model")
            if dist_.is_main:
                _save_trainer_state(trainer_state, tmp / "trainer.pt")
    except BaseException:
        PendingCheckpoint(run_dir, step, tmp, final, keep, dist_, future, started).abandon()
        raise
    return PendingCheckpoint(run_dir, step, tmp, final, keep, dist_, future, started)


class PendingCheckpoint:
    """A checkpoint whose shards are still being written in the background (``--async-save``). Until
    ``finish()`` it lies in a hidden temporary folder, so the run's latest checkpoint is still the one before:
    a process killed meanwhile leaves no broken checkpoint."""

    def __init__(self, run_dir: Path, step: int, tmp: Path, final: Path, keep: int, dist_, future, started: float):
        self.run_dir, self.step, self.tmp, self.final, self.keep = run_dir, step, tmp, final, keep
        self.dist_, self.future, self.started = dist_, future, started  # (started: time.perf_counter())

    def done(self) -> bool:
        """Whether this rank's shards are written (a local question: see the loop, which asks every rank)."""
        return self.future.done()

    def abandon(self) -> None:
        """On the way out of a failed run: wait for this rank's background writing to end (it must not be cut
        off mid-file, and its own collectives end with the group's timeout at the latest), then (rank 0)
        remove the unsealed folder. The run's latest checkpoint stays the one before."""
        if self.future is not None:
            try:
                self.future.result()
            except BaseException:  # (the run is failing already: its own error is the one to report)
                pass
        if self.dist_.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self) -> Path:
        """Wait for this rank's shards, then (rank 0, once every rank's are written) seal and rename the
        checkpoint into place. Every rank calls this."""
        try:
            with _disk_full_is_an_error(self.run_dir, self.step):
                self.future.result()
                self.dist_.barrier()
                if self.dist_.is_main:
                    _write_manifest(self.tmp, self.step)
                    give_usual_permissions(self.tmp)
                    fsync_dir(self.tmp)
                    replace_dir(self.tmp, self.final)
        except BaseException:
            if self.dist_.is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.dist_.is_main:
            _prune(self.run_dir / "checkpoints", self.keep)
        return self.final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the last ``keep`` checkpoints, and what killed saves left behind."""
    # Hidden folders are the temporary folders of saves that were killed; only one process writes a run.
    for leftover in root.glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in checkpoint_dirs(root.parent)[:-keep]:
        # Out of sight first: a process killed half-way through rmtree leaves no half-deleted checkpoint.
        hidden = old.with_name(f".old-{old.name}")
        os.rename(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted (a missing, truncated or changed file), or None when intact.

    A checkpoint saved before manifests existed is taken as it is.
    """
    if not (checkpoint / MANIFEST).exists():
        return None
    try:
        files = read_json(checkpoint / MANIFEST, "checkpoint manifest")["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (LmforgeError, KeyError, TypeError, ValueError, AttributeError) as e:
        return f"its {MANIFEST} is unreadable ({first_line(e)})"
    for name, (size, sha256) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
        if sha256_file(path) != sha256:
            return f"{name} differs from what was saved (corrupted)"
    return None


def resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The newest intact checkpoint of a run, and the damaged newer ones (each named in a warning)."""
    damaged = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        reason = damage(checkpoint)
        if reason is None:
            return checkpoint, damaged
        warn(f"checkpoint {checkpoint} is damaged: {reason}")
        damaged.append(checkpoint)
    if not damaged:
        raise LmforgeError(f"nothing to resume: {run_dir} has no checkpoints; run without --resume to start")
    names = ", ".join(d.name for d in damaged)
    raise LmforgeError(f"nothing to resume: every checkpoint of {run_dir} is damaged ({names}); start again with --overwrite")


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the run's sequence (kept for inspection, never pruned or resumed)."""
    aside, n = checkpoint.with_name(f"{checkpoint.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged-{n}")
    os.rename(checkpoint, aside)
    return aside


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and stop
        raise LmforgeError(
            f"{checkpoint}/trainer.pt cannot be read ({first_line(e)}); delete that checkpoint to resume from an earlier one"
        ) from None
