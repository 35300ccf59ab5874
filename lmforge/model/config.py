"""`Config`: every shape and switch of the decoder, and the named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Config:
    """Shape and switches of the decoder (GPT-2 family: learned positions, LayerNorm, GELU MLP)."""

    vocab_size: int = 50257
    block_size: int = 1024  # context length: the number of learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int | None = None  # MLP width; None means 4 * n_embd
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) or "gelu" (exact erf)
    layer_norm_eps: float = 1e-5
    bias: bool = True  # biases in every Linear and LayerNorm
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise LmforgeError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise LmforgeError(f"activation {self.activation!r} is not supported; use gelu_tanh or gelu")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

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
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- size and cost, from the shape alone (a 70B config needs no memory to inspect) ---------

    def num_params(self) -> int:
        d, h, v = self.n_embd, self.hidden, self.vocab_size
        b = 1 if self.bias else 0
        layer_norm = (2 if self.bias else 1) * d
        per_layer = 2 * layer_norm + (d * 3 * d + b * 3 * d) + (d * d + b * d) + (d * h + b * h) + (h * d + b * d)
        head = 0 if self.tie_embeddings else v * d
        return v * d + self.block_size * d + self.n_layer * per_layer + layer_norm + head

    def matmul_params(self) -> int:
        """Weights used in matrix products per token: every Linear plus the output head."""
        d, h = self.n_embd, self.hidden
        return self.n_layer * (4 * d * d + 2 * d * h) + self.vocab_size * d

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """FLOPs per token: 2 per matmul weight plus attention scores/values (4·L·T·d), ×3 to train."""
        seq_len = seq_len or self.block_size
        forward = 2 * self.matmul_params() + 4 * self.n_layer * seq_len * self.n_embd
        return 3 * forward if training else forward


PRESETS: dict[str, Config] = {
    # A few million parameters: trains visibly on a laptop CPU in minutes.
    "tiny": Config(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256),
    "mini": Config(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384),
    # The published GPT-2 shapes.
    "gpt2": Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": Config(n_layer=48, n_head=25, n_embd=1600),
}
