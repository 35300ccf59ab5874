"""The historical baselines: an interpolated Kneser–Ney n-gram model and an LSTM language model.

`lmforge baseline --kind ngram|lstm --data DATA --out DIR` trains one on a prepared corpus; `lmforge
eval --data DATA --model TRANSFORMER --model NGRAM --model LSTM` puts their validation perplexity and
bits per byte beside the Transformer's, on the same tokens.

The n-gram model follows NLTK's ``KneserNeyInterpolated`` exactly (its test checks it within 1%):

    P(w | h) = max(c(h w) - d, 0) / c(h •)  +  d · N1+(h •) / c(h •) · P(w | h[1:])

with raw counts at the highest order, continuation counts (how many distinct tokens precede
``h w``) at lower orders down to the unigram, N1+(• w) / N1+(• •), and every sequence padded at both
ends. NLTK stops there, so a token never seen after another has probability zero; by default
lmforge discounts the unigram once more and interpolates it with a uniform distribution over the
vocabulary, so that every token keeps some probability (``smooth_unigram=False`` is NLTK's model). Counting is vectorised: n-grams become integer keys, counted with ``np.unique`` and looked
up with ``np.searchsorted``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.utils import atomic_dir, atomic_write_json, check_output_dir, read_json, refuse_overwriting_sources

# -- interpolated Kneser–Ney ------------------------------------------------------------------------


class KneserNey:
    """An interpolated Kneser–Ney model of ``order`` over token ids ``0 .. vocab_size-1``."""

    def __init__(self, order: int = 3, discount: float = 0.75, vocab_size: int = 0, smooth_unigram: bool = True):
        if order < 2:
            raise LmforgeError("the n-gram order must be at least 2")
        if not 0 < discount < 1:
            raise LmforgeError("the discount must be in (0, 1)")
        self.order, self.discount, self.vocab_size = order, discount, vocab_size
        self.bos, self.eos = vocab_size, vocab_size + 1  # padding symbols
        self.base = vocab_size + 2
        if order >= 63 or self.base ** order >= 2**63:  # (base 2 at least: an order of 63 never fits)
            raise LmforgeError(f"order {order} with a vocabulary of {vocab_size} does not fit 64-bit keys; lower --order")
        self.smooth_unigram = smooth_unigram
        self.tables: dict[str, np.ndarray] = {}

    def _keys(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """Integer keys of all k-grams of ``tokens`` (k tokens in base ``self.base``)."""
        n = len(tokens) - k + 1
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        key = np.zeros(n, dtype=np.int64)
        for j in range(k):
            key = key * self.base + tokens[j : j + n]
        return key

    def _padded(self, tokens: np.ndarray, end: bool = True) -> np.ndarray:
        pads = self.order - 1
        parts = [np.full(pads, self.bos), np.asarray(tokens, dtype=np.int64)]
        if end:
            parts.append(np.full(pads, self.eos))
        return np.concatenate(parts).astype(np.int64)

    def fit(self, sequences: list[np.ndarray]) -> KneserNey:
        """Count every order's n-grams in ``sequences`` (each padded at both ends)."""
        padded = [self._padded(s) for s in sequences]
        for k in range(1, self.order + 1):
            keys, counts = np.unique(np.concatenate([self._keys(p, k) for p in padded]), return_counts=True)
            self.tables[f"keys{k}"], self.tables[f"counts{k}"] = keys, counts
        self._index()
        return self

    def _index(self) -> None:
        """Per-context totals: raw at every order, continuation below the top."""
        B, t = self.base, self.tables
        # the continuation unigram: N1+(• w), out of N1+(• •) distinct bigrams
        t["cont1"], t["cont_counts1"] = np.unique(t["keys2"] % B, return_counts=True)
        for k in range(2, self.order + 1):  # context length k-1
            ctx = t[f"keys{k}"] // B
            uniq, first = np.unique(ctx, return_index=True)
            t[f"ctx{k}"] = uniq
            t[f"ctx_total{k}"] = np.add.reduceat(t[f"counts{k}"], first)  # c(h •)
            t[f"ctx_types{k}"] = np.diff(np.append(first, len(ctx)))  # N1+(h •), raw
            if k < self.order:
                # continuation: how many distinct tokens precede (h w), from the (k+1)-grams
                suffix = t[f"keys{k + 1}"] % B**k
                cont_keys, cont_counts = np.unique(suffix, return_counts=True)
                t[f"cont{k}"], t[f"cont_counts{k}"] = cont_keys, cont_counts
                mid = cont_keys // B
                mids, mfirst = np.unique(mid, return_index=True)
                t[f"cont_ctx{k}"] = mids
                t[f"cont_total{k}"] = np.add.reduceat(cont_counts, mfirst)  # N1+(• h •)

    @staticmethod
    def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
        i = np.searchsorted(keys, queries)
        i = np.minimum(i, len(keys) - 1)
        found = keys[i] == queries if len(keys) else np.zeros(len(queries), bool)
        return np.where(found, values[i] if len(keys) else 0, 0)

    def probabilities(self, padded: np.ndarray, first: int) -> np.ndarray:
        """P(padded[i] | the order-1 tokens before it) for every i >= ``first``."""
        B, t, d = self.base, self.tables, self.discount
        positions = np.arange(max(first, self.order - 1), len(padded))
        words = padded[positions]
        continuation = self._lookup(t["cont1"], t["cont_counts1"], words).astype(float)
        bigrams = len(t["keys2"])
        if self.smooth_unigram:
            p = np.maximum(continuation - d, 0) / bigrams + d * len(t["cont1"]) / bigrams / self.base
        else:
            p = continuation / bigrams
        for c in range(1, self.order):  # context length
            k = c + 1
            ctx = np.zeros(len(positions), dtype=np.int64)
            for j in range(c, 0, -1):
                ctx = ctx * B + padded[positions - j]
            full = ctx * B + words
            raw_total = self._lookup(t[f"ctx{k}"], t[f"ctx_total{k}"], ctx)
            types = self._lookup(t[f"ctx{k}"], t[f"ctx_types{k}"], ctx)
            if k == self.order:
                count = self._lookup(t[f"keys{k}"], t[f"counts{k}"], full)
                total = raw_total
            else:
                count = self._lookup(t[f"cont{k}"], t[f"cont_counts{k}"], full)
                total = self._lookup(t[f"cont_ctx{k}"], t[f"cont_total{k}"], ctx)
            seen = (raw_total > 0) & (total > 0)
            safe = np.where(seen, total, 1)
            alpha = np.maximum(count - d, 0) / safe
            gamma = d * types / safe
            p = np.where(seen, alpha + gamma * p, p)
        return p

    def sequence_nll(self, tokens: np.ndarray) -> tuple[float, int]:
        """(negative log-likelihood in nats, tokens scored): every token but the first, as the other models."""
        padded = self._padded(tokens, end=False)
        p = self.probabilities(padded, self.order)  # skip the first real token
        return float(-np.log(p).sum()), len(p)

    # -- files --

    def save(self, folder: str | os.PathLike, tokenizer=None) -> Path:
        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / "config.json", {"model_type": "lmforge-ngram", "order": self.order,
                                                   "discount": self.discount, "vocab_size": self.vocab_size,
                                                   "smooth_unigram": self.smooth_unigram})
            np.savez_compressed(tmp / "ngram.npz", **self.tables)
            if tokenizer is not None:
                tokenizer.save(tmp)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> KneserNey:
        folder = Path(folder)
        config = read_json(folder / "config.json", "n-gram config")
        model = cls(int(config["order"]), float(config["discount"]), int(config["vocab_size"]),
                    bool(config.get("smooth_unigram", True)))
        with np.load(folder / "ngram.npz", allow_pickle=False) as data:  # arrays only, never pickles
            model.tables = {k: data[k] for k in data.files}
        return model


