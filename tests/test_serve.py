"""`lmforge serve`: a live server on loopback, driven by the official openai client and by raw HTTP."""

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import make_hf_gpt2

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
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return make_hf_gpt2(tmp_path_factory.mktemp("served") / "m", tokenizer_dir=tokenizer_dir, n_positions=512)


@pytest.fixture(scope="module")
def server(model_dir):
    model = load_model(model_dir)
    settings = ServerSettings(max_batch=4, max_queue=2, max_tokens=300, max_n=3, max_body_bytes=20_000, model_name="tiny")
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), settings))
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
    out = client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0, logprobs=2, echo=True)
    assert out.choices[0].text.startswith("import")
    assert len(out.choices[0].logprobs.token_logprobs) == 5 and all(len(t) == 2 for t in out.choices[0].logprobs.top_logprobs)


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
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param, needle):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]


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
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 300, "stream": True,
                                                                      "temperature": 1.0}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
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


def test_api_key_is_required_on_v1_when_set(model_dir):
    model = load_model(model_dir)
    live = LiveServer(build_server_app(model, load_tokenizer_for(model), ServerSettings(api_key="s3cret", max_batch=2)))
    try:
        assert httpx.get(live.url + "/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(live.url + "/v1/models", timeout=TIMEOUT).status_code == 401
        wrong = httpx.get(live.url + "/v1/models", headers={"authorization": "Bearer nope"}, timeout=TIMEOUT)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert good.completions.create(model="m", prompt="a", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0).models.list()
    finally:
        live.stop()


def test_serve_binds_to_loopback_by_default():
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1"
