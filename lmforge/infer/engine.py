"""The inference engine: batched decoding of many sequences at once, with a static KV cache.

Each sequence owns one row of the cache, which holds as many positions as the admitted requests need
(prompt + max_new_tokens, at most the context) and grows when a longer request is admitted. New requests
are *prefilled* (their prompts run through the model into their rows; the requests admitted in one step
together, as one right-padded batch), then every active sequence advances together: one forward pass per
step, each row at its own position, attending only to its own keys (a per-row mask). A sequence's result
therefore does not depend on what else is in the batch (up to the rounding of matrix products of another
size). The server feeds the same engine from many clients (continuous batching); `generate` feeds it one
prompt or a list.

Rows stay packed: when a sequence finishes, the last active row moves into its place.

An encoder-decoder (T5) runs in one wave at a time, with continuous batching too: the waiting requests
that fit are admitted together, their sources encoded once as one padded batch (each row's
cross-attention keys and values cached once), and their decoders start together; every row then
advances in step, finished rows dropping out, and requests that arrive later join at the next step
(their rows masked over the columns before their start: ``encoder_decoder.join_rows``). Sampling, stop
rules and events are the same code as the decoder's.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.sampling import (SamplingParams, draw_rows, filter_logits, fit_prompt, process_logits,
                                    repeated_ngram_ends, sample)
from lmforge.model.encoder_decoder import join_rows, select_rows
from lmforge.model.gpt import GPT, KVCache, use_matvec
from lmforge.utils import warn

_ids = itertools.count()


@dataclass
class Request:
    """One prompt and its settings; ``n`` samples become ``n`` sequences."""

    prompt_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    sequences: list[Sequence] = field(default_factory=list)
    aborted: bool = False
    error: Exception | None = None  # why it failed alone, in an engine that isolates failures
    # with params.prompt_logprobs: each prompt token's (logprob, top alternatives) given the tokens before it,
    # None for the first (nothing before it), as the OpenAI API's echo gives them
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.finished for s in self.sequences)


@dataclass
class Event:
    """What one step produced for one sequence."""

    sequence: Sequence
    token_id: int | None
    text: str  # newly decided text (may be empty while a stop string or a character is pending)
    finished: bool
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    appended: bool = False  # the token became part of the output (a stop token does not)


class Sequence:
    def __init__(self, request: Request, index: int, tokenizer, stop_ids: set[int], text_as_it_comes: bool = True):
        p = request.params
        self.request, self.index = request, index
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token that ended it (not part of ``tokens``)
        self.stop_logprob: tuple | None = None  # its (logprob, top alternatives), where logprobs were asked for
        self.stop_ids = stop_ids
        self.text_stream = Detokenizer(tokenizer, p.stop, lazy=not text_as_it_comes, skip_special=p.skip_special_tokens)
        self.generator = None
        if p.seed is not None and p.temperature > 0:
            self.generator = torch.Generator().manual_seed(p.seed + index)
        self.history = torch.tensor(request.prompt_ids, dtype=torch.long)
        self.counts: torch.Tensor | None = None  # token counts of the output, for frequency/presence penalties
        self.next_input: int | None = None  # sampled but not yet in the cache
        self.pos = len(request.prompt_ids)  # cache position of next_input
        plain = (p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
                 and not p.no_repeat_ngram_size and not p.min_new_tokens and p.logprobs is None)
        self.plain_greedy = plain and p.temperature == 0
        # Plain sampling rows with the same settings are sampled together (each with its own generator).
        self.plain_sampling = (p.temperature, p.top_k, p.top_p, p.min_p) if plain and p.temperature > 0 else None

    @property
    def text(self) -> str:
        return self.text_stream.text

    def choose(self, logits: torch.Tensor, drawn: int | None = None) -> tuple[int, float | None, list | None]:
        """Pick the next token from raw ``logits`` (vocab,); returns (token, its logprob, top alternatives).
        ``drawn``: the token already drawn for this row together with other rows (plain sampling)."""
        if drawn is not None:
            return drawn, None, None
        p = self.request.params
        raw = logits.float()
        if p.frequency_penalty or p.presence_penalty:
            if self.counts is None:
                self.counts = torch.zeros_like(raw)
        processed = process_logits(raw, self.history, p, self.counts, len(self.tokens), self.stop_ids)
        if p.temperature == 0:
            token = int(processed.argmax())
        else:
            token = sample(processed.softmax(-1), self.generator)
        logprob, top = None, None
        if p.logprobs is not None:
            logp = F.log_softmax(raw, -1)
            logprob = float(logp[token])
            if p.logprobs > 0:
                values, ids = logp.topk(p.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        return token, logprob, top

    def accept(self, token: int, logprob, top, context: int) -> Event:
        p = self.request.params
        if token in self.stop_ids:
            self.stop_token = token
            self.stop_logprob = (logprob, top) if logprob is not None else None
            self._finish("stop")
            return Event(self, token, self.text_stream.finish(), True, logprob, top)
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top)
        if p.repetition_penalty != 1.0 or p.no_repeat_ngram_size:
            self.history = torch.cat([self.history, self.history.new_tensor([token])])
        if self.counts is not None:
            self.counts[token] += 1
        piece, hit_stop = self.text_stream.add(token)
        if hit_stop:
            self._finish("stop")
            return Event(self, token, piece, True, logprob, top, appended=True)
        if len(self.tokens) >= p.max_new_tokens or self.pos + 1 >= context:
            self._finish("length")
            return Event(self, token, piece + self.text_stream.finish(), True, logprob, top, appended=True)
        self.next_input = token
        return Event(self, token, piece, False, logprob, top, appended=True)

    def _finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason


def end_tokens(model, tokenizer) -> list[int]:
    """The tokens that end a generation by default: the tokenizer's end-of-text token and the model's end ids
    (transformers' ``generate`` stops at the latter), where they differ (Qwen2.5's chat models: ``<|im_end|>`` and
    ``<|endoftext|>``): those its folder names (``checkpoint.end_token_ids``: generation_config.json's, else
    config.json's), or, for a model made in this process, its config's ``eos_token_id``."""
    ends = getattr(model, "end_token_ids", None) or [getattr(model.config, "eos_token_id", None)]
    ids = [tokenizer.eos_id, *ends]
    return sorted({i for i in ids if i is not None and 0 <= i < model.config.vocab_size})


def record_end_of_turn(model, tokenizer) -> None:
    """A model trained on conversations ends its turns with the template's end-of-turn token: list it among the
    model's end ids, which go into the generation_config.json it is saved with (transformers' ``generate`` stops
    there too) and which ``end_tokens`` reads. Refused before training: lmforge's default template (ChatML) for a
    tokenizer without its markers as tokens, which would write each marker in pieces and leave the model no
    token to end a turn with."""
    turn_end = tokenizer.end_of_turn_id
    markers = [t for t in ("<|im_start|>", "<|im_end|>") if tokenizer.hf.token_to_id(t) is None]
    if tokenizer.chat_template is None and markers:
        raise LmforgeError(f"the tokenizer has no chat template of its own, and lacks {' and '.join(markers)} of "
                           f"the default one (ChatML): conversations would be written with the markers in pieces, "
                           f"and no token would end a turn; use a tokenizer that has them (`lmforge tokenizer "
                           f"train` reserves them) or one with a chat template, or give prompt/completion rows")
    if turn_end is None:
        warn("the chat template ends an assistant's turn with no special token: the model learns no single token "
             "to stop at (generation stops at the end-of-text token or a stop string)")
    if turn_end is not None:
        ends = [*getattr(model, "end_token_ids", []), tokenizer.eos_id, turn_end]
        model.end_token_ids = [i for i in dict.fromkeys(ends) if i is not None]


def fit_source(source_ids: list[int], max_new_tokens: int, context: int, truncate: bool,
               eos: int | None = None, say: bool = True) -> list[int]:
    """An encoder-decoder's source, ending with ``eos`` as its training inputs did (T5's inputs end with the
    end-of-text token), checked against the longest input it takes (left-truncated when asked, the end token
    kept, with a warning unless ``say`` is off); the decoder's ``max_new_tokens`` has a room of its own."""
    if max_new_tokens > context:
        raise LmforgeError(f"max_new_tokens {max_new_tokens} exceeds the model's {context} decoder positions")
    given = len(source_ids)
    if eos is not None and (not source_ids or source_ids[-1] != eos):
        source_ids = source_ids + [eos]
    if len(source_ids) <= context:
        return source_ids
    what = f"the source ({given} tokens" + (" + its end token)" if len(source_ids) > given else ")")
    if not truncate:
        raise LmforgeError(f"{what} exceeds the model's {context} input positions; shorten it or pass --truncate to "
                           f"keep its last {context - len(source_ids) + given} tokens")
    if say:
        warn(f"{what} left-truncated to its last {context} tokens to fit the model's {context} input positions")
    return source_ids[-context:]


