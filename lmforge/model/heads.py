"""Give a loaded backbone a task head: sequence classification (decoder or encoder), or extractive
question answering (encoder). The head starts from the usual N(0, 0.02) initialisation."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT, drawn_on_cpu, new_weights_device


def attach_head(model, head: str, num_labels: int = 2, labels=None, pad_token_id: int | None = None,
                pooling: str | None = None):
    """Replace ``model``'s head (in place) and its config; returns the model."""
    labels = tuple(labels) if labels else None
    num_labels = len(labels) if labels else num_labels
    device, dtype = new_weights_device(model), next(model.parameters()).dtype
    made_on = device if device.type == "meta" else None  # (elsewhere made on the CPU: see drawn_on_cpu)
    if isinstance(model, GPT):
        if head != "sequence_classification":
            raise LmforgeError(f"a decoder model takes the sequence_classification head, not {head}; "
                               f"question answering needs an encoder (bert)")
        model.config = replace(model.config, head=head, num_labels=num_labels, labels=labels, pad_token_id=pad_token_id)
        model.lm_head = None
        score = nn.Linear(model.config.n_embd, num_labels, bias=False, device=made_on, dtype=dtype)
        score.weight = nn.Parameter(drawn_on_cpu(score.weight.detach(),
                                                 lambda w: nn.init.normal_(w, std=model.config.init_std), device))
        model.score = score
        return model
    if not isinstance(model, Encoder):
        raise LmforgeError(f"an encoder-decoder (t5) takes no {head.replace('_', ' ')} head: fine-tune it on "
                           f"source → target rows (a label can be a target text), or use a decoder or an encoder (bert)"
                           if hasattr(model, "shared") else f"cannot attach a head to {type(model).__name__}")
    config = model.config.with_head(head, num_labels, labels, pooling)
    if pooling == "pooler" and model.pooler is None:
        raise LmforgeError("this encoder has no pooler; use pooling first or mean")
    model.config = config
    model.mlm, model.nsp, model.classifier, model.qa_outputs = None, None, None, None
    if not config.pooler:
        model.pooler = None
    if head in ("sequence_classification", "token_classification"):
        new = model.classifier = nn.Linear(config.n_embd, num_labels, device=made_on, dtype=dtype)
    elif head == "question_answering":
        new = model.qa_outputs = nn.Linear(config.n_embd, 2, device=made_on, dtype=dtype)
    else:
        raise LmforgeError(f"unknown head {head!r}")
    new.weight = nn.Parameter(drawn_on_cpu(new.weight.detach(), lambda w: nn.init.normal_(w, std=config.init_std),
                                           device))
    new.bias = nn.Parameter(torch.zeros_like(new.bias, device=device))
    return model


def decoder_classifier_ids(tokenizer, text: str, model, whole: bool = False) -> list[int]:
    """The ids a decoder classifier reads ``text`` as, in training and after: transformers' ``tokenizer(text)``
    (with the tokenizer's leading special tokens: Llama's <s>), so that the saved folder classifies in transformers
    what it classifies here (its score reads the last token); the last ``block_size`` ids (``whole``: all)."""
    ids = tokenizer.encode_prompt(text)
    return ids if whole else ids[-model.config.block_size:]
