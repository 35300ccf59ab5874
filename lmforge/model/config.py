"""`Config`: every shape and switch of the decoder, and the named presets.

One decoder serves every family through these fields; ``family`` names the Hugging Face
``model_type`` a checkpoint is saved as:

    family    positions   norm       MLP     attention
    gpt2      learned     LayerNorm  GELU    biases everywhere
    llama     rope        RMSNorm    SwiGLU  no biases; grouped-query (n_kv_head)
    qwen2     rope        RMSNorm    SwiGLU  q/k/v biases only
    mistral   rope        RMSNorm    SwiGLU  sliding-window attention
    lmforge   any combination (e.g. sinusoidal positions), saved in lmforge's own config.json layout
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from lmforge.errors import LmforgeError

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "lmforge")


@dataclass(frozen=True)
class Config:
    vocab_size: int = 50257
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head; 1: multi-query)
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int | None = None  # MLP width; None: 4 * n_embd
    # switches
    family: str = "gpt2"  # the Hugging Face model_type a checkpoint is saved as (see the module docstring)
    pos_embedding: str = "learned"  # "learned" (GPT-2), "rope" (rotary), "sinusoidal" (Vaswani et al. 2017)
    rope_theta: float = 10000.0
    # Llama 3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings; or rope_type "linear": factor
    rope_scaling: dict | None = None
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu": fc → activation → proj; "swiglu": down(silu(gate) · up)
    activation: str = "gelu_tanh"  # of the "gelu" MLP: "gelu_tanh" (GPT-2's gelu_new) or "gelu" (exact)
    norm_eps: float = 1e-5
    bias: bool = True  # biases in every Linear and LayerNorm
    qkv_bias: bool | None = None  # biases on q/k/v only (Qwen2); None: follows `bias`
    sliding_window: int | None = None  # each token sees itself and the previous window-1 tokens (Mistral)
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # task head: None (language modelling) or "sequence_classification" (a score over the last real token)
    head: str | None = None
    num_labels: int = 2
    labels: tuple[str, ...] | None = None
    pad_token_id: int | None = None  # classification: the padding id, to find each row's last real token

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be a positive integer, got {getattr(self, name)}")
        choices = {
            "family": FAMILIES,
            "pos_embedding": ("learned", "rope", "sinusoidal"),
            "norm": ("layernorm", "rmsnorm"),
            "mlp": ("gelu", "swiglu"),
            "activation": ("gelu_tanh", "gelu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"{name} {getattr(self, name)!r} is not supported; use one of: {', '.join(allowed)}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise LmforgeError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head} (or set head_dim)")
        if self.n_head % self.kv_heads:
            raise LmforgeError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.kv_heads}")
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise LmforgeError(f"rotary embeddings need an even head_dim, got {self.head_size}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise LmforgeError(f"sliding_window must be at least 1, got {self.sliding_window}")
        if self.head not in (None, "sequence_classification"):
            raise LmforgeError(f"head {self.head!r} is not supported on a decoder; use sequence_classification")
        problem = self._family_problem()
        if problem:
            raise LmforgeError(
                f"family {self.family!r} needs {problem}; change the switch, or use family 'lmforge' "
                f"(saved in lmforge's own config.json layout)"
            )

    def _family_problem(self) -> str | None:
        """What keeps this config from being saved as its ``family`` in Hugging Face's layout."""
        if self.family == "lmforge":
            return None
        if self.family == "gpt2":
            wanted = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
                      "kv_heads": self.n_head, "head_size": self.n_embd // self.n_head, "has_qkv_bias": True,
                      "sliding_window": None}
        else:
            wanted = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                      "has_qkv_bias": self.family == "qwen2"}
            if self.family == "llama":
                wanted["sliding_window"] = None
        wrong = [f"{k}={v!r}" for k, v in wanted.items() if getattr(self, k) != v]
        return ", ".join(wrong) if wrong else None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Config:
        if name not in PRESETS:
            raise LmforgeError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown model config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if k == "labels" and v else v for k, v in d.items()})

    # -- size and cost, from the shape alone (a 70B config needs no memory to inspect) ---------

    def _layer_params(self) -> tuple[int, int]:
        """(matrix weights, other weights) of one block."""
        d, h = self.n_embd, self.hidden
        q, kv = self.n_head * self.head_size, self.kv_heads * self.head_size
        mlp_in = 2 * h if self.mlp == "swiglu" else h
        matrices = d * (q + 2 * kv) + q * d + d * mlp_in + h * d
        norm = 2 * d if self.norm == "layernorm" and self.bias else d
        biases = (q + 2 * kv if self.has_qkv_bias else 0) + ((d + mlp_in + d) if self.bias else 0)
        return matrices, 2 * norm + biases

    def num_params(self) -> int:
        matrices, other = self._layer_params()
        d, v = self.n_embd, self.vocab_size
        positions = self.block_size * d if self.pos_embedding == "learned" else 0
        final_norm = 2 * d if self.norm == "layernorm" and self.bias else d
        head = 0 if self.tie_embeddings else v * d
        if self.head == "sequence_classification":
            head = self.num_labels * d  # a score matrix replaces the language-model head
        return v * d + positions + self.n_layer * (matrices + other) + final_norm + head

    def matmul_params(self) -> int:
        """Weights used in matrix products per token: every Linear plus the output head."""
        return self.n_layer * self._layer_params()[0] + self.vocab_size * self.n_embd

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """FLOPs per token: 2 per matmul weight plus attention scores and values (4·L·T·heads·head_dim),
        ×3 to train (forward + backward)."""
        seq_len = seq_len or self.block_size
        forward = 2 * self.matmul_params() + 4 * self.n_layer * seq_len * self.n_head * self.head_size
        return 3 * forward if training else forward


_LLAMA = dict(family="llama", pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
              norm_eps=1e-5)
_LLAMA3_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, Config] = {
    # A few million parameters: trains visibly on a laptop CPU in minutes.
    "tiny": Config(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256),
    "mini": Config(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384),
    # The same size in the Llama layout (rotary, RMSNorm, SwiGLU, grouped-query attention).
    "tiny-llama": Config(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                         mlp_hidden=688, **{**_LLAMA, "tie_embeddings": True}),
    # The published GPT-2 shapes.
    "gpt2": Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": Config(n_layer=48, n_head=25, n_embd=1600),
    # Llama 3.2 1B and 3B.
    "llama-1b": Config(vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                       mlp_hidden=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                       **{**_LLAMA, "tie_embeddings": True}),
    "llama-3b": Config(vocab_size=128256, block_size=131072, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072,
                       mlp_hidden=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                       **{**_LLAMA, "tie_embeddings": True}),
    # Llama 2 7B, 13B and 70B.
    "llama-7b": Config(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008,
                       **{**_LLAMA, "norm_eps": 1e-5}),
    "llama-13b": Config(vocab_size=32000, block_size=4096, n_layer=40, n_head=40, n_embd=5120, mlp_hidden=13824,
                        **_LLAMA),
    "llama-70b": Config(vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_kv_head=8, n_embd=8192,
                        mlp_hidden=28672, **_LLAMA),
}