def _reraise(error: Exception):
    raise error


def prefill_groups(requests: list[Request], tokens: int) -> list[list[Request]]:
    """``requests`` in order, cut into groups whose prompts, right-padded to the group's longest, hold at most
    ``tokens`` tokens (a longer prompt is a group of its own)."""
    groups: list[list[Request]] = []
    longest = 0
    for r in requests:
        n = len(r.prompt_ids)
        if groups and max(longest, n) * (len(groups[-1]) + 1) <= tokens:
            groups[-1].append(r)
            longest = max(longest, n)
        else:
            groups.append([r])
            longest = n
    return groups


def static_keys(needed: int, max_len: int) -> int:
    """How many cache positions a compiled (static-shape) step attends to when its longest row needs
    ``needed``: the next power of two from max(128, max_len / 128), at most ``max_len``. Attending to the
    whole cache made every step cost as much as the last one could (masked keys are still read); these
    buckets keep the work within 2x of what is needed and compile at most 8 shapes (dynamo's recompile limit)."""
    keys = max(128, max_len >> 7)
    while keys < needed:
        keys *= 2
    return min(keys, max_len)


class Engine:
    """Continuous batching over a static KV cache of ``max_batch`` rows × ``max_len`` positions."""

    def __init__(self, model: GPT, tokenizer, max_batch: int = 8, max_len: int | None = None, compile: bool = False,
                 isolate_failures: bool = False, text_as_it_comes: bool = True):
        from lmforge.model.encoder_decoder import EncoderDecoder

        self.seq2seq = isinstance(model, EncoderDecoder)
        if not isinstance(model, GPT) and not self.seq2seq:
            raise LmforgeError("the engine generates with decoder and encoder-decoder models; an encoder cannot generate text")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        embedding = model.shared.weight if self.seq2seq else model.wte.weight
        self.device = embedding.device
        # (bf16/fp16 only: fp32's linear and mv are both BLAS gemv, the same speed in whole-model decoding)
        if self.device.type == "cpu" and embedding.dtype != torch.float32 and not getattr(model, "quantized", None):
            from lmforge.precision import MARGIN, matvec_speedup

            width = model.config.d_model if self.seq2seq else model.config.n_embd
            if matvec_speedup(embedding.dtype, width, model.config.vocab_size) >= MARGIN:
                use_matvec(model)  # batch-1 steps through the faster matrix-vector kernel (measured here)
        # The cache starts small and grows to what the admitted requests need (prompt + max_new_tokens, at most
        # max_len): all of it is zeros written to memory (0.26 s for 16 rows x 1,024 positions of gpt2 in fp32).
        # A compiled step's static shapes take the whole context at once.
        self.cache = None if self.seq2seq else KVCache(model.config, max_batch, 0, self.device, embedding.dtype)
        self._staged: dict[int, tuple[int, torch.Tensor]] = {}  # request id: (cache row of its prompt, logits)
        self.wave: dict | None = None  # encoder-decoder: the current wave's encoder padding and decoder caches
        # a sequence ends at this position: the context (a decoder's prompt shares it; an encoder-decoder's
        # decoder has it all, counted from its start token)
        self.limit = self.max_len + 1 if self.seq2seq else self.max_len
        self.waiting: deque[Request] = deque()
        self.active: list[Sequence] = []  # active[i] lives in cache row i
        self.static = compile
        # A server sets this: an exception in one request's share of a step ends that request alone.
        self.isolate_failures = isolate_failures
        # False: the caller reads each sequence's text once it has finished (not from the events as they come), so a
        # sequence without stop strings decodes its tokens once, at its end (RL rollouts, generate's lists).
        self.text_as_it_comes = text_as_it_comes
        self._decode = torch.compile(self._decode_forward, dynamic=False) if compile else self._decode_forward

    # -- requests ---------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a prompt; checks it against the context (left-truncating only when ``params.truncate``)."""
        params.validate()
        if params.n > self.max_batch:
            raise LmforgeError(f"n={params.n} samples exceed the engine's {self.max_batch} rows")
        if params.num_beams > 1:
            raise LmforgeError("beam search runs through beam_search(), not the batching engine")
        if params.prompt_logprobs is not None and self.seq2seq:
            raise LmforgeError("prompt_logprobs are a decoder's: an encoder-decoder reads its prompt, it does not predict it")
        if isinstance(prompt_ids, str) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                  for t in prompt_ids):
            raise LmforgeError("Engine.add takes the prompt's token ids (tokenizer.encode(text)), a list of whole numbers")
        vocab = self.model.config.vocab_size
        outside = [t for t in prompt_ids if not 0 <= t < vocab]
        if outside:
            raise LmforgeError(f"prompt token id {outside[0]} is outside the model's vocabulary (0 to {vocab - 1})")
        prompt_ids = prompt_ids or ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])
        if not prompt_ids:
            raise LmforgeError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        if self.seq2seq:  # the prompt is the encoder's source; the decoder's room is its own
            prompt_ids = fit_source(list(prompt_ids), params.max_new_tokens, self.max_len, params.truncate,
                                    self.tokenizer.eos_id)
        else:
            prompt_ids = fit_prompt(list(prompt_ids), params.max_new_tokens, self.max_len, params.truncate)
        request = Request(prompt_ids, params)
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else end_tokens(self.model, self.tokenizer))
        stops.discard(None)
        request.sequences = [Sequence(request, i, self.tokenizer, stops, self.text_as_it_comes)
                             for i in range(params.n)]
        if self.seq2seq:  # repetition penalties look at the decoder's tokens, which start at the start token
            for seq in request.sequences:
                seq.history = torch.tensor([self.model.start_token_id])
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Stop a request (a client went away): its rows are freed at the next step."""
        request.aborted = True
        for s in request.sequences:
            if not s.finished:
                s._finish("abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    # -- stepping ---------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """The waiting requests that fit beside the active rows, in order (aborted ones dropped)."""
        admitted, rows = [], len(self.active)
        while self.waiting and rows + len(self.waiting[0].sequences) <= self.max_batch:
            request = self.waiting.popleft()
            if not request.aborted:
                admitted.append(request)
                rows += len(request.sequences)
        return admitted

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Advance every active sequence by one token and admit waiting requests that fit."""
        if self.seq2seq:
            return self._wave_step()
        events: list[Event] = []
        self._drop_finished()
        pending = list(self.active)  # sequences that already hold a sampled token
        if pending:
            events += self._decode_step(pending)
        admitted = self._admit()
        need = max((min(len(r.prompt_ids) + r.params.max_new_tokens, self.max_len) for r in admitted), default=0)
        need = self.max_len if self.static and admitted else need
        if need > self.cache.max_len:  # (doubling: a server's longer requests grow it a few times at most)
            try:
                self.cache.grow(min(max(need, 2 * self.cache.max_len), self.max_len))
            except Exception as e:
                if not self.isolate_failures:
                    raise
                # (out of memory, most likely) the requests that needed the room fail; the rows decoding go on
                for request in admitted:
                    events += self._isolated(request, _reraise, e)
                admitted = []
        for group in prefill_groups(admitted, self.PREFILL_TOKENS):
            together = [r for r in group if r.params.prompt_logprobs is None]  # (those prefill alone: all logits)
            if len(together) > 1:
                self._stage(together)
            for request in group:
                events += self._isolated(request, self._prefill, request)
        self._staged.clear()  # (the prompts of requests that failed before taking theirs)
        self._drop_finished()
        return events

    # Requests admitted in one step are prefilled in one forward pass (one matrix product per weight, not one per
    # request: 16 prompts of 32 tokens at the gpt2 shape took 0.97 s one by one, 0.36 s together) while their
    # right-padded batch holds at most this many tokens.
    PREFILL_TOKENS = 4096

    def _stage(self, requests: list[Request]) -> None:
        """Run the prompts of ``requests`` through the model together, into the last rows of the cache, for each
        request's ``_prefill`` to take (``_staged``). The last rows are free (the admitted sequences fit), and a
        request's rows, taken in order, never reach a prompt not yet taken: each request has a sequence or more.
        If the pass fails, each request prefills alone (so that a prompt that breaks it fails alone)."""
        first = self.max_batch - len(requests)
        try:
            logits = self._prompt_pass(requests, first)
        except Exception:
            if not self.isolate_failures:
                raise
            return
        self._staged.update((r.id, (first + i, logits[i])) for i, r in enumerate(requests))

    def _prompt_pass(self, requests: list[Request], first: int) -> torch.Tensor:
        """The prompts of ``requests`` through the model into cache rows ``first, first + 1, ...``, as one
        right-padded batch; returns each prompt's next-token logits (len(requests), vocab)."""
        k = len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        T = max(lengths)
        ids = torch.zeros(k, T, dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        ids, cache = ids.to(self.device), self.cache.row(first, k)
        if min(lengths) == T:
            return self.model(ids, kv_cache=cache, start=0, last_only=True)[:, -1]
        # Each row's tokens attend causally to that row's own tokens only, and its logits are read at its last
        # token. The padding's keys and values land in the cache after the prompt, where the row's own tokens
        # overwrite them before its mask lets it read them.
        length = torch.tensor(lengths, device=self.device)
        position = torch.arange(T, device=self.device)
        mask = (position[None, :] <= position[:, None])[None] & (position < length[:, None])[:, None, :]
        return self.model(ids, kv_cache=cache, start=0, positions=position.expand(k, T), attn_mask=mask[:, None],
                          keep=(length - 1)[:, None])[:, 0]

    def _prefill(self, request: Request) -> list[Event]:
        """Start ``request``'s sequences in the next free rows, from its prompt's pass (staged with others', or its
        own): its ``n`` sequences share the prompt's keys and values."""
        first = len(self.active)
        staged = self._staged.pop(request.id, None)
        if request.params.prompt_logprobs is not None and request.prompt_ids:
            staged = (first, self._scored_prompt_pass(request, first))
        source, logits = staged if staged is not None else (first, self._prompt_pass([request], first)[0])
        for row in range(first, first + len(request.sequences)):
            if row != source:
                self.cache.copy_row(source, row, len(request.prompt_ids))
        self.active += request.sequences
        return [seq.accept(*seq.choose(logits), self.max_len) for seq in request.sequences]

    def _scored_prompt_pass(self, request: Request, row: int) -> torch.Tensor:
        """``request``'s prompt through the model into cache row ``row``, keeping in ``request.prompt_logprobs``
        each prompt token's log-probability given the tokens before it and the ``prompt_logprobs`` likeliest
        there (as ``Sequence.choose`` gives a generated token's: from the raw logits); returns the logits after
        the prompt. The vocabulary's projection runs over a slice of positions at a time (a whole prompt's
        logits, positions x vocabulary in fp32, could take gigabytes)."""
        ids = torch.tensor([request.prompt_ids], device=self.device)
        hidden = self.model.hidden_states(ids, kv_cache=self.cache.row(row, 1), start=0)[0]
        k, targets = request.params.prompt_logprobs, ids[0, 1:]
        scored: list = [None]
        for i in range(0, len(targets), 256):
            logp = F.log_softmax(self.model.lm_logits(hidden[i : i + 256][: len(targets) - i]).float(), dim=-1)
            chosen = logp.gather(1, targets[i : i + 256, None])[:, 0].tolist()
            if k:
                values, alternatives = logp.topk(k, dim=-1)
                tops = [list(zip(a, v)) for a, v in zip(alternatives.tolist(), values.tolist())]
            else:
                tops = [None] * len(chosen)
            scored += list(zip(chosen, tops))
        request.prompt_logprobs = scored
        return self.model.lm_logits(hidden[-1:])[0]

    def _decode_forward(self, tokens, positions, mask):
        return self.model(tokens, kv_cache=self.cache, start=positions[:, 0], positions=positions, attn_mask=mask,
                          last_only=True)[:, -1]

    def _decode_step(self, seqs: list[Sequence]) -> list[Event]:
        B = len(seqs)
        tokens = torch.tensor([[s.next_input] for s in seqs], dtype=torch.long)
        starts = [s.pos for s in seqs]
        if not self.static and min(starts) == max(starts):
            # Every row at the same position (one sequence, or prompts of one length): plain causal
            # attention over the cache, written with a slice; no per-row mask needed.
            logits = self.model(tokens.to(self.device), kv_cache=self.cache, start=starts[0], last_only=True)[:, -1]
        else:
            width = self.max_batch if self.static else B  # a compiled step always runs full, static shapes
            positions = torch.zeros(width, 1, dtype=torch.long)
            positions[:B, 0] = torch.tensor(starts)
            if width > B:
                tokens = torch.cat([tokens, torch.zeros(width - B, 1, dtype=torch.long)])
            S = static_keys(max(starts) + 1, self.max_len) if self.static else max(starts) + 1
            mask = (torch.arange(S)[None, :] <= positions)[:, None, None, :]
            self.cache.view_len = S
            logits = self._decode(tokens.to(self.device), positions.to(self.device), mask.to(self.device))
        # Plain rows (no penalties, no log-probabilities) are decided together: greedy ones by one argmax,
        # sampled ones by settings, each row with its own generator (the token it would get alone).
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy]
        chosen = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}
        return self._choose_all(seqs, logits, chosen)

    def _choose_all(self, seqs: list[Sequence], logits: torch.Tensor, chosen: dict[int, int],
                    drawn: dict[int, int] | None = None) -> list[Event]:
        """Each row's next token from its ``logits`` row (``chosen``: rows already decided; ``drawn``: rows
        already sampled together, by default now)."""
        drawn = self._batched_draws(seqs, logits) if drawn is None else drawn
        events = []
        for i, s in enumerate(seqs):
            s.pos += 1
            if not s.finished:  # (a row of a request that failed earlier in this step)
                events += self._isolated(s.request, self._advance, s, logits[i], chosen.get(i), drawn.get(i))
        return events

    # -- encoder-decoder waves --------------------------------------------------------------------

    def _wave_step(self) -> list[Event]:
        """Advance the current wave one token, then let the waiting requests that fit join it (encode their
        sources, decode their first token); with no wave, they start one."""
        events: list[Event] = []
        self._drop_finished_rows()  # (aborted ones too)
        if self.active:
            seqs, cache = self.active, self.wave["cache"]
            tokens = torch.tensor([[s.next_input] for s in seqs], device=self.device)
            past = cache[0]["self"][0].size(2)
            try:
                logits = self.model.decode(tokens, None, self.wave["mask"], cache)[:, -1]
                chosen, drawn = self._greedy(seqs, logits), self._batched_draws(seqs, logits)
            except Exception:
                # The cache (its blocks before a failing one, or all of them) already holds this step's keys: cut
                # it back, so that the step can run again (with fewer rows, when a server fails the newest
                # request and retries) without a key twice.
                for layer in cache:
                    layer["self"] = tuple(t[:, :, :past] for t in layer["self"])
                raise
            events += self._choose_all(seqs, logits, chosen, drawn)
            self._drop_finished_rows()
        requests = self._admit()
        if not requests:
            return events
        try:
            seqs, mask, cache, logits = self._first_tokens(requests)
        except Exception as e:
            if not self.isolate_failures:
                raise
            # The newest request is the likeliest cause (the longest source, the one that did not fit): it fails
            # alone, the others wait for the next step.
            newest = requests.pop()
            self.waiting.extendleft(reversed(requests))
            newest.error = e
            for s in newest.sequences:
                if not s.finished:
                    s._finish("error")
                    events.append(Event(s, None, "", True))
            return events
        if self.active:  # continuous batching: the newcomers' rows join the running wave's
            self.wave["mask"] = join_rows(self.wave["cache"], self.wave["mask"], cache, mask)
            self.active += seqs
        else:
            self.wave, self.active = {"mask": mask, "cache": cache}, seqs
        events += self._choose_all(seqs, logits, self._greedy(seqs, logits))
        self._drop_finished_rows()
        return events

    def _first_tokens(self, requests: list[Request]) -> tuple[list[Sequence], torch.Tensor, list[dict], torch.Tensor]:
        """Encode ``requests``' sources as one padded batch and decode their start token: (their sequences, the
        sources' mask a row, the decoder's cache, the logits of each row's first token)."""
        sources = [r.prompt_ids for r in requests]
        width = max(map(len, sources))
        pad = self.model.config.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sources], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources], device=self.device)
        rows = torch.tensor([i for i, r in enumerate(requests) for _ in r.sequences], device=self.device)
        memory, mask = self.model.encode(ids, mask)[rows], mask[rows]
        cache = [{} for _ in self.model.decoder.blocks]
        seqs = [s for r in requests for s in r.sequences]
        start = torch.full((len(seqs), 1), self.model.start_token_id, device=self.device)
        logits = self.model.decode(start, memory, mask, cache)[:, -1]
        for s in seqs:
            s.pos = 0
        return seqs, mask, cache, logits

    def _greedy(self, seqs: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy]
        return dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}

    def _drop_finished_rows(self) -> None:
        """Keep the unfinished rows of the wave (their caches and encoder padding too)."""
        keep = [i for i, s in enumerate(self.active) if not s.finished]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if not keep:
            self.wave = None
            return
        rows = torch.tensor(keep, device=self.device)
        self.wave["mask"] = self.wave["mask"][rows]
        select_rows(self.wave["cache"], rows)

    @staticmethod
    def _batched_draws(seqs: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
        """Rows that sample with the same plain settings have their logits filtered, normalised and summed
        together, and draw together (``draw_rows``, each with its own generator): the token each row gets alone."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.plain_sampling is not None and not s.finished:
                groups.setdefault(s.plain_sampling, []).append(i)
        chosen = {}
        for rows in groups.values():
            if len(rows) > 1:
                cdfs = filter_logits(logits[rows].float(), seqs[rows[0]].request.params).softmax(-1).cumsum(-1)
                chosen.update(zip(rows, draw_rows(cdfs, [seqs[i].generator for i in rows])))
        return chosen

    def _advance(self, seq: Sequence, logits: torch.Tensor, token: int | None, drawn: int | None = None) -> list[Event]:
        choice = (token, None, None) if token is not None else seq.choose(logits, drawn)
        return [seq.accept(*choice, self.limit)]

    def _isolated(self, request: Request, work, *args) -> list[Event]:
        """``work(*args)``, one request's share of a step. With ``isolate_failures``, an exception ends
        that request only: ``request.error`` keeps it, its sequences finish as "error", the others go on."""
        if not self.isolate_failures:
            return work(*args)
        try:
            return work(*args)
        except Exception as e:  # noqa: BLE001 (kept on the request for the caller to report)
            request.error = e
            ended = [s for s in request.sequences if not s.finished]
            for s in ended:
                s._finish("error")
            return [Event(s, None, "", True) for s in ended]

    def _drop_finished(self) -> None:
        i = 0
        while i < len(self.active):
            if self.active[i].finished:
                last = len(self.active) - 1
                if i != last:  # keep rows packed: the last sequence moves into the freed row
                    self.cache.copy_row(last, i, self.active[last].pos)
                    self.active[i] = self.active[last]
                self.active.pop()
            else:
                i += 1

    # -- whole requests ---------------------------------------------------------------------------

    def run(self, requests: list[Request]) -> None:
        """Step until ``requests`` are all finished."""
        while not all(r.finished for r in requests):
            self.step()


# -- beam search ----------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model: GPT, prompt_ids: list[int], num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_ids: tuple[int, ...] = (), n: int | None = None,
                no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, repetition_penalty: float = 1.0):
    """The best beam's new tokens (ending with its end-of-sequence token, if it chose one) and its score; with
    ``n``, a list of the ``n`` best (at most ``num_beams``), best first, as transformers'
    ``num_return_sequences``.

    Follows transformers' beam search step for step (its ``_beam_search``): 2·num_beams candidates (more
    with several end tokens) ranked by summed log-probabilities; a candidate that ends (end token or
    maximum length) is scored ``sum / generated_length ** length_penalty`` and kept among the best
    ``num_beams`` finished; the rest continue. ``early_stopping`` True stops once ``num_beams`` have
    finished; False and "never" stop when no running beam can still beat the finished ones.
    ``repetition_penalty``, ``no_repeat_ngram_size`` and ``min_new_tokens`` act on each beam's log-probabilities as
    transformers' processors do there (the penalty multiplies a seen token's log-probability, which is negative).
    """
    from lmforge.model.encoder_decoder import EncoderDecoder

    if num_beams < 1:
        raise LmforgeError("num_beams must be at least 1")
    if n is not None and not 1 <= n <= num_beams:
        raise LmforgeError(f"n {n} must be from 1 to num_beams ({num_beams}): beam search returns its n best beams")
    c = model.config
    model.eval()  # (no dropout: as the engine, which sets it too)
    seq2seq = isinstance(model, EncoderDecoder)
    # an encoder-decoder reads the prompt in its encoder; its decoder's prefix is the start token
    prefix = [model.start_token_id] if seq2seq else prompt_ids
    if seq2seq:
        fit_source(prompt_ids, max_new_tokens, c.block_size, False)
    P = len(prefix)
    max_length = P + max_new_tokens
    if max_length > c.block_size and not seq2seq:
        raise LmforgeError(f"prompt of {P} tokens plus {max_new_tokens} new tokens exceeds the context of {c.block_size}")
    device = (model.shared if seq2seq else model.wte).weight.device
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos_ids)) * num_beams
    fill = eos_ids[0] if eos_ids else -1
    running = torch.full((num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :P] = torch.tensor(prefix, device=device)
    finished_seqs = running.clone()
    running_scores = torch.zeros(num_beams, device=device)
    running_scores[1:] = -1e9
    finished_scores = torch.full((num_beams,), -1e9, device=device)
    is_finished = torch.zeros(num_beams, dtype=torch.bool, device=device)
    improvable = True
    running_parents = torch.full((num_beams, max_new_tokens), -1, dtype=torch.long, device=device)
    finished_parents = running_parents.clone()
    top_mask = torch.arange(keep, device=device) < num_beams

    if seq2seq:
        memory = model.encode(torch.tensor([prompt_ids], device=device)).expand(num_beams, -1, -1)
        layers = [{} for _ in model.decoder.blocks]
        logits = model.decode(running[:, :1], memory, None, layers)[:, -1]

        def step(tokens, _position):
            return model.decode(tokens, None, None, layers)[:, -1]

        def reorder(rows):
            select_rows(layers, rows)
    else:
        cache = KVCache(c, num_beams, max_length, device, model.wte.weight.dtype)
        logits = model(running[:1, :P], kv_cache=cache.row(0), start=0, last_only=True)[:, -1].expand(num_beams, -1)
        for b in range(1, num_beams):
            cache.copy_row(0, b, P)

        def step(tokens, position):
            return model(tokens, kv_cache=cache, start=position, last_only=True)[:, -1]

        reorder = cache.reorder
    cur = P
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if repetition_penalty != 1.0:
            seen = running[:, :cur]
            picked = log_probs.gather(1, seen)
            log_probs = log_probs.scatter(1, seen, torch.where(picked < 0, picked * repetition_penalty,
                                                                picked / repetition_penalty))
        if no_repeat_ngram_size:
            for b in range(num_beams):
                banned = repeated_ngram_ends(running[b, :cur].tolist(), no_repeat_ngram_size)
                log_probs[b, banned] = float("-inf")
        if cur - P < min_new_tokens:
            log_probs[:, eos[(eos >= 0) & (eos < log_probs.size(-1))]] = float("-inf")
        log_probs = log_probs + running_scores[:, None]
        vocab = log_probs.size(-1)
        top_lp, top_idx = torch.topk(log_probs.reshape(-1), keep)
        parent, token = top_idx // vocab, top_idx % vocab
        cand = running[parent].clone()
        cand[:, cur] = token
        cand_parents = running_parents[parent].clone()
        cand_parents[:, cur - P] = parent
        ends = torch.isin(token, eos) | (cur + 1 >= max_length)
        # the best num_beams candidates that did not end continue
        live = top_lp + ends.float() * -1e9
        nxt = torch.topk(live, num_beams).indices
        running, running_scores, running_parents = cand[nxt], live[nxt], cand_parents[nxt]
        # candidates that ended (among the top num_beams) compete for the finished places
        just_ended = ends & top_mask
        scored = top_lp / ((cur + 1 - P) ** length_penalty)
        if bool(is_finished.all()) and early_stopping is True:
            scored = scored - 1e9
        if not improvable:
            scored = scored - 1e9
        scored = scored + (~just_ended).float() * -1e9
        merged = torch.cat([finished_scores, scored])
        best = torch.topk(merged, num_beams).indices
        finished_seqs = torch.cat([finished_seqs, cand])[best]
        finished_parents = torch.cat([finished_parents, cand_parents])[best]
        is_finished = torch.cat([is_finished, just_ended])[best]
        finished_scores = merged[best]
        reorder(running_parents[:, cur - P])
        cur += 1
        best_length = max_length - P if early_stopping == "never" and length_penalty > 0 else cur - P
        best_possible = running_scores[0] / (best_length ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(), torch.tensor(-1e9, device=device))
        improvable = improvable and bool((best_possible > worst_finished).any())
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (improvable and open_beams and not bool(ends.all())):
            break
        logits = step(running[:, cur - 1 : cur], cur - 1)
    best = []
    for i in range(n or 1):  # (the finished beams are in order of score)
        length = int((finished_parents[i] + 1).bool().sum())
        best.append((finished_seqs[i, P : P + length].tolist(), float(finished_scores[i])))
    return best if n is not None else best[0]


def quantize_int8(model):
    """Int8 weights of a decoder or an encoder-decoder for CPU inference, with PyTorch's dynamic quantisation
    (``quantize_dynamic``: int8 weights per output channel, activations quantised on the fly by fbgemm). The
    tied output head gets its own Linear first so that it is quantised too (the embedding stays float).
    Returns a new model for inference only. The input of each product is quantised with one scale for all its
    rows, so rows decoded together are not exactly what each row gives alone (weight-only int8,
    ``torch._weight_int8pack_mm``, would be, but measured 1.5x to 38x slower than this on a 2-core Xeon: 1 to 16
    rows of the gpt2 shape's matrices, bf16 or fp32 inputs)."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model).float().cpu().eval()
    embedding = model.wte if isinstance(model, GPT) else model.shared
    if model.lm_head is None and getattr(model, "score", None) is None:
        head = torch.nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        head.weight = embedding.weight
        model.lm_head = head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        quantized = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    quantized.quantized = "int8-dynamic"
    return quantized


def perplexity(model: GPT, token_ids: list[int], window: int | None = None) -> float:
    """Perplexity of ``token_ids`` in non-overlapping windows (for comparing a model with its quantised copy)."""
    window = window or model.config.block_size
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(token_ids) - 1, window):
            chunk = torch.tensor(token_ids[i : i + window + 1], device=model.wte.weight.device)
            if len(chunk) < 2:
                break
            _, loss = model(chunk[None, :-1], chunk[None, 1:])
            total += loss.item() * (len(chunk) - 1)
            count += len(chunk) - 1
    if count == 0:
        raise ValueError("perplexity needs at least two tokens: there is nothing to predict")
    return math.exp(total / count)
