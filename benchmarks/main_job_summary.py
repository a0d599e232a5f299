"""Summarise `mazo train` runs of the README's main job (e.g. one per commit) into one JSON: per run the median
ZO-step time from `losses.jsonl`, the wall time and scores from `results.json`, with the machine and versions.

    mazo train --model smollm2-135m --tasks sst2 --method mtl-zo --steps 200 --lr 1e-5 --eps 1e-2 --batch-size 4 \\
        --n-train 200 --n-val 32 --n-test 200 --max-length 256 --eval-every 50 --data-dir ../shared/data --out runs/main
    python benchmarks/main_job_summary.py --run sst2=runs/main@$(git rev-parse --short HEAD) \\
        --out benchmarks/results/main_job_sst2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(directory: Path) -> dict:
    steps = [json.loads(line) for line in (directory / "losses.jsonl").read_text().splitlines()]
    results = json.loads((directory / "results.json").read_text())
    return {
        "steps": len(steps),
        "step_seconds_median": statistics.median(r["seconds"] for r in steps),
        "step_seconds_all": [round(r["seconds"], 3) for r in steps],
        "run_wall_seconds": results["wall_seconds"],
        "average_before": results["average_before"],
        "average_after": results["average_after"],
        "scores_after": {t: v["score"] for t, v in results["after"].items()},
        "test_examples": {t: v.get("n") for t, v in results["after"].items()},
        "validation_loss": validation_losses(directory),
        "config": results["config"],
    }


def validation_losses(directory: Path) -> dict[int, float]:
    """`{step: mean validation loss}` of a run made with `--eval-every` (empty without)."""
    path = directory / "validation.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR@COMMIT (repeat)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--note", default="", help="how the machine was used (e.g. shared with other work)")
    args = parser.parse_args()
    report = {
        "benchmark": "main_job",
        "device": f"cpu: {cpu_name()}",
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "note": args.note,
        "runs": {},
    }
    for spec in args.run:
        name, rest = spec.split("=", 1)
        directory, commit = rest.rsplit("@", 1)
        report["runs"][name] = {"git_commit": commit, **summarize(Path(directory))}
    commits = {run["git_commit"] for run in report["runs"].values()}
    if len(commits) == 1:
        report["git_commit"] = commits.pop()  # the tree every run measured
    names = list(report["runs"])
    if len(names) == 2:
        first, second = (report["runs"][n]["step_seconds_median"] for n in names)
        report[f"step_speedup_{names[1]}_vs_{names[0]}"] = first / second
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, run in report["runs"].items():
        print(
            f"{name:<8} {run['git_commit']:<10} step {run['step_seconds_median']:.2f} s (median of {run['steps']}), "
            f"run {run['run_wall_seconds']:.0f} s, average {run['average_before']:.1f} -> {run['average_after']:.1f}"
        )


if __name__ == "__main__":
    main()