def train_ngram(data_dir: str | os.PathLike, out: str | os.PathLike, order: int = 3, discount: float = 0.75,
                overwrite: bool = False) -> dict:
    """Count the train split of a prepared corpus (one sequence) into a model folder ``out``."""
    from lmforge.data.loader import TokenSplit
    from lmforge.tokenizer import Tokenizer

    out = check_output_dir(out, overwrite, ("an n-gram baseline folder", "ngram.npz"))
    refuse_overwriting_sources(out, data_dir)

    split = TokenSplit(data_dir, "train")
    tokens = np.concatenate([np.asarray(s) for s in split.shards]).astype(np.int64)
    model = KneserNey(order, discount, split.meta["tokenizer"]["vocab_size"]).fit([tokens])
    model.save(out, Tokenizer.load(data_dir))
    return {"order": order, "discount": discount, "train_tokens": int(len(tokens)),
            "ngrams": {k: int(len(model.tables[f"keys{k}"])) for k in range(1, order + 1)}}


# -- LSTM ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = 8192
    n_embd: int = 256
    hidden: int = 512
    n_layer: int = 2
    dropout: float = 0.0
    block_size: int = 256  # the training window (truncated backpropagation through time)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        d, h, v = self.n_embd, self.hidden, self.vocab_size
        lstm = sum(4 * h * ((d if i == 0 else h) + h) + 8 * h for i in range(self.n_layer))
        return v * d + lstm + h * d + d  # embedding (also the output head) + LSTM + projection to n_embd

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        d, h = self.n_embd, self.hidden
        matmul = sum(4 * h * ((d if i == 0 else h) + h) for i in range(self.n_layer)) + h * d + self.vocab_size * d
        return (6 if training else 2) * matmul


