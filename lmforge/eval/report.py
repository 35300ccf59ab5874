"""`lmforge report RUN`: a ``report.md`` with the run's numbers and PNG plots (matplotlib).

Everything in it is read back from the files the training loop wrote: ``config.yaml``,
``run.json``, ``metrics.jsonl`` and ``samples.jsonl``, and ``eval.json`` where `lmforge eval` wrote one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.utils import atomic_write_text, human_count, read_json


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise LmforgeError(f"{run_dir} has no metrics.jsonl; is it a run folder written by `lmforge pretrain`?")
    train, val = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LmforgeError(f"{path}:{lineno} is not valid JSON; the metrics log is corrupt") from None
        (val if "val_loss" in record else train).append(record)
    return train, val


def _plot(path: Path, series: list[tuple[str, list, list]], xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, xs, ys in series:
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``loss.png``, ``lr.png`` and ``throughput.png`` into the run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run folder {run_dir} does not exist")
    train, val = read_metrics(run_dir)
    if not train:
        raise LmforgeError(f"{run_dir}/metrics.jsonl has no training steps yet; train first")
    run = read_json(run_dir / "run.json", "run description")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").exists() else {}

    window = max(1, len(train) // 50)
    _plot(
        run_dir / "loss.png",
        [
            (f"train (mean of {window} steps)" if window > 1 else "train", [r["tokens"] for r in train], _smooth([r["loss"] for r in train], window)),
            ("validation", [r["tokens"] for r in val if "val_loss" in r], [r["val_loss"] for r in val if "val_loss" in r]),
        ],
        "tokens", "cross-entropy (nats/token)", "Loss",
    )
    _plot(run_dir / "lr.png", [("lr", [r["step"] for r in train], [r["lr"] for r in train])], "step", "learning rate", "Learning rate")
    _plot(
        run_dir / "throughput.png",
        [("tokens/s", [r["step"] for r in train], _smooth([r["tokens_per_second"] for r in train], window))],
        "step", "tokens per second", "Throughput",
    )

    last = train[-1]
    n_recent = max(1, len(train) // 10)
    recent_loss = sum(r["loss"] for r in train[-n_recent:]) / n_recent
    lines = [
        f"# Training report: `{run_dir.name}`",
        "",
        "| | |",
        "|---|---|",
        f"| model | {config.get('model', '?')}: {run['model']['n_layer']} layers, {run['model']['n_head']} heads, "
        f"width {run['model']['n_embd']}, context {run['model']['block_size']}, vocabulary {run['model']['vocab_size']} |",
        f"| parameters | {run['parameters']:,} ({human_count(run['parameters'])}), "
        f"{run.get('trainable_parameters', run['parameters']):,} trained |",
        *([f"| task, method | {run['task']}, {run['method']} (from {run['base_model']}) |"] if "task" in run else []),
        *([f"| training FLOPs per token | {human_count(run['flops_per_token'])} |"] if run.get("flops_per_token") else []),
        f"| hardware | {run['hardware']} |",
        f"| device, precision, processes | {run['device']}, {run['dtype']}, {run['world_size']} |",
        f"| steps | {last['step']:,} |",
        f"| tokens seen | {last['tokens']:,} ({human_count(last['tokens'])}) |",
        f"| wall-clock training time | {_duration(last['elapsed'])} |",
        f"| mean throughput | {last['tokens'] / max(last['elapsed'], 1e-9):,.0f} tokens/s |",
        f"| final train loss (mean of last {n_recent} steps) | {recent_loss:.4f} |",
        "",
        "## Validation",
        "",
    ]
    if val:
        keys = [k for k in val[0] if k.startswith("val_")]
        header = [k.removeprefix("val_").replace("_", " ") for k in keys]
        lines += ["| step | tokens | " + " | ".join(header) + " |", "|---:|---:|" + "---:|" * len(keys)]
        for r in val:
            cells = [f"{r[k]:.2f}" if k == "val_perplexity" else f"{r[k]:.4f}" for k in keys if k in r]
            lines.append(f"| {r['step']} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    else:
        lines.append("No validation split.")
    lines += ["", "![loss](loss.png)", "", "![learning rate](lr.png) ![throughput](throughput.png)", ""]
    if (run_dir / "eval.json").exists():  # written by `lmforge eval --model RUN`
        from lmforge.eval.evaluate import format_results

        results = read_json(run_dir / "eval.json", "evaluation results")
        lines += ["## Evaluation", "", f"`lmforge eval` of `{results['model']}` on {results['date']}:", "",
                  format_results(results), ""]
    samples_path = run_dir / "samples.jsonl"
    if samples_path.exists():
        samples = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if samples:
            lines += ["## Samples", ""]
            for s in (samples[0], samples[-1]) if len(samples) > 1 else samples:
                lines += [f"At step {s['step']}:", "", "```", s["prompt"] + s["text"], "```", ""]
    lines += [
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
