"""`POST /v1/embeddings` in OpenAI's format: an encoder's sentence embeddings as sentence-transformers makes them
from the folder (its pooling, prompt and Normalize module: ``lmforge.model.encoder.sentence_recipe``), as floats or
as base64 of little-endian float32 (what the official client asks for by default); ``dimensions`` keeps the first
ones (Matryoshka), normalised again where the full vectors are."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | Annotated[list, Field(min_length=1, max_length=MAX_INPUTS)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, strict=True)  # (true and "5" are no count: a 400, not 1 and 5)
    user: str | None = None


class Embedder:
    """An encoder behind the endpoint: one request embeds at a time (its batches use every core already)."""

    def __init__(self, folder: str | Path, device="cpu"):
        from lmforge.infer.retrieval import load_encoder
        from lmforge.model.encoder import declared_max_length, sentence_recipe

        self.model, self.tokenizer = load_encoder(folder, device, "/v1/embeddings embeds")
        self.name = Path(folder).resolve().name
        self.max_length = min(declared_max_length(self.model.source) or self.model.config.block_size,
                              self.model.config.block_size)
        self.recipe = sentence_recipe(self.model.source)
        self.dim = len(self.recipe.pooling) * self.model.config.n_embd
        self.lock = threading.Lock()

    def lengths(self, texts: list[str]) -> list[int]:
        """Each text's tokens with [CLS]/[SEP] and the folder's prompt."""
        return [len(self.tokenizer.encode(self.recipe.prompt + t, add_special_tokens=True)) for t in texts]

    def embed(self, texts: list[str]) -> torch.Tensor:
        """The vectors (len(texts), dim) of texts that fit ``max_length``."""
        from lmforge.model.encoder import embed

        with self.lock, torch.inference_mode():
            return embed(self.model, self.tokenizer, texts, max_length=self.max_length, normalize=None).float().cpu()


async def embeddings(body: EmbeddingBody, embedder: Embedder, check_model, error) -> dict:
    """The response to one request; ``check_model(name)`` refuses another model's name, ``error(message,
    param[, code])`` makes the 400 of a client's mistake."""
    check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise error("input: send text (a string or a list of strings); token arrays are not taken", "input")
        if not text.strip():
            raise error(f"input[{i}] is empty; every input must hold text", "input")
        if "\x00" in text or not _encodable(text):
            raise error(f"input[{i}] is not valid text (a NUL or a lone surrogate)", "input")
    if body.dimensions is not None and body.dimensions > embedder.dim:
        raise error(f"dimensions: {embedder.name} makes vectors of {embedder.dim}; ask for {embedder.dim} or fewer",
                    "dimensions")
    lengths = await asyncio.to_thread(embedder.lengths, texts)
    for i, n in enumerate(lengths):  # (as OpenAI's API answers: an error, not a vector of the text's start alone)
        if n > embedder.max_length:
            raise error(f"input[{i}] is {n} tokens; {embedder.name} reads at most {embedder.max_length} (with its "
                        f"special tokens): shorten or split it", "input", "context_length_exceeded")
    vectors, tokens = await asyncio.to_thread(embedder.embed, texts), sum(lengths)
    if body.dimensions is not None and body.dimensions < embedder.dim:  # (as OpenAI and sentence-transformers cut)
        vectors = vectors[:, : body.dimensions]
        vectors = F.normalize(vectors, dim=1) if embedder.recipe.normalize else vectors
    data = []
    for i, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            value = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
