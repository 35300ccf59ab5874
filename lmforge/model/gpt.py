"""The decoder-only Transformer, top to bottom in the order data flows.

One file for every decoder family; each difference is a field of ``Config`` (see config.py):
positions (learned, rotary, sinusoidal), norm (LayerNorm, RMSNorm), MLP (GELU, SwiGLU),
grouped-query attention, q/k/v biases, sliding-window attention, tied or untied embeddings.

KVCache → positional encodings → CausalSelfAttention → MLP → Block → GPT. Attention goes
through ``scaled_dot_product_attention`` (flash kernels on GPU). Build big models with
``build_model``: parameters are created on the ``meta`` device first and only then materialised.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.errors import LmforgeError
from lmforge.model.config import Config


class KVCache:
    """Preallocated keys and values of every layer, each ``(batch, n_kv_head, max_len, head_dim)``.

    Rows are independent sequences. ``update`` writes at one position for all rows (``start`` an int)
    or at each row's own position (``start`` a (B,) tensor: batched decoding of sequences of different
    lengths, reading keys ``0:view_len``).
    """

    def __init__(self, config: Config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.kv_heads, max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.view_len: int | None = None  # keys read by per-row updates

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, H_kv, T, D) at positions ``start:start+T``; return the keys/values to attend to."""
        B, T = k.size(0), k.size(2)
        if isinstance(start, torch.Tensor):
            rows = torch.arange(B, device=k.device)
            for t in range(T):
                self.k[layer][rows, :, start + t] = k[:, :, t]
                self.v[layer][rows, :, start + t] = v[:, :, t]
            return self.k[layer][:B, :, : self.view_len], self.v[layer][:B, :, : self.view_len]
        end = start + T
        self.k[layer][:B, :, start:end] = k
        self.v[layer][:B, :, start:end] = v
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]

    def grow(self, max_len: int) -> None:
        """Hold ``max_len`` positions from now on (more than now), keeping what is stored; one layer at a time,
        so that the old and the new cache are never both whole in memory (and a failed allocation leaves a
        cache that works as before: layers already grown only hold more)."""
        for store in (self.k, self.v):
            for layer, old in enumerate(store):
                if old.size(2) < max_len:
                    new = old.new_zeros(*old.shape[:2], max_len, old.size(3))
                    new[:, :, : old.size(2)] = old
                    store[layer] = new
        self.max_len = max_len

    def row(self, r: int, n: int = 1) -> KVCache:
        """A view of rows ``r ... r + n - 1`` of this cache (writes go to them)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [k[r : r + n] for k in self.k], [v[r : r + n] for v in self.v]
        view.max_len, view.view_len = self.max_len, None
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` to row ``dst``."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def reorder(self, rows: torch.Tensor) -> None:
        """Rows become ``rows`` of the old cache (beam search keeps the beams it continues)."""
        for k, v in zip(self.k, self.v):
            k[: len(rows)] = k[rows]
            v[: len(rows)] = v[rows]


# -- positions ------------------------------------------------------------------------------------


def rope_inv_freq(config: Config, device=None) -> torch.Tensor:
    """Rotary frequencies (head_dim/2,), scaled where configured: linearly (positions divided by ``factor``, as
    transformers' "linear" rope type) or with Llama 3's scaling of the low frequencies (the default kind)."""
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    s = config.rope_scaling
    if s and s.get("rope_type") == "linear":
        return inv_freq / s["factor"]
    if s:
        # Llama 3: wavelengths longer than the original context are stretched by `factor`, short ones
        # kept, and the band between blended smoothly.
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(config: Config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``positions`` (T,) → (T, head_dim), or (B, T) → (B, 1, T, head_dim) to broadcast over
    heads; each frequency is repeated for both halves."""
    freqs = positions.float()[..., None] * rope_inv_freq(config, positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    if positions.dim() == 2:
        emb = emb[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position: pairs are (i, i + D/2), as in Hugging Face's Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
    ``positions`` (...,) → (..., dim)."""
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device).float() * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * div
    pe = torch.zeros(*positions.shape, dim, device=positions.device)
    pe[..., 0::2] = angles.sin()
    pe[..., 1::2] = angles.cos()[..., : dim // 2]
    return pe


def attention_mask(start: int, T: int, S: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, S) mask for queries at positions start..start+T-1 over keys 0..S-1, or None when
    plain causal attention (``is_causal``) or no mask at all is exact."""
    if window is None or S <= window:
        if T == 1 or S == T:
            return None  # one query sees every cached key; or a fresh causal block
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    return (k <= q) & (k > q - window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except that in bf16 or fp16 on the CPU it takes another kernel where
    that is measured faster than the flash kernel for this shape (lengths and decoding rows rounded up to a power
    of two): in training, the math backend (``precision.attention_math_speedup``: the flash kernel's backward is
    slow for short sequences, 5x slower at 37 tokens on a Xeon); for a decoding step's one query a row, the math
    backend or ``matmul_attention`` (``precision.decode_attention_kernel``: on a 2-core EPYC, 16 rows of the gpt2
    shape over 544 cached positions took 9.7 ms a layer through the flash kernel, 4.2 through
    ``matmul_attention``). The same attention, computed by another kernel."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        length = max(16, 1 << (k.size(-2) - 1).bit_length())
        kernel = "flash"
        if q.requires_grad and torch.is_grad_enabled():
            kernel = "math" if _math_attention_is_faster(q.dtype, q.size(1), q.size(-1), length) else "flash"
        elif q.size(-2) == 1 and kwargs.get("dropout_p", 0.0) == 0.0:
            rows = 1 << (q.size(0) - 1).bit_length()
            kernel = _decoding_attention(q.dtype, rows, q.size(1), k.size(1), q.size(-1), length)
        if kernel == "matmul":
            return matmul_attention(q, k, v, **kwargs)
        if kernel == "math":
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     scale: float | None = None, enable_gqa: bool = False, is_causal: bool = False,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention as two matrix products in the inputs' precision with the softmax between in fp32, as
    transformers' eager attention computes it in bf16 (each score rounded once to bf16 before the softmax, where
    SDPA's kernels keep it in fp32): for decoding steps (``T`` = 1, so ``is_causal`` changes nothing), where it
    read the cache up to 2.3x faster than SDPA's CPU kernels in bf16. Query heads share key/value heads in groups
    (``enable_gqa``) without copying the cache. A row with every key masked gets the mean of the values
    (SDPA gives 0 or NaN; the engine never reads such a row)."""
    B, H, T, D = q.shape
    if (is_causal and T > 1) or dropout_p:
        raise ValueError("matmul_attention is for decoding steps: one query a row, no causal mask, no dropout")
    kv_heads, L = k.size(1), k.size(2)
    group = H // kv_heads  # (query heads h*group ... read key/value head h, as SDPA's enable_gqa)
    # (k·qᵀ, not q·kᵀ: the cache's keys are a view of a longer cache, and the bf16 product of q with that view's
    # transpose copied it first: 243 against 126 us for one row of the gpt2 shape over 544 positions)
    scores = torch.matmul(k, q.reshape(B, kv_heads, group * T, D).transpose(-1, -2)).transpose(-1, -2).float()
    scores = scores.reshape(B, H, T, L) * (D**-0.5 if scale is None else scale)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, torch.finfo(torch.float32).min) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights.reshape(B, kv_heads, group * T, L), v).reshape(B, H, T, D)


@functools.lru_cache(maxsize=None)
def _math_attention_is_faster(dtype: torch.dtype, heads: int, head_dim: int, length: int) -> bool:
    from lmforge.precision import MARGIN, attention_math_speedup

    return attention_math_speedup(dtype, heads, head_dim, length) >= MARGIN


@functools.lru_cache(maxsize=None)
def _decoding_attention(dtype: torch.dtype, rows: int, heads: int, kv_heads: int, head_dim: int, length: int) -> str:
    from lmforge.precision import decode_attention_kernel

    return decode_attention_kernel(dtype, rows, heads, kv_heads, head_dim, length)[0]


# -- blocks ---------------------------------------------------------------------------------------


def make_norm(config: Config) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        q_out, kv_out = config.n_head * self.head_dim, config.kv_heads * self.head_dim
        # One matrix for q, k and v (out features ordered [q | k | v]): one matmul instead of three.
        self.qkv = nn.Linear(config.n_embd, q_out + 2 * kv_out, bias=config.has_qkv_bias)
        self.proj = nn.Linear(q_out, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, kv_cache: KVCache | None = None, layer: int = 0, start: int = 0,
                keep: torch.Tensor | None = None):
        """``keep`` (B, K) indices: only those positions ask (queries), every position answers (keys and
        values); the output is (B, K, n_embd)."""
        B, T, _ = x.shape
        q_out, kv_out = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_out, kv_out, kv_out], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, start, k, v)
        if keep is not None:
            q = q.gather(2, keep[:, None, :, None].expand(-1, q.size(1), -1, q.size(3)))
            mask = query_rows(mask, keep, T, k.size(2))
            T = keep.size(1)
        y = attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1 and T == k.size(2), enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, q_out)))


def query_rows(mask: torch.Tensor | None, keep: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """The rows of an attention mask over S keys (None = the last T keys are the queries, causal; (T, S);
    or (B, 1, T, S)) for the queries at indices ``keep`` (B, K) → (B, 1, K, S)."""
    if mask is None:
        return (torch.arange(S, device=keep.device)[None, None, :] <= keep[:, :, None] + (S - T))[:, None]
    if mask.dim() == 2:
        return mask[keep][:, None]
    return mask.gather(2, keep[:, None, :, None].expand(-1, mask.size(1), -1, S))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU's gate and up projections share one matrix (out features ordered [gate | up]).
        self.fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.hidden, bias=config.bias)
        self.proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.drop(self.proj(F.silu(gate) * up))
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, mask=None, kv_cache: KVCache | None = None, layer: int = 0, start: int = 0,
                keep: torch.Tensor | None = None):
        """With ``keep`` (B, K) only those positions come out (B, K, n_embd): the last block of a model that
        reads a few positions (a reward model's score) skips the rest of its attention and MLP."""
        h = self.attn(self.ln_1(x), rope, mask, kv_cache, layer, start, keep)
        if keep is not None:
            x = x.gather(1, keep[:, :, None].expand(-1, -1, x.size(2)))
        x = x + h
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.wte = embedding(config.vocab_size, config.n_embd)
        self.wpe = embedding(config.block_size, config.n_embd) if config.pos_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        # Tied embeddings use wte.weight directly in forward(): no second Parameter to keep tied.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.score = None
        self.matvec = False  # one-row products through torch.mv (``use_matvec``)
        self.onednn_head = False  # a tied head's fp32 products through oneDNN (``use_fast_kernels``)
        self.packed_head = None  # a tied head's weights packed for oneDNN (``use_fast_kernels``)
        self.head_multiple = 0  # the head's products padded to a multiple of this many rows (``aligned_linear``)
        if config.head == "sequence_classification":
            self.lm_head = None
            self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        if not self.wte.weight.is_meta:  # (nothing to draw on the meta device: build_on_meta draws once allocated)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/√(2·n_layer), zero biases."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(".proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def hidden_states(self, idx, *, kv_cache=None, start: int = 0, positions=None, attn_mask=None,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) → final normed hidden states (B, T, n_embd); with ``keep`` (B, K) indices only
        those positions' (B, K, n_embd), and the last block computes nothing else.

        By default tokens sit at positions ``start..start+T-1`` under causal attention. ``positions``
        (B, T) and a boolean ``attn_mask`` (B, 1, T, S) (True = may attend; causality included) replace
        both, for packed rows of several documents and for padded batches.
        """
        B, T = idx.shape
        c = self.config
        if positions is None:
            if start + T > c.block_size:
                raise LmforgeError(f"positions up to {start + T} exceed the model's context of {c.block_size} tokens "
                                   f"(its max_position_embeddings); give it at most {c.block_size} at a time")
            pos = torch.arange(start, start + T, device=idx.device)
            mask = attention_mask(start, T, start + T, c.sliding_window, idx.device)
        else:
            pos = positions
            mask = attn_mask
            if c.sliding_window is not None and mask is not None:
                # keys further back than the window are hidden too: cache slots are positions when decoding
                # from a cache, and the rows' own positions in a packed row
                keys = torch.arange(mask.size(-1), device=idx.device)[None, :] if kv_cache is not None else pos
                mask = mask & (keys[:, None, None, :] > pos[:, None, :, None] - c.sliding_window)
        x = self.wte(idx)
        rope = None
        if c.pos_embedding == "learned":
            x = x + self.wpe(pos)
        elif c.pos_embedding == "sinusoidal":
            x = x + sinusoidal_positions(pos, c.n_embd).to(x.dtype)
        else:
            rope = rope_cos_sin(c, pos)
        x = self.drop(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, kv_cache, i, start, keep if i == last else None)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ):
        """Token ids ``idx`` (B, T) → logits (B, T, vocab); positions and masking as in ``hidden_states``.

        With ``last_only`` only the last position's logits (B, 1, vocab) are computed (generation); with
        ``select``, a boolean (B, T), only those positions' logits (N, vocab), in row-major order (losses
        on answer tokens: the vocabulary projection is skipped where nothing is learned).
        With ``targets`` (B, T; -100 is ignored) returns ``(logits, mean cross-entropy)``.
        A model with a classification head returns its scores (B, num_labels) instead (``targets``: labels (B,)).
        With ``keep`` (B, K) indices only those positions are computed through the last block, and the
        output is theirs: logits (B, K, vocab), or a classification head's scores (B, K, num_labels).
        """
        x = self.hidden_states(idx, kv_cache=kv_cache, start=start, positions=positions, attn_mask=attn_mask, keep=keep)
        if keep is not None:
            return self.score(x) if self.score is not None else self.lm_logits(x)
        if self.score is not None:
            return self._classify(idx, x, targets)
        if last_only:
            # (contiguous: given a strided (B > 1, 1, C) view, F.linear runs a batched product that first copies
            # the head's weight once per row, 2.5 GB for 16 rows at the gpt2 shape)
            x = x[:, -1:].contiguous()
        elif select is not None:
            x = x[select]
        logits = self.lm_logits(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., n_embd) → next-token logits (..., vocab)."""
        # (a module call, not F.linear with its weight, so that a quantised or LoRA head works too)
        if self.lm_head is not None:
            if self.head_multiple and type(self.lm_head) is nn.Linear:
                return aligned_linear(hidden, self.lm_head.weight, self.head_multiple)
            return self.lm_head(hidden)
        if self.head_multiple:
            return aligned_linear(hidden, self.wte.weight, self.head_multiple)
        weight = self.packed_head if self.packed_head is not None else self.wte.weight
        return linear(hidden, weight, matvec=self.matvec, onednn=self.onednn_head)

    def _classify(self, idx: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor | None):
        """Sequence classification: scores (B, num_labels) read at each row's last non-padding token
        (rows are right-padded with ``config.pad_token_id``), as transformers does; with ``labels`` (B,)
        also the mean cross-entropy."""
        last = last_tokens(idx, self.config.pad_token_id)
        logits = self.score(hidden[torch.arange(idx.size(0), device=idx.device), last])
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.float(), labels)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, matvec: bool = False,
           onednn: bool = False) -> torch.Tensor:
    """``F.linear``; with ``matvec``, an input of one row (batch-1 decoding) goes through ``torch.mv``, a
    matrix-vector kernel that some CPUs run much faster than ``linear``'s in bf16 (the precision probe
    measures it: ``precision.matvec_speedup``); with ``onednn``, fp32 products in no-grad mode go through
    oneDNN's fp32 kernel instead of BLAS's (``precision.linear_kernels``: on a 2-core EPYC the gpt2 head's
    product ran 2.2x faster so at 1 row and 2.4x at 16), except in a graph ``torch.compile`` builds. Same
    arithmetic, another kernel. A weight packed into oneDNN's layout (``precision.pack_weight``) goes through
    oneDNN's kernel, the one that reads it."""
    if weight.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if matvec and x.numel() == x.size(-1) and x.dtype == weight.dtype:
        y = torch.mv(weight, x.reshape(-1))
        return (y if bias is None else y + bias).view(*x.shape[:-1], -1)
    if (onednn and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):  # (a compiled graph picks its own kernels)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, multiple: int, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed with the weight's rows padded with zeros to a multiple of ``multiple``
    and the padding's columns cut from the result: the same numbers. A vocabulary such as GPT-2's 50,257 makes
    the head's output rows an odd number of bf16 values, which GPU kernels handle less well than aligned rows
    (nanoGPT pads its vocabulary to 50,304 for this); padding here keeps the model's vocabulary, its checkpoint
    and its softmax as they are. The training loop sets it on GPUs (the models' ``head_multiple``). Measured on
    an H200 (gpt2-124M, 32 × 1024 tokens, compiled, bf16): the same tokens/s within the runs' noise, 3.1 GB
    less peak memory (21.2 against 24.3 GB)."""
    rows = weight.size(0)
    if not multiple or rows % multiple == 0:
        return F.linear(x, weight, bias)
    pad = -rows % multiple
    return F.linear(x, F.pad(weight, (0, 0, 0, pad)), None if bias is None else F.pad(bias, (0, pad)))[..., :rows]


def _matvec_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias, matvec=True)


def _onednn_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias, onednn=True)


def use_matvec(model: nn.Module) -> None:
    """Run ``model``'s one-row products through ``torch.mv`` (see ``linear``): each plain ``nn.Linear``
    gets a forward bound to itself (so a deep copy keeps its own weights), and a tied head is flagged."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_matvec_forward, module)
    model.matvec = True


def _dense_state(module, state: dict, prefix: str, local_metadata) -> None:
    """A state dict of plain tensors from a model with weights packed for oneDNN (``use_fast_kernels``)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.layout == torch._mkldnn:
            state[key] = value.to_dense()


def use_fast_kernels(model: nn.Module, rows: int, pack: bool = True) -> str:
    """For inference on the CPU with up to ``rows`` rows a step: run ``model``'s products through the kernel
    measured fastest on this machine for its weights' precision and the row counts a step passes through as
    sequences finish (``precision.linear_kernels``), chosen apart for the output head and for the body (every
    other ``nn.Linear``). Returns what it chose, in words.

    fp32 weights: BLAS on the weights as ``nn.Linear`` stores them; BLAS on the weights stored transposed
    (columns contiguous: the same values and ``F.linear`` calls, only the strides change); oneDNN's fp32
    kernel (the modules' forward bound to it; the tied head flagged), in no-grad mode only; or (with ``pack``)
    oneDNN's kernel on the weights packed into its blocked layout, as below. BLAS's kernel for a few rows is
    much slower than it can be on some CPUs: on a 2-core EPYC, oneDNN ran the gpt2 head 2.2x faster at 1 row
    and its body 1.6x, and packed fp32 weights took T5 generation at 8 rows from 1.4x to 1.7-2.0x
    transformers' speed (tiny shape); on a 2-core Xeon the transposed head ran 2.0x faster at 8 rows.

    bf16 and fp16 weights: as stored, or (with ``pack``) packed into oneDNN's blocked layout, which its kernel
    reads at 24 GB/s on the EPYC where PyTorch's bf16 products read 12-17 (the same values: the packed weight
    replaces the module's, and ``state_dict`` gives them back plain). A tied head's packed weights are a copy
    (the embedding reads the plain ones): the vocabulary's matrix twice in memory. Leave ``pack`` off for a
    graph ``torch.compile`` builds, which cannot take them (where packed fp32 was measured fastest, the weights
    then stay plain and go through oneDNN's kernel outside a compiled graph).

    For inference only: not for a model that will train on (its optimizer state and DDP's buckets expect the
    layout they were made with; packed weights have no gradient)."""
    from lmforge.precision import MARGIN, linear_kernels, pack_weight

    tied = next((m for m in (getattr(model, "wte", None), getattr(model, "shared", None)) if m is not None), None)
    untied = getattr(model, "lm_head", None)
    head_module = untied if type(untied) is nn.Linear else None
    head = head_module.weight if head_module is not None else (tied.weight if untied is None and tied else None)
    body = [m for m in model.modules() if type(m) is nn.Linear and m is not head_module]
    dtype = head.dtype if head is not None else None
    if (rows < 1 or not body or head is None or getattr(model, "quantized", None)
            or any(w.device.type != "cpu" or w.dtype != dtype or w.layout != torch.strided
                   for w in [head, *(m.weight for m in body)])
            or (dtype != torch.float32 and not pack)):
        return "as loaded"
    chosen = linear_kernels(dtype, head.size(1), head.size(0), min(rows, 16))
    said = []
    for group, modules in (("head", [head_module] if head_module else []), ("body", body)):
        kernel, speedup = chosen[group]
        if kernel == "packed" and not pack:
            kernel = "onednn"  # (fp32: the same kernel on the weights as stored; bf16 and fp16 returned above)
        if kernel == "plain" or speedup < MARGIN:
            continue
        if kernel == "packed":
            if group == "head" and not modules:
                model.packed_head = pack_weight(head, min(rows, 16))
                packed = model.packed_head is not None
            else:  # one matrix at a time, each replacing the module's own: never the body twice in memory
                packed = False
                for module in modules:
                    weight = pack_weight(module.weight, min(rows, 16))
                    if weight is not None:
                        module.weight = nn.Parameter(weight, requires_grad=False)
                        module.forward = types.MethodType(_onednn_forward, module)
                        packed = True
            if packed:
                said.append(f"{group} packed for oneDNN" + ("" if modules else " (a copy of the tied embedding)"))
                if not getattr(model, "_dense_state_hook", None):
                    model._dense_state_hook = model._register_state_dict_hook(_dense_state)
            continue
        said.append(f"{group} {'stored transposed' if kernel == 'transposed' else 'through oneDNN'}")
        if kernel == "transposed":
            with torch.no_grad():
                for w in [head] if group == "head" else [m.weight for m in modules]:
                    if w.is_contiguous():
                        w.data = w.data.t().contiguous().t()
        else:
            for module in modules:
                module.forward = types.MethodType(_onednn_forward, module)
            if group == "head":
                model.onednn_head = True
    return ", ".join(said) or "as loaded"


def last_tokens(idx: torch.Tensor, pad: int | None) -> torch.Tensor:
    """Each row's last token that is not ``pad`` (B,), where a classification head reads: transformers'
    rule, so a pad token that is also the end-of-text token is not read either."""
    real = idx != pad if pad is not None else torch.ones_like(idx, dtype=torch.bool)
    return (torch.arange(idx.size(1), device=idx.device) * real).argmax(-1)


def build_model(config: Config, device: torch.device | str = "cpu", init: bool = True) -> GPT:
    """Create the model on the meta device, then allocate on ``device`` (and initialise if ``init``)."""
    return build_on_meta(GPT, config, device, init)


_DEFERRING = [False]


@contextlib.contextmanager
def deferred_init(enabled: bool = True):
    """While active, models are built on the ``meta`` device and left there (``build_on_meta``), and
    model folders are opened without copying their weights (``load_model`` keeps them, memory-mapped, as
    ``model.pending_weights``); ``materialize`` gives them memory later, shard by shard."""
    before = _DEFERRING[0]
    _DEFERRING[0] = enabled
    try:
        yield
    finally:
        _DEFERRING[0] = before


def deferring() -> bool:
    return _DEFERRING[0]


def new_weights_device(model: nn.Module) -> torch.device:
    """Where weights added to ``model`` (a task head, LoRA adapters) go: beside its own, or on the CPU while it
    is a folder opened for sharding (on the meta device, with ``pending_weights``), where ``materialize``
    keeps them when the rest gets its memory. Their random values are drawn on the CPU whatever the device
    (``drawn_on_cpu``), so a seed gives the same new weights on one GPU as under FSDP or on the CPU."""
    first = next(model.parameters())
    return torch.device("cpu") if first.is_meta and hasattr(model, "pending_weights") else first.device


def drawn_on_cpu(tensor: torch.Tensor, init, device: torch.device) -> torch.Tensor:
    """``init(tensor)`` drawn from the CPU's random numbers, then put on ``device`` (on the meta device
    nothing is drawn: the weights get their values later)."""
    if torch.device(device).type == "meta":
        return tensor.to(device)
    with torch.no_grad():
        init(tensor)
    return tensor.to(device)


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``, except that on the meta device (``build_on_meta``) it does not draw its weights:
    the model's ``init_weights`` draws them, and ``normal_`` on a meta tensor imports ``torch._dynamo`` (1.4-2.1 s on
    a 2-core CPU, torch 2.13), which every command that builds a model, and every rank, would pay at start."""
    weight = torch.empty(num, dim)
    return nn.Embedding(num, dim, _weight=weight) if weight.is_meta else nn.Embedding(num, dim)


def build_on_meta(cls, config, device, init: bool):
    """``cls(config)`` with no memory (the meta device), then allocated on ``device`` and, if ``init``,
    initialised: a 70B config is inspected without 276 GB, and loading skips a wasted initialisation."""
    with torch.device("meta"):
        model = cls(config)
    if str(device) == "meta":
        return model
    if deferring() and init:  # sharded training: materialised later, one shard each (train/distributed.py: materialize)
        model.init_rng_state = torch.get_rng_state()
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights()
    return model
