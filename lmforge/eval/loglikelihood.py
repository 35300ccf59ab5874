"""Log-likelihood of continuations given contexts: the scoring behind multiple-choice evaluation,
few-shot classification and the lm-evaluation-harness adapter. No generation, so no unparseable answers.

Two things make it fast without changing a number:

* Requests that share a context (the choices of one question) are scored in one row: the context
  once, then each continuation as a branch that attends to the context and to itself only (a tree
  mask), at the positions it would have alone. Four choices of ``l`` tokens after a context of ``L``
  cost ``L + 4(l - 1)`` tokens instead of ``4(L + l)``.
* The output head and the log-softmax run only at the positions that predict a continuation token,
  not at every position of the row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.utils import warn


def harness_encode(tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` as lm-evaluation-harness's ``hf`` model encodes it for a decoder: as the tokenizer
    does by default, with its leading special tokens (Llama's <s>), unless the text already begins with the
    beginning-of-sequence token's text (then nothing is added, whatever ``add_bos``); ``add_bos`` (the harness's
    add_bos_token) False adds nothing, True the beginning-of-sequence token where the tokenizer would not (GPT-2's
    <|endoftext|>)."""
    bos = tokenizer.hf.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    if add_bos is False or (bos and text.startswith(bos)):
        return tokenizer.encode(text)
    ids = tokenizer.encode_prompt(text)
    if add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def empty_context(tokenizer, continuation: list[int]) -> tuple[list[int], list[int]]:
    """(context, continuation) for an empty context, as the harness makes it: the beginning-of-sequence token
    where the tokenizer names one, else the end-of-text token (the continuation's own first token when it is
    that token)."""
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        return [], continuation
    return (continuation[:1], continuation[1:]) if continuation[:1] == [prefix] else ([prefix], continuation)


