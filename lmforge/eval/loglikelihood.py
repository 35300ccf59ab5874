"""Log-likelihood of continuations given contexts: the scoring behind few-shot classification
(and multiple-choice evaluation). No generation, so no unparseable answers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.utils import warn


def split_context(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), tokenised together when the context's tokens are a
    prefix of the whole (the usual case), so the continuation is scored as the model would see it."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation)


@torch.inference_mode()
def score_tokens(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, pad: int = 0,
                 progress: bool = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), whether the continuation is the greedy choice at every
    token) for each (context ids, continuation ids). A request longer than the context keeps its last
    tokens (the continuation is always kept)."""
    from tqdm.auto import tqdm

    device = model.wte.weight.device
    limit = model.config.block_size
    encoded, truncated = [], 0
    for ctx, cont in requests:
        if not cont:
            raise LmforgeError("a continuation to score is empty")
        ids = (list(ctx) + list(cont))[-(limit + 1):]
        truncated += len(ctx) + len(cont) > limit + 1
        encoded.append((ids, len(cont)))
    if truncated:
        warn(f"{truncated} request(s) did not fit the context of {limit} tokens; their beginnings were cut")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths batch together
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        inputs = [encoded[i][0][:-1] for i in chunk]
        width = max(map(len, inputs))
        x = torch.tensor([s + [pad] * (width - len(s)) for s in inputs], device=device)
        logprobs = F.log_softmax(model(x).float(), dim=-1)
        for row, i in enumerate(chunk):
            ids, n_cont = encoded[i]
            positions = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1, device=device)
            targets = torch.tensor(ids[-n_cont:], device=device)
            rows = logprobs[row, positions]
            results[i] = (rows[torch.arange(n_cont, device=device), targets].sum().item(),
                          bool((rows.argmax(-1) == targets).all()))
    return results


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, progress: bool = False,
                   desc: str = "scoring") -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation) of text."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    token_requests = [split_context(tokenizer, context, continuation) for context, continuation in requests]
    return [score for score, _ in score_tokens(model, token_requests, batch_size, pad, progress, desc)]
