"""The `generate` entry points: one prompt streamed as text, or many prompts decoded as a batch.

The decoding loop itself is the engine (engine.py); decoding settings and logit processing live in
sampling.py, streamed text in detokenize.py. Their names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

from lmforge.errors import LmforgeError
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.engine import Engine, beam_search, end_tokens, fit_source
from lmforge.infer.sampling import (SamplingParams, fit_prompt, process_logits, recommended_length,
                                    recommended_for_beams, recommended_sampling)
from lmforge.model.gpt import GPT, use_fast_kernels
from lmforge.model.encoder_decoder import EncoderDecoder

__all__ = ["Detokenizer", "Generation", "SamplingParams", "chat_prompt", "fit_prompt", "generate", "generate_ids",
           "process_logits", "stream_generate"]


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


def stream_generate(model: GPT, tokenizer, prompt: str, params: SamplingParams, result: dict | None = None,
                    rendered: bool = False) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are safe to show.

    ``result`` (if given) receives the final ``Generation``. ``rendered``: the prompt is a chat template's
    rendering, which holds its own special tokens (see ``prompt_ids``).
    """
    engine = Engine(model, tokenizer, max_batch=1)
    request = engine.add(prompt_ids(model, tokenizer, prompt, rendered), replace(params, n=1))
    while not request.finished:
        for event in engine.step():
            if event.text:
                yield event.text
    seq = request.sequences[0]
    if result is not None:
        result["generation"] = Generation(seq.text, seq.tokens, len(request.prompt_ids), seq.finish_reason,
                                          seq.logprobs or None, seq.top_logprobs or None)


def prompt_ids(model, tokenizer, prompt: str, rendered: bool = False) -> list[int]:
    """A prompt's token ids: plain text as transformers' ``tokenizer(prompt)`` gives it to a decoder (with the
    tokenizer's leading special tokens: Llama's <s>); a chat template's rendering as written; an encoder-decoder's
    source as is (its end token is the engine's)."""
    if rendered or isinstance(model, EncoderDecoder):
        return tokenizer.encode(prompt) if prompt else []
    return tokenizer.encode_prompt(prompt)


def _beam_generation(tokenizer, tokens: list[int], stop_ids, stops: list[str], prompt_tokens: int,
                     skip_special: bool = False) -> Generation:
    """The best beam as a ``Generation``, its text cut before the first stop string as the engine cuts it."""
    text = Detokenizer(tokenizer, stops, skip_special=skip_special)
    reason = "length"
    for i, token in enumerate(tokens):
        if token in stop_ids or text.add(token)[1]:
            tokens, reason = tokens[: i + 1], "stop"
            break
    text.finish()
    return Generation(text.text, tokens, prompt_tokens, reason)


