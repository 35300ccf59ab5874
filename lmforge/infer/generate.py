"""`lmforge generate`: KV-cache decoding with greedy and sampled choices, streamed as text.

Logits go through the same steps, in the same order, as ``transformers``' ``generate``:
repetition penalty → temperature → top-k → top-p; temperature 0 means greedy (as in the OpenAI
API). A seed makes sampling reproducible and touches no global random state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, KVCache
from lmforge.utils import warn


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    stop: list[str] = field(default_factory=list)  # stop before the first of these strings
    stop_token_ids: list[int] | None = None  # None: the model's end-of-text token
    seed: int | None = None
    truncate: bool = False  # keep the end of a prompt that does not fit, instead of an error

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise LmforgeError(f"bad sampling option: {message}")


def process_logits(logits: torch.Tensor, history: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Apply penalties and filters to next-token ``logits`` (vocab,) given token ``history`` (n,)."""
    if p.repetition_penalty != 1.0 and history.numel():
        seen = logits.gather(0, history)
        logits = logits.scatter(0, history, torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty))
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.size(0):
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first is always kept.
        drop = (cumulative - sorted_logits.softmax(-1)) >= p.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
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


@torch.inference_mode()
def generate_ids(model: GPT, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int]) -> Iterator[int]:
    """Yield new token ids one by one; the first of ``stop_ids`` is yielded and ends generation."""
    params.validate()
    device = model.wte.weight.device
    prompt_ids = fit_prompt(list(prompt_ids), params.max_new_tokens, model.config.block_size, params.truncate)
    history = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    generator = None
    if params.seed is not None and params.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = KVCache(model.config, 1, len(prompt_ids) + params.max_new_tokens, device, model.wte.weight.dtype)
    logits = model(history[None], kv_cache=cache, start=0, last_only=True)[0, -1]
    # The history is only read by the repetition penalty; greedy decoding needs no filtering at all.
    track_history = params.repetition_penalty != 1.0
    plain_greedy = params.temperature == 0 and not track_history
    next_input = torch.empty(1, 1, dtype=torch.long, device=device)
    pos = len(prompt_ids)
    for i in range(params.max_new_tokens):
        if plain_greedy:
            next_id = int(logits.argmax())
        else:
            logits = process_logits(logits.float(), history, params)
            if params.temperature == 0:
                next_id = int(logits.argmax())
            else:
                next_id = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        yield next_id
        if next_id in stop_ids or i == params.max_new_tokens - 1:
            return
        if track_history:
            history = torch.cat([history, history.new_tensor([next_id])])
        next_input.fill_(next_id)
        logits = model(next_input, kv_cache=cache, start=pos, last_only=True)[0, -1]
        pos += 1


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"


def stream_generate(model: GPT, tokenizer, prompt: str, params: SamplingParams, result: dict | None = None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are safe to show.

    Text that could still turn into a stop string, or that ends inside a UTF-8 character, is held
    back until it is decided. ``result`` (if given) receives the final ``Generation``.
    """
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if not prompt_ids:
        if tokenizer.eos_id is None:
            raise LmforgeError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        prompt_ids = [tokenizer.eos_id]
    params.validate()
    prompt_ids = fit_prompt(prompt_ids, params.max_new_tokens, model.config.block_size, params.truncate)
    stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else [tokenizer.eos_id])
    stop_ids.discard(None)
    stops = [s for s in params.stop if s]
    hold = max((len(s) for s in stops), default=1) - 1
    ids: list[int] = []
    emitted = 0
    finish = "length"
    text = ""
    for token in generate_ids(model, prompt_ids, params, stop_ids):
        if token in stop_ids:
            finish = "stop"
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # the last token ends inside a multi-byte character
        hits = [i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0]
        if hits:
            text = text[: min(hits)]
            finish = "stop"
            break
        safe = len(text) - hold
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    else:
        text = tokenizer.decode(ids)
    if len(text) > emitted:
        yield text[emitted:]
    if result is not None:
        result["generation"] = Generation(text, ids, len(prompt_ids), finish)


def chat_prompt(tokenizer, messages: list[dict], params: SamplingParams) -> tuple[str, SamplingParams]:
    """The conversation rendered with the model's chat template, ready for the assistant's turn, and
    sampling settings that also stop at the end-of-turn token."""
    from dataclasses import replace

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stops = list(params.stop_token_ids) if params.stop_token_ids is not None else [tokenizer.eos_id]
    if tokenizer.end_of_turn_id is not None:
        stops.append(tokenizer.end_of_turn_id)
    extra = [] if tokenizer.end_of_turn_id is not None else ["<|im_end|>"]  # the marker as text, when not a token
    return prompt, replace(params, stop_token_ids=[s for s in stops if s is not None], stop=list(params.stop) + extra)


def generate(model: GPT | str | os.PathLike, prompt: str = "", tokenizer=None, chat: bool | None = None,
             system: str | None = None, **params) -> Generation:
    """Generate from a model object or a model/run folder: ``generate("runs/demo", "def ", max_new_tokens=50)``.

    ``chat`` (default: when the model has a chat template) sends the prompt as a user message through
    the template and stops at the end of the assistant's turn.
    """
    from lmforge.model.checkpoint import load_decoder, load_tokenizer_for

    if not isinstance(model, GPT):
        model = load_decoder(model)
    tokenizer = tokenizer or load_tokenizer_for(model)
    sampling = SamplingParams(**params)
    if chat if chat is not None else tokenizer.chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt, sampling = chat_prompt(tokenizer, messages, sampling)
    result: dict = {}
    for _ in stream_generate(model, tokenizer, prompt, sampling, result):
        pass
    return result["generation"]
