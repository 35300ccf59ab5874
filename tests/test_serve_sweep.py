"""`lmforge serve` on requests that users and their clients send and the other tests did not: each answered as
the OpenAI API answers it, or refused with a 400 saying why."""

import httpx
import pytest
import torch
from conftest import make_hf_gpt2
from test_serve import TIMEOUT, LiveServer, post

from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.serve.server import Metrics, OpenAIService, ServerSettings, build_server_app
from lmforge.tokenizer import Tokenizer

openai = pytest.importorskip("openai", reason="the openai client (a dev extra) is not installed")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    # a vocabulary padded past the tokenizer's, as many checkpoints have (Qwen2's 151,936 rows for 151,665 tokens)
    vocab = Tokenizer.load(tokenizer_dir).vocab_size
    return load_model(make_hf_gpt2(tmp_path_factory.mktemp("sweep") / "m", tokenizer_dir=tokenizer_dir, n_positions=256,
                                   vocab_size=vocab + 64))


@pytest.fixture(scope="module")
def server(model):
    settings = ServerSettings(max_batch=4, max_queue=4, max_tokens=64, max_n=2, model_name="tiny")
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), settings))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def test_logprobs_give_a_split_characters_own_bytes_and_name_every_token_apart(model, server, client):
    """A byte-level BPE writes "€" as pieces that decode alone to U+FFFD: chat's ``bytes`` were U+FFFD's bytes
    for each (joined, "���" rather than "€"), and the completions' top_logprobs, a dict keyed by token text, lost
    alternatives that shared a text (logprobs=5 gave 4). Now, as OpenAI's API: a piece's own bytes, named
    "bytes:\\xe2\\x82"; an id without a token (a padded vocabulary) "token_id:ID", as vLLM names it."""
    tokenizer = load_tokenizer_for(model)
    service = OpenAIService(model, tokenizer, ServerSettings(), Metrics())
    text = "price: 5 € 😀"
    entries = [service._token_entry(t, 0.0) for t in tokenizer.encode(text)]
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8") == text
    assert any(e["token"].startswith("bytes:\\x") for e in entries), entries
    assert service.token_text(model.config.vocab_size - 1) == f"token_id:{model.config.vocab_size - 1}"

    out = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=24, temperature=1.0, seed=3, logprobs=5)
    assert [len(top) for top in out.choices[0].logprobs.top_logprobs] == [5] * 24
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=1.0, seed=3, logprobs=True, top_logprobs=20)
    for entry in chat.choices[0].logprobs.content:
        assert len({alt.token for alt in entry.top_logprobs}) == 20
        for named in (entry, *entry.top_logprobs):
            if not named.token.startswith(("bytes:", "token_id:")):
                assert bytes(named.bytes).decode("utf-8") == named.token


def test_a_model_can_be_retrieved_by_its_id(server, client):
    """GET /v1/models/{id} (the openai client's models.retrieve) was a 404 unknown_url."""
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "lmforge")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found" and "'tiny'" in caught.value.message
    assert httpx.post(server.url + "/v1/models/tiny", timeout=TIMEOUT).status_code == 405


def test_top_logprobs_without_logprobs_is_refused(server):
    """top_logprobs asks for log-probabilities that only logprobs: true gives: they were silently left out."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_logprobs": 3}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs", response.text
    assert post(server, "/v1/chat/completions", {**body, "top_logprobs": 0}).status_code == 200
    assert post(server, "/v1/chat/completions", {**body, "logprobs": True}).json()["choices"][0]["logprobs"] is not None


def test_a_limit_error_names_the_field_the_request_set(server):
    """The openai client sends chat's max_completion_tokens (max_tokens is deprecated there): over the server's
    limit, the error named max_tokens, a field the request did not hold."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}
    error = post(server, "/v1/chat/completions", body).json()["error"]
    assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens 65 is above")
    error = post(server, "/v1/chat/completions", {**body, "max_completion_tokens": None, "max_tokens": 65}).json()["error"]
    assert error["param"] == "max_tokens" and error["message"].startswith("max_tokens 65 is above")


def test_logprobs_with_echo_score_the_prompt_as_transformers_and_lm_eval_reads_them(model, server, client):
    """OpenAI's API answers echo with logprobs with the prompt's tokens' log-probabilities too (the first None),
    and scorers rely on it: lm-evaluation-harness's local-completions sends echo, logprobs=1, max_tokens=1 and
    sums token_logprobs[len(context):-1]. The server gave the completion's alone, so such a score came out 0 with
    a 200. Now the prompt's are there, equal to transformers' on the same folder, and the stop token that ended
    a completion is listed last (a [context:-1] slice would otherwise cut the prompt's last token)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model.source).eval()
    ids = [5, 6, 7, 300, 9, 41]
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1 : len(ids)]),
                               expected[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= chosen
               for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    text = client.completions.create(model="tiny", prompt="import os", max_tokens=3, temperature=0, logprobs=0,
                                     echo=True).choices[0]
    pieces = [text.text[o : o + len(t)] for o, t in zip(text.logprobs.text_offset, text.logprobs.tokens)]
    assert text.text.startswith("import os") and pieces[:3] == text.logprobs.tokens[:3]
    streamed = [c.choices[0] for c in client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                                                                logprobs=2, echo=True, stream=True)]
    assert streamed[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]

    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (a dev extra) is not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer=str(model.source),
                             tokenizer_backend="huggingface", max_retries=1, timeout=TIMEOUT)
    pairs = [("def main():", " return 0"), ("import os", "\nimport sys")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (score, _) in zip(pairs, got):
        whole, head = lm.tokenizer(context + continuation).input_ids, lm.tokenizer(context).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
        want = sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))
        assert score == pytest.approx(want, abs=1e-3), (context, continuation)
    assert lm_eval  # (the harness itself read the server's answers)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server, client):
    """OpenAI's legacy scoring request, max_tokens 0 with echo (and logprobs): the prompt alone, its tokens scored,
    no completion token counted; it was a 400. max_tokens 0 without echo asks for nothing: a 400 says so."""
    ids = [5, 6, 7, 300, 9, 41]
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=3, echo=True)
    zero = client.completions.create(model="tiny", prompt=ids, max_tokens=0, temperature=0, logprobs=3, echo=True)
    choice = zero.choices[0]
    assert choice.text == one.choices[0].text[: len(choice.text)] and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[: len(ids)]
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.top_logprobs[1:] == \
        one.choices[0].logprobs.top_logprobs[1 : len(ids)]
    assert (zero.usage.prompt_tokens, zero.usage.completion_tokens, zero.usage.total_tokens) == (len(ids), 0, len(ids))
    chunks = list(client.completions.create(model="tiny", prompt="import os", max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "import os" and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="import os", max_tokens=0)
    assert caught.value.param == "max_tokens" and "echo" in caught.value.message
