"""The run's loss log (`losses.jsonl`): truncation on resume and the per-task loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

from .._atomic import write_text_atomically


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps <= `last_step` (those a resumed run must not write twice).

    A line cut short by a crash (not valid JSON) ends the log: it and everything after it are dropped.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] <= last_step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Per-task training-loss curves from `losses.jsonl` (raw, and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in records[0]["losses"]:
        steps = [r["step"] for r in records]
        values = [r["losses"][task] for r in records]
        window = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        (line,) = ax.plot(steps, smooth, label=task)
        ax.plot(steps, values, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
