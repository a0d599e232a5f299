"""The `mazo` command: argument parsing and wiring to `peft_mazo.runner`, no logic of its own.

    mazo train --model smollm2-135m --tasks sst2,boolq,copa --method mazo-lora --steps 200 \\
        --data-dir ../shared/data --out runs/demo
    mazo eval --model smollm2-135m --adapter runs/demo/adapter --tasks sst2,boolq,copa --data-dir ../shared/data \\
        --out runs/demo-eval
    mazo methods            # list the methods

Exit codes: 0 success, 2 bad input (nothing was done; the message names the problem and the fix), 1 a run that
stopped after it started (a checkpoint that could not be written, only non-finite losses; the last complete
checkpoint is intact and `--resume` continues from it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from .methods import METHODS
from .runner import RunConfig, RunError, RunFailed, evaluate_adapter, run


def _tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _optional_int(value: str) -> Optional[int]:
    return None if value.lower() in ("all", "none") else int(value)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local path, hub id, or 'smollm2-135m' (installed offline)")
    parser.add_argument("--tasks", required=True, type=_tasks, help="comma-separated, e.g. sst2,boolq,copa")
    parser.add_argument("--data-dir", help="directory of <task>/{train,validation}.jsonl; default: the HF hub")
    parser.add_argument("--out", required=True, help="run directory (results.json, logs, checkpoints)")
    parser.add_argument("--n-test", type=_optional_int, default=500, help="test examples per task ('all')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt cut on the left)")
    parser.add_argument("--load-in-4bit", action="store_true", help="nf4 base through bitsandbytes")
    parser.add_argument("--dtype", default="auto", help="base dtype: auto (bf16 on GPU, fp32 on CPU), float32, ...")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mazo", description="Masked zeroth-order multi-task fine-tuning (MaZO).")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    train = commands.add_parser(
        "train", help="fine-tune on several tasks and evaluate before and after", formatter_class=defaults
    )
    _add_common(train)
    train.add_argument("--n-train", type=_optional_int, default=500, help="training examples per task ('all')")
    train.add_argument("--n-val", type=int, default=250, help="validation examples per task (from the train file)")
    train.add_argument("--method", default="mazo-lora", choices=list(METHODS), help="see `mazo methods`")
    train.add_argument("--steps", type=int, default=1000, help="ZO steps (each: two forward passes)")
    train.add_argument("--lr", type=float, help="learning rate (default: the method's, 1e-6 dense / 3e-4 LoRA)")
    train.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    train.add_argument("--batch-size", type=int, default=4, help="examples per task per step")
    train.add_argument("--sparsity", type=float, help="override the method's mask sparsity")
    train.add_argument("--r", type=int, help="override the method's LoRA rank (0 = dense)")
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every K steps")
    train.add_argument("--calib-batches", type=int, default=8, help="calibration batches per task for the mask")
    train.add_argument("--calib-batch-size", type=int, default=8)
    train.add_argument("--no-eval-before", action="store_true", help="skip the zero-shot evaluation")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (default: refuse a used --out)"
    )
    train.add_argument("--coba-every", type=int, default=4, help="CoBa: steps between validation-loss observations")
    train.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run every forward directly instead of replaying CUDA graphs of the packed step (GPU only)",
    )
    train.add_argument(
        "--max-skipped-steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps with a non-finite (NaN/inf) loss; 0 = never stop",
    )

    evaluate = commands.add_parser(
        "eval", help="evaluate a base model, or a saved adapter, on the test split", formatter_class=defaults
    )
    _add_common(evaluate)
    evaluate.add_argument("--adapter", help="adapter directory written by save_pretrained (omit: zero-shot)")

    commands.add_parser("methods", help="list the fine-tuning methods")
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    fields = set(RunConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if getattr(args, "no_eval_before", False):
        values["evaluate_before"] = False
    if getattr(args, "no_cuda_graphs", False):
        values["cuda_graphs"] = False
    return RunConfig(**values)


def _print_table(results: dict) -> None:
    before, after = results.get("before", {}), results.get("after", {})
    print(f"\n{'task':<10} {'metric':<9} {'before':>8} {'after':>8}")
    for task, scores in after.items():
        previous = before.get(task, {}).get("score")
        previous_text = f"{previous:8.1f}" if previous is not None else f"{'-':>8}"
        print(f"{task:<10} {scores['metric']:<9} {previous_text} {scores['score']:8.1f}")
    average_before = results.get("average_before")
    average_text = f"{average_before:8.1f}" if average_before is not None else f"{'-':>8}"
    print(f"{'average':<10} {'':<9} {average_text} {results['average_after']:8.1f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "methods":
        for method in METHODS.values():
            print(f"{method.name:<15} {method.description}")
        return 0
    try:
        if args.command == "train":
            results = run(_config(args))
        else:
            config = _config(args)
            config.method = "zero-shot"
            config.overwrite = True  # an evaluation rewrites only its results.json
            results = evaluate_adapter(config, args.adapter) if args.adapter else run(config)
    except RunError as error:
        print(f"mazo: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"mazo: run failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = " Continue with the same command and --resume." if args.command == "train" else ""
        print(f"\nmazo: interrupted. Checkpoints already written in {args.out} are intact.{resume}", file=sys.stderr)
        return 130
    _print_table(results)
    print(f"\nresults: {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
