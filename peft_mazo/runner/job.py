"""The multi-task fine-tuning run behind `mazo train` / `mazo eval`: validate, build, train, checkpoint, evaluate.

Outputs in the run directory:

- `losses.jsonl`: one JSON line per step: step, loss, per-task losses and projected gradients, lr, seconds;
- `checkpoint-<step>/` (adapter + `state.pt` with optimizer, sampler and log position + `run_config.json`) every
  `save_every` steps, written under a temporary name, fsynced (files and directory) and renamed, with `latest` naming
  the newest complete one;
- `results.json`: each task's metric before (zero-shot) and after training, and the averages, on the test examples
  (`--split validation`: on the validation examples);
- `loss_curves.png`: the per-task training-loss curves;
- with `--eval-every K`: `validation.jsonl` (step, mean and per-task validation loss every K steps), `best/` (the
  adapter of the lowest one, which the final evaluation scores; `adapter/` stays the last step's), and in
  results.json `selected_step`, `selection` (the validation curve) and `validation` (the selected adapter's task
  metrics on the validation examples, `average_validation`), so that a setting can be chosen without the test set.

Failure modes, all with a message that names the problem and the fix: bad input raises `RunError` before any model
is loaded or any file written (including too little free disk space for the checkpoints and an unwritable output
directory); a failure during training (a checkpoint that cannot be written, only non-finite losses for
`max_skipped_steps` steps in a row) raises `RunFailed` and leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .._atomic import write_text_atomically
from ..models import load_model_and_tokenizer
from ..tasks.encoding import full_lengths
from . import ranks
from .checkpoint import checkpoint_error
from .config import RunConfig, RunError
from .loop import train_group
from .preflight import check_adapter_fits, validate


ZERO_SHOT_NAME = "zero_shot.json"


StepCallback = Callable[[int, dict[str, Any]], None]


def _sample_splits(config: RunConfig) -> dict[str, Any]:
    """The seeded train / val / test examples of every task (`TaskSplits` by task name)."""
    from ..tasks import sample_tasks

    try:
        return sample_tasks(
            config.tasks,
            data_dir=config.data_dir,
            n_train=config.n_train,
            n_val=config.n_val,
            n_test=config.n_test,
            seed=config.seed,
        )
    except ValueError as error:  # a bad record: the message names the file, the line and the field
        raise RunError(str(error)) from None


@ranks.launched  # under torchrun / accelerate launch every rank runs it, rank 0 writes (runner/ranks.py)
def run(config: RunConfig, on_step: Optional[StepCallback] = None) -> dict[str, Any]:
    """Validate, then train (or only evaluate, for "zero-shot") and write the run's outputs. Returns results.json.

    Raises:
        RunError: bad input, before any work (nothing is written).
        RunFailed: the run stopped (a checkpoint could not be written, only non-finite losses); the last complete
            checkpoint is intact and `--resume` continues from it.
    """
    from ..methods import get_method

    with ranks.agreed():  # a bad input on any rank stops every rank
        validate(config)
        ranks.check_run(config, get_method(config.method))
    method = get_method(config.method)
    out = Path(config.out)
    with ranks.writer_context(_exclusive_run_dir(out)):
        return _run_locked(config, method, out, on_step)


@contextlib.contextmanager
def _exclusive_run_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (`flock` on the directory itself: no lock file is left behind,
    and a killed run releases it) so that two runs cannot write into one `--out`. No-op where `fcntl` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"--out {out} is in use by another mazo run (it holds the directory's lock). Wait for that run to "
                "finish, or choose another --out."
            ) from None
        yield
    finally:
        os.close(descriptor)


def _run_locked(config: RunConfig, method, out: Path, on_step: Optional[StepCallback]) -> dict[str, Any]:
    started = time.time()
    splits = _sample_splits(config)
    groups = [[t] for t in config.tasks] if method.per_task else [list(config.tasks)]
    results: dict[str, Any] = {
        "method": method.name,
        "description": method.description,
        "model": config.model,
        "tasks": config.tasks,
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        "sizes": {t: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for t, s in splits.items()},
        "split": config.split,
        "before": {},
        "after": {},
        "skipped_steps": 0,
    }
    selections = {}
    for group in groups:
        group_out = out / group[0] if method.per_task else out
        group_results = _run_group(config, method, group, splits, group_out, on_step)
        results["before"].update(group_results["before"])
        results["after"].update(group_results["after"])
        results["skipped_steps"] += group_results.get("skipped_steps", 0)
        if "validation" in group_results:
            results.setdefault("validation", {}).update(group_results["validation"])
        if group_results.get("selection") is not None:
            selections[group[0] if method.per_task else "all"] = group_results["selection"]
        if group_results.get("cuda_graphs"):
            results.setdefault("cuda_graphs", {})[group[0] if method.per_task else "all"] = group_results[
                "cuda_graphs"
            ]
    for key in ("before", "after", "validation"):
        if key in results:
            scores = [r["score"] for r in results[key].values()]
            results[f"average_{key}"] = sum(scores) / len(scores) if scores else None
    if config.eval_every:
        if method.per_task:
            results["selected_step"] = {t: s["selected_step"] for t, s in selections.items()}
        else:
            results["selected_step"] = selections["all"]["selected_step"] if selections else 0  # 0: zero-shot
        results["selection"] = selections
    results["wall_seconds"] = time.time() - started
    ranks.on_writer(_write_results, out, results)
    return results


def _write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    except OSError as error:
        raise checkpoint_error(error, "results.json", out) from error


def _run_group(config, method, tasks, splits, out: Path, on_step: Optional[StepCallback]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(
        config.model, device=config.device, dtype=config.dtype, load_in_4bit=config.load_in_4bit
    )
    if method.trains:
        warn_truncated(tokenizer, {t: splits[t].train for t in tasks}, config.max_length)

    def evaluate(m, split: str = config.split) -> dict[str, Any]:
        examples = {t: splits[t].test if split == "test" else splits[t].val for t in tasks}
        return ranks.evaluate_tasks(
            m, tokenizer, examples, batch_size=config.eval_batch_size, max_length=config.max_length
        )

    before_path = out / ZERO_SHOT_NAME  # kept so that a resumed run reports the zero-shot scores too
    if config.resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    elif (config.evaluate_before or not method.trains) and not config.resume:
        before = evaluate(model)
        if method.trains:
            ranks.on_writer(write_text_atomically, before_path, json.dumps(before, indent=2))
    else:
        before = {}
    if not method.trains:
        results = {"before": before, "after": before}
        if config.eval_every:
            results["validation"] = before if config.split == "validation" else evaluate(model, "validation")
        return results
    model, skipped, graphs, selection = train_group(config, method, tasks, splits, out, model, tokenizer, on_step)
    # with --eval-every, `model` holds the selected adapter (best/)
    results = {"before": before, "after": evaluate(model), "skipped_steps": skipped, "cuda_graphs": graphs}
    if selection is not None:
        results["selection"] = selection
        results["validation"] = results["after"] if config.split == "validation" else evaluate(model, "validation")
    return results


def warn_truncated(tokenizer, examples: dict[str, Any], max_length: int) -> dict[str, tuple[int, int]]:
    """Warn, per task, when training examples are longer than `--max-length` (their prompts are cut from the left, see
    `tasks.encoding`), naming the length that keeps them all whole. Returns `{task: (cut, longest)}` for those tasks."""
    cut_tasks = {}
    for task, task_examples in examples.items():
        lengths = full_lengths(tokenizer, task_examples)
        cut = sum(length > max_length for length in lengths)
        if cut:
            cut_tasks[task] = (cut, max(lengths))
            warnings.warn(
                f"Task '{task}': {cut} of {len(lengths)} training examples are longer than --max-length {max_length} "
                f"tokens; their prompts are cut from the left (the longest needs {max(lengths)}). Pass --max-length "
                f"{max(lengths)} to keep every one whole.",
                stacklevel=2,
            )
    return cut_tasks


@ranks.launched
def evaluate_adapter(config: RunConfig, adapter: str) -> dict[str, Any]:
    """`mazo eval`: load the base model and an adapter directory, evaluate on the test split (`--split validation`:
    the validation examples drawn from train.jsonl with `--seed`, `--n-train` and `--n-val`), write results.json."""
    from peft import PeftModel

    with ranks.agreed():
        if not (Path(adapter) / "adapter_config.json").exists():
            raise RunError(
                f"--adapter {adapter} has no adapter_config.json; pass a directory written by save_pretrained (e.g. "
                "the run's adapter/ or a checkpoint-<step>/)."
            )
        config.method = "zero-shot"
        validate(config)
        check_adapter_fits(config, adapter)
        ranks.check_run(config)
    splits = _sample_splits(config)
    model, tokenizer = load_model_and_tokenizer(
        config.model, device=config.device, dtype=config.dtype, load_in_4bit=config.load_in_4bit
    )
    model = PeftModel.from_pretrained(model, adapter)
    scores = ranks.evaluate_tasks(
        model,
        tokenizer,
        {t: s.test if config.split == "test" else s.val for t, s in splits.items()},
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
    )
    results = {
        "adapter": adapter,
        "model": config.model,
        "tasks": config.tasks,
        "split": config.split,
        "sizes": {t: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for t, s in splits.items()},
        "after": scores,
        "average_after": sum(r["score"] for r in scores.values()) / len(scores),
    }
    ranks.on_writer(_write_results, Path(config.out), results)
    return results
