"""Which precision is fast here: measured on this machine, not guessed from its CPU flags.

bf16 matrix products are 4x faster than fp32 on one CPU and slower on the next (PyTorch's CPU kernels
differ by instruction set: AMX, AVX-512 BF16, neither), so ``dtype: auto`` times a few products of the
model's own shapes in each precision, once per machine, torch version, thread count and shape, and
keeps the result in ``~/.cache/lmforge/precision.json`` (``LMFORGE_CACHE`` moves it). Two kinds of
product are timed: a matrix product (training, prefill: compute-bound) and a matrix-vector product
(one token of decoding: bound by reading the weights). GPUs are not timed: bf16 where supported.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# A precision must beat fp32 by this much to be chosen: timings of a second-long probe are noisy, and a
# change of precision costs some accuracy.
MARGIN = 1.15
# Work per timed product, so that the whole probe stays well under a second on a laptop CPU.
_MATMUL_FLOPS = 1e9
_GEMV_BYTES = 64e6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def cache_file() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "precision.json"


def _cpu_flags() -> set[str]:
    from lmforge.utils import cpu_flags

    return cpu_flags()


def machine_key() -> str:
    """What the timings depend on: the CPU and its kernel-picking flags, threads and torch."""
    from lmforge.utils import hardware_description

    return hardware_description(torch.device("cpu"))


def candidates() -> list[str]:
    """Precisions worth timing on this CPU: fp16 only where the CPU has fp16 arithmetic."""
    flags = _cpu_flags()
    return ["float32", "bfloat16"] + (["float16"] if flags & {"avx512_fp16", "amx_fp16"} else [])


@contextmanager
def flushing_subnormals():
    """Inside the block, floats below 1.2e-38 (subnormals) become 0 on the CPU; the process's setting is given back.

    CPUs compute on subnormals ~20x slower, and training makes them: AdamW's moments of parameters whose gradient
    is 0 (embedding rows a step did not use) decay into them within a few hundred steps, and the softmax gradient
    of a sharply peaked output (a freshly initialised T5 head) holds them from the first step. The training loop
    runs inside this; the benches run lmforge's training steps inside it too."""
    already = (torch.tensor([1e-39]) * 1.0).item() == 0.0  # (torch has no getter for the setting)
    flushing = not already and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


_KEEPING = [0]  # depth of keeping_freed_memory blocks


def _glibc():
    """The C library when it is glibc (whose mallopt settings are known), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def keeping_freed_memory():
    """Inside the block (Linux with glibc), memory a tensor frees stays with the process for the next one instead of
    going back to the system. glibc maps every allocation over 32 MB afresh and unmaps it when freed, so each large
    tensor of a training step (an output layer's logits and gradient, an embedding's dense gradient) pays a page
    fault per 4 KB: measured 17% of a gpt2 GRPO update on a 2-core Xeon. glibc's defaults are put back when the
    outermost block ends, and the free memory is returned then. The training loop runs inside this."""
    libc = _glibc() if _KEEPING[0] == 0 else None
    m_trim_threshold, m_mmap_max = -1, -4
    if libc is not None:
        libc.mallopt(m_mmap_max, 0)  # large blocks from the heap, not from fresh mappings
        libc.mallopt(m_trim_threshold, 2**31 - 1)  # and the heap is not shrunk while the block runs
    _KEEPING[0] += 1
    try:
        yield
    finally:
        _KEEPING[0] -= 1
        if libc is not None:
            libc.mallopt(m_mmap_max, 65536)  # glibc's defaults
            libc.mallopt(m_trim_threshold, 128 * 1024)
            libc.malloc_trim(0)


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls (first calls pick kernels
    and allocate)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_product(k: int, n: int, dtype: torch.dtype, rows: int = 1) -> float:
    """Seconds for one ``(rows, k) @ (k, n)`` product in ``dtype`` (one row: a matrix-vector product)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype)
    with torch.inference_mode():
        return median_seconds(lambda: torch.nn.functional.linear(a, b))


