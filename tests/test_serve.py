"""`lmforge serve`: a live server on loopback, driven by the official openai client and by raw HTTP."""

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import make_hf_gpt2, run_cli

from lmforge.infer.generate import generate
from lmforge.model.checkpoint import load_model, load_tokenizer_for
from lmforge.serve.server import ServerSettings, build_server_app

openai = pytest.importorskip("openai", reason="the openai client (a dev extra) is not installed")
TIMEOUT = 30


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + TIMEOUT
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=TIMEOUT)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_hf_gpt2(tmp_path_factory.mktemp("served") / "m", tokenizer_dir=tokenizer_dir, n_positions=512)


@pytest.fixture(scope="module")
def server(model_dir):
    model = load_model(model_dir)
    settings = ServerSettings(max_batch=4, max_queue=2, max_tokens=300, max_n=3, max_body_bytes=20_000, model_name="tiny")
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), settings))
    live.settings = settings
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def test_completions_with_the_openai_client(client, model_dir):
    expected = generate(model_dir, "def main():", max_new_tokens=12, temperature=0).text
    out = client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == expected and len(pieces) > 1
    out = client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, echo=True)
    assert out.choices[0].text.startswith("import")
    out = client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, logprobs=2)
    assert len(out.choices[0].logprobs.token_logprobs) == 5 and all(len(t) == 2 for t in out.choices[0].logprobs.top_logprobs)


def test_a_stream_of_several_choices_gives_each_all_its_text_and_its_finish(client):
    """n choices of one request end at the same step: each gets that step's text and its finish_reason."""
    kw = dict(model="tiny", prompt="def f(x):", max_tokens=3, temperature=1.0, seed=2, n=3)
    whole = client.completions.create(**kw)
    texts, finishes = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: "length" for c in whole.choices}


