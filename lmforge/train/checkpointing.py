"""Training checkpoints: a Hugging Face model folder plus, beside it, the training-only state.

    RUN/checkpoints/step_0000500/model/        config.json, model.safetensors, tokenizer.json, ...
    RUN/checkpoints/step_0000500/trainer.pt    optimizer, loader position, RNG states, step, time

Each checkpoint is assembled in a hidden temporary folder and renamed into place, so a process
killed while saving never leaves a broken latest checkpoint. Only the last K are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.utils import atomic_dir, first_line

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def save_checkpoint(run_dir: Path, step: int, save_model, trainer_state: dict, keep: int) -> Path:
    """``save_model(folder)`` writes the model folder (a full model, or a LoRA adapter)."""
    final = run_dir / "checkpoints" / f"step_{step:07d}"
    with atomic_dir(final) as tmp:
        save_model(tmp / "model")
        with open(tmp / "trainer.pt", "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and stop
        raise LmforgeError(
            f"{checkpoint}/trainer.pt cannot be read ({first_line(e)}); delete that checkpoint to resume from an earlier one"
        ) from None
