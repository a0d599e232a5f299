"""Plots of the measured benchmark results for the documentation (reads `benchmarks/results/*.json`).

    python benchmarks/plot_results.py            # writes docs/img/*.png

Only plots what was measured: a missing result file is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def plot_zo_step(result: dict, png: Path) -> None:
    """ZO step time and peak memory of each configuration, relative to the plain forward (targets dashed)."""
    rows = [
        ("MaZO dense\nρ = 0.9", "mazo_dense", "mazo_dense_step_vs_two_forwards", "mazo_dense_peak_vs_forward_peak"),
        (
            "MaZO LoRA\nr = 64, ρ = 0.8",
            "mazo_lora",
            "mazo_lora_step_vs_two_forwards",
            "mazo_lora_peak_vs_forward_peak",
        ),
        ("MeZO\nfull model", "mezo_full", "mezo_full_step_vs_two_forwards", "mezo_full_peak_vs_forward_peak"),
        (
            "MeZO on\npeft LoRA r = 16",
            "mezo_peft_lora",
            "mezo_peft_lora_step_vs_two_forwards",
            "mezo_peft_lora_peak_vs_forward_peak",
        ),
    ]
    ratios, targets = result["ratios"], result["targets"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [label for label, *_ in rows]
    left.bar(labels, [ratios[step] for _, _, step, _ in rows], color="#4c72b0")
    right.bar(labels, [ratios[peak] for _, _, _, peak in rows], color="#55a868")
    for axis, kind in ((left, "step_vs_two_forwards"), (right, "peak_vs_forward_peak")):
        for index, (_, name, _, _) in enumerate(rows):
            target = targets.get(f"{name}_{kind}")
            if target:
                axis.hlines(target, index - 0.4, index + 0.4, colors="black", linestyles="dashed")
        axis.tick_params(axis="x", labelsize=8)
    left.axhline(1.0, color="grey", linewidth=0.8)
    right.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("step time / two forwards")
    right.set_ylabel("peak memory / forward peak")
    fig.suptitle(f"ZO step, Llama-2-7B shapes, batch 16 × 512, {result['device_name']} (dashed: target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_mask_overlap(result: dict, png: Path) -> None:
    """Pairwise overlap of the single-task masks, and each task's overlap with the multi-task mask by projection."""
    tasks = result["settings"]["tasks"]
    matrix = [[result["pairwise_overlap"][f"{a}|{b}"] for b in tasks] for a in tasks]
    projections = list(result["by_projection"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    image = left.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    left.set_xticks(range(len(tasks)), tasks)
    left.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            left.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    left.set_title("single-task masks: pairwise overlap", fontsize=10)
    fig.colorbar(image, ax=left, fraction=0.046)
    width = 0.8 / len(tasks)
    for index, task in enumerate(tasks):
        values = [result["by_projection"][p][task] for p in projections]
        right.bar([x + index * width for x in range(len(projections))], values, width, label=task)
    right.axhline(1.0 - result["settings"]["sparsity"], color="grey", linestyle="dotted", label="chance")
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(projections))], projections, fontsize=8)
    right.set_ylim(0.0, 1.05)
    right.set_title("each task's mask vs the multi-task mask", fontsize=10)
    right.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"MaZO masks of {result['model']}, ρ = {result['settings']['sparsity']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, plot in (("zo_step_h100", plot_zo_step), ("mask_overlap_smollm2", plot_mask_overlap)):
        source = RESULTS / f"{name}.json"
        if not source.exists():
            print(f"skipped {name}: {source} does not exist")
            continue
        target = args.out / f"{name}.png"
        plot(json.loads(source.read_text()), target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