def test_chat_with_the_openai_client(client, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, n=2)
    assert len(out.choices) == 2 and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens // 2
    # the same answer through lmforge's own chat path
    model = load_model(model_dir)
    assert generate(model, "hello", system="be brief", chat=True, max_new_tokens=10, temperature=0).text == text
    seeded = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=5).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    assert len(out.choices[0].logprobs.content) == 4 and len(out.choices[0].logprobs.content[0].top_logprobs) == 3


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    page = httpx.get(server.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script" in page.text
    assert "http" not in page.text.replace("http://", "").split("<script")[0].lower().replace("http-equiv", "")  # no external assets


def post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("body,status,param,needle", [
    (b"{not json", 400, None, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "lots"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "x", "n": 9}, 400, "n", "above this server's limit of 3"),
    ({"prompt": "x", "max_tokens": 301}, 400, "max_tokens", "above this server's limit of 300"),
    ({"prompt": "word " * 300, "max_tokens": 100}, 400, "prompt", "maximum context length is 512 tokens. However, you requested"),
    ({"max_tokens": 5}, 400, "prompt", "Field required"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),  # no guessing at what a string means
    ({"prompt": "x", "n": True}, 400, "n", "valid integer"),
    ({"prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias", "logit_bias is not supported by this server"),
    ({"prompt": "x", "n": 1, "best_of": 3}, 400, "best_of", "best_of is not supported"),
    ({"prompt": "x", "suffix": "}"}, 400, "suffix", "suffix is not supported"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param, needle):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]


def test_what_the_server_does_not_implement_is_refused_and_its_no_op_values_pass(server):
    """An answer that ignored a field asking for something else would be silently wrong: a 400 instead; the
    values that ask for nothing (which some clients send) are accepted."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, param in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"logit_bias": {"1": -100}}, "logit_bias")]:
        response = post(server, "/v1/chat/completions", {**chat, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, extra
        assert response.json()["error"]["code"] == "unsupported_parameter"
    # other servers' extensions that would change the answer (they were dropped, the answer a greedy one)
    for extra, param in [({"num_beams": 3}, "num_beams"), ({"min_tokens": 4}, "min_tokens"),
                         ({"ignore_eos": True}, "ignore_eos"), ({"guided_regex": "a+"}, "guided_regex")]:
        response = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, extra
    no_ops = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "user": "me",
              "num_beams": 1, "ignore_eos": False, "add_generation_prompt": True}
    assert post(server, "/v1/chat/completions", {**chat, **no_ops}).status_code == 200
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 2, "best_of": 2, "suffix": None,
                                            "logit_bias": None}).status_code == 200


def test_completion_logprobs_give_each_tokens_offset_and_a_stream_can_end_with_usage(server, client):
    out = client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, logprobs=1)
    choice = out.choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert len(offsets) == len(tokens) == 5
    assert [choice.text[o : o + len(t)] for o, t in zip(offsets, tokens)] == tokens and offsets[0] == 0
    chunks = list(client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert streamed == offsets
    # each chunk carries its own token's log-probability, however far the engine has run ahead of the stream
    assert [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens] == tokens
    assert [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs] == \
        pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_context_error_names_both_token_counts(server, model_dir):
    prompt = "word " * 300
    n_prompt = len(load_tokenizer_for(load_model(model_dir)).encode(prompt))
    error = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 100}).json()["error"]
    assert f"({n_prompt} in the prompt, 100 for the completion)" in error["message"] and error["code"] == "context_length_exceeded"
    bad_chat = post(server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"].startswith("messages")


def test_oversized_bodies_get_413(server):
    response = post(server, "/v1/completions", {"prompt": "x" * 30_000, "max_tokens": 1})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(30):
            yield b" " * 1000

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                          timeout=TIMEOUT)
    assert response.status_code == 413


def test_concurrent_requests_share_decode_steps_and_bad_requests_do_not_disturb_them(server, client, model_dir):
    expected = generate(model_dir, "import os", max_new_tokens=40, temperature=0).text
    results, errors = {}, []

    def ask(i):
        try:
            results[i] = client.completions.create(model="tiny", prompt="import os", max_tokens=40, temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    batched_before = server.metric("lmforge_batch_size_sum") - server.metric("lmforge_batch_size_count")
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(5):  # bad requests in the middle
        assert post(server, "/v1/completions", b"{oops").status_code == 400
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and list(results.values()) == [expected] * 3
    # some decode steps carried more than one sequence (sum of batch sizes grew faster than the step count)
    assert server.metric("lmforge_batch_size_sum") - server.metric("lmforge_batch_size_count") > batched_before


def test_a_client_that_disconnects_stops_its_generation(server):
    before = server.metric("lmforge_completion_tokens_total")
    body = {"prompt": "x", "max_tokens": 300, "stream": True, "temperature": 1.0}
    with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
    deadline = time.time() + TIMEOUT
    while server.metric("lmforge_active_sequences") > 0:
        assert time.time() < deadline
        time.sleep(0.05)
    assert server.metric("lmforge_completion_tokens_total") - before < 300


def test_a_full_queue_gets_429(server, monkeypatch):
    # max_batch 4 and max_queue 2: four long streams fill the rows, two more wait, the next is refused.
    # The test model is fast; make each engine step take 10 ms so that the rows stay busy.
    from lmforge.infer.engine import Engine

    step = Engine.step

    def slow_step(self):
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(Engine, "step", slow_step)
    from contextlib import ExitStack

    with httpx.Client(timeout=TIMEOUT) as http, ExitStack() as open_streams:
        for _ in range(6):  # keep every stream open (a closed stream is a client gone away)
            response = open_streams.enter_context(http.stream("POST", server.url + "/v1/completions",
                                                          json={"prompt": "x", "max_tokens": 300, "stream": True}))
            assert response.status_code == 200
        deadline = time.time() + TIMEOUT
        while server.metric("lmforge_queue_depth") < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        assert server.metric("lmforge_active_sequences") == 4
        response = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
        assert server.metric('lmforge_requests_total{endpoint="/v1/completions",status="429"}') >= 1
    monkeypatch.setattr(Engine, "step", step)
    deadline = time.time() + TIMEOUT
    while server.metric("lmforge_active_sequences") + server.metric("lmforge_queue_depth") > 0:
        assert time.time() < deadline
        time.sleep(0.05)
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200  # and it recovers


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model="tiny", prompt="a", max_tokens=3)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("lmforge_requests_total", "lmforge_prompt_tokens_total", "lmforge_completion_tokens_total",
                 "lmforge_request_latency_seconds_bucket", "lmforge_queue_depth"):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text and name in text


def test_a_gpu_error_that_lasts_makes_health_unhealthy(model_dir, monkeypatch):
    """A device-side assert leaves CUDA failing every later call in the process: the request that met it gets a
    500, and /health answers 503 from then on so that a supervisor restarts the server (an out-of-memory error,
    which the next step survives, does not)."""
    from lmforge.infer.engine import Engine

    model = load_model(model_dir)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(max_batch=2)))
    try:
        errors = iter([RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                       RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                       RuntimeError("CUDA error: device-side assert triggered")])
        decode = Engine._decode_step
        monkeypatch.setattr(Engine, "_decode_step", lambda self, seqs: (_ for _ in ()).throw(next(errors)))
        body = {"prompt": "def f(x):", "max_tokens": 4}
        for _ in range(2):
            assert post(live, "/v1/completions", body).status_code == 500
            assert httpx.get(live.url + "/health", timeout=TIMEOUT).status_code == 200  # out of memory: passes
        assert post(live, "/v1/completions", body).status_code == 500
        health = httpx.get(live.url + "/health", timeout=TIMEOUT)
        assert health.status_code == 503 and "device-side assert" in health.json()["error"], health.text
        monkeypatch.setattr(Engine, "_decode_step", decode)
    finally:
        live.stop()


def test_api_key_is_required_on_v1_when_set(model_dir):
    model = load_model(model_dir)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(api_key="s3cret", max_batch=2)))
    try:
        assert httpx.get(live.url + "/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(live.url + "/v1/models", timeout=TIMEOUT).status_code == 401
        wrong = httpx.get(live.url + "/v1/models", headers={"authorization": "Bearer nope"}, timeout=TIMEOUT)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert live.metric('lmforge_requests_total{endpoint="/v1/models",status="401"}') == 2
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert good.completions.create(model="lmforge", prompt="a", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0).models.list()
    finally:
        live.stop()


def test_serve_binds_to_loopback_by_default():
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1" and not args.allow_any_model


def test_serve_checks_its_options_before_loading_the_model(tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.serve.server import ServerSettings, serve

    missing = tmp_path / "no-model"  # loading it would be the next error: these checks come first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(LmforgeError, match=f"port {port} on 127.0.0.1 is in use .*choose another with --port, for example"):
            serve(missing, port=port)
    with pytest.raises(LmforgeError, match="--port 99999 is not a port number; use 1 to 65535"):
        serve(missing, port=99999)
    for name in ("max_batch", "max_queue", "max_tokens", "max_n", "max_body_bytes"):
        with pytest.raises(LmforgeError, match="must be a positive whole number, not 0"):
            ServerSettings(**{name: 0})


def test_serve_with_a_bad_port_prints_one_line(model_dir):
    result = run_cli("serve", "--model", str(model_dir), "--port", "99999", timeout=60)
    assert result.returncode == 2
    assert result.stderr == "lmforge: error: --port 99999 is not a port number; use 1 to 65535 (or 0 for any free port)\n"


ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed", "less than or equal to 9223372036854775807"),
    ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, "seed", "greater than or equal to -9223372036854775808"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": Infinity}', "repetition_penalty", "finite number"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k", "greater than or equal to -1"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16 items"),
    ("/v1/completions", b'{"prompt": "a lone \\ud800"}', "prompt", "lone surrogate"),
    ("/v1/completions", {"prompt": "a\x00b"}, "prompt", "NUL"),
    ("/v1/completions", {"prompt": "x", "stop": ["\udfff"]}, "stop.0", "lone surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages.0.content", "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text", "valid string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": []}},
     "stream_options.include_usage", "valid boolean"),
])
def test_values_the_engine_or_the_tokenizer_cannot_take_get_400_before_reaching_them(server, path, body, param, needle):
    if isinstance(body, dict):  # (json.dumps writes lone surrogates as \\u escapes, as a client's JSON would)
        body = json.dumps(body).encode()
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error"
    assert error["param"] == param and needle in error["message"], error
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_seeds_across_the_whole_int64_range_work(server):
    for seed in (2**63 - 1, -(2**63), 0):  # n=3 samples use seed, seed + 1, seed + 2
        response = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 3, "seed": seed})
        assert response.status_code == 200, response.text


FAULTY_SEED = 13


def inject_failure(monkeypatch, where: str) -> None:
    """Make the engine raise for requests with FAULTY_SEED only, at one of the places a request passes."""
    from lmforge.infer.engine import Engine, Sequence

    def faulty(params) -> bool:
        return params.seed == FAULTY_SEED

    def fail():
        raise RuntimeError("injected failure")

    if where == "add":
        add = Engine.add
        monkeypatch.setattr(Engine, "add", lambda self, ids, p: fail() if faulty(p) else add(self, ids, p))
    elif where == "prefill":
        prefill = Engine._prefill
        monkeypatch.setattr(Engine, "_prefill", lambda self, r: fail() if faulty(r.params) else prefill(self, r))
    elif where == "prompt pass":  # the forward pass over the prompts, whenever a faulty request takes part in it
        prompt_pass = Engine._prompt_pass
        monkeypatch.setattr(Engine, "_prompt_pass", lambda self, requests, first: fail()
                            if any(faulty(r.params) for r in requests) else prompt_pass(self, requests, first))
    elif where == "sampling":  # one row of a batched decode step, after the request has streamed a token
        choose = Sequence.choose
        monkeypatch.setattr(Sequence, "choose",
                            lambda self, logits, drawn=None: fail() if faulty(self.request.params) and self.tokens
                            else choose(self, logits, drawn))
    elif where == "forward":  # the batched decode step as a whole, whenever a faulty request takes part
        decode = Engine._decode_step
        monkeypatch.setattr(Engine, "_decode_step",
                            lambda self, seqs: fail() if any(faulty(s.request.params) for s in seqs) else decode(self, seqs))


def stream_text(server, body) -> tuple[str, list[dict]]:
    with httpx.Client(timeout=TIMEOUT) as http, http.stream("POST", server.url + "/v1/completions",
                                                           json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events


@pytest.mark.parametrize("where", ["add", "prefill", "prompt pass", "sampling", "forward"])
def test_a_request_that_fails_inside_the_engine_fails_alone(server, monkeypatch, where):
    from lmforge.infer.engine import Engine

    def body(seed):
        return {"prompt": "def f(x):", "max_tokens": 60, "temperature": 1.0, "seed": seed}

    expected = {seed: post(server, "/v1/completions", body(seed)).json()["choices"][0]["text"] for seed in (1, 2)}
    step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: time.sleep(0.01) or step(self))  # so that requests overlap
    inject_failure(monkeypatch, where)
    results = {}
    normal = [threading.Thread(target=lambda: results.__setitem__(1, post(server, "/v1/completions", body(1)))),
              threading.Thread(target=lambda: results.__setitem__(2, stream_text(server, body(2))[0]))]
    for t in normal:
        t.start()
    deadline = time.time() + TIMEOUT
    while server.metric("lmforge_active_sequences") < 2:  # both decoding: the faulty requests come last
        assert time.time() < deadline
        time.sleep(0.01)
    faulty_stream = threading.Thread(target=lambda: results.__setitem__("stream", stream_text(server, body(FAULTY_SEED))[1]))
    faulty_stream.start()
    faulty = post(server, "/v1/completions", body(FAULTY_SEED))
    for t in [*normal, faulty_stream]:
        t.join(TIMEOUT)
    assert faulty.status_code == 500, faulty.text
    error = faulty.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "server_error" and "injected failure" in error["message"]
    assert results["stream"][-1]["error"]["type"] == "server_error"  # (a stream's status line has gone: its last event)
    assert results[1].status_code == 200 and results[1].json()["choices"][0]["text"] == expected[1]
    assert results[2] == expected[2]
    monkeypatch.undo()
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_failure_while_writing_an_answer_fails_that_request_alone(server, monkeypatch):
    from lmforge.serve.server import OpenAIService

    monkeypatch.setattr(OpenAIService, "token_text", lambda self, token: 1 / 0)  # used for log-probabilities only
    body = {"prompt": "x", "max_tokens": 3, "logprobs": 1}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    events = stream_text(server, body)[1]
    assert events[-1]["error"]["type"] == "server_error" and "ZeroDivisionError" in events[-1]["error"]["message"]
    monkeypatch.undo()
    assert post(server, "/v1/completions", body).status_code == 200


def test_every_error_is_openai_shaped(server):
    json_header = {"content-type": "application/json"}
    cases = [
        (httpx.get(server.url + "/no/such/page", timeout=TIMEOUT), 404, "unknown_url", "Invalid URL (GET /no/such/page)"),
        (httpx.get(server.url + "/v1/chat/completions", timeout=TIMEOUT), 405, "method_not_allowed", "use POST"),
        (httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": []}', headers={"content-type": "text/plain"},
                    timeout=TIMEOUT), 415, "unsupported_media_type", "Content-Type: application/json"),
        (httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=TIMEOUT), 415,
         "unsupported_media_type", "no Content-Type header"),
        (httpx.post(server.url + "/v1/completions", content=b'{"prompt": "\xff"}', headers=json_header, timeout=TIMEOUT),
         400, "invalid_json", "not valid JSON"),
        (post(server, "/v1/completions", b"[" * 100_00), 400, "invalid_json", "not valid JSON"),
    ]
    for response, status, code, needle in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS and error["code"] == code and needle in error["message"], error


def test_a_model_that_is_not_served_gets_404_unless_any_name_is_allowed(server, client, monkeypatch):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    assert caught.value.code == "model_not_found" and "'tiny'" in caught.value.message
    assert post(server, "/v1/completions", {"model": "other", "prompt": "x"}).json()["error"]["code"] == "model_not_found"
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200  # no name: the served one
    monkeypatch.setattr(server.settings, "allow_any_model", True)
    assert client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2).choices[0].message.role == "assistant"


def test_metrics_have_one_label_for_unknown_paths_and_count_rejections(server):
    for i in range(20):  # a scanner's paths must not each become a time series
        assert httpx.get(f"{server.url}/scan/{i}", timeout=TIMEOUT).status_code == 404
    assert post(server, "/v1/completions", {"prompt": "x" * 30_000}).status_code == 413
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    series = [line for line in text.splitlines() if line.startswith("lmforge_requests_total{")]
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in series}
    assert endpoints <= {"/", "/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "other"}, endpoints
    assert server.metric('lmforge_requests_total{endpoint="other",status="404"}') >= 20
    assert server.metric('lmforge_requests_total{endpoint="/v1/completions",status="413"}') >= 1


def test_stop_token_ids_stop_beside_the_end_tokens(server, model_dir):
    """vLLM's stop_token_ids (the README's "stop token ids ... and the server alike") were dropped with a 200."""
    body = {"prompt": "def", "max_tokens": 12, "temperature": 0}
    free = post(server, "/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]
    written = free["logprobs"]["tokens"]
    tok = __import__("lmforge.tokenizer", fromlist=["Tokenizer"]).Tokenizer.load(model_dir)
    ids = [tok.encode(t)[0] for t in written]  # (each token's id: a token's text encodes to itself here)
    stop = ids[2]
    stopped = post(server, "/v1/completions", {**body, "stop_token_ids": [stop], "logprobs": 0}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["logprobs"]["tokens"] == written[: ids.index(stop)]
    response = post(server, "/v1/completions", {**body, "stop_token_ids": [10**9]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop_token_ids"


def test_special_tokens_are_left_out_of_the_text_unless_asked_for(tmp_path, tokenizer_dir):
    """As vLLM (and transformers' pipelines) by default: a special token the model writes (here <|im_start|>, not
    a stop token) adds no text; skip_special_tokens: false keeps it; the logprobs' tokens keep it either way. (The
    field was accepted and ignored.)"""
    from conftest import make_special_token_writer

    model = load_model(make_special_token_writer(tmp_path / "m", tokenizer_dir))
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(max_batch=2, model_name="m")))
    try:
        body = {"prompt": "def", "max_tokens": 3, "temperature": 0, "logprobs": 0}
        skipped = post(live, "/v1/completions", body).json()["choices"][0]
        kept = post(live, "/v1/completions", {**body, "skip_special_tokens": False}).json()["choices"][0]
        # a stop string that is a left-out special token still stops (it ran on to max_tokens)
        stopped = post(live, "/v1/completions", {**body, "max_tokens": 5, "stop": ["<|im_start|>"]}).json()
        chat = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                    "temperature": 0}).json()["choices"][0]
    finally:
        live.stop()
    assert skipped["logprobs"]["tokens"] == kept["logprobs"]["tokens"] == ["<|im_start|>"] * 3
    assert (skipped["text"], kept["text"], chat["message"]["content"]) == ("", "<|im_start|>" * 3, "")
    assert (stopped["choices"][0]["finish_reason"], stopped["usage"]["completion_tokens"]) == ("stop", 1)
    assert skipped["logprobs"]["text_offset"] == [0, 0, 0]  # (offsets into the text, which leaves them out)


def test_a_prompt_of_token_ids_is_read_as_it_is(server, model_dir):
    """The OpenAI API's other prompt form, token ids (as vLLM serves it; lm-evaluation-harness's local-completions
    sends them by default): it was a 400."""
    from lmforge.tokenizer import Tokenizer

    ids = Tokenizer.load(model_dir).encode_prompt("def main():")
    body = {"max_tokens": 6, "temperature": 0, "logprobs": 0}
    as_text = post(server, "/v1/completions", {**body, "prompt": "def main():"}).json()
    as_ids = post(server, "/v1/completions", {**body, "prompt": ids}).json()
    assert as_ids["usage"]["prompt_tokens"] == len(ids) == as_text["usage"]["prompt_tokens"]
    echoed = post(server, "/v1/completions", {**body, "prompt": ids, "echo": True, "logprobs": None}).json()
    assert echoed["choices"][0]["text"] == "def main():" + as_text["choices"][0]["text"]
    assert as_ids["choices"][0]["logprobs"]["tokens"] == as_text["choices"][0]["logprobs"]["tokens"]
    for prompt, param in (([10**6], "prompt"), ([ids, [10**6]], "prompt"), ([], "prompt")):
        response = post(server, "/v1/completions", {**body, "prompt": prompt})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_list_of_prompts_gets_every_prompts_choices(server, client):
    """The OpenAI API's list of prompts (the openai client sends one as it is given): choice p * n + i is sample i
    of prompt p, each as that prompt alone gives it; it was a 400. A stream takes one prompt."""
    prompts = ["def", "import os", "x ="]
    alone = [post(server, "/v1/completions", {"prompt": p, "max_tokens": 5, "temperature": 0, "n": 2}).json()
             for p in prompts]
    together = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in together.choices] == list(range(6))
    assert [c.text for c in together.choices] == [c["text"] for a in alone for c in a["choices"]]
    assert together.usage.prompt_tokens == sum(a["usage"]["prompt_tokens"] for a in alone)
    ids = post(server, "/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0}).json()
    assert [c["index"] for c in ids["choices"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 5
    response = post(server, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