class LSTMLM(nn.Module):
    """Embedding → stacked LSTM → projection → logits with the (tied) embedding matrix."""

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.lstm = nn.LSTM(config.n_embd, config.hidden, config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.proj = nn.Linear(config.hidden, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # +-0.1 as classic LSTM language models (0.02, a Transformer's, starves the LSTM of input)
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state=None):
        out, _ = self.lstm(self.drop(self.wte(idx)), state)
        logits = F.linear(self.proj(self.drop(out)), self.wte.weight)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def sequence_nll(self, tokens: np.ndarray, chunk: int = 1024) -> tuple[float, int]:
        """Score every token but the first, carrying the LSTM state through the whole sequence."""
        self.eval()
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.wte.weight.device)
        total, state = 0.0, None
        for start in range(0, len(ids) - 1, chunk):
            x = ids[start : start + chunk][None]
            y = ids[start + 1 : start + chunk + 1][None]
            x = x[:, : y.size(1)]
            out, state = self.lstm(self.wte(x), state)
            logp = F.log_softmax(F.linear(self.proj(out), self.wte.weight).float(), -1)
            total -= logp.gather(-1, y[..., None]).sum().item()
        return total, max(len(ids) - 1, 0)


    @torch.inference_mode()
    def sample(self, ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 40, seed: int = 0,
               stop_id: int | None = None) -> list[int]:
        """New token ids after ``ids``, sampled one at a time with the LSTM state carried along."""
        device = self.wte.weight.device
        generator = torch.Generator().manual_seed(seed)
        x, state, out = torch.tensor([ids], device=device), None, []
        for _ in range(max_new_tokens):
            hidden, state = self.lstm(self.wte(x), state)
            logits = F.linear(self.proj(hidden[0, -1]), self.wte.weight).float().cpu() / max(temperature, 1e-6)
            if top_k:
                logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = -float("inf")
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            if token == stop_id:
                break
            out.append(token)
            x = torch.tensor([[token]], device=device)
        return out


