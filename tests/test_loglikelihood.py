"""Log-likelihood scoring: shared contexts in one row (tree mask) give what each request gives alone."""

import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.eval.loglikelihood import score_tokens, split_context
from lmforge.model.config import Config
from lmforge.model.gpt import build_model

FAMILIES = {
    "gpt2": {},
    "llama-mqa": dict(family="llama", bias=False, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1,
                      tie_embeddings=False),
    "mistral-window": dict(family="mistral", bias=False, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                           tie_embeddings=False, sliding_window=5),
}


def score_alone(model, context, continuation):
    """The plain recipe: one request, one forward pass, log-softmax at every position."""
    ids = (context + continuation)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    n = len(continuation)
    positions, targets = torch.arange(len(ids) - 1 - n, len(ids) - 1), torch.tensor(ids[-n:])
    return logprobs[positions, targets].sum().item(), bool((logprobs[positions].argmax(-1) == targets).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_contexts_score_as_each_request_alone(family):
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=24, **FAMILIES[family])).eval()
    rng = random.Random(0)
    requests = []
    for _ in range(7):  # questions with 1-4 choices of 1-6 tokens after a context of 1-20
        context = [rng.randrange(97) for _ in range(rng.randint(1, 20))]
        requests += [(context, [rng.randrange(97) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(1, 4))]
    requests.append(requests[0])  # a duplicate
    requests.append((requests[0][0], requests[0][1][:1]))  # a one-token continuation of a shared context
    requests.append((list(range(30)), [5, 6]))  # longer than the context: its beginning is cut
    got = score_tokens(model, requests, batch_size=3)
    expected = [score_alone(model, c, k) for c, k in requests]
    for (score, greedy), (score_ref, greedy_ref) in zip(got, expected):
        assert score == pytest.approx(score_ref, abs=1e-4) and greedy == greedy_ref
    greedy_continuation = [int(model(torch.tensor([requests[0][0]]))[0, -1].argmax())]
    assert score_tokens(model, [(requests[0][0], greedy_continuation)])[0][1] is True


def test_bad_requests_get_clear_errors():
    model = build_model(Config(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    with pytest.raises(LmforgeError, match="continuation to score is empty"):
        score_tokens(model, [([1, 2], [])])
    with pytest.raises(LmforgeError, match="context to score after is empty"):
        score_tokens(model, [([], [3])])
    with pytest.raises(LmforgeError, match="continuation of 9 tokens does not fit the model's context of 8"):
        score_tokens(model, [([1], list(range(9)))])


def test_trailing_space_moves_to_the_continuation(tokenizer_dir):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    assert split_context(tok, "import", " json") == split_context(tok, "import ", "json")
    context, continuation = split_context(tok, "import ", "json")
    assert tok.decode(context) == "import" and tok.decode(continuation) == " json"
