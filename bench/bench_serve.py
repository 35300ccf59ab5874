"""Load on `lmforge serve` from 1, 4 and 16 concurrent clients (loopback only, a bounded number of requests).

    python bench/bench_serve.py                      # a tiny-shape model with random weights
    python bench/bench_serve.py --model runs/demo/train

Each client sends non-streaming completions of --max-tokens tokens, one after another. Reported:
total generated tokens per second, and the p50/p99 of request latency. The server batches concurrent
requests into shared decode steps, so throughput should grow with the number of clients.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_model(folder: Path) -> Path:
    """A tiny-shape GPT with random weights and a tokenizer trained on a slice of the stdlib."""
    import torch

    from lmforge.data.corpus import default_corpus_files
    from lmforge.model.checkpoint import save_model
    from lmforge.model.config import Config
    from lmforge.model.gpt import build_model
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([str(f) for f in default_corpus_files()[:80]], folder / "tok", vocab_size=8192, progress=False)
    torch.manual_seed(0)
    save_model(build_model(Config.from_preset("tiny", vocab_size=tok.vocab_size)), folder / "model", tok)
    return folder / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`lmforge serve` on a free loopback port, answering /health; stopped on leaving the block. Its
    output goes to a temporary file: a long run would fill a pipe that nobody reads, and block."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
                                   *flags], stdout=log, stderr=subprocess.STDOUT)
        server.log = log  # (for the caller to show)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError("the server did not start: " + log.read().decode(errors="replace"))
                time.sleep(0.2)
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=30)


def load(url: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    latencies, tokens, errors = [], [], []

    def client(i: int):
        with httpx.Client(timeout=300) as http:
            for j in range(requests_per_client):
                t = time.perf_counter()
                r = http.post(url + "/v1/completions", json={"prompt": f"def f{i}_{j}(x):", "max_tokens": max_tokens,
                                                             "temperature": 1.0, "seed": i * 1000 + j})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    tokens.append(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0][:200]}")
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "tokens_per_second": sum(tokens) / wall,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp))
        with running_server(model, "--max-batch", "16", "--max-queue", "256") as (url, _):
            load(url, 2, 1, 8)  # warm up
            rows = [load(url, int(c), args.requests, args.max_tokens) for c in args.clients.split(",")]
    print(f"lmforge serve, {args.max_tokens} tokens per request, {args.requests} requests per client, loopback\n")
    print("| clients | requests | tokens/s (total) | vs 1 client | p50 latency (s) | p99 latency (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tokens_per_second"]
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / base:.2f}x | "
              f"{r['p50']:.3f} | {r['p99']:.3f} |")
    last = rows[-1]["tokens_per_second"] / base
    print(f"\n{rows[-1]['clients']} clients / 1 client throughput: {last:.2f}x (target >= 4x) -> {'OK' if last >= 4 else 'FAIL'}")


if __name__ == "__main__":
    main()
