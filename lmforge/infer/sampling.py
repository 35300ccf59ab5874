"""Decoding settings and the logit processing every decoder shares.

Logits go through the same steps, in the same order, as ``transformers``' ``generate``:
repetition penalty → (OpenAI's frequency and presence penalties) → no repeated n-gram → no end before
min_new_tokens → temperature → top-k → top-p → min-p; temperature 0 means greedy (as in the OpenAI API). A seed
makes sampling reproducible and touches no global random state.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.utils import warn


MAX_ROWS = 1024  # samples (n) or beams decoded side by side for one prompt


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: off
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one; 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (transformers)
    frequency_penalty: float = 0.0  # minus this × how often a token was generated (OpenAI)
    presence_penalty: float = 0.0  # minus this once a token was generated (OpenAI)
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in the prompt and output (transformers)
    min_new_tokens: int = 0  # the end tokens are held back until this many tokens are generated (transformers)
    n: int = 1  # samples per prompt
    stop: list[str] = field(default_factory=list)  # stop before the first of these strings
    stop_token_ids: list[int] | None = None  # None: the model's end-of-text token
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token given those before it (a decoder's)
    truncate: bool = False  # keep the end of a prompt that does not fit, instead of an error
    num_beams: int = 1  # > 1: beam search (greedy over beams: no sampling, OpenAI penalties or logprobs; n: the n best beams)
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    skip_special_tokens: bool = False  # the text leaves special tokens out (the token ids keep them)

    def validate(self) -> None:
        def whole(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def number(v) -> bool:
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        reals = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "length_penalty")
        kinds = [(name, whole) for name in ("max_new_tokens", "top_k", "n", "num_beams", "no_repeat_ngram_size",
                                            "min_new_tokens")]
        kinds += [(name, number) for name in reals]
        kinds += [("seed", lambda v: v is None or whole(v)), ("logprobs", lambda v: v is None or whole(v)),
                  ("prompt_logprobs", lambda v: v is None or whole(v)),
                  ("stop", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
                  ("stop_token_ids", lambda v: v is None or (isinstance(v, (list, tuple)) and all(whole(x) for x in v)))]
        for name, ok in kinds:  # (checked first: the comparisons below assume the types)
            if not ok(getattr(self, name)):
                wanted = {whole: "a whole number", number: "a number"}.get(ok, {
                    "seed": "a whole number or None", "logprobs": "a whole number or None",
                    "stop": "a list of strings", "stop_token_ids": "a list of token ids (whole numbers) or None"}.get(name))
                raise LmforgeError(f"bad sampling option: {name} must be {wanted}, not {getattr(self, name)!r}")
        if "" in self.stop:
            raise LmforgeError("bad sampling option: an empty stop string would stop before the first character")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.n >= 1, "n must be at least 1"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be 0 (off) or more"),
            (self.min_new_tokens >= 0, "min_new_tokens must be 0 (off) or more"),
            # (each sample, each beam, is a row of the KV cache, allocated up front)
            (self.n <= MAX_ROWS and self.num_beams <= MAX_ROWS, f"n and num_beams must be at most {MAX_ROWS:,}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be between 0 and 20"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (self.num_beams == 1 or self.n <= self.num_beams,
             f"n ({self.n}) must not exceed num_beams ({self.num_beams}): beam search returns its n best beams"),
            (self.num_beams == 1 or (not self.frequency_penalty and not self.presence_penalty and self.logprobs is None),
             "beam search takes no frequency or presence penalty and gives no logprobs; drop them or num_beams"),
            (self.num_beams == 1 or (self.temperature in (0, 1) and self.top_k == 0 and self.top_p == 1
                                     and self.min_p == 0 and self.seed is None),
             "beam search keeps the likeliest beams and draws nothing: temperature, top_k, top_p, min_p and seed "
             "would be ignored; drop them or num_beams"),
            # sample i of n draws from a torch.Generator seeded with seed + i, which takes 64 bits
            (self.seed is None or -(2**63) <= self.seed <= 2**64 - self.n, "seed must be from -2**63 to 2**64 - n"),
            (self.early_stopping in (True, False, "never"), "early_stopping must be true, false or never"),
        ]
        checks = [(math.isfinite(getattr(self, name)), f"{name} must be a finite number, not {getattr(self, name)}")
                  for name in reals] + checks  # (inf passes `>= 0`, and NaN fails every test silently)
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad sampling option: {message}")


# transformers' GenerationConfig defaults for what a generation_config.json with do_sample true leaves out
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": 0.0, "repetition_penalty": 1.0}


def recommended_sampling(model) -> dict:
    """The sampling a model's folder recommends: where its generation_config.json says ``do_sample: true``
    (Qwen2.5's and Llama 3's instruct models: temperature 0.7 / top_p 0.8 / top_k 20 / repetition_penalty 1.05,
    temperature 0.6 / top_p 0.9), the settings transformers' ``generate`` samples with: the file's, and
    transformers' defaults for the rest (top_k 50); where it does not, its repetition penalty (transformers'
    greedy search applies it too), and its no_repeat_ngram_size and min_new_tokens, which transformers applies
    either way. generate, chat and serve use them where not told otherwise (serve only the sampling settings and
    the penalty, as vLLM); the settings transformers applies and lmforge does not (num_beams, bad_words_ids, ...)
    are warned about.
    {} when the folder recommends none (or the model was not loaded from a folder). Worked out (and a bad one
    said) once per model."""
    settings = getattr(model, "generation_settings", None) or {}
    cached = getattr(model, "_recommended_sampling", None)
    if cached is None or cached[0] is not settings:
        model._recommended_sampling = cached = (settings, _recommended(settings, getattr(model, "source", None)))
    return dict(cached[1])


# generation_config.json settings that transformers' generate applies and lmforge does not (their no-op values)
_NOT_APPLIED = {"num_beams": 1, "num_beam_groups": 1, "encoder_no_repeat_ngram_size": 0,
                "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "force_words_ids": None,
                "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0, "max_length": 20,
                "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
                "sequence_bias": None, "exponential_decay_length_penalty": None, "guidance_scale": None}


def _recommended(settings: dict, folder) -> dict:
    used = [f"{name} {settings[name]!r}" for name, off in _NOT_APPLIED.items()
            if settings.get(name) not in (None, off, [], {})]
    if used:
        warn(f"{folder}/generation_config.json sets {', '.join(used)}, which lmforge does not apply by default "
             f"(transformers' generate does): its results differ from transformers' there"
             + ("; `lmforge generate --num-beams` (or num_beams= in Python) runs beam search" if any(u.startswith("num_beams ") for u in used)
                else "")
             + ("; lmforge reads max_new_tokens: pass --max-new-tokens (max_new_tokens= in Python)"
                if any(u.startswith("max_length ") for u in used) else "")
             )
    # what transformers applies whether it samples or not: no repeated n-grams, no end before min_new_tokens
    always = {name: settings[name] for name in ("no_repeat_ngram_size", "min_new_tokens")
              if isinstance(settings.get(name), int) and not isinstance(settings[name], bool) and settings[name] > 0}
    if settings.get("do_sample") is not True:  # greedy in transformers; a repetition penalty still applies
        penalty = settings.get("repetition_penalty")
        ok = isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and 0 < penalty < math.inf
        return always | ({"repetition_penalty": float(penalty)} if ok and penalty != 1.0 else {})
    values = {name: settings.get(name) if settings.get(name) is not None else default
              for name, default in _SAMPLING_DEFAULTS.items()}
    try:
        SamplingParams(**values).validate()
    except (LmforgeError, TypeError) as e:
        warn(f"the sampling settings of {folder}/generation_config.json are not used ({e})")
        return always
    return values | always


def recommended_for_beams(model) -> dict:
    """What beam search takes of ``recommended_sampling``: it samples nothing, but transformers' beam search
    applies the repetition penalty, no_repeat_ngram_size and min_new_tokens too."""
    return {k: v for k, v in recommended_sampling(model).items()
            if k in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens")}


def recommended_length(model) -> int | None:
    """The ``max_new_tokens`` a model's generation_config.json sets (a default where none is asked for, as
    transformers' generate and vLLM take it), or None."""
    value = (getattr(model, "generation_settings", None) or {}).get("max_new_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def describe_sampling(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if v != {"top_p": 1.0, "min_p": 0.0,
                                                                     "repetition_penalty": 1.0}.get(k))


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                   counts: torch.Tensor | None = None, generated: int = 0, ends=()) -> torch.Tensor:
    """Apply penalties and filters to next-token ``logits`` (vocab,). ``history`` (n,) is the prompt and
    output so far (repetition penalty, repeated n-grams); ``counts`` (vocab,) how often each token was generated;
    ``generated``: how many tokens were; ``ends``: the tokens that end generation (held back by min_new_tokens)."""
    if p.repetition_penalty != 1.0 and history.numel():
        history = history.to(logits.device)
        seen = logits.gather(0, history)
        logits = logits.scatter(0, history, torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty))
    if counts is not None and (p.frequency_penalty or p.presence_penalty):
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    banned = repeated_ngram_ends(history.tolist(), p.no_repeat_ngram_size) if p.no_repeat_ngram_size else []
    if generated < p.min_new_tokens:
        banned += [t for t in ends if 0 <= t < logits.size(-1)]
    if banned:
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))
    if p.temperature == 0:
        return logits
    return filter_logits(logits, p)


