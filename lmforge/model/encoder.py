"""The encoder-only Transformer (BERT family), top to bottom in the order data flows.

Bidirectional attention over non-padding tokens, token-type embeddings, post-norm blocks
(x = norm(x + sublayer(x)), as in BERT), an optional tanh pooler over the first token, and one
optional head: masked-LM, sequence classification or token classification. ``embed`` gives sentence
embeddings as sentence-transformers makes them from the folder (``sentence_recipe``: mean pooling by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.model.gpt import aligned_linear, embedding

# "pretraining" is BERT's pair of pretraining heads: masked LM and next-sentence prediction (on the pooler)
HEADS = (None, "masked_lm", "pretraining", "sequence_classification", "token_classification", "question_answering")


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    block_size: int = 512  # learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int = 3072
    type_vocab_size: int = 2
    activation: str = "gelu"  # "gelu" (exact, BERT) or "gelu_tanh"
    norm_eps: float = 1e-12
    dropout: float = 0.1
    init_std: float = 0.02
    pad_token_id: int = 0
    pooler: bool = True  # tanh(Linear(first token)), used by sequence classification
    head: str | None = None  # one of HEADS
    pooling: str = "pooler"  # sequence classification reads: "pooler" (BERT's), "first" token, or "mean" of tokens
    num_labels: int = 2
    labels: tuple[str, ...] | None = None  # names of the classes, index order

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise LmforgeError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.head not in HEADS:
            raise LmforgeError(f"head {self.head!r} is not supported; use one of: {', '.join(map(str, HEADS[1:]))}")
        if self.pooling not in ("pooler", "first", "mean"):
            raise LmforgeError(f"pooling {self.pooling!r} is not supported; use pooler, first or mean")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise LmforgeError(f"activation {self.activation!r} is not supported; use gelu or gelu_tanh")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "labels" and v else v) for k, v in d.items() if k in known})

    def with_head(self, head: str | None, num_labels: int | None = None, labels=None, pooling: str | None = None) -> EncoderConfig:
        pooling = pooling or self.pooling
        pooler = self.pooler and head not in ("token_classification", "question_answering", "masked_lm")
        return replace(self, head=head, num_labels=num_labels or self.num_labels, labels=tuple(labels) if labels else None,
                       pooling=pooling, pooler=pooler or head == "pretraining")


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # (B, T, n_embd) last hidden states
    pooled: torch.Tensor | None = None  # (B, n_embd) tanh pooler over the first token
    logits: torch.Tensor | None = None  # head output: (B, T, vocab), (B, labels) or (B, T, labels)
    loss: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None  # "pretraining": (B, 2), index 0 "B follows A", 1 "B is random"
    start_logits: torch.Tensor | None = None  # question answering: (B, T) each
    end_logits: torch.Tensor | None = None


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: torch.Tensor | None = None,
                g_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention of ``x``; with ``g`` (permutation LM's query stream) also ``g``'s queries over ``x``'s
        keys and values under ``g_mask``, with the same weights: returns both."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))
        if g is None:
            return y
        qg = F.linear(g, self.qkv.weight[:C], self.qkv.bias[:C]).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        yg = F.scaled_dot_product_attention(qg, k, v, attn_mask=g_mask, dropout_p=dropout)
        return y, self.proj(yg.transpose(1, 2).reshape(B, T, C))


class EncoderBlock(nn.Module):
    """Post-norm: x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))."""

    # Methods that run the block besides forward(): a sharded block (FSDP) gathers its weights for them too.
    other_forwards = ("two_stream",)

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x, mask)))
        return self.mlp(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_2(x + self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate))))

    def two_stream(self, h: torch.Tensor, g: torch.Tensor, h_mask: torch.Tensor, g_mask: torch.Tensor):
        """XLNet's two streams through one block, its weights shared: content ``h`` and query ``g``."""
        attn_h, attn_g = self.attn(h, h_mask, g, g_mask)
        return self.mlp(self.ln_1(h + self.drop(attn_h))), self.mlp(self.ln_1(g + self.drop(attn_g)))