def _probe_shape(kind: str, k: int, n: int, rows: int) -> tuple[int, int, int]:
    """The model's shape, scaled down (never up) so that one product is about a fixed amount of work."""
    if kind == "gemv":
        n = max(1, min(n, int(_GEMV_BYTES / 4 / k)))
        return 1, k, n
    rows = max(1, min(rows, int(_MATMUL_FLOPS / (2 * k * n))))
    return rows, k, n


def measure(kind: str, k: int, n: int, rows: int = 1) -> dict[str, float]:
    """Speed of each candidate precision relative to fp32 (``{"float32": 1.0, "bfloat16": 3.9, ...}``),
    cached per machine and shape."""
    rows, k, n = _probe_shape(kind, k, n, rows)

    def speeds():
        seconds = {name: time_product(k, n, DTYPES[name], rows) for name in candidates()}
        return {name: seconds["float32"] / s for name, s in seconds.items()}

    return _cached(f"{machine_key()} | {kind} {rows}x{k}x{n}", speeds, dict)


def _cached(key: str, compute, kind: type):
    """The probe's result for ``key`` from the cache file, or ``compute()`` it and add it there."""
    path = cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), kind):
        return cached[key]
    value = compute()
    try:  # a cache that cannot be written only means measuring again next time
        from lmforge.utils import atomic_write_json

        atomic_write_json(path, {**(cached if isinstance(cached, dict) else {}), key: value})
    except OSError:
        pass
    return value


def matvec_speedup(dtype: torch.dtype, k: int, n: int) -> float:
    """How much faster ``torch.mv`` runs a one-row product in ``dtype`` than ``F.linear`` does (the model's
    ``k`` x ``n`` shape, scaled to the GEMV probe's size); cached per machine. Batch-1 decoding uses the
    faster one (``gpt.use_matvec``): on a Xeon with AMX, bf16 ``mv`` ran 1.4-1.9x ``linear``'s speed."""
    _, k, n = _probe_shape("gemv", k, n, 1)
    name = next(name for name, d in DTYPES.items() if d == dtype)

    def speedup():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        with torch.inference_mode():
            return median_seconds(lambda: torch.nn.functional.linear(x[None], w)) / median_seconds(lambda: torch.mv(w, x))

    return float(_cached(f"{machine_key()} | matvec {name} 1x{k}x{n}", speedup, float))


FP32_KERNELS = ("plain", "transposed", "onednn", "packed")
HALF_KERNELS = ("plain", "packed")


def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's fp32 linear kernel (``gpt.linear(..., onednn=True)``)."""
    try:
        x = torch.ones(1, 2)
        with torch.no_grad():
            return bool(torch.backends.mkldnn.is_available()) and torch.equal(
                torch.ops.mkldnn._linear_pointwise(x, torch.ones(3, 2), None, "none", [], ""), torch.full((1, 3), 2.0))
    except Exception:  # noqa: BLE001 (an older or other build of torch: not there, or another signature)
        return False


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """An fp32, bf16 or fp16 ``weight`` (out, in) copied into oneDNN's own blocked layout for products of
    about ``rows`` rows (a tensor of layout ``torch._mkldnn``: the same values, which ``gpt.linear`` multiplies
    with oneDNN's kernel and ``.to_dense()`` gives back exactly), or None where this torch or CPU cannot
    (fp16 needs AVX-512 FP16 or AVX-NE-CONVERT)."""
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            x = torch.ones(1, weight.size(1), dtype=weight.dtype)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")[:, :4].float()
            # (the kernel that reads it gives F.linear's values, up to the order of a sum's terms)
            if packed.layout != torch._mkldnn or not torch.allclose(
                    y, torch.nn.functional.linear(x, weight[:4].detach()).float(), rtol=1e-2, atol=1e-2):
                return None
            return packed
    except Exception:  # noqa: BLE001 (another build of torch or a CPU without the instructions)
        return None


