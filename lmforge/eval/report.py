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
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == last and not text.endswith("\n"):
                # a run killed while writing its last record (a crash, the machine lost): the records before it stand
                from lmforge.utils import warn

                warn(f"{path}:{lineno}: the last record is cut short (the run stopped while writing it); reporting "
                     f"the {len(train)} training step(s) before it")
                break
            raise LmforgeError(f"{path}:{lineno} is not valid JSON; the metrics log is corrupt") from None
        if not isinstance(record, dict):
            raise LmforgeError(f"{path}:{lineno} is no JSON object; the metrics log is corrupt")
        # an evaluation logs only val_ keys (val_loss, or val_reward for `lmforge rl`); a training step logs its loss
        evaluation = any(k.startswith("val_") for k in record)
        needed = ("step", "tokens") if evaluation else _TRAIN_KEYS
        bad = [k for k in needed if not isinstance(record.get(k), (int, float)) or isinstance(record.get(k), bool)]
        if bad:
            raise LmforgeError(f"{path}:{lineno}: {'an evaluation' if evaluation else 'a training step'} needs the "
                               f"number(s) {', '.join(bad)}; the metrics log is corrupt")
        (val if evaluation else train).append(record)
    return train, val


_TRAIN_KEYS = ("step", "tokens", "loss", "lr", "tokens_per_second", "elapsed")


def _read_yaml(path: Path) -> dict:
    """The run's config.yaml ({} when there is none)."""
    from lmforge.train.config import read_config_file

    return read_config_file(path, "the run's config") if path.exists() else {}


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