class MaskedLMHead(nn.Module):
    """dense → GELU → LayerNorm → logits with the (tied) word embeddings, plus an output bias."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.head_multiple = 0  # the products padded to a multiple of this many rows (gpt.aligned_linear)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.dense(hidden), approximate=self.approximate))
        return aligned_linear(h, word_embeddings, self.head_multiple, self.bias)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.wte = embedding(config.vocab_size, config.n_embd)
        self.wpe = embedding(config.block_size, config.n_embd)
        self.wtt = embedding(config.type_vocab_size, config.n_embd)
        self.ln_emb = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if config.pooler else None
        self.mlm = MaskedLMHead(config) if config.head in ("masked_lm", "pretraining") else None
        self.nsp = nn.Linear(config.n_embd, 2) if config.head == "pretraining" else None
        self.classifier = None
        if config.head in ("sequence_classification", "token_classification"):
            self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.qa_outputs = nn.Linear(config.n_embd, 2) if config.head == "question_answering" else None
        if not self.wte.weight.is_meta:  # (nothing to draw on the meta device: build_on_meta draws once allocated)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.mlm is not None:
            nn.init.zeros_(self.mlm.bias)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Token ids (B, T) → last hidden states (B, T, n_embd); ``attention_mask`` 1 = real token, 0 = padding."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise LmforgeError(f"input of {T} tokens exceeds the encoder's {self.config.block_size} positions; truncate it")
        pos = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(pos) + self.wtt(types)))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys each query may see
        for block in self.blocks:
            x = block(x, mask)
        return x

    def permutation_lm(self, input_ids, order: torch.Tensor, query_token: int, token_type_ids=None,
                       select=None) -> torch.Tensor:
        """Permutation LM (XLNet's two-stream attention, without Transformer-XL's memory and relative positions):
        the content stream reads the tokens, the query stream starts from ``query_token``'s embedding (the
        mask token: position, no content) and attends to the content stream under
        ``lmforge.data.masking.plm_attention(order)``. Returns the masked-LM head's logits from the query
        stream at ``select`` (default: the predicted tokens, ``order >= 0``), (N, vocab)."""
        from lmforge.data.masking import plm_attention

        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        around = self.wpe(pos) + self.wtt(types)
        h = self.drop(self.ln_emb(self.wte(input_ids) + around))
        g = self.drop(self.ln_emb(self.wte.weight[query_token] + around))
        h_mask, g_mask = (m.to(input_ids.device) for m in plm_attention(order))
        for block in self.blocks:
            h, g = block.two_stream(h, g, h_mask, g_mask)
        chosen = order >= 0 if select is None else select
        return self.mlm(g[chosen], self.wte.weight)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                start_positions=None, end_positions=None, select=None, next_sentence_label=None,
                plm_order=None, plm_query=None) -> EncoderOutput:
        """``select`` (B, T) bool, masked LM only: logits (and ``labels``) at those positions alone, (N, vocab),
        so pretraining runs the vocabulary projection on the ~15% of tokens it predicts. With the "pretraining"
        head the loss is the masked-LM loss plus the next-sentence loss (``next_sentence_label``), as in
        ``transformers.BertForPreTraining``. ``plm_order`` and ``plm_query``: ``permutation_lm``'s logits (at
        ``select``) as ``logits``, and ``hidden`` None (so DDP's forward wraps it too)."""
        if plm_order is not None:
            return EncoderOutput(None, logits=self.permutation_lm(input_ids, plm_order, plm_query, token_type_ids, select))
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        out = EncoderOutput(hidden)
        if self.pooler is not None:
            out.pooled = torch.tanh(self.pooler(hidden[:, 0]))
        head = self.config.head
        if head == "pretraining":
            out.nsp_logits = self.nsp(out.pooled)
        if head in ("masked_lm", "pretraining"):
            if select is not None:
                hidden = hidden[select]
                labels = labels[select] if labels is not None else None
            out.logits = self.mlm(hidden, self.wte.weight)
        elif head == "sequence_classification":
            out.logits = self.classifier(self.drop(self.sentence_features(out, attention_mask)))
        elif head == "token_classification":
            out.logits = self.classifier(self.drop(hidden))
        elif head == "question_answering":
            out.start_logits, out.end_logits = self.qa_outputs(hidden).float().unbind(-1)
            if start_positions is not None:
                out.loss = (F.cross_entropy(out.start_logits, start_positions) + F.cross_entropy(out.end_logits, end_positions)) / 2
        if labels is not None and head == "sequence_classification" and (self.config.num_labels == 1 or labels.is_floating_point()):
            # as transformers infers the problem from the labels: one label is regression, float ones multi-label
            logits = out.logits.float()
            out.loss = (F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if self.config.num_labels == 1
                        else F.binary_cross_entropy_with_logits(logits, labels.float()))
        elif labels is not None and out.logits is not None:
            out.loss = F.cross_entropy(out.logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        if next_sentence_label is not None and out.nsp_logits is not None:
            nsp_loss = F.cross_entropy(out.nsp_logits.float(), next_sentence_label.flatten())
            out.loss = nsp_loss if out.loss is None else out.loss + nsp_loss
        return out

    def sentence_features(self, out: EncoderOutput, attention_mask=None) -> torch.Tensor:
        """What sequence classification reads: the pooler output, the first token, or the mean of real tokens."""
        pooling = self.config.pooling
        if pooling == "pooler" and out.pooled is not None:
            return out.pooled
        if pooling == "mean":
            mask = attention_mask if attention_mask is not None else torch.ones(out.hidden.shape[:2], device=out.hidden.device)
            return mean_pool(out.hidden, mask)
        return out.hidden[:, 0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states of real (non-padding) tokens: (B, T, C) → (B, C)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# sentence-transformers' Pooling modes, and the keys of its older 1_Pooling/config.json that switch each on
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class SentenceRecipe:
    """How a folder's sentence vectors are made from its hidden states, as sentence-transformers makes them from
    modules.json (Transformer → Pooling → Normalize) and config_sentence_transformers.json. A folder without
    modules.json: mean pooling, normalised (sentence-transformers, too, mean-pools such a folder, with a warning)."""
    pooling: tuple[str, ...] = ("mean",)  # several: their vectors side by side
    include_prompt: bool = True  # False: the prompt's tokens are read but left out of the pooling
    normalize: bool = True  # a Normalize module
    prompt: str = ""  # the default prompt (default_prompt_name), put before every text


def sentence_recipe(folder) -> SentenceRecipe:
    """The ``SentenceRecipe`` of a model folder; a module lmforge does not apply (Dense, LSTM...) is an error
    rather than vectors that differ from sentence-transformers'."""
    import json

    def read(path: Path, kind=dict):
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise LmforgeError(f"{path} cannot be read ({e}); fix or delete it") from None
        if not isinstance(value, kind):
            raise LmforgeError(f"{path} is not a JSON {'object' if kind is dict else 'list'}; fix or delete it")
        return value

    folder = Path(folder) if folder is not None else None
    if folder is None or not (folder / "modules.json").is_file():
        return SentenceRecipe()
    pooling, include_prompt, normalize = None, True, False
    for module in read(folder / "modules.json", list):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1] if isinstance(module, dict) else ""
        if kind == "Pooling":
            config = read(folder / module.get("path", "") / "config.json")
            modes = config.get("pooling_mode") or [mode for key, mode in _POOLING_KEYS.items() if config.get(key)] or "mean"
            pooling = (modes,) if isinstance(modes, str) else tuple(modes)
            include_prompt = bool(config.get("include_prompt", True))
            unknown = [m for m in pooling if m not in POOLING_MODES]
            if unknown:
                raise LmforgeError(f"{folder}: pooling mode {unknown[0]!r} is not one of {', '.join(POOLING_MODES)}")
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise LmforgeError(f"{folder}: modules.json has a {kind or module!r} module, which lmforge does not apply "
                               f"(it applies Transformer, Pooling and Normalize): its vectors would differ from "
                               f"sentence-transformers'")
    settings = folder / "config_sentence_transformers.json"
    settings = read(settings) if settings.is_file() else {}
    prompts, default = settings.get("prompts") or {}, settings.get("default_prompt_name")
    return SentenceRecipe(pooling or ("mean",), include_prompt, normalize, str(prompts.get(default) or "") if default else "")


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes=("mean",)) -> torch.Tensor:
    """Sentence vectors as sentence-transformers' Pooling makes them: (B, T, C) hidden states and (B, T) ``mask``
    (1 = a token pooled; padding on the right) → (B, len(modes) * C)."""
    B, T, _ = hidden.shape
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    rows = torch.arange(B, device=hidden.device)
    out = []
    for mode in modes:
        if mode == "cls":  # the first token pooled ([CLS], or the first after a prompt left out)
            out.append(hidden[rows, mask.int().argmax(1)])
        elif mode == "lasttoken":
            out.append((hidden * weights)[rows, T - 1 - mask.flip(1).int().argmax(1)])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(1).values)
        elif mode == "weightedmean":  # the i-th token (from 1) weighs i
            w = weights * torch.arange(1, T + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]
            out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        else:
            count = weights.sum(1).clamp(min=1e-9)
            out.append((hidden * weights).sum(1) / (count if mode == "mean" else count.sqrt()))
    return torch.cat(out, dim=-1)


