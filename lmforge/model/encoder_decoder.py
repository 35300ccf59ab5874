"""The encoder-decoder Transformer (T5 family), top to bottom in the order data flows.

An encoder reads the source with bidirectional attention; a decoder writes the target one token at a
time with causal self-attention and cross-attention over the encoder's output. T5's choices: no
position embeddings but a learned bias per head added to the attention scores, indexed by the
bucketed distance between query and key (bidirectional buckets in the encoder, causal ones in the
decoder), computed once in the first block of each stack and shared by the others; RMS norms with
no bias before each sub-layer (pre-norm); no 1/sqrt(d) scaling of the scores; a ReLU feed-forward
(T5 v1.0) or gated GELU (v1.1, Flan-T5); no biases anywhere. The output head is the shared
embedding matrix (``tied``) or its own; T5 v1.0 scales the decoder output by ``d_model ** -0.5``
before a tied head (``scale_output``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.gpt import aligned_linear, attention, embedding, linear

# The feed-forward's activation, by transformers' names: ``feed_forward`` is ``ACT`` or ``gated-ACT`` (T5 v1.1:
# ``act(wi_0 x) * wi_1 x``). As in transformers, "gated-gelu" means the tanh approximation (gelu_new), plain
# "gelu" the exact one.
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_python": F.gelu,
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu6": F.relu6,
    "relu2": lambda x: F.relu(x).square(),
    "leaky_relu": F.leaky_relu,
    "linear": lambda x: x,
}


def feed_forward_activation(feed_forward: str):
    """(gated, activation) of a ``feed_forward`` name such as "relu", "gated-gelu" or "gated-silu"."""
    gated, _, act = str(feed_forward).rpartition("-")
    if gated not in ("", "gated") or act not in ACTIVATIONS:
        raise LmforgeError(f"feed_forward {feed_forward!r} is not supported; use one of {', '.join(ACTIVATIONS)}, "
                           f"or gated-NAME of one of them")
    return gated == "gated", ACTIVATIONS["gelu_new" if feed_forward == "gated-gelu" else act]


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width (T5 sets it apart from d_model / n_head)
    d_ff: int = 2048
    n_layer: int = 6  # encoder blocks
    n_decoder_layer: int = 6
    n_head: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    feed_forward: str = "relu"  # ACT or gated-ACT, ACT one of ACTIVATIONS
    dropout: float = 0.1
    norm_eps: float = 1e-6
    tied: bool = True  # the output head is the shared embedding matrix
    scale_output: bool = True  # decoder output × d_model ** -0.5 before the head (T5 v1.0)
    init_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    block_size: int = 512  # longest source or target lmforge feeds it (relative positions have no limit)

    def __post_init__(self):
        feed_forward_activation(self.feed_forward)  # (refuses a name it does not know)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Seq2SeqConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each ``key - query`` distance. Half the buckets (per direction, when bidirectional) are exact
    distances 0, 1, 2, ...; the rest grow logarithmically up to ``max_distance``, beyond which all distances
    share the last bucket. Causal (decoder): only keys at or before the query count; later ones fall in 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets  # keys after the query use the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    logarithmic = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                           * (num_buckets - exact)).long()
    # (where max_distance is at most ``exact``, the logarithm is undefined from distance ``exact`` on: transformers
    # fails there, and a decoding step's bias table, which holds distances not reached yet, must still index)
    logarithmic = logarithmic.clamp(exact, num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, logarithmic)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square (in fp32), no centring, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same arithmetic in one kernel
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed


class Attention(nn.Module):
    """Multi-head attention with no bias and no score scaling; the position bias comes in as ``bias``."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        inner = config.n_head * config.d_kv
        self.n_head, self.d_kv, self.dropout = config.n_head, config.d_kv, config.dropout
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.n_head, self.d_kv).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(source)), self.heads(self.v(source))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, T, d_model) attends to ``kv`` (given: a cache) or to ``source``'s (cross-attention) or its own
        keys and values; ``bias`` (B or 1, heads or 1, T, S) is added to the scores (-inf where not allowed)."""
        k, v = kv if kv is not None else self.keys_values(x if source is None else source)
        y = attention(self.heads(self.q(x)), k, v, attn_mask=bias.to(x.dtype), scale=1.0,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


class FeedForward(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.gated, self.act = feed_forward_activation(config.feed_forward)
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(_drop(self.drop, hidden))


class EncoderBlock(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.ln_attn = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ln_ff = RMSNorm(config.d_model, config.norm_eps)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + _drop(self.drop, self.attn(self.ln_attn(x), bias))
        return x + _drop(self.drop, self.ff(self.ln_ff(x)))


class DecoderBlock(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.ln_self = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.ln_cross = RMSNorm(config.d_model, config.norm_eps)
        self.cross_attn = Attention(config)
        self.ln_ff = RMSNorm(config.d_model, config.norm_eps)
        self.ff = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, cross_bias: torch.Tensor,
                memory: torch.Tensor | None = None, cache: dict | None = None) -> torch.Tensor:
        """``memory``: the encoder's output, or None when ``cache`` holds its keys and values ("cross")
        beside the self-attention's of the tokens decoded so far ("self", extended here: ``_extend``)."""
        h = self.ln_self(x)
        kv = None
        if cache is not None:
            kv = _extend(cache, *self.self_attn.keys_values(h))
        x = x + _drop(self.drop, self.self_attn(h, self_bias, kv))
        h = self.ln_cross(x)
        if cache is not None and "cross" not in cache:
            cache["cross"] = self.cross_attn.keys_values(memory)
        cross = cache["cross"] if cache is not None else None
        x = x + _drop(self.drop, self.cross_attn(h, cross_bias, cross, memory))
        return x + _drop(self.drop, self.ff(self.ln_ff(x)))


