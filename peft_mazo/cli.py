"""The `mazo` command: argument parsing and wiring to `peft_mazo.runner`, no logic of its own.

    mazo train --model smollm2-135m --tasks sst2,boolq,copa --method mazo-lora --steps 200 \\
        --data-dir ../shared/data --out runs/demo
    mazo eval --model smollm2-135m --adapter runs/demo/adapter --tasks sst2,boolq,copa --data-dir ../shared/data \\
        --out runs/demo-eval
    mazo methods            # list the methods

Validation-based selection: `mazo train ... --eval-every 50` keeps the adapter of the lowest validation loss as
`best/`, evaluates it, and records `selected_step` and its validation metrics in results.json; `mazo eval ...
--split validation` scores the validation examples (drawn from train.jsonl) instead of the test ones.

The flags, their help and their defaults come from `runner.RunConfig` (and `runner.EvalConfig`, its evaluation
fields) through `transformers.HfArgumentParser`. Exit codes: 0 success, 2 bad input (nothing was done; the message
names the problem and the fix), 1 a run that stopped after it started (a checkpoint that could not be written, only
non-finite losses; the last complete checkpoint is intact and `--resume` continues from it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Optional

from transformers import HfArgumentParser

from .methods import METHODS
from .runner import EvalConfig, RunConfig, RunError, RunFailed, evaluate_adapter, run
from .runner.ranks import is_writer, log_level


def _optional_int(value: str) -> Optional[int]:
    return None if value.lower() in ("all", "none") else int(value)


# Values that argparse cannot read from a field's type alone: "all" for a count means every example.
_VALUE_TYPES = {"n_train": _optional_int, "n_test": _optional_int, "n_val_eval": _optional_int}
# Short forms kept from earlier versions: flag -> (field, value it sets).
_ALIASES = {"--no-eval-before": ("evaluate_before", False)}


def _command(commands, name: str, config_class: type, help: str) -> HfArgumentParser:
    parser = commands.add_parser(name, help=help, dataclass_types=config_class)
    for action in parser._actions:
        if action.dest in _VALUE_TYPES:
            action.type = _VALUE_TYPES[action.dest]
        if action.dest == "method":
            action.choices = list(METHODS)
    for flag, (dest, value) in _ALIASES.items():
        if dest in {f.name for f in fields(config_class)}:
            parser.add_argument(flag, dest=dest, action="store_const", const=value, help=argparse.SUPPRESS)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mazo", description="Masked zeroth-order multi-task fine-tuning (MaZO).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    _command(commands, "train", RunConfig, "fine-tune on several tasks and evaluate before and after")
    _command(
        commands, "eval", EvalConfig, "evaluate a base model, or a saved adapter, on the test (or validation) split"
    )
    commands.add_parser("methods", help="list the fine-tuning methods")
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names})


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
    if results.get("split") == "validation":
        print("(scores on the validation examples, drawn from train.jsonl)")
    if results.get("average_validation") is not None and results.get("split") != "validation":
        step = results.get("selected_step")
        selected = f", selected step {step}" if step is not None else ""
        print(f"validation average {results['average_validation']:.1f} (drawn from train.jsonl{selected})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=log_level(), format="%(message)s")  # under torchrun: INFO from rank 0 only
    if args.command == "methods":
        for method in METHODS.values():
            print(f"{method.name:<15} {method.description}")
        return 0
    try:
        if args.command == "train":
            results = run(_config(args))
        else:
            # an evaluation only writes its results.json (it may replace the one of an earlier evaluation)
            config = _config(argparse.Namespace(**vars(args), method="zero-shot", overwrite=True))
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
    if not is_writer():
        return 0
    _print_table(results)
    print(f"\nresults: {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