@torch.inference_mode()
def embed(model: Encoder, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 32,
          normalize: bool | None = True, progress: bool = False, prompt: str | None = None) -> torch.Tensor:
    """Sentence embeddings (len(texts), dim) as sentence-transformers makes them from the model's folder
    (``sentence_recipe``): its pooling (mean for a folder that names none, dim = n_embd per mode), its default
    prompt (or ``prompt``) before each text, at most ``max_length`` tokens (default: ``declared_max_length``).
    ``normalize``: L2-normalised (True), not (False), or as the folder's Normalize module says (None).

    Texts are batched in order of length (as sentence-transformers does), so that a batch pads to
    about its own length rather than to the longest text's; the rows come back in the texts' order."""
    from tqdm.auto import tqdm

    if not isinstance(model, Encoder):
        raise LmforgeError(f"embed takes a loaded encoder (load_model(folder) of a bert folder), not "
                           f"{type(model).__name__}")
    if isinstance(texts, str):  # one text, not its characters
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise LmforgeError(f"embed takes a list of strings, not {type(texts).__name__}")
    if not hasattr(tokenizer, "hf"):
        raise LmforgeError(f"embed takes the model's Tokenizer (load_tokenizer_for(model)), not {type(tokenizer).__name__}")
    if (max_length is not None and not (isinstance(max_length, int) and max_length >= 2)) \
            or not (isinstance(batch_size, int) and batch_size >= 1):
        raise LmforgeError(f"max_length must be a whole number of 2 or more (room for text between [CLS] and [SEP]), "
                           f"and batch_size of 1 or more (they are {max_length!r} and {batch_size!r})")
    source = getattr(model, "source", None)
    recipe = sentence_recipe(source)
    prompt = recipe.prompt if prompt is None else prompt
    normalize = recipe.normalize if normalize is None else normalize
    declared = declared_max_length(source) if source is not None else None
    max_length = min(max_length or declared or model.config.block_size, model.config.block_size)
    device = model.wte.weight.device
    # a text longer than max_length keeps its end token ([SEP]), as sentence-transformers' truncation does
    encoded = [ids if len(ids) <= max_length else ids[: max_length - 1] + ids[-1:]
               for ids in (tokenizer.encode(prompt + t, add_special_tokens=True) for t in texts)]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:  # (a tokenizer without BERT's [CLS] ... [SEP] template, and an empty text)
        raise LmforgeError(f"text {empty[0]} ({texts[empty[0]]!r}) gives no tokens to embed; give it some text")
    skip = 0  # the prompt's tokens, less its end token, where the pooling leaves them out (sentence-transformers)
    if prompt and not recipe.include_prompt:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        skip = len(prompt_ids) - (1 if prompt_ids and prompt_ids[-1] in tokenizer.special_ids else 0)
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = model.config.pad_token_id
    out = torch.zeros(len(texts), len(recipe.pooling) * model.config.n_embd, device=device)
    for i in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", disable=not progress):
        rows = order[i : i + batch_size]
        ids = [encoded[r] for r in rows]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        pooled_mask = mask.clone()
        pooled_mask[:, :skip] = 0
        pooled = pool(model.encode(input_ids, mask).float(), pooled_mask, recipe.pooling)
        out[torch.tensor(rows, device=device)] = F.normalize(pooled, p=2, dim=1) if normalize else pooled
    return out


def declared_max_length(folder) -> int | None:
    """The tokens a folder's sentence embeddings are made from, as sentence-transformers reads it:
    sentence_bert_config.json's max_seq_length (256 for all-MiniLM-L6-v2), else the tokenizer's model_max_length
    (tokenizer_config.json). The caller keeps it within the model's positions."""
    import json

    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = Path(folder) / name
        try:
            value = int(json.loads(path.read_text())[key]) if path.exists() else None
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        if value and 2 <= value < 10**9:  # (transformers writes 1e30 for "no limit")
            return value
    return None


def build_encoder(config: EncoderConfig, device="cpu", init: bool = True) -> Encoder:
    from lmforge.model.gpt import build_on_meta

    return build_on_meta(Encoder, config, device, init)
