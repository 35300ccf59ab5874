"""A bounded soak of `lmforge serve`: many clients, good and bad requests, for a fixed time (loopback only).

    python bench/soak_serve.py                     # 32 clients, 3 minutes, at most 50,000 requests
    python bench/soak_serve.py --duration 30

Starts `lmforge serve` on a tiny-shape model with random weights (made here, as bench_serve.py does),
then 32 clients send, each in its own random order: completions and chat completions, streamed or
not; streams dropped after a few events and requests abandoned mid-generation (the server must stop
generating for them); bodies over --max-body; and malformed requests (bad JSON, wrong types, values
out of range, lone surrogates, a wrong content type, unknown paths and models). It stops at
--duration or --requests, whichever comes first, and reports requests by kind and status, p50/p99
latency, and the server's resident memory (VmRSS from /proc) after a warm-up and at the end.

Pass/fail: no 5xx; every well-formed request answered 200 and every bad one 4xx; the server still
answers and holds no rows or queue afterwards; /metrics stays small; RSS grows by at most
--rss-bound-mb (default 64 MiB) from the warm-up to the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import make_model, running_server

MAX_BODY = 16_000
PROMPTS = ["def main():", "import os\n", "class Stack:", "# a comment about", "for i in range(", "héllo wörld ✓ 😀"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def completion(rng: random.Random, stream: bool = False) -> dict:
    return {"model": "model", "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 32),
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 2**63 - 1), "stream": stream}


def chat(rng: random.Random, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": rng.randint(1, 32),
            "temperature": rng.choice([0, 1.0]), "top_p": 0.9, "n": rng.choice([1, 1, 2]), "stream": stream}


# (method, path, body bytes, content type): each must get a 4xx
MALFORMED = [
    ("POST", "/v1/completions", b"{not json", "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "n": 1000}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": ' + json.dumps("word " * 400).encode() + b"}", "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "model": "gpt-4o"}', "application/json"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": 1}]}', "application/json"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    ("POST", "/v1/chat/completions", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "application/json"),
    ("GET", "/v1/chat/completions", b"", ""),
    ("GET", "/wp-login.php", b"", ""),
    ("GET", "/scan/{n}", b"", ""),  # a new path each time: /metrics must not grow with them
]


class Client(threading.Thread):
    def __init__(self, index: int, url: str, stop_at: float, budget: list[int], results: list):
        super().__init__(daemon=True)
        self.rng, self.url, self.stop_at, self.budget, self.results = random.Random(index), url, stop_at, budget, results

    def run(self) -> None:
        kinds = ["completion"] * 30 + ["chat"] * 20 + ["stream"] * 15 + ["dropped stream"] * 10 + \
                ["abandoned"] * 5 + ["oversized"] * 5 + ["malformed"] * 15
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.time() < self.stop_at and self._take():
                kind = self.rng.choice(kinds)
                started = time.perf_counter()
                try:
                    status = getattr(self, "_" + kind.replace(" ", "_"))(http)
                except httpx.HTTPError as e:
                    status = f"client error {type(e).__name__}"
                self.results.append((kind, status, time.perf_counter() - started))

    def _take(self) -> bool:
        with LOCK:
            if self.budget[0] <= 0:
                return False
            self.budget[0] -= 1
            return True

    def _completion(self, http) -> int:
        return http.post("/v1/completions", json=completion(self.rng)).status_code

    def _chat(self, http) -> int:
        return http.post("/v1/chat/completions", json=chat(self.rng)).status_code

    def _stream(self, http) -> int:
        path, body = self.rng.choice([("/v1/completions", completion), ("/v1/chat/completions", chat)])
        with http.stream("POST", path, json=body(self.rng, stream=True)) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        if response.status_code == 200 and (not events or events[-1] != "[DONE]"
                                            or any("error" in json.loads(e) for e in events[:-1])):
            FAILED_STREAMS.append(events[-3:])
            return 599  # a stream that ended in an error event (or early) counts as a server failure
        return response.status_code

    def _dropped_stream(self, http) -> int:
        body = completion(self.rng, stream=True) | {"max_tokens": 200}
        with http.stream("POST", "/v1/completions", json=body) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= self.rng.randint(0, 3):
                    break  # leave mid-stream: the server must notice and free the row
        return response.status_code

    def _abandoned(self, http) -> str:
        try:  # a non-streaming request given up on before its answer
            http.post("/v1/completions", json=completion(self.rng) | {"max_tokens": 200}, timeout=0.05)
        except httpx.TimeoutException:
            return "abandoned"
        return "answered"

    def _oversized(self, http) -> int:
        return http.post("/v1/completions", json={"prompt": "x" * (MAX_BODY + self.rng.randint(1, 50_000))}).status_code

    def _malformed(self, http) -> int:
        method, path, content, content_type = self.rng.choice(MALFORMED)
        headers = {"content-type": content_type} if content_type else {}
        path = path.replace("{n}", str(self.rng.randint(0, 10**9)))
        return http.request(method, path, content=content, headers=headers).status_code


LOCK = threading.Lock()
FAILED_STREAMS: list = []  # the last events of streams that failed, to show


def expected(kind: str, status) -> bool:
    if kind in ("completion", "chat", "stream", "dropped stream"):
        return status == 200
    if kind == "abandoned":
        return status in ("abandoned", "answered")
    if kind == "oversized":
        return status == 413
    return isinstance(status, int) and 400 <= status < 500


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def soak(url: str, pid: int, clients: int, duration: float, requests: int) -> dict:
    results: list = []
    budget = [requests]
    samples = [(0.0, rss_mb(pid))]
    stop_at = time.time() + duration
    threads = [Client(i, url, stop_at, budget, results) for i in range(clients)]
    started = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        samples.append((time.time() - started, rss_mb(pid)))
    for t in threads:
        t.join()
    return {"results": results, "wall": time.time() - started, "rss": samples}


def report(run: dict, pid: int, url: str, rss_start: float, bound_mb: float) -> bool:
    results = run["results"]
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    for kind, status, seconds in results:
        by_kind[kind][status] += 1
        if kind in ("completion", "chat", "stream") and status == 200:
            latencies[kind].append(seconds)
    statuses = Counter(s for _, s, _ in results)
    n4xx = sum(c for s, c in statuses.items() if isinstance(s, int) and 400 <= s < 500)
    n5xx = sum(c for s, c in statuses.items() if isinstance(s, int) and s >= 500)
    unexpected = [(k, s) for k, s, _ in results if not expected(k, s)]
    time.sleep(1)  # let abandoned generations be noticed and aborted
    metrics = httpx.get(url + "/metrics", timeout=10).text
    alive = httpx.post(url + "/v1/completions", json={"prompt": "def", "max_tokens": 4}, timeout=60).status_code == 200
    rss_end = rss_mb(pid)
    series = sum(1 for line in metrics.splitlines() if line.startswith("lmforge_requests_total{"))
    leftover = metric(metrics, "lmforge_active_sequences") + metric(metrics, "lmforge_queue_depth")

    print(f"{len(results):,} requests in {run['wall']:.0f} s ({len(results) / run['wall']:.1f}/s); "
          f"{metric(metrics, 'lmforge_completion_tokens_total'):,.0f} tokens generated\n")
    print("| kind | requests | answers | p50 latency (s) | p99 latency (s) |")
    print("|---|---:|---|---:|---:|")
    for kind in sorted(by_kind, key=lambda k: -sum(by_kind[k].values())):
        lat = sorted(latencies[kind])
        p50 = f"{statistics.median(lat):.3f}" if lat else ""
        p99 = f"{lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.3f}" if lat else ""
        answers = ", ".join(f"{s}: {c:,}" for s, c in by_kind[kind].most_common())
        print(f"| {kind} | {sum(by_kind[kind].values()):,} | {answers} | {p50} | {p99} |")
    served = sum(c for s, c in statuses.items() if s == 200)
    everything = sorted(x for k in ("completion", "chat", "stream") for x in latencies[k])
    print(f"\nserved (200): {served:,}; 4xx: {n4xx:,}; 5xx: {n5xx:,}; other: {len(results) - served - n4xx - n5xx:,} "
          f"(abandoned by the client)")
    if everything:
        print(f"latency of answered generations: p50 {statistics.median(everything):.3f} s, "
              f"p99 {everything[min(len(everything) - 1, int(0.99 * len(everything)))]:.3f} s")
    peak = max(r for _, r in run["rss"])
    growth = rss_end - rss_start
    print(f"server RSS: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end (peak {peak:.0f}), "
          f"growth {growth:+.0f} MiB (bound {bound_mb:.0f} MiB)")
    print(f"/metrics: {series} request series; rows or queue left busy: {leftover:.0f}; answers afterwards: {alive}")
    checks = {"no 5xx": n5xx == 0, "every answer as expected": not unexpected, "server answers afterwards": alive,
              "no rows or queue left busy": leftover == 0, "/metrics bounded (< 60 series)": series < 60,
              f"RSS growth <= {bound_mb:.0f} MiB": growth <= bound_mb}
    if unexpected:
        print(f"unexpected answers ({len(unexpected)}): {Counter(unexpected).most_common(5)}")
        for events in FAILED_STREAMS[:3]:
            print(f"a failed stream ended with: {events}")
    for name, ok in checks.items():
        print(f"{name}: {'OK' if ok else 'FAIL'}")
    return all(checks.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model folder (default: a tiny-shape model with random weights)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=180, help="seconds of load (default: 180)")
    p.add_argument("--requests", type=int, default=50_000, help="stop after this many requests, if earlier")
    p.add_argument("--rss-bound-mb", type=float, default=64, help="largest RSS growth allowed from warm-up to end")
    p.add_argument("--server-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the server (default: torch's choice, one per core)")
    args = p.parse_args()
    import torch

    from lmforge.utils import hardware_description

    print(f"machine: {hardware_description(torch.device('cpu'))}")
    if args.server_threads:  # the server inherits it (this process's torch has started already)
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp))
        flags = ["--max-batch", "16", "--max-queue", "64", "--max-tokens", "256", "--max-n", "2", "--max-body", str(MAX_BODY)]
        threads = f"OMP_NUM_THREADS={args.server_threads} " if args.server_threads else ""
        print(f"{threads}lmforge serve {' '.join(flags)}; {args.clients} clients for {args.duration:.0f} s "
              f"(at most {args.requests:,} requests), loopback\n")
        with running_server(model, *flags) as (url, server):
            warm = soak(url, server.pid, args.clients, min(20.0, args.duration / 6), args.requests)  # allocator, caches
            rss_start = rss_mb(server.pid)
            print(f"warm-up: {len(warm['results']):,} requests in {warm['wall']:.0f} s\n")
            run = soak(url, server.pid, args.clients, args.duration, args.requests)
            ok = report(run, server.pid, url, rss_start, args.rss_bound_mb)
            if not ok:
                server.log.seek(0)
                print("\nthe server's output (last 3,000 characters):\n" + server.log.read().decode(errors="replace")[-3000:])
    print(f"\nsoak: {'OK' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