def linear_kernels(dtype: torch.dtype, k: int, n: int, rows: int) -> dict[str, list]:
    """The fastest way to run inference products of ``dtype`` weights here, over the row counts a decoding
    step of up to ``rows`` rows passes through as sequences finish (1, 2, 4, ... ``rows``), for the output
    head (a ``k`` x ``n`` product) and for the body (distinct ``k`` x ``4k`` products), 32M elements in all,
    more than a CPU's caches hold, so that each product reads its weights from memory as decoding does:
    ``{"head": [kernel, speedup], "body": [kernel, speedup]}``, with its speed over "plain"; cached per
    machine. fp32 weights choose among ``FP32_KERNELS``: BLAS on the weights as stored, BLAS on them stored
    transposed, oneDNN's kernel on them as stored or packed into its blocked layout (``pack_weight``). On a
    2-core Xeon the gpt2 head's product ran 2.0x faster transposed at 8 rows but 0.7x at 2; on a 2-core EPYC
    oneDNN ran it 2.2x faster at 1 row and 2.4x at 16, and the body 1.6x at 1 row; at 8 rows packed fp32 ran
    the T5-small decoder's products in 146 us each against 176 for oneDNN on plain weights and 240 for BLAS.
    bf16 and fp16 weights choose among ``HALF_KERNELS``: as stored, or packed; on the EPYC packed bf16 ran the
    gpt2 head 1.6x faster at 1 row and the body 1.5-1.9x at 1 to 16 rows (24 GB/s read against 12-17)."""
    n = max(1, min(n, 2**24 // k))
    # (at most 64 body matrices: a small model's, which fit in the caches as the model does, are not timed by the
    # thousand -- 2-8 s a probe for a 32-wide test model before)
    body = max(1, min(64, (2**25 - n * k) // (4 * k * k)))
    counts = sorted({2**i for i in range(rows.bit_length())} | {rows})  # 1, 2, 4, ... and rows itself
    packs = pack_weight(torch.ones(4, 2, dtype=dtype), 1) is not None
    kernels = [k_ for k_ in (FP32_KERNELS if dtype == torch.float32 else HALF_KERNELS)
               if (k_ != "onednn" or onednn_linear_available()) and (k_ != "packed" or packs)]

    def measure_all():
        plain = {"head": [torch.full((n, k), 0.01, dtype=dtype)],  # (values do not matter for speed)
                 "body": [torch.full((4 * k, k), 0.01, dtype=dtype) for _ in range(body)]}
        weights = {"plain": plain, "onednn": plain}  # (oneDNN's kernel on the weights as stored)
        if "transposed" in kernels:
            weights["transposed"] = {g: [w.t().contiguous().t() for w in ws] for g, ws in plain.items()}
        if "packed" in kernels:
            weights["packed"] = {g: [pack_weight(w, rows) for w in ws] for g, ws in plain.items()}
        inputs = {r: torch.full((r, k), 0.01, dtype=dtype) for r in counts}
        samples = {(kernel, group, r): [] for kernel in kernels for group in plain for r in counts}
        with torch.inference_mode():
            # The kernels take turns, one timing each a round (the first round warms up): a slow spell on a shared
            # machine then falls on all of them alike instead of on whichever was being timed.
            for _ in range(6):
                for (kernel, group, r), times in samples.items():
                    x, ws = inputs[r], weights[kernel][group]
                    start = time.perf_counter()
                    if kernel in ("onednn", "packed"):
                        for w in ws:
                            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                    else:
                        for w in ws:
                            torch.nn.functional.linear(x, w)
                    times.append(time.perf_counter() - start)
        total = {(kernel, group): sum(statistics.median(samples[kernel, group, r][1:]) for r in counts)
                 for kernel in kernels for group in plain}
        best = {group: min(kernels, key=lambda kernel: total[kernel, group]) for group in plain}
        return {group: [kernel, total["plain", group] / total[kernel, group]] for group, kernel in best.items()}

    name = SHORT[next(name for name, d in DTYPES.items() if d == dtype)]
    # (the kernels in the key: a choice cached before one joined them is measured again)
    chosen = _cached(f"{machine_key()} | {name} kernels {'/'.join(kernels)} rows 1-{rows} x{k}x{n}", measure_all, dict)
    valid = all(isinstance(chosen.get(g), list) and len(chosen[g]) == 2 and chosen[g][0] in kernels
                and isinstance(chosen[g][1], (int, float)) for g in ("head", "body"))
    return chosen if valid else {"head": ["plain", 1.0], "body": ["plain", 1.0]}  # (a cache file edited by hand)


def attention_math_speedup(dtype: torch.dtype, heads: int, head_dim: int, length: int) -> float:
    """How much faster causal attention's forward and backward run through ``scaled_dot_product_attention``'s
    math backend than through its flash kernel, in ``dtype`` on the CPU, for 4 rows of ``length`` tokens; cached
    per machine. On a 2-core Xeon the bf16 flash kernel's backward made 37 tokens 5x slower than the math
    backend; from ~192 tokens on the flash kernel was faster (and always in the forward pass alone)."""
    name = next(name for name, d in DTYPES.items() if d == dtype)

    def speedup():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = torch.Generator().manual_seed(0)
        q, k, v, grad = (torch.randn(4, heads, length, head_dim, generator=g).to(dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)

        def step(backend):
            def run():
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
            return run

        return median_seconds(step(SDPBackend.FLASH_ATTENTION)) / median_seconds(step(SDPBackend.MATH))

    return float(_cached(f"{machine_key()} | attention {name} 4x{heads}x{length}x{head_dim}", speedup, float))


DECODE_ATTENTION = ("flash", "math", "matmul")


def decode_attention_kernel(dtype: torch.dtype, rows: int, heads: int, kv_heads: int, head_dim: int,
                            length: int) -> list:
    """The fastest way to run a decoding step's attention here (one query per row over ``length`` cached keys and
    values, a per-row mask as the engine passes it) in ``dtype`` on the CPU: ``[kernel, speedup over flash]``, a
    kernel of ``DECODE_ATTENTION`` -- ``scaled_dot_product_attention``'s flash kernel, its math backend, or two
    matrix products with a softmax between (``gpt.matmul_attention``) -- chosen only when ``MARGIN`` faster than
    the flash kernel; cached per machine. On a 2-core EPYC, bf16, the gpt2 shape's keys and values as views of a
    longer cache, one row over 544 positions: flash 668 us a layer, math 246, matmul 251; over 1,000: 926, 478,
    380; 16 rows over 544: 9.7 ms, 10.9, 4.2; one row over 64: 95, 74, 138 us."""
    name = next(name for name, d in DTYPES.items() if d == dtype)

    def measure_all():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from lmforge.model.gpt import matmul_attention

        g = torch.Generator().manual_seed(0)
        q = torch.randn(rows, heads, 1, head_dim, generator=g).to(dtype)
        # (views of a cache twice as long, as the engine's keys and values are: a kernel may copy such a view)
        k, v = (torch.randn(rows, kv_heads, 2 * length, head_dim, generator=g).to(dtype)[:, :, :length] for _ in range(2))
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
        gqa = kv_heads != heads

        def sdpa(backend):
            def run():
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
            return run

        runs = {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "math": sdpa(SDPBackend.MATH),
                "matmul": lambda: matmul_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)}
        with torch.inference_mode():
            times = {kernel: median_seconds(run) for kernel, run in runs.items()}
        best = min(times, key=times.get)
        speedup = times["flash"] / times[best]
        return [best, speedup] if speedup >= MARGIN else ["flash", 1.0]

    key = f"{machine_key()} | decode attention kernel {name} {rows}x{heads}/{kv_heads}x{length}x{head_dim} (views)"
    chosen = _cached(key, measure_all, list)
    valid = (isinstance(chosen, list) and len(chosen) == 2 and chosen[0] in DECODE_ATTENTION
             and isinstance(chosen[1], (int, float)))
    return chosen if valid else ["flash", 1.0]  # (a cache file edited by hand)


@dataclass
class Choice:
    dtype: str  # float32, bfloat16 or float16
    reason: str  # one line for the user: what was chosen and why
    news: bool = True  # worth saying: False for fp32 weights kept as the checkpoint stores them

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 (NVIDIA from Ampere on). ``torch.cuda.is_bf16_supported()`` also says
    yes for GPUs that only emulate it (a T4, a V100), where bf16 runs far slower than fp16 or fp32."""
    if torch.version.hip:  # AMD: the ROCm builds say it straight
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_autocast(device: torch.device, requested: str, k: int, n: int, rows: int) -> Choice:
    """Training's ``dtype``: "float32", "bfloat16" (autocast, fp32 master weights) or "auto" (measured)."""
    if requested != "auto":
        return Choice(requested, f"{SHORT[requested]}{' autocast' if requested != 'float32' else ''} (as configured)")
    if device.type == "cuda":
        if gpu_has_bf16(device):
            return Choice("bfloat16", "bf16 autocast (this GPU computes in it)")
        return Choice("float32", "fp32 (this GPU has no bf16 units: it would only emulate them)")
    if device.type != "cpu":
        return Choice("float32", f"fp32 ({device.type} is not probed)")
    speed = measure("matmul", k, n, rows).get("bfloat16", 0.0)
    if speed >= MARGIN:
        return Choice("bfloat16", f"bf16 autocast: {speed:.1f}x faster matrix products on this CPU (measured; "
                                  f"--dtype float32 to override)")
    return Choice("float32", f"fp32: bf16 matrix products run {speed:.2f}x as fast on this CPU (measured; "
                             f"--dtype bfloat16 to override)")


def choose_weights(device: torch.device, requested: str, stored: str | None, k: int, n: int) -> Choice:
    """Inference weights: ``requested`` as given, or for "auto" the checkpoint's ``stored`` precision
    (published checkpoints are mostly bf16) unless decoding in it is slower here than in fp32."""
    if requested != "auto":
        return Choice(requested, f"{SHORT[requested]} weights (as asked)", news=False)
    stored = stored if stored in DTYPES else "float32"
    if stored == "float32" or device.type != "cpu":
        if device.type == "cuda" and stored == "bfloat16" and not gpu_has_bf16(device):
            return Choice("float32", "fp32 weights (the checkpoint is bf16; this GPU has no bf16)")
        return Choice(stored, f"{SHORT[stored]} weights (the checkpoint's precision)", news=stored != "float32")
    # (linear's speed, not torch.mv's: on the tiny shape bf16 mv measured 1.6x linear, yet a whole bf16
    # decode step ran 0.8x fp32's; the one-row kernel is chosen after the precision, in the engine)
    speed = measure("gemv", k, n).get(stored)
    if speed is None:  # (not a precision this CPU computes in natively: not measured)
        return Choice("float32", f"fp32 weights: the checkpoint is {SHORT[stored]}, which this CPU has no native "
                                 f"arithmetic for (--dtype {stored} to keep it)")
    if speed >= 1.0 / MARGIN:
        return Choice(stored, f"{SHORT[stored]} weights (the checkpoint's precision; decoding in it is "
                              f"{speed:.1f}x fp32's speed on this CPU)")
    return Choice("float32", f"fp32 weights: the checkpoint is {SHORT[stored]}, which decodes at {speed:.2f}x "
                             f"fp32's speed on this CPU (measured; --dtype {stored} to keep it)")


def describe_probe(k: int, n_matmul: int, rows: int, n_gemv: int) -> str:
    """The probe's figures for one model shape, for benchmarks' machine lines."""
    parts = []
    for kind, n, r in (("matmul", n_matmul, rows), ("gemv", n_gemv, 1)):
        speed = measure(kind, k, n, r)
        parts.append(f"{kind} " + ", ".join(f"{SHORT[d]} {v:.2f}x" for d, v in speed.items() if d != "float32"))
    return "precision probe (speed vs fp32): " + "; ".join(parts)