def chat_prompt(tokenizer, messages: list[dict], params: SamplingParams, model=None) -> tuple[str, SamplingParams]:
    """The conversation rendered with the model's chat template, ready for the assistant's turn, and
    sampling settings that also stop at the end-of-turn token (and at every end the ``model`` names)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stops = list(params.stop_token_ids) if params.stop_token_ids is not None else \
        end_tokens(model, tokenizer) if model is not None else [tokenizer.eos_id]
    if tokenizer.end_of_turn_id is not None:
        stops.append(tokenizer.end_of_turn_id)
    extra = [] if tokenizer.end_of_turn_id is not None else ["<|im_end|>"]  # the marker as text, when not a token
    return prompt, replace(params, stop_token_ids=[s for s in dict.fromkeys(stops) if s is not None],
                           stop=list(dict.fromkeys([*params.stop, *extra])))


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else \
        f"a list holding {', '.join(sorted({type(v).__name__ for v in value}))}"


def sampling_params(params: dict) -> SamplingParams:
    """``SamplingParams(**params)``, checked: an unknown name says which it may have meant."""
    import difflib
    from dataclasses import fields

    known = [f.name for f in fields(SamplingParams)]
    for name in params:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise LmforgeError(f"unknown generation option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                                       f"; the options are {', '.join(known)}"))
    sampling = SamplingParams(**params)
    sampling.validate()
    return sampling


def generate(model: GPT | str | os.PathLike, prompt: str | list[str] = "", tokenizer=None, chat: bool | None = None,
             system: str | None = None, device: str = "auto", **params) -> Generation | list[Generation]:
    """Generate from a model object or a model/run folder: ``generate("runs/demo", "def ", max_new_tokens=50)``.
    A folder is loaded on ``device`` (auto: CUDA when present, as the commands do); a model object runs where
    it is.

    A list of prompts is decoded as one batch and returns a list (``n`` > 1: a list per prompt).
    ``chat`` (default: when the model has a chat template) sends each prompt as a user message through
    the template and stops at the end of the assistant's turn. ``num_beams`` > 1 runs beam search. Sampling
    settings not given are the ones the model's generation_config.json recommends (``recommended_sampling``),
    else ``SamplingParams``' defaults.
    """
    from lmforge.model.checkpoint import load_generator, load_tokenizer_for

    loaded = not isinstance(model, (GPT, EncoderDecoder))
    if loaded:
        from lmforge.utils import pick_device

        model = load_generator(model, pick_device(device))
    seq2seq = isinstance(model, EncoderDecoder)
    if isinstance(tokenizer, (str, os.PathLike)):  # (a tokenizer.json or its folder)
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    tokenizer = tokenizer or load_tokenizer_for(model)
    beams = params.get("num_beams", 1)
    recommended = recommended_for_beams(model) if isinstance(beams, int) and beams > 1 else recommended_sampling(model)
    sampling = sampling_params({**{k: v for k, v in recommended.items() if k not in params}, **params})
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise LmforgeError(f"the prompt must be a string or a list of strings, not {_kind(prompt)}")
    if chat and seq2seq:  # (as serve refuses chat for one: its prompt is the encoder's source, not a conversation)
        raise LmforgeError("chat=True renders a chat template, and an encoder-decoder reads its prompt as a source "
                           "without one: leave chat out")
    templated = chat if chat is not None else (tokenizer.chat_template is not None and not seq2seq)
    if system and not templated:
        raise LmforgeError("system= goes into the chat template, and this generation uses none (the model has no "
                           "chat template, or chat=False): put the instruction in the prompt")
    if templated:
        rendered = []
        for p in prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text, sampling = chat_prompt(tokenizer, messages, sampling, model)
            rendered.append(text)
        prompts = rendered
    if "max_new_tokens" not in params:  # as the commands: the folder's setting, else up to 128, within the context
        lengths = [] if seq2seq else [max(len(prompt_ids(model, tokenizer, p, templated)), 1) for p in prompts]
        longest = 0 if seq2seq else max(lengths, default=1)  # (an empty list of prompts: nothing to fit)
        wanted = recommended_length(model) or 128
        # (with truncate the prompt gives way to the length, not the length to the prompt)
        room = model.config.block_size - (1 if sampling.truncate and not seq2seq else longest)
        sampling = replace(sampling, max_new_tokens=max(1, min(wanted, room)))
    if loaded:  # (a model object is left as it is: it may train on)
        use_fast_kernels(model, max(len(prompts) * sampling.n, sampling.num_beams))
    if sampling.num_beams > 1:
        out = []
        for p in prompts:
            ids = prompt_ids(model, tokenizer, p, templated) or [tokenizer.eos_id]
            if seq2seq:
                ids = fit_source(ids, sampling.max_new_tokens, model.config.block_size, sampling.truncate, tokenizer.eos_id)
            else:
                ids = fit_prompt(ids, sampling.max_new_tokens, model.config.block_size, sampling.truncate)
            stops = tuple(sampling.stop_token_ids if sampling.stop_token_ids is not None else end_tokens(model, tokenizer))
            beams = beam_search(model, ids, sampling.num_beams, sampling.max_new_tokens, sampling.length_penalty,
                                sampling.early_stopping, tuple(t for t in stops if t is not None), n=sampling.n,
                                no_repeat_ngram_size=sampling.no_repeat_ngram_size,
                                min_new_tokens=sampling.min_new_tokens, repetition_penalty=sampling.repetition_penalty)
            gens = [_beam_generation(tokenizer, tokens, stops, sampling.stop, len(ids), sampling.skip_special_tokens) for tokens, _ in beams]
            out.append(gens[0] if sampling.n == 1 else gens)
        return out[0] if isinstance(prompt, str) else out
    engine = Engine(model, tokenizer, max_batch=max(len(prompts), 1) * sampling.n, text_as_it_comes=False)
    requests = [engine.add(prompt_ids(model, tokenizer, p, templated), sampling) for p in prompts]
    engine.run(requests)
    results = []
    for r in requests:
        gens = [Generation(s.text, s.tokens, len(r.prompt_ids), s.finish_reason, s.logprobs or None,
                           s.top_logprobs or None) for s in r.sequences]
        results.append(gens[0] if sampling.n == 1 else gens)
    return results[0] if isinstance(prompt, str) else results