def _extend(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append a step's self-attention keys and values to ``cache["self"]`` (B, H, length, D) and return it.
    The tensors live in a preallocated ``cache["buffer"]`` that doubles when full, so a step writes its
    own positions instead of copying the whole past (``cache["self"]`` are views of its first ``length``)."""
    past = cache["self"][0].size(2) if "self" in cache else 0
    end = past + k.size(2)
    buffer = cache.get("buffer")
    if buffer is None or buffer[0].size(2) < end or buffer[0].size(0) != k.size(0):
        capacity = max(end, 2 * buffer[0].size(2) if buffer is not None else 16)
        buffer = tuple(k.new_empty(k.size(0), k.size(1), capacity, k.size(3)) for _ in range(2))
        for new, old in zip(buffer, cache.get("self", ())):
            new[:, :, :past] = old
        cache["buffer"] = buffer
    buffer[0][:, :, past:end] = k
    buffer[1][:, :, past:end] = v
    cache["self"] = (buffer[0][:, :, :end], buffer[1][:, :, :end])
    return cache["self"]


def select_rows(cache: list[dict], rows: torch.Tensor) -> None:
    """Keep (or reorder, or repeat) the rows ``rows`` of a decoding cache, in place: the self-attention keys and
    values (their buffer) and the cross-attention's. The position-bias table is the same for every row. Columns
    that only rows gone were using (before every kept row's start, ``join_rows``) are dropped."""
    for layer in cache:
        if "cross" in layer:
            layer["cross"] = tuple(t[rows] for t in layer["cross"])
        if "self" in layer:
            length = layer["self"][0].size(2)
            layer["buffer"] = tuple(t[rows] for t in layer["buffer"])
            layer["self"] = tuple(t[:, :, :length] for t in layer["buffer"])
    if "starts" in cache[0]:
        starts = cache[0]["starts"][rows]
        first = int(starts.min()) if starts.numel() else 0
        if first > 0:  # (views: a column's distance to the next query, all the position bias reads, stays the same)
            for layer in cache:
                layer["buffer"] = tuple(t[:, :, first:] for t in layer["buffer"])
                layer["self"] = tuple(t[:, :, first:] for t in layer["self"])
            starts = starts - first
        if starts.any():
            cache[0]["starts"] = starts
        else:  # every row from the first column again: no per-row mask
            del cache[0]["starts"]


def join_rows(cache: list[dict], mask: torch.Tensor, new_cache: list[dict], new_mask: torch.Tensor) -> torch.Tensor:
    """Add the rows of ``new_cache`` -- sequences that have decoded only their start token, over sources with
    the padding ``new_mask`` -- to a running decoding ``cache`` (sources ``mask``), in place; returns the joined
    rows' source mask. Continuous batching for an encoder-decoder: every row writes its next keys and values at
    the same column, so the newcomers' start token goes in the column the others wrote last, and
    ``cache[0]["starts"]`` keeps each row's first column: the columns before it are masked in its self-attention
    (their keys are zeros). The position bias depends only on a key's distance to the query, the same in columns
    as in each row's own positions. The sources are padded to the longer of the two (masked, zeros)."""
    length = cache[0]["self"][0].size(2)
    width = max(mask.size(1), new_mask.size(1))
    starts = cache[0].get("starts", torch.zeros(mask.size(0), dtype=torch.long, device=mask.device))
    for layer, new in zip(cache, new_cache, strict=True):
        joined = []
        for old, fresh in zip(layer["buffer"], new["self"]):
            rows = old.new_zeros(fresh.size(0), old.size(1), old.size(2), old.size(3))
            rows[:, :, length - 1] = fresh[:, :, 0]
            joined.append(torch.cat([old, rows]))
        layer["buffer"] = tuple(joined)
        layer["self"] = tuple(t[:, :, :length] for t in joined)
        layer["cross"] = tuple(torch.cat([F.pad(a, (0, 0, 0, width - a.size(2))), F.pad(b, (0, 0, 0, width - b.size(2)))])
                               for a, b in zip(layer["cross"], new["cross"]))
    cache[0]["starts"] = torch.cat([starts, torch.full((new_mask.size(0),), length - 1, dtype=torch.long,
                                                       device=starts.device)])
    return torch.cat([F.pad(mask, (0, width - mask.size(1))), F.pad(new_mask, (0, width - new_mask.size(1)))])


class Stack(nn.Module):
    """The encoder's or the decoder's blocks, their position bias table and final norm."""

    def __init__(self, config: Seq2SeqConfig, decoder: bool):
        super().__init__()
        self.decoder = decoder
        n = config.n_decoder_layer if decoder else config.n_layer
        self.blocks = nn.ModuleList((DecoderBlock if decoder else EncoderBlock)(config) for _ in range(n))
        self.relative_bias = embedding(config.num_buckets, config.n_head)
        self.ln_f = RMSNorm(config.d_model, config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.config = config

    def step_bias(self, cache: dict, position: int, dtype) -> torch.Tensor:
        """(1, heads, 1, position + 1): ``position_bias`` of the one query at ``position`` over keys 0 ... position
        (all allowed), a slice of a table of the bias of every distance kept in ``cache`` (grown by doubling).
        Column j of the table is distance n - 1 - j, so the keys 0 ... position are its last position + 1 columns."""
        table = cache.get("bias_table")
        if table is None or table.size(-1) <= position or table.dtype != dtype:
            c, n = self.config, max(64, 2 * (position + 1))
            distance = torch.arange(n - 1, -1, -1, device=self.relative_bias.weight.device)
            buckets = relative_position_bucket(-distance, not self.decoder, c.num_buckets, c.max_distance)
            table = cache["bias_table"] = self.relative_bias(buckets).T[None, :, None, :].to(dtype)
        return table[..., table.size(-1) - 1 - position:]

    def position_bias(self, queries: int, keys: int, offset: int, device) -> torch.Tensor:
        """(1, heads, queries, keys): the learned bias of each key's distance from each query (queries at
        positions ``offset ...``)."""
        c = self.config
        relative = torch.arange(keys, device=device)[None, :] - (torch.arange(queries, device=device)[:, None] + offset)
        buckets = relative_position_bucket(relative, not self.decoder, c.num_buckets, c.max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]


def _drop(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``dropout(x)``, skipped (not even called) where it does nothing: in eval mode or at p = 0."""
    return dropout(x) if dropout.training and dropout.p > 0 else x


def _cached_padding_bias(cache: dict, mask: torch.Tensor | None, dtype) -> torch.Tensor | float:
    """``_padding_bias`` of ``mask``, made once per mask tensor a decoding run passes (kept in ``cache``)."""
    if cache.get("mask") is not mask or cache.get("padding_bias_dtype") != dtype:
        cache.update(mask=mask, padding_bias=_padding_bias(mask, dtype), padding_bias_dtype=dtype)
    return cache["padding_bias"]


def _padding_bias(mask: torch.Tensor | None, dtype) -> torch.Tensor | float:
    """(B, 1, 1, S) of 0 for real tokens and -inf (the dtype's lowest) for padding; 0 with no mask."""
    if mask is None:
        return 0.0
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]


class EncoderDecoder(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.shared = embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, decoder=False)
        self.decoder = Stack(config, decoder=True)
        self.lm_head = None if config.tied else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.matvec = False  # one-row products through torch.mv (gpt.use_matvec)
        self.onednn_head = False  # the head's fp32 products through oneDNN (gpt.use_fast_kernels)
        self.head_multiple = 0  # the head's products padded to a multiple of this many rows (gpt.aligned_linear)
        self.packed_head = None  # a tied head's weights packed for oneDNN (gpt.use_fast_kernels)
        if not self.shared.weight.is_meta:  # (nothing to draw on the meta device: build_on_meta draws once allocated)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation: each matrix N(0, (fan-in)^-1/2), embeddings N(0, 1), norms 1."""
        c, f = self.config, self.config.init_factor
        nn.init.normal_(self.shared.weight, std=f)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=f)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Attention):
                for name, fan_in in (("q", c.d_model * c.d_kv), ("k", c.d_model), ("v", c.d_model), ("o", c.n_head * c.d_kv)):
                    nn.init.normal_(getattr(module, name).weight, std=f * fan_in ** -0.5)
            elif isinstance(module, FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(module, name):
                        nn.init.normal_(getattr(module, name).weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(module.wo.weight, std=f * c.d_ff ** -0.5)
            elif isinstance(module, Stack):
                nn.init.normal_(module.relative_bias.weight, std=f * c.d_model ** -0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) → the encoder's output (B, S, d_model); ``attention_mask`` 1 = token, 0 = padding."""
        stack = self.encoder
        x = _drop(stack.drop, self.shared(input_ids))
        bias = stack.position_bias(input_ids.size(1), input_ids.size(1), 0, input_ids.device) \
            + _padding_bias(attention_mask, x.dtype)
        for block in stack.blocks:
            x = block(x, bias)
        return _drop(stack.drop, stack.ln_f(x))

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, cache: list[dict] | None = None) -> torch.Tensor:
        """Target ids so far (B, T) → logits (B, T, vocab). ``memory``: the encoder's output (B, S, d_model)
        and ``attention_mask`` its padding. ``cache`` (one dict per block, empty at first) keeps the keys and
        values of earlier calls: each call then passes only the new tokens (``memory`` may be None after the
        first)."""
        stack = self.decoder
        past = cache[0]["self"][0].size(2) if cache is not None and "self" in cache[0] else 0
        T = decoder_input_ids.size(1)
        x = _drop(stack.drop, self.shared(decoder_input_ids))
        if cache is not None and T == 1 and not torch.is_grad_enabled():  # a decoding step: biases kept with the cache
            self_bias = stack.step_bias(cache[0], past, x.dtype)
            if "starts" in cache[0]:  # rows that joined later (join_rows): the columns before their start are not theirs
                late = torch.arange(past + 1, device=x.device)[None, :] < cache[0]["starts"][:, None]
                self_bias = self_bias.masked_fill(late[:, None, None, :], torch.finfo(x.dtype).min)
            cross_bias = _cached_padding_bias(cache[0], attention_mask, x.dtype)
        else:
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            self_bias = stack.position_bias(T, past + T, past, x.device).masked_fill(~causal, torch.finfo(x.dtype).min)
            cross_bias = _padding_bias(attention_mask, x.dtype)
        if not isinstance(cross_bias, torch.Tensor):
            cross_bias = torch.zeros(1, 1, 1, 1, dtype=x.dtype, device=x.device)
        for i, block in enumerate(stack.blocks):
            x = block(x, self_bias, cross_bias, memory, cache[i] if cache is not None else None)
        x = _drop(stack.drop, stack.ln_f(x))
        if self.config.scale_output:
            x = x * self.config.d_model ** -0.5
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):  # an int8 head (quantize_int8)
            return self.lm_head(x)
        if self.head_multiple:
            return aligned_linear(x, self.lm_head.weight if self.lm_head is not None else self.shared.weight,
                                  self.head_multiple)
        weight = self.lm_head.weight if self.lm_head is not None else (
            self.packed_head if self.packed_head is not None else self.shared.weight)
        return linear(x, weight, matvec=self.matvec, onednn=self.onednn_head)

    @property
    def start_token_id(self) -> int:
        """The token generation starts the decoder from: generation_config.json's ``decoder_start_token_id`` where
        the model's folder names one (transformers' ``generate`` reads it there), else config.json's, which is the
        one training shifts the labels with (``shift_right``, as transformers' T5 does)."""
        start = (getattr(self, "generation_settings", None) or {}).get("decoder_start_token_id")
        if isinstance(start, int) and not isinstance(start, bool) and 0 <= start < self.config.vocab_size:
            return start
        return self.config.decoder_start_token_id

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's input for ``labels``: the start token, then the labels but the last (-100 as padding)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], 1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, vocab), mean cross-entropy over ``labels`` that are not -100, or None)."""
        if decoder_input_ids is None:
            if labels is None:
                raise LmforgeError("an encoder-decoder needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        logits = self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_encoder_decoder(config: Seq2SeqConfig, device="cpu", init: bool = True) -> EncoderDecoder:
    from lmforge.model.gpt import build_on_meta

    return build_on_meta(EncoderDecoder, config, device, init)
