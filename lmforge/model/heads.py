"""Give a loaded backbone a task head: sequence classification (decoder or encoder), or extractive
question answering (encoder). The head starts from the usual N(0, 0.02) initialisation."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.model.encoder import Encoder
from lmforge.model.gpt import GPT, new_weights_device


def attach_head(model, head: str, num_labels: int = 2, labels=None, pad_token_id: int | None = None,
                pooling: str | None = None):
    """Replace ``model``'s head (in place) and its config; returns the model."""
    labels = tuple(labels) if labels else None
    num_labels = len(labels) if labels else num_labels
    device, dtype = new_weights_device(model), next(model.parameters()).dtype
    if isinstance(model, GPT):
        if head != "sequence_classification":
            raise LmforgeError(f"a decoder model takes the sequence_classification head, not {head}; "
                               f"question answering needs an encoder (bert)")
        model.config = replace(model.config, head=head, num_labels=num_labels, labels=labels, pad_token_id=pad_token_id)
        model.lm_head = None
        model.score = nn.Linear(model.config.n_embd, num_labels, bias=False, device=device, dtype=dtype)
        nn.init.normal_(model.score.weight, std=model.config.init_std)
        return model
    if not isinstance(model, Encoder):
        raise LmforgeError(f"cannot attach a head to {type(model).__name__}")
    config = model.config.with_head(head, num_labels, labels, pooling)
    if pooling == "pooler" and model.pooler is None:
        raise LmforgeError("this encoder has no pooler; use pooling first or mean")
    model.config = config
    model.mlm, model.nsp, model.classifier, model.qa_outputs = None, None, None, None
    if not config.pooler:
        model.pooler = None
    if head in ("sequence_classification", "token_classification"):
        model.classifier = nn.Linear(config.n_embd, num_labels, device=device, dtype=dtype)
        new = model.classifier
    elif head == "question_answering":
        model.qa_outputs = nn.Linear(config.n_embd, 2, device=device, dtype=dtype)
        new = model.qa_outputs
    else:
        raise LmforgeError(f"unknown head {head!r}")
    with torch.no_grad():
        nn.init.normal_(new.weight, std=config.init_std)
        nn.init.zeros_(new.bias)
    return model
