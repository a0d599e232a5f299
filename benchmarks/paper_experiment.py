"""The paper's multi-task experiment (Table 1, Table 5 ablation, Figures 1 and 4) on a real LLM, one command.

Runs `mazo train` for every method and seed as separate processes, several at a time on one GPU, then collects the
`results.json` files into a table (mean ± std over seeds per task and on the average), a radar chart per method
(Figure 1) and the training-loss curves of MTL-ZO vs MaZO with and without LoRA (Figure 4).

    python benchmarks/paper_experiment.py --model smollm2-135m --data-dir ../shared/data --out runs/paper \\
        --steps 400 --seeds 0 --parallel 8

The "shared" row trains MTL-ZO on SST-2 only and evaluates the adapter on every task (`mazo eval`). The ablation
(`--ablation`) runs the mask scorers at ρ = 0.5 on SST-2, BoolQ, COPA and SQuAD (the paper's Table 5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ALL_TASKS = ["sst2", "boolq", "rte", "wsc", "wic", "multirc", "copa", "squad"]
ABLATION_TASKS = ["sst2", "boolq", "copa", "squad"]
TABLE1_METHODS = ["zero-shot", "mtl-zo", "famo", "coba", "mtl-zo-lora", "mazo", "mazo-lora", "stl-zo", "shared"]
ABLATION_METHODS = ["mtl-zo", "mask-random", "mask-magnitude", "mask-wanda", "mask-mazo"]


def train_command(args, method: str, tasks: list[str], seed: int, out: Path, extra: list[str]) -> list[str]:
    command = [
        sys.executable, "-m", "peft_mazo.cli", "train", "--model", args.model, "--tasks", ",".join(tasks),
        "--method", method, "--steps", str(args.steps), "--seed", str(seed), "--data-dir", args.data_dir,
        "--out", str(out), "--batch-size", str(args.batch_size), "--n-train", str(args.n_train),
        "--n-val", str(args.n_val), "--n-test", str(args.n_test), "--max-length", str(args.max_length),
        "--save-every", str(args.steps), "--eval-batch-size", str(args.eval_batch_size),
    ]  # fmt: skip
    if method != "zero-shot":
        command.append("--no-eval-before")
    lr = args.lr_lora if method in ("mtl-zo-lora", "mazo-lora") else args.lr_dense
    if method != "zero-shot" and lr is not None:
        command += ["--lr", str(lr)]
    return command + extra


def jobs(args) -> list[tuple[str, str, int, Path, list[list[str]]]]:
    """(group, method, seed, run dir, commands) for every run."""
    out = Path(args.out)
    planned = []
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / "table1" / f"{method}-seed{seed}"
            if method == "shared":
                train = train_command(args, "mtl-zo", ["sst2"], seed, run_dir / "train", [])
                evaluate = [
                    sys.executable, "-m", "peft_mazo.cli", "eval", "--model", args.model, "--adapter",
                    str(run_dir / "train" / "adapter"), "--tasks", ",".join(args.tasks), "--data-dir", args.data_dir,
                    "--out", str(run_dir), "--n-train", str(args.n_train), "--n-val", str(args.n_val), "--n-test",
                    str(args.n_test), "--max-length", str(args.max_length), "--seed", str(seed),
                    "--eval-batch-size", str(args.eval_batch_size),
                ]  # fmt: skip
                planned.append(("table1", method, seed, run_dir, [train, evaluate]))
            else:
                planned.append(
                    ("table1", method, seed, run_dir, [train_command(args, method, args.tasks, seed, run_dir, [])])
                )
        if args.ablation:
            for method in ABLATION_METHODS:
                run_dir = out / "ablation" / f"{method}-seed{seed}"
                extra = ["--sparsity", "0.5"] if method != "mtl-zo" else []
                planned.append(
                    (
                        "ablation",
                        method,
                        seed,
                        run_dir,
                        [train_command(args, method, ABLATION_TASKS, seed, run_dir, extra)],
                    )
                )
    return planned


def execute(job) -> dict:
    group, method, seed, run_dir, commands = job
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run_dir / "stdout.log", "w") as log:
        for command in commands:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            if code != 0:
                return {"group": group, "method": method, "seed": seed, "error": f"exit {code}", "dir": str(run_dir)}
    results = json.loads((run_dir / "results.json").read_text())
    return {"group": group, "method": method, "seed": seed, "dir": str(run_dir), "seconds": time.time() - started,
            "scores": {t: r["score"] for t, r in results["after"].items()}}  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def table(records: list[dict], group: str, tasks: list[str], methods: list[str]) -> str:
    lines = ["| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for method in methods:
        runs = [r for r in records if r["group"] == group and r["method"] == method and "scores" in r]
        if not runs:
            continue
        cells = []
        for task in tasks:
            m, s = mean_std([r["scores"][task] for r in runs])
            cells.append(f"{m:.1f} ± {s:.1f}" if len(runs) > 1 else f"{m:.1f}")
        m, s = mean_std([sum(r["scores"][t] for t in tasks) / len(tasks) for r in runs])
        cells.append(f"**{m:.1f} ± {s:.1f}**" if len(runs) > 1 else f"**{m:.1f}**")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def radar(records: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))] + [0.0]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(polar=True)
    for method in methods:
        runs = [r for r in records if r["group"] == "table1" and r["method"] == method and "scores" in r]
        if runs:
            values = [mean_std([r["scores"][t] for r in runs])[0] for t in tasks]
            ax.plot(angles, values + values[:1], label=method)
    ax.set_xticks(angles[:-1], tasks)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves(out: Path, seed: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, pair in zip(axes, [("mtl-zo", "mazo"), ("mtl-zo-lora", "mazo-lora")], strict=True):
        for method in pair:
            log = out / "table1" / f"{method}-seed{seed}" / "losses.jsonl"
            if not log.exists():
                continue
            records = [json.loads(line) for line in log.read_text().splitlines() if line]
            window = max(1, len(records) // 25)
            losses = [r["loss"] for r in records]
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(losses))
            ]
            ax.plot([r["step"] for r in records], smooth, label=method)
        ax.set_xlabel("step")
        ax.set_ylabel("multi-task training loss (moving average)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=os.environ.get("MAZO_DATA", "../shared/data"))
    parser.add_argument("--out", default="runs/paper")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--methods", default=",".join(TABLE1_METHODS))
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per task per step")
    parser.add_argument("--lr-dense", type=float, default=1e-5)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-val", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=8, help="runs at a time")
    parser.add_argument("--ablation", action="store_true")
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]

    from peft_mazo.models import resolve_model

    args.model = resolve_model(args.model)  # convert once, before the parallel runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(pool.map(execute, jobs(args)))
    summary = {
        "model": args.model,
        "args": dict(vars(args)),
        "wall_seconds": time.time() - started,
        "records": records,
    }
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - informational only
        pass
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = ["## Table 1 (8 tasks)", table(records, "table1", args.tasks, args.methods)]
    if args.ablation:
        report += ["", "## Mask ablation, rho = 0.5", table(records, "ablation", ABLATION_TASKS, ABLATION_METHODS)]
    failed = [r for r in records if "error" in r]
    if failed:
        report += [
            "",
            "Failed runs: " + ", ".join(f"{r['method']} seed {r['seed']} ({r['error']}, {r['dir']})" for r in failed),
        ]
    (out / "tables.md").write_text("\n".join(report) + "\n")
    radar(records, args.tasks, args.methods, out / "radar.png")
    loss_curves(out, args.seeds[0], out / "loss_curves.png")
    print("\n".join(report))
    print(f"\n{len(records)} runs in {summary['wall_seconds']:.0f} s on {summary.get('device')}; outputs in {out}")


if __name__ == "__main__":
    main()
