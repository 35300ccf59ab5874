"""Systems trained in turn, one optimizer step each, in separate processes (bench_preference.py, bench_rl.py).

Taking turns makes whatever else runs on the machine fall on every system alike, and running each in its own
process keeps their threads and memory apart. Each process runs ``run(spec, turns)`` and calls ``turns.wait()``
before a step and ``turns.done()`` after it; the processes form a ring, the first system going first.
"""

from __future__ import annotations

import multiprocessing
import traceback
import warnings

TURN_TIMEOUT = 900  # seconds a process waits for the others' steps (or set-up) before giving up


class Turns:
    """The ring's token: ``wait()`` before a step, ``done()`` after it (passes it to the next system)."""

    def __init__(self, mine, nxt, ready):
        self.mine, self.next, self.ready, self.started, self.holding = mine, nxt, ready, False, False

    def wait(self) -> None:
        if not self.started:  # every system set up (models loaded, trainer made) before the first step
            self.ready.wait(TURN_TIMEOUT)
            self.started = True
        if not self.mine.acquire(timeout=TURN_TIMEOUT):
            raise RuntimeError(f"the other systems took no step for {TURN_TIMEOUT} s")
        self.holding = True

    def done(self) -> None:
        if self.holding:
            self.holding = False
            self.next.release()


def begin(steps: str, threads: int) -> dict[str, str]:
    """What a TRL comparison does first: libraries quiet, the thread count set, the machine line printed (with
    transformers' and TRL's versions); returns ``--steps`` ("tiny=8,gpt2=4") as {shape: steps}."""
    import torch
    import transformers
    import trl

    from lmforge.utils import hardware_description

    quiet()
    torch.set_num_threads(threads)
    print(f"machine: {hardware_description(torch.device('cpu'))}; transformers {transformers.__version__}, "
          f"trl {trl.__version__}")
    return dict(item.split("=") for item in steps.split(","))


def quiet() -> None:
    """transformers', datasets' and Python's warnings and progress bars off."""
    import datasets
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _worker(run, spec: dict, threads: int, mine, nxt, ready, results) -> None:
    import torch

    quiet()
    torch.set_num_threads(threads)
    turns = Turns(mine, nxt, ready)
    try:
        results.put((spec["system"], run(spec, turns), None))
    except BaseException:
        results.put((spec["system"], None, traceback.format_exc()))  # the parent stops the others
        raise
    finally:
        turns.done()  # never leave the others waiting for a turn this process holds


def run_in_turns(run, systems: list[str], spec: dict, threads: int) -> dict:
    """``run({**spec, "system": s, "tmp": ...}, turns)`` for each system ``s``, in processes taking turns step by
    step; returns each system's result. ``run`` must be a module-level function (it is sent to the processes)."""
    ctx = multiprocessing.get_context("spawn")
    n = len(systems)
    turn = [ctx.Semaphore(1 if i == 0 else 0) for i in range(n)]
    ready, results = ctx.Barrier(n), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(run, {**spec, "system": system, "tmp": f"{spec['tmp']}/{i}"}, threads,
                                                 turn[i], turn[(i + 1) % n], ready, results))
               for i, system in enumerate(systems)]
    for w in workers:
        w.start()
    out = {}
    try:
        while len(out) < n:
            system, result, error = results.get(timeout=2 * TURN_TIMEOUT)
            if error:
                raise SystemExit(f"{system} failed:\n{error}")
            out[system] = result
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.terminate()
                w.join()
    return out