def repeated_ngram_ends(tokens: list[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram of ``tokens`` (transformers' ``no_repeat_ngram_size``): each token
    that followed an earlier occurrence of the last n - 1 tokens (n 1: every token there)."""
    if n < 1 or len(tokens) < n:
        return []
    last = tokens[len(tokens) - n + 1 :]
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == last]


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over the last dimension of ``logits`` (..., vocab): one row or
    a batch of rows that share ``p``, with the same arithmetic per row either way."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # transformers' arithmetic: least likely first, a token is dropped while it and those below it hold at most
        # 1 - top_p; the most likely is always kept. (Sorted the same way, tied logits at the cut, common in bf16,
        # are kept or dropped as transformers keeps them.)
        sorted_logits, order = torch.sort(logits, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p.top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, context: int, truncate: bool, say: bool = True) -> list[int]:
    """The prompt, checked against the context length (or left-truncated when asked, with a warning unless
    ``say`` is off)."""
    if max_new_tokens >= context:
        raise LmforgeError(f"max_new_tokens {max_new_tokens} must be below the model's context length {context}")
    if len(prompt_ids) + max_new_tokens <= context:
        return prompt_ids
    keep = context - max_new_tokens
    if not truncate:
        raise LmforgeError(
            f"prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{context}; shorten the prompt, lower --max-new-tokens, or pass --truncate to keep its last {keep} tokens"
        )
    if say:
        warn(f"prompt of {len(prompt_ids)} tokens left-truncated to its last {keep} to fit the context of {context}")
    return prompt_ids[-keep:]


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from ``probs`` (vocab,) by inverse CDF: one uniform number and a binary search, where
    ``torch.multinomial`` draws a random number per vocabulary entry (~20x slower here for 8K tokens)."""
    return draw(probs.float().cumsum(-1), generator)


def draw(cdf: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw given the cumulative sums ``cdf`` (vocab,) of the probabilities (``draw_rows`` of one row)."""
    return draw_rows(cdf[None], [generator])[0]


def draw_rows(cdfs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One draw per row of ``cdfs`` (rows, vocab), the cumulative sums of each row's probabilities: one uniform
    number from each row's generator, in row order, and one batched binary search, so a row draws what it draws
    alone. Zero-probability tokens are never chosen: ``right=True`` skips the flat stretches of the CDF."""
    # (the generators are CPU ones, so a seed draws the same numbers on any device)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdfs.device) * cdfs[:, -1]
    return torch.searchsorted(cdfs, u[:, None], right=True).clamp_(max=cdfs.size(1) - 1)[:, 0].tolist()
