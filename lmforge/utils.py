"""Small shared helpers: atomic file writes, hashing, device choice, hardware description."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` can only set it,
    and a file another thread creates in between would get the wrong permissions)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_usual_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, everywhere under ``folder``: what ``open`` and
    ``mkdir`` give, which some writers do not (safetensors makes 0600 files, mkstemp too)."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _as_os_error(error: BaseException, where: Path) -> BaseException:
    """safetensors reports a failed write (a full disk, say) as ``SafetensorError("... (os error 28)")``:
    turn it back into the OSError it was, which callers (and the CLI) know how to report."""
    found = re.search(r"\(os error (\d+)\)", str(error)) if type(error).__name__ == "SafetensorError" else None
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(where))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder ``tmp`` to ``final`` atomically, replacing an older ``final``."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(folder: str | os.PathLike):
    """Build a folder in a hidden temporary sibling and rename it into place at the end, so that a
    crash leaves the old folder (or none), never a half-written one. Yields the temporary path."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        give_usual_permissions(tmp)
        fsync_dir(tmp)
        replace_dir(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _as_os_error(e, folder)
        if error is not e:
            raise error from e
        raise


def file_above(path: Path) -> Path | None:
    """The nearest of ``path``'s parent folders that is a file instead (nothing can be written under it), or None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def refuse_file_on_path(out: Path) -> None:
    """``--out`` must be a folder, or a path a folder can be made at: not a file, nor under one."""
    from lmforge.errors import LmforgeError

    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; give a folder path")
    blocking = file_above(out)
    if blocking is not None:
        raise LmforgeError(f"--out {out} lies under {blocking}, which is a file; give a folder path")


def check_output_dir(out: str | os.PathLike, overwrite: bool, made_by: tuple[str, str] | None = None) -> Path:
    """``out`` as a Path, after refusing a file there or a non-empty folder unless ``overwrite``; with
    ``made_by`` (what the command writes, and a file every such folder holds), ``overwrite`` replaces only
    such a folder: never a folder of something else that happened to be named."""
    from lmforge.errors import LmforgeError

    out = Path(out)
    refuse_file_on_path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LmforgeError(f"output folder {out} is not empty; pass --overwrite to replace it or choose another --out")
        if made_by is not None and not (out / made_by[1]).exists():
            raise LmforgeError(f"--overwrite refused: {out} is not {made_by[0]} (it has no {made_by[1]}), and "
                               f"--overwrite replaces only that; choose another --out")
    return out.resolve() if out.name in ("", ".", "..") else out  # (a folder written through a sibling needs a name)


def refuse_overwriting_sources(out: str | os.PathLike, *sources: str | os.PathLike | None) -> None:
    """Writing ``out`` replaces it whole: refuse when it is, or holds, a file or folder the result is read from
    (an adapter's base, a run's model or data included), before anything is written."""
    from lmforge.errors import LmforgeError

    target = Path(out).resolve()
    for source in sources:
        if source is None or str(source) == "":
            continue
        source = Path(source).expanduser().resolve()
        if source == target or target in source.parents:
            raise LmforgeError(f"--out {out} would replace {source}, which this reads from; choose another --out")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", ";": ";"}


def stop_strings(text: str, several: bool = False) -> list[str]:
    """Stop strings as typed on a command line, where a newline cannot be: ``\\n``, ``\\t`` and ``\\r`` are the
    characters, ``\\\\`` a backslash; with ``several``, the strings are joined with ``;`` (``\\;`` is one)."""
    out, piece, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            piece.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        if ch == ";" and several:
            out.append("".join(piece))
            piece = []
        else:
            piece.append(ch)
        i += 1
    out.append("".join(piece))
    return [s for s in out if s]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON file that holds an object (every JSON file lmforge reads does), turning a missing or corrupt
    file into a clear error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"{path} not found: the {what} is missing") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text; the {what} is corrupt, restore or re-create it") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmforgeError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the {what} is corrupt, restore or re-create it"
        ) from None
    if not isinstance(value, dict):
        raise LmforgeError(f"{path} holds a JSON {type(value).__name__}, not an object; the {what} is corrupt, restore "
                           f"or re-create it")
    return value


def pick_device(name: str = "auto", int8: bool = False):
    """``auto`` picks CUDA when present, else the CPU; ``auto`` and ``cuda`` under torchrun mean the local rank's
    GPU. ``int8`` (int8 weights: a CPU kernel): ``auto`` is the CPU, and another device is refused."""
    import torch

    if int8:
        if name not in ("auto", "cpu"):
            raise LmforgeError(f"--int8 is for CPU inference, not --device {name}; drop one of them")
        name = "cpu"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmforgeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # (under torchrun: this process's GPU)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LmforgeError(f"device {name!r} asked for but this machine has {torch.cuda.device_count()} GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def hardware_description(device=None) -> str:
    """The machine line benches and runs print: CPU model and the flags that matter, cores, torch (or the GPU)."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} ({torch.cuda.device_count()} visible), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # The flags that pick PyTorch's CPU kernels, so figures from different machines are never compared blindly.
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"})
    return (f"{cpu} ({' '.join(flags) or 'no AVX2'}), {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries often add pages of detail)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def warn(message: str) -> None:
    """A one-line warning on stderr (the CLI's counterpart of an error, for things it can continue past)."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