def save_lstm(model: LSTMLM, folder: str | os.PathLike, tokenizer=None) -> Path:
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / "config.json", {"model_type": "lmforge-lstm", **model.config.to_dict()})
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def load_lstm(folder: str | os.PathLike) -> LSTMLM:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_json(folder / "config.json", "LSTM config")
    config.pop("model_type", None)
    model = LSTMLM(LSTMConfig(**config))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def train_lstm(data_dir: str, out: str, progress: bool = True, config: str | None = None, resume: bool = False,
               **overrides) -> dict:
    """Train an LSTM language model on a prepared corpus with the same loop as `pretrain`: the same
    training keys, from a YAML ``config`` (e.g. the Transformer's, for the same tokens and schedule) and
    ``overrides``; its shape from ``n_embd``, ``hidden``, ``n_layer``."""
    from lmforge.train.loop import CausalLM, resolve_config, train
    from lmforge.utils import human_count

    shape = {k: overrides.pop(k) for k in ("n_embd", "hidden", "n_layer") if k in overrides}
    overwrite = overrides.pop("overwrite", False)
    for key, most in (("n_embd", 1 << 20), ("hidden", 1 << 20), ("n_layer", 10_000)):  # (as a Transformer's shape)
        if key in shape and not 1 <= shape[key] <= most:
            raise LmforgeError(f"--{key.replace('_', '-')} {shape[key]} must be from 1 to {most:,}")

    class LSTMObjective(CausalLM):
        def load(self, checkpoint):
            if checkpoint is not None:
                return load_lstm(checkpoint / "model").to(self.device).train()
            block = self.config.block_size or 256
            return LSTMLM(LSTMConfig(vocab_size=self.tokenizer.vocab_size, block_size=block, dropout=self.config.dropout,
                                     **shape)).to(self.device).train()

        def save(self, folder):
            save_lstm(self.model, folder, self.tokenizer)

        def sample_text(self, prompt, params):
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id or 0]
            new = self.model.sample(ids, params.max_new_tokens, params.temperature, params.top_k, params.seed or 0,
                                    self.tokenizer.eos_id)
            return self.tokenizer.decode(new)

        def describe(self):
            info = super().describe()
            info["summary"] = f"LSTM {human_count(self.model.num_params())} parameters; " + info["summary"].split("; ", 1)[-1]
            return info

    settings = resolve_config(config, resume, {**overrides, "data": data_dir, "out": out, "model": "lstm"})
    if settings.objective != "clm":
        raise LmforgeError(f"the LSTM baseline is a causal language model; objective {settings.objective} trains a "
                           f"Transformer with `lmforge pretrain`")
    return train(settings, LSTMObjective, resume=resume, overwrite=overwrite, progress=progress)


# -- any model folder ----------------------------------------------------------------------------------


def load_any(path: str | os.PathLike, dtype: str = "auto", device: str | torch.device = "cpu"):
    """(model, kind) for a Transformer folder or run (its weights in ``dtype``) or an LSTM baseline folder, on
    ``device``; or an n-gram baseline folder (counts, on the CPU)."""
    from lmforge.model.checkpoint import load_decoder, resolve_model_dir

    folder = resolve_model_dir(path)
    kind = read_json(folder / "config.json", "model config").get("model_type") if (folder / "config.json").exists() else None
    if kind == "lmforge-ngram":
        return KneserNey.load(folder), "n-gram (Kneser-Ney)"
    if kind == "lmforge-lstm":
        return load_lstm(folder).to(device), "LSTM"
    model = load_decoder(folder, device, dtype=transformer_dtype(folder, dtype, device))
    return model, f"Transformer ({model.config.family})"


def transformer_dtype(path, requested: str = "auto", device: str | torch.device = "cpu"):
    """The torch dtype to evaluate a Transformer folder in on ``device``, said in one line on stderr."""
    import sys

    from lmforge.model.checkpoint import weights_precision

    choice = weights_precision(path, torch.device(device), requested)
    if choice.news:
        print(f"precision of {path}: {choice.reason}", file=sys.stderr, flush=True)
    return choice.torch_dtype