def _plot_panels(path: Path, panels: list[tuple[str, str, list[tuple[str, list, list, str]]]], xlabel: str) -> None:
    """One PNG of several plots side by side: each panel is (title, ylabel, [(label, xs, ys, style), ...])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        for label, xs, ys, style in series:
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_label(task: str | None, config: dict) -> str:
    """The loss plot's axis: a preference objective's loss is a mean over pairs, not a cross-entropy per token."""
    if task == "reward":
        return "Bradley-Terry loss (mean over pairs)"
    if task == "dpo":
        return f"{config.get('loss', 'sigmoid')} preference loss (mean over pairs)"
    if task == "rl":
        return f"{config.get('algo', 'rl')} policy loss (not a measure of progress: see rl.png)"
    return "cross-entropy (nats/token)"

# What `lmforge reward` and `lmforge dpo` log at every step (and with a val_ prefix at each evaluation).
PREFERENCE_KEYS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected",
                   "logp_chosen", "logp_rejected")


def _preference_section(run_dir: Path, train: list[dict], val: list[dict], task: str | None) -> list[str]:
    """``preference.png`` and the report's lines about it, for a run whose objective logs pair metrics."""
    dpo = task == "dpo"
    reward = "implicit reward β·log(π/π_ref)" if dpo else "reward"
    window = max(1, len(train) // 20)  # a step's accuracy is over one batch of pairs: smooth more than the loss
    smoothed = f" (mean of {window} steps)" if window > 1 else ""

    def curves(key: str, label: str, style: str = "-", val_style: str = "o--") -> list[tuple]:
        rows = [r for r in train if key in r]
        checked = [r for r in val if f"val_{key}" in r]
        steps, values = [r["step"] for r in rows], _smooth([r[key] for r in rows], window)
        return [(f"{label}, train{smoothed}", steps, values, style),
                (f"{label}, validation", [r["step"] for r in checked], [r[f"val_{key}"] for r in checked], val_style)]

    panels = [
        ("Pair accuracy (chosen scored above rejected)", "fraction of pairs", curves("reward_accuracy", "accuracy")),
        ("Margin (chosen minus rejected)", reward, curves("reward_margin", "margin")),
        ("Chosen vs rejected", reward,
         curves("reward_chosen", "chosen", "C0-", "C0o--") + curves("reward_rejected", "rejected", "C3-", "C3o--")),
    ]
    if any("logp_chosen" in r for r in train):
        logps = curves("logp_chosen", "chosen", "C0-", "C0o--") + curves("logp_rejected", "rejected", "C3-", "C3o--")
        panels.append(("Policy log-probability of the answers", "log π(answer | prompt), summed over tokens", logps))
    _plot_panels(run_dir / "preference.png", panels, "step")

    lines = ["## Preferences", ""]
    checked = [r for r in val if "val_reward_accuracy" in r]
    if checked:
        first, last = checked[0], checked[-1]
        names = {"reward_accuracy": "pair accuracy", "reward_margin": f"{reward}: margin",
                 "reward_chosen": f"{reward}: chosen", "reward_rejected": f"{reward}: rejected",
                 "logp_chosen": "log π(chosen)", "logp_rejected": "log π(rejected)", "loss": "loss"}
        columns = [first, last] if first is not last else [last]
        lines += ["| validation | " + " | ".join(f"step {r['step']:,}" for r in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for key in ("loss", *PREFERENCE_KEYS):
            if f"val_{key}" in last:
                digits = 2 if key.startswith("logp") else 4
                lines.append(f"| {names[key]} | " + " | ".join(f"{r[f'val_{key}']:.{digits}f}" for r in columns) + " |")
        if dpo and first["step"] == 0 and first["val_reward_margin"] == 0:
            lines += ["", ("At step 0 the policy is its reference: every implicit reward is 0, and a tie counts as "
                           "a wrong pair, so the accuracy starts at 0.")]
        lines.append("")
    else:
        lines += ["No validation pairs.", ""]
    return lines + ["![preference curves](preference.png)", ""]


def _rl_section(run_dir: Path, train: list[dict], val: list[dict], config: dict) -> list[str]:
    """``rl.png`` and the report's lines about it, for a `lmforge rl` run: reward (each reward function's too when
    there are several), KL to the reference, completion length and the share cut at max_new_tokens."""
    window = max(1, len(train) // 20)  # each step's numbers are one rollout's: smooth like the preference curves
    smoothed = f" (mean of {window} steps)" if window > 1 else ""
    parts = sorted({k for r in train for k in r if k.startswith("reward_")} - set(RL_OWN_KEYS))

    def curve(key: str, label: str, style: str = "-") -> list[tuple]:
        rows = [r for r in train if key in r]
        return [(f"{label}, rollouts{smoothed}", [r["step"] for r in rows], _smooth([r[key] for r in rows], window), style)]

    def points(key: str, label: str, style: str = "o--") -> list[tuple]:
        rows = [r for r in val if key in r]
        return [(f"{label}, validation (greedy)", [r["step"] for r in rows], [r[key] for r in rows], style)]

    reward = curve("reward_mean", "mean reward", "C0-") + points("val_reward", "reward", "C0o--")
    for i, key in enumerate(parts, 1):
        name = key.removeprefix("reward_")
        reward += curve(key, name, f"C{i}-") + points(f"val_{key}", name, f"C{i}o--")
    has_kl = any("kl" in r for r in train)
    panels = [("Reward", "reward per completion", reward)]
    if has_kl:
        panels.append(("KL to the reference", "KL(π‖π_ref), summed over a completion", curve("kl", "KL")))
    panels += [
        ("Completion length", "tokens", curve("completion_length", "length") +
         points("val_completion_length", "length")),
        (f"Completions cut at max_new_tokens ({config.get('max_new_tokens', '?')})", "share of completions",
         curve("truncated_share", "cut")),
    ]
    _plot_panels(run_dir / "rl.png", panels, "step")

    lines = ["## Reinforcement learning", ""]
    lines.append(f"{config.get('algo', '?')} against `{config.get('reward', '?')}`; each step's rollout numbers are the "
                 f"completions it sampled (temperature {config.get('temperature', '?')}), validation is greedy.")
    lines.append("")
    head, tail = train[:window], train[-window:]
    label = (lambda rows: f"steps {rows[0]['step']:,}–{rows[-1]['step']:,}") if window > 1 else (lambda rows: f"step {rows[0]['step']:,}")
    lines += [f"| | first ({label(head)}) | last ({label(tail)}) |", "|---|---:|---:|"]

    def row(name: str, first, last, digits: int = 4) -> None:
        if first is not None and last is not None:
            lines.append(f"| {name} | {first:.{digits}f} | {last:.{digits}f} |")

    def mean(rows: list[dict], key: str):
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    row("mean reward (rollouts)", mean(head, "reward_mean"), mean(tail, "reward_mean"))
    for key in parts:
        row(f"{key.removeprefix('reward_')} (rollouts)", mean(head, key), mean(tail, key))
    checked = [r for r in val if "val_reward" in r]
    if checked:
        first, last = checked[0], checked[-1]
        row(f"validation reward, greedy (step {first['step']:,} → {last['step']:,})", first["val_reward"], last["val_reward"])
        for key in parts:
            if f"val_{key}" in first:
                row(f"validation {key.removeprefix('reward_')}", first[f"val_{key}"], last[f"val_{key}"])
    if has_kl:
        row("KL to the reference", mean(head, "kl"), mean(tail, "kl"))
    row("kl_coef (β)", mean(head, "kl_coef"), mean(tail, "kl_coef"))
    row("completion length (tokens)", mean(head, "completion_length"), mean(tail, "completion_length"), 1)
    row("share cut at max_new_tokens", mean(head, "truncated_share"), mean(tail, "truncated_share"), 3)
    if not has_kl:
        lines += ["", "No KL: kl_coef is 0 and target_kl is off, so no reference model was run."]
    return lines + ["", "![reinforcement learning curves](rl.png)", ""]


# What `lmforge rl` logs under reward_ names besides the reward functions' own values.
RL_OWN_KEYS = ("reward_mean", "reward_std", "reward_errors")


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _sample_text(sample: dict) -> str:
    """A sample as text: pretraining's {"prompt", "text"}, or `lmforge rl`'s {"prompt" (text or messages), "completion",
    "reward"}."""
    prompt = sample["prompt"]
    if isinstance(prompt, list):
        prompt = "".join(f"[{m['role']}] {m['content']}\n" for m in prompt) + "[assistant] "
    if "completion" in sample:
        return f"{prompt}{sample['completion']}\n(reward {sample['reward']:.4f})"
    return prompt + sample["text"]


_OBJECTIVES = {"mlm": "encoder, masked LM", "mlm+nsp": "encoder, masked LM and next-sentence prediction",
               "plm": "encoder, permutation LM", "span": "encoder-decoder, span corruption"}


def _model_line(config: dict, shape: dict) -> str:
    """The model's shape in words: a decoder's, an encoder's or an encoder-decoder's config."""
    layers = f"{shape['n_layer']} layers"
    if "n_decoder_layer" in shape:
        layers = f"{shape['n_layer']} encoder + {shape['n_decoder_layer']} decoder layers"
    kind = _OBJECTIVES.get(config.get("objective"))
    if "n_head" not in shape and "hidden" in shape:  # the LSTM baseline (`lmforge baseline --kind lstm`)
        return (f"LSTM baseline: {layers}, embeddings {shape.get('n_embd')}, hidden {shape['hidden']}, trained on "
                f"windows of {shape.get('block_size')}, vocabulary {shape.get('vocab_size')}")
    return (f"{config.get('model', '?')}{f' ({kind})' if kind else ''}: {layers}, {shape.get('n_head', '?')} heads, "
            f"width {shape.get('n_embd') or shape.get('d_model')}, context {shape.get('block_size', '?')}, "
            f"vocabulary {shape.get('vocab_size', '?')}")


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _speed_rows(run_dir: Path) -> list[str]:
    """What the run measured about itself at its last evaluation (throughput.json): MFU, memory, layout."""
    path = run_dir / "throughput.json"
    if not path.exists():
        return []
    try:
        speed = json.loads(path.read_text(encoding="utf-8"))
        layout = {"none": "one process", "ddp": "DDP", "fsdp": "FSDP2"}.get(speed["parallel"], speed["parallel"])
        rows = [f"| parallelism | {layout}{', activation checkpointing' if speed.get('activation_checkpointing') else ''} |",
                f"| peak memory per process | {', '.join(f'{m:,.0f}' for m in speed['peak_memory_mb'])} MB |"]
        if speed.get("mfu"):
            rows.insert(0, f"| model FLOPs utilisation (the steps from the evaluation before step {speed.get('step', '?')} to it) | "
                           f"{speed['mfu']:.1%} of {speed['peak_flops_per_device'] / 1e12:.3g} TFLOP/s per device "
                           f"({speed['peak_source']}), at {speed['tokens_per_second']:,.0f} tokens/s |")
        return rows
    except (ValueError, KeyError, TypeError):
        return []  # a report never fails on this optional file


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``loss.png``, ``lr.png`` and ``throughput.png`` into the run folder (and
    ``preference.png`` for a reward model or DPO run: pair accuracy, margin, chosen vs rejected; ``rl.png`` for an
    RL run: reward, KL to the reference, completion length, the share cut at max_new_tokens)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmforgeError(f"run folder {run_dir} " + ("is a file; give the run's folder" if run_dir.exists()
                                                       else "does not exist"))
    train, val = read_metrics(run_dir)
    if not train:
        raise LmforgeError(f"{run_dir}/metrics.jsonl has no training steps yet; train first")
    run = read_json(run_dir / "run.json", "run description")
    config = _read_yaml(run_dir / "config.yaml")

    window = max(1, len(train) // 50)
    _plot(
        run_dir / "loss.png",
        [
            (f"train (mean of {window} steps)" if window > 1 else "train", [r["tokens"] for r in train], _smooth([r["loss"] for r in train], window)),
            ("validation", [r["tokens"] for r in val if "val_loss" in r], [r["val_loss"] for r in val if "val_loss" in r]),
        ],
        "tokens", _loss_label(run.get("task"), config), "Loss",
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
    skipped = sum(bool(r.get("skipped")) for r in train)
    lines = [
        f"# Training report: `{run_dir.name}`",
        "",
        "| | |",
        "|---|---|",
        f"| model | {_model_line(config, run['model'])} |",
        f"| parameters | {run['parameters']:,} ({human_count(run['parameters'])}), "
        f"{run.get('trainable_parameters', run['parameters']):,} trained |",
        *([f"| task, method | {run['task']}, {run['method']} (from {run['base_model']}) |"] if "task" in run else []),
        *([f"| training FLOPs per token | {human_count(run['flops_per_token'])} |"] if run.get("flops_per_token") else []),
        f"| hardware | {run['hardware']} |",
        f"| device, precision, processes | {run['device']}, {run['dtype']}, {run['world_size']} |",
        f"| steps | {last['step']:,} |",
        f"| tokens seen | {last['tokens']:,} ({human_count(last['tokens'])}) |",
        f"| wall-clock training time | {_duration(last['elapsed'])} |",
        f"| mean throughput (whole run) | {last['tokens'] / max(last['elapsed'], 1e-9):,.0f} tokens/s |",
        *_speed_rows(run_dir),
        f"| final train loss (mean of last {n_recent} steps) | {recent_loss:.4f} |",
        *([f"| skipped updates (loss or gradients not finite) | {skipped:,} of {len(train):,} steps |"] if skipped else []),
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
    if any("reward_accuracy" in r for r in train):  # `lmforge reward` or `lmforge dpo`
        lines += _preference_section(run_dir, train, val, run.get("task"))
    if any("reward_mean" in r for r in train):  # `lmforge rl`
        lines += _rl_section(run_dir, train, val, config)
    if (run_dir / "eval.json").exists():  # written by `lmforge eval --model RUN`
        from lmforge.eval.evaluate import format_results

        results = read_json(run_dir / "eval.json", "evaluation results")
        try:
            lines += ["## Evaluation", "", f"`lmforge eval` of `{results['model']}` on {results['date']}:", "",
                      format_results(results), ""]
        except (KeyError, TypeError, AttributeError, ValueError):
            raise LmforgeError(f"{run_dir / 'eval.json'} is not lmforge evaluation results; move it away or run "
                               f"`lmforge eval --model {run_dir}` again") from None
    samples_path = run_dir / "samples.jsonl"
    if samples_path.exists():
        samples = []
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            try:
                sample = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                sample = None
            if isinstance(sample, dict) and "step" in sample:  # (a damaged line is no sample to show)
                samples.append(sample)
        if samples:
            lines += ["## Samples", ""]
            for s in (samples[0], samples[-1]) if len(samples) > 1 else samples:
                lines += [f"At step {s['step']}:", "", "```", _sample_text(s), "```", ""]
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
