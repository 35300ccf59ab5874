"""`lmforge serve` under hostile input: a few hundred generated requests against the app in process.

Two kinds of request. Valid ones: every field left out or given any value the API allows (seeds
across the whole int64 range, any temperature, penalty, top-k, stop strings, n, log-probabilities,
streaming or not, any valid Unicode); each must be answered 200, so nothing the checks let through
can fail below them. Hostile ones: the same fields, each sometimes given anything JSON can hold
(wrong types, huge and negative numbers, NaN and infinities, lone surrogates, NUL, odd Unicode),
extra fields, whole bodies of random JSON, bytes that are not JSON, wrong content types, other
paths and methods. None gets a 5xx, every error is JSON in OpenAI's shape, and the server still
answers a normal request afterwards.
"""

import json
import os

import pytest
from conftest import make_hf_gpt2
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.serve.server import ServerSettings, build_server_app

EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "300"))
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_TOKENS, MAX_N = 8, 2

# Valid text that tokenizers find hard: combining marks, right-to-left, emoji (astral, so a surrogate
# pair in JSON), noncharacters, controls, the chat template's own markers.
odd_pieces = st.sampled_from(["\u0301", "\u202e", "\U0001f600", "\ufffe", "\uffff", "\r\n", "\x1b", "<|im_end|>", "<|im_start|>"])
valid_text = st.lists(st.characters(exclude_categories=["Cs"], exclude_characters="\x00") | odd_pieces, max_size=12).map("".join)
# Text that is not: lone surrogates and NUL as well.
odd_text = st.lists(st.characters() | odd_pieces | st.sampled_from(["\ud800", "\udfff", "\x00"]), max_size=12).map("".join)
numbers = (st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
           | st.floats() | st.sampled_from([1e308, -1e308, 5e-324]))
anything = st.recursive(st.none() | st.booleans() | numbers | odd_text,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3), max_leaves=8)

SAMPLING = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, MAX_TOKENS),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "n": st.integers(1, MAX_N),
    "stream": st.booleans(),
    "stop": st.none() | valid_text | st.lists(valid_text, max_size=16),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    "top_k": st.integers(-1, 2**40),
    "min_p": st.floats(0, 1, exclude_max=True),
    "repetition_penalty": st.floats(0, 1e300, exclude_min=True),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
part = st.fixed_dictionaries({"type": st.just("text"), "text": valid_text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                 "content": st.none() | valid_text | st.lists(part, max_size=3)})
COMPLETION = {"prompt": valid_text | st.lists(valid_text, min_size=1, max_size=1)}
COMPLETION_OPTIONAL = {**SAMPLING, "logprobs": st.none() | st.integers(0, 5), "echo": st.booleans()}
CHAT = {"messages": st.lists(message, min_size=1, max_size=3)}
CHAT_OPTIONAL = {**SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
                 "max_completion_tokens": st.integers(1, MAX_TOKENS)}


def refused_together(text: str) -> bool:
    """Valid fields that the server refuses together (400), as OpenAI's API does: top_logprobs without logprobs."""
    request = json.loads(text)
    return bool(request.get("top_logprobs")) and request.get("logprobs") is not True


def hostile(fields: dict) -> dict:
    """Each field mostly valid (so that requests get past the first check), sometimes anything."""
    return {name: st.integers(0, 5).flatmap(lambda k, valid=valid: anything if k == 0 else valid)
            for name, valid in fields.items()}


def body(required: dict, optional: dict, extra=None):
    extra = extra if extra is not None else st.just({})
    return st.tuples(st.fixed_dictionaries(required, optional=optional), extra).map(lambda b: json.dumps({**b[1], **b[0]}))


def post_json(path: str, content, ok: bool):
    return st.tuples(st.just("POST"), st.just(path), content.map(str.encode), st.just("application/json"), st.just(ok))


extra_fields = st.dictionaries(st.text(max_size=8), anything, max_size=2)
request_strategy = st.one_of(
    post_json("/v1/completions", body(COMPLETION, COMPLETION_OPTIONAL).filter(lambda t: not refused_together(t)), ok=True),
    post_json("/v1/chat/completions", body(CHAT, CHAT_OPTIONAL).filter(lambda t: not refused_together(t)), ok=True),
    post_json("/v1/completions", body(hostile(COMPLETION), hostile(COMPLETION_OPTIONAL), extra_fields), ok=False),
    post_json("/v1/chat/completions", body(hostile(CHAT), hostile(CHAT_OPTIONAL), extra_fields), ok=False),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
              anything.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=64),
              st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "",
                               "application/json; charset=latin-1"]), st.just(False)),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "POST"]),
              st.sampled_from(["/v1/models", "/v1/completions", "/v1/nope", "/nope/" + "x" * 500, "/%ff", "/metrics"]),
              st.just(b"{}"), st.just("application/json"), st.just(False)),
)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tokenizer_dir):
    folder = make_hf_gpt2(tmp_path_factory.mktemp("fuzzed") / "m", tokenizer_dir=tokenizer_dir, n_positions=256)
    model = load_model(folder)
    # Small limits: whatever passes the checks generates a few tokens, so hundreds of requests take seconds.
    limits = ServerSettings(max_batch=4, max_queue=64, max_tokens=MAX_TOKENS, max_n=MAX_N, max_body_bytes=4096,
                            model_name="tiny")
    with TestClient(build_server_app(model, load_tokenizer_for(model), limits), raise_server_exceptions=False) as c:
        yield c


def check_response(response, ok: bool) -> None:
    if ok:
        assert response.status_code == 200, response.text
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()
        assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS, error
        assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", response.text
        for event in events[:-1]:
            assert "error" not in json.loads(event), event


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=request_strategy)
def fuzz(client, request):
    method, path, content, content_type, ok = request
    headers = {"content-type": content_type} if content_type else {}
    check_response(client.request(method, path, content=content, headers=headers), ok)


def test_no_request_gets_a_5xx_every_error_is_openai_shaped_and_the_server_still_answers(client):
    fuzz(client)
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