def split_context(tokenizer, context: str, continuation: str, encode=None) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), as the model would see the whole text, split as
    lm-evaluation-harness splits them: trailing whitespace of the context moves to the continuation (in BPE a
    space belongs to the word after it), the whole is encoded, and the continuation is what follows the context's
    own number of tokens (where the two merge into one token at the seam, "Hello" + "world", that token counts as
    the context's). A context of whitespace only is an empty one (``empty_context``); a continuation the whole's
    tokens leave nothing of is encoded alone. ``encode``: how text is encoded (default: ``harness_encode``).
    """
    encode = encode or (lambda text: harness_encode(tokenizer, text))
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    if not context:
        return empty_context(tokenizer, encode(continuation))
    ctx = encode(context)
    whole = encode(context + continuation)
    if len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation)


class _Row:
    """One context and the distinct continuations scored after it."""

    def __init__(self, context: tuple[int, ...]):
        self.context = context
        self.continuations: dict[tuple[int, ...], int] = {}  # continuation → its branch index

    def branch(self, continuation: tuple[int, ...]) -> int:
        return self.continuations.setdefault(continuation, len(self.continuations))

    @property
    def length(self) -> int:
        # the last token of a continuation is only ever a target, never an input
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def _group(requests: list[tuple[list[int], list[int]]], limit: int) -> tuple[list[_Row], list[tuple[int, int]]]:
    """Rows of requests sharing a context, and each request's (row, branch)."""
    rows: list[_Row] = []
    by_context: dict[tuple[int, ...], int] = {}
    where, truncated = [], 0
    for ctx, cont in requests:
        if not cont:
            raise LmforgeError("a continuation to score is empty")
        if not ctx:
            raise LmforgeError("a context to score after is empty; start it with the end-of-text token")
        if len(cont) > limit:
            raise LmforgeError(f"a continuation of {len(cont)} tokens does not fit the model's context of {limit}")
        if len(ctx) + len(cont) > limit + 1:  # keep the last tokens: the continuation and what is nearest it
            ctx = ctx[len(ctx) + len(cont) - limit - 1 :]
            truncated += 1
        key = tuple(ctx)
        if key not in by_context:
            by_context[key] = len(rows)
            rows.append(_Row(key))
        r = by_context[key]
        where.append((r, rows[r].branch(tuple(cont))))
    if truncated:
        warn(f"{truncated} request(s) did not fit the context of {limit} tokens; their beginnings were cut")
    return rows, where


def _layout(rows: list[_Row], pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list]:
    """Token ids (B, W), positions and the tree mask (None when every row is one plain sequence, where
    causal attention is exact), and for each row and branch the (row, column) of the positions whose
    logits predict the continuation's tokens."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # 0: context, b + 1: branch b, -1: padding
    predictors = []
    for i, row in enumerate(rows):
        L = len(row.context)
        ids[i, :L] = torch.tensor(row.context)
        positions[i, :L] = torch.arange(L)
        segment[i, :L] = 0
        column, branches = L, []
        for b, cont in enumerate(row.continuations):
            n = len(cont) - 1
            ids[i, column : column + n] = torch.tensor(cont[:-1], dtype=torch.long)
            positions[i, column : column + n] = torch.arange(L, L + n)
            segment[i, column : column + n] = b + 1
            # cont[0] is predicted at the context's last token, cont[t] at the branch's token t-1
            branches.append([L - 1, *range(column, column + n)])
            column += n
        predictors.append(branches)
    if all(len(r.continuations) == 1 for r in rows):
        return ids.to(device), None, None, predictors  # right-padded plain sequences: causal attention is exact
    index = torch.arange(width)
    earlier = index[None, :] <= index[:, None]  # (query, key)
    same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # context, or one's own branch
    mask = (earlier[None] & same)[:, None]  # (B, 1, W, W)
    return ids.to(device), positions.to(device), mask.to(device), predictors


@torch.inference_mode()
def score_tokens(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, pad: int = 0,
                 progress: bool = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log P(continuation | context), whether the
    continuation is the greedy choice at every token).

    ``batch_size`` counts rows; a row holds one context and every distinct continuation requested after
    it. A request longer than the model's context keeps its last tokens (a warning says how many).
    """
    from tqdm.auto import tqdm

    device = model.wte.weight.device
    rows, where = _group(requests, model.config.block_size)
    order = sorted(range(len(rows)), key=lambda i: -rows[i].length)  # similar lengths batch together
    scores: dict[tuple[int, int], tuple[float, bool]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        ids, positions, mask, predictors = _layout(chunk, pad, device)
        hidden = model.hidden_states(ids, positions=positions, attn_mask=mask)
        at_row, at_column, targets, sizes = [], [], [], []
        for r, (row, branches) in enumerate(zip(chunk, predictors)):
            for cont, columns in zip(row.continuations, branches):
                at_row += [r] * len(columns)
                at_column += columns
                targets += cont
                sizes.append(len(cont))
        logits = model.lm_logits(hidden[torch.tensor(at_row, device=device), torch.tensor(at_column, device=device)])
        logprobs = F.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(targets, device=device)
        token_scores = logprobs.gather(-1, targets[:, None])[:, 0].split(sizes)
        greedy = (logprobs.argmax(-1) == targets).split(sizes)
        k = 0
        for i in order[start : start + batch_size]:
            for b in range(len(rows[i].continuations)):
                scores[(i, b)] = (token_scores[k].sum().item(), bool(greedy[k].all()))
                k += 1
    return [scores[key] for key in where]


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, progress: bool = False,
                   desc: str = "scoring") -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation) of text; an empty
    context is the beginning-of-sequence token, else the end-of-text token (as lm-evaluation-harness does)."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    token_requests = []
    for context, continuation in requests:
        if context:
            token_requests.append(split_context(tokenizer, context, continuation))
        else:
            token_requests.append(empty_context(tokenizer, tokenizer.encode(continuation)))
    return [score for score, _ in score_tokens(model, token_requests, batch_size, pad, progress, desc)]
