"""Every command on a device, end to end, on tiny models: does each one run there at all?

    python bench/check_gpu_paths.py                  # --device cuda
    python bench/check_gpu_paths.py --device cpu     # the same chain on the CPU (what the tests cover)

The test suite runs on the CPU; this is the check to run when a GPU is at hand, in a few minutes: a tokenizer
and data from the standard library, then pretraining (causal, masked, span), fine-tuning (full, LoRA), the
reward model, DPO, GRPO and PPO, generation, evaluation and the HTTP server, each command a few steps on
`--device DEVICE` with its default precision (bf16 where the GPU has it). It measures nothing: it prints one
line per command, ok or the error's last line, and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def stdlib_files(n: int) -> list[str]:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    return [str(p) for p in files[:n]]


def chain(t: Path, device: str) -> list[tuple[str, str]]:
    """(name, command line) in order; later commands use earlier ones' folders."""
    files = " ".join(shlex.quote(f) for f in stdlib_files(12))
    common = f"--device {device} --tensorboard false --quiet"
    small = "--n-layer 2 --n-embd 64 --n-head 2"
    steps = "--max-steps 3 --eval-interval 3 --warmup-steps 1"
    return [
        ("tokenizer", f"tokenizer train {files} --vocab-size 1024 --out {t}/tok"),
        ("prepare", f"prepare {files} --tokenizer {t}/tok --out {t}/data"),
        ("pretrain clm", f"pretrain --data {t}/data --out {t}/clm --model tiny {small} --block-size 64 {steps} "
                         f"--eval-windows 2 --micro-batch-size 4 {common}"),
        ("pretrain clm compiled", f"pretrain --data {t}/data --out {t}/clm_compiled --model tiny-llama {small} "
                                  f"--n-kv-head 1 --block-size 64 {steps} --eval-windows 2 --micro-batch-size 4 "
                                  f"--compile true {common}"),
        ("generate", f"generate --model {t}/clm --device {device} --max-new-tokens 8 --seed 0 'def main('"),
        ("generate beams", f"generate --model {t}/clm --device {device} --max-new-tokens 8 --num-beams 2 -n 2 "
                           f"'def main('"),
        ("eval", f"eval --model {t}/clm --data {t}/data --device {device}"),
        ("finetune full", f"finetune --model {t}/clm --train {EXAMPLES}/preferences/next_line_sft.jsonl "
                          f"--out {t}/sft {steps} --micro-batch-size 4 {common}"),
        ("finetune lora", f"finetune --model {t}/clm --train {EXAMPLES}/preferences/next_line_sft.jsonl "
                          f"--out {t}/lora --method lora {steps} --micro-batch-size 4 {common}"),
        ("reward", f"reward --model {t}/clm --train {EXAMPLES}/preferences/next_line_train.jsonl --out {t}/reward "
                   f"{steps} --micro-batch-size 4 {common}"),
        ("dpo", f"dpo --model {t}/sft --train {EXAMPLES}/preferences/next_line_train.jsonl --out {t}/dpo {steps} "
                f"--micro-batch-size 4 {common}"),
        ("rl grpo", f"rl --algo grpo --reward exact --model {t}/sft --train {EXAMPLES}/rl/arithmetic_prompts.jsonl "
                    f"--out {t}/grpo --num-generations 2 --micro-batch-size 4 --max-new-tokens 8 "
                    f"--max-steps 2 --eval-interval 2 --warmup-steps 1 {common}"),
        ("rl ppo", f"rl --algo ppo --reward model:{t}/reward --model {t}/sft "
                   f"--train {EXAMPLES}/rl/next_line_prompts.jsonl --out {t}/ppo --num-generations 2 "
                   f"--micro-batch-size 4 --max-new-tokens 8 --max-steps 2 --eval-interval 2 --warmup-steps 1 {common}"),
        ("tokenizer encoder", f"tokenizer train {files} --vocab-size 1024 --encoder --out {t}/tok_enc"),
        ("prepare encoder", f"prepare {files} --tokenizer {t}/tok_enc --out {t}/data_enc"),
        ("pretrain mlm", f"pretrain --objective mlm --data {t}/data_enc --out {t}/mlm --model tiny {small} "
                         f"--block-size 64 {steps} --eval-windows 2 --micro-batch-size 4 {common}"),
        ("tokenizer t5", f"tokenizer train {files} --vocab-size 1024 --sentinels 20 --out {t}/tok_t5"),
        ("prepare t5", f"prepare {files} --tokenizer {t}/tok_t5 --out {t}/data_t5"),
        ("pretrain span", f"pretrain --objective span --data {t}/data_t5 --out {t}/t5 --model tiny {small} "
                          f"--block-size 64 {steps} --eval-windows 2 --micro-batch-size 4 {common}"),
        ("generate t5", f"generate --model {t}/t5 --device {device} --max-new-tokens 8 'def <extra_id_0>('"),
    ]


def serve_check(t: Path, device: str) -> None:
    """`lmforge serve` on the device: one completion, one streamed chat message, then stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(t / "sft"), "--device", device,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=ROOT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(server.stdout.read()[-1000:])
                time.sleep(0.5)

        def post(path, body):
            request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()

        try:
            completion = json.loads(post("/v1/completions", {"model": "sft", "prompt": "def main(", "max_tokens": 8,
                                                             "n": 2}))
            assert [c["finish_reason"] in ("length", "stop") for c in completion["choices"]] == [True, True], completion
            stream = post("/v1/chat/completions", {"model": "sft", "stream": True, "max_tokens": 8,
                                                   "messages": [{"role": "user", "content": "What is 2 plus 2?"}]})
            assert stream.rstrip().endswith("data: [DONE]"), stream[-300:]
        except Exception as e:
            server.poll()
            if server.returncode is not None:  # it died: what it said is the news
                raise RuntimeError(f"the server exited {server.returncode}: {server.stdout.read()[-1000:]}") from e
            raise
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="where the tiny runs go (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per command")
    args = parser.parse_args()
    t = args.out or Path(tempfile.mkdtemp(prefix="gpu_paths_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    for name, line in chain(t, args.device) + [("serve", None)]:
        started = time.perf_counter()
        try:
            if line is None:
                serve_check(t, args.device)
                error = None
            else:
                done = subprocess.run([sys.executable, "-m", "lmforge", *shlex.split(line)], capture_output=True,
                                      text=True, timeout=args.timeout, cwd=ROOT, env=env)
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()
                error = None if done.returncode == 0 else f"exit {done.returncode}: {tail[-1] if tail else ''}"
                if error:
                    (t / f"{name.replace(' ', '_')}.log").write_text(done.stdout + done.stderr)
        except Exception as e:  # noqa: BLE001 (a check that failed is reported, and the chain goes on)
            error = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        results.append((name, error))
        print(f"{name:<24} {time.perf_counter() - started:6.1f} s  {'ok' if error is None else error}", flush=True)
    failed = [name for name, error in results if error]
    print(f"{len(results) - len(failed)} of {len(results)} commands ran on {args.device}"
          + (f"; failed: {', '.join(failed)} (logs in {t})" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
