"""Decoding settings, logit processing, streamed text, and the `generate` entry points.

Logits go through the same steps, in the same order, as ``transformers``' ``generate``:
repetition penalty → (OpenAI's frequency and presence penalties) → temperature → top-k → top-p →
min-p; temperature 0 means greedy (as in the OpenAI API). A seed makes sampling reproducible and
touches no global random state. The decoding loop itself is the engine (engine.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT
from lmforge.utils import warn


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
    n: int = 1  # samples per prompt
    stop: list[str] = field(default_factory=list)  # stop before the first of these strings
    stop_token_ids: list[int] | None = None  # None: the model's end-of-text token
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely alternatives
    truncate: bool = False  # keep the end of a prompt that does not fit, instead of an error
    num_beams: int = 1  # > 1: beam search (greedy over beams; n, sampling and penalties do not apply)
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def validate(self) -> None:
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
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (self.early_stopping in (True, False, "never"), "early_stopping must be true, false or never"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad sampling option: {message}")


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Apply penalties and filters to next-token ``logits`` (vocab,). ``history`` (n,) is the prompt and
    output so far (repetition penalty); ``counts`` (vocab,) how often each token was generated."""
    if p.repetition_penalty != 1.0 and history.numel():
        seen = logits.gather(0, history)
        logits = logits.scatter(0, history, torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty))
    if counts is not None and (p.frequency_penalty or p.presence_penalty):
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.size(0):
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the first is always kept.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    """The prompt, checked against the context length (or left-truncated when asked)."""
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
    warn(f"prompt of {len(prompt_ids)} tokens left-truncated to its last {keep} to fit the context of {context}")
    return prompt_ids[-keep:]


class Detokenizer:
    """Token ids in, text out as soon as it is decided: text that ends inside a UTF-8 character, or that
    could still turn into a stop string, is held back until it is certain."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string was reached; the text then ends before it)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return "", False  # the last token ends inside a multi-byte character
        hits = [i for i in (text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._flush(), True
        self.text = text
        safe = len(text) - self.hold
        if safe > self.emitted:
            piece = text[self.emitted : safe]
            self.emitted = safe
            return piece, False
        return "", False

    def finish(self) -> str:
        """Whatever is still held back (the sequence ended)."""
        if self.ids and not self.text:
            self.text = self.tokenizer.decode(self.ids)
        return self._flush()

    def _flush(self) -> str:
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def generate_ids(model: GPT, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int]) -> Iterator[int]:
    """Yield new token ids one by one; the first of ``stop_ids`` is yielded and ends generation."""
    from lmforge.infer.engine import Engine

    engine = Engine(model, _NoText(), max_batch=1)
    request = engine.add(list(prompt_ids), replace(params, stop_token_ids=sorted(stop_ids), stop=[], n=1))
    while not request.finished:
        for event in engine.step():
            if event.token_id is not None:
                yield event.token_id


class _NoText:
    """A stand-in tokenizer for callers that want token ids only."""

    eos_id = None

    def decode(self, ids):
        return ""


def stream_generate(model: GPT, tokenizer, prompt: str, params: SamplingParams, result: dict | None = None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are safe to show.

    ``result`` (if given) receives the final ``Generation``.
    """
    from lmforge.infer.engine import Engine

    engine = Engine(model, tokenizer, max_batch=1)
    request = engine.add(tokenizer.encode(prompt) if prompt else [], replace(params, n=1))
    while not request.finished:
        for event in engine.step():
            if event.text:
                yield event.text
    seq = request.sequences[0]
    if result is not None:
        result["generation"] = Generation(seq.text, seq.tokens, len(request.prompt_ids), seq.finish_reason,
                                          seq.logprobs or None, seq.top_logprobs or None)


def chat_prompt(tokenizer, messages: list[dict], params: SamplingParams) -> tuple[str, SamplingParams]:
    """The conversation rendered with the model's chat template, ready for the assistant's turn, and
    sampling settings that also stop at the end-of-turn token."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stops = list(params.stop_token_ids) if params.stop_token_ids is not None else [tokenizer.eos_id]
    if tokenizer.end_of_turn_id is not None:
        stops.append(tokenizer.end_of_turn_id)
    extra = [] if tokenizer.end_of_turn_id is not None else ["<|im_end|>"]  # the marker as text, when not a token
    return prompt, replace(params, stop_token_ids=[s for s in stops if s is not None], stop=list(params.stop) + extra)


def generate(model: GPT | str | os.PathLike, prompt: str | list[str] = "", tokenizer=None, chat: bool | None = None,
             system: str | None = None, **params) -> Generation | list[Generation]:
    """Generate from a model object or a model/run folder: ``generate("runs/demo", "def ", max_new_tokens=50)``.

    A list of prompts is decoded as one batch and returns a list (``n`` > 1: a list per prompt).
    ``chat`` (default: when the model has a chat template) sends each prompt as a user message through
    the template and stops at the end of the assistant's turn. ``num_beams`` > 1 runs beam search.
    """
    from lmforge.infer.engine import Engine, beam_search
    from lmforge.model.checkpoint import load_decoder, load_tokenizer_for

    if not isinstance(model, GPT):
        model = load_decoder(model)
    tokenizer = tokenizer or load_tokenizer_for(model)
    sampling = SamplingParams(**params)
    sampling.validate()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if chat if chat is not None else tokenizer.chat_template is not None:
        rendered = []
        for p in prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text, sampling = chat_prompt(tokenizer, messages, sampling)
            rendered.append(text)
        prompts = rendered
    if sampling.num_beams > 1:
        out = []
        for p in prompts:
            ids = fit_prompt(tokenizer.encode(p) or [tokenizer.eos_id], sampling.max_new_tokens, model.config.block_size,
                             sampling.truncate)
            stops = tuple(sampling.stop_token_ids if sampling.stop_token_ids is not None else [tokenizer.eos_id])
            tokens, _ = beam_search(model, ids, sampling.num_beams, sampling.max_new_tokens, sampling.length_penalty,
                                    sampling.early_stopping, tuple(t for t in stops if t is not None))
            ended = bool(tokens) and tokens[-1] in stops
            text_ids = tokens[:-1] if ended else tokens
            out.append(Generation(tokenizer.decode(text_ids), tokens, len(ids), "stop" if ended else "length"))
        return out[0] if isinstance(prompt, str) else out
    engine = Engine(model, tokenizer, max_batch=max(len(prompts), 1) * sampling.n)
    requests = [engine.add(tokenizer.encode(p) if p else [], sampling) for p in prompts]
    engine.run(requests)
    results = []
    for r in requests:
        gens = [Generation(s.text, s.tokens, len(r.prompt_ids), s.finish_reason, s.logprobs or None,
                           s.top_logprobs or None) for s in r.sequences]
        results.append(gens[0] if sampling.n == 1 else gens)
    return results[0] if isinstance(prompt, str) else results
