"""Validation-based selection (`--eval-every`): the mean validation loss over the tasks every K steps, its log
(`validation.jsonl`), and the adapter with the lowest one kept as `best/`.

The loss is the training loss (`multitask_losses`) on fixed batches of the first `--n-val-eval` validation examples of
every task (drawn from train.jsonl, disjoint from the training examples; the test set is never read for a choice).
A task's loss is the mean of its batches' losses weighted by their sizes; the selection criterion is the unweighted
mean over the tasks. `best/` is written atomically together with `selection.json` (its step and losses), so after a
crash the adapter and the step it belongs to always agree; `--resume` reads them back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .._atomic import save_dir_atomically
from . import ranks
from .checkpoint import checkpoint_error
from .losslog import truncate_log


logger = logging.getLogger(__name__)


VALIDATION_LOG = "validation.jsonl"
BEST_DIR = "best"
SELECTION_NAME = "selection.json"


class ValidationSelector:
    """Evaluates the validation loss, logs it and keeps the best adapter of one group of tasks.

    Args:
        config: the run's `RunConfig` (`eval_every`, `n_val_eval`, `eval_batch_size`, `max_length`, `patience`).
        tasks: the group's tasks, in the order of the losses.
        splits: `TaskSplits` by task (their `val` examples are used).
        tokenizer: the model's tokenizer.
        out: the group's run directory.
    """

    def __init__(self, config, tasks, splits, tokenizer, out: Path) -> None:
        from ..tasks import encode_batch

        self.every = config.eval_every
        self.patience = config.patience
        self.out = Path(out)
        self.log_path = self.out / VALIDATION_LOG
        self.tasks = list(tasks)
        size = config.eval_batch_size
        chunks: list[dict[str, Any]] = []
        self.counts = {}
        for task in self.tasks:
            examples = list(splits[task].val[: config.n_val_eval])
            self.counts[task] = len(examples)
            examples = ranks.strided_share(examples)  # several ranks: each evaluates a share, the sums are added
            for index, start in enumerate(range(0, len(examples), size)):
                if index == len(chunks):
                    chunks.append({})
                chunks[index][task] = encode_batch(tokenizer, examples[start : start + size], config.max_length)
        empty = [t for t, n in self.counts.items() if n == 0]
        if empty:
            from .config import RunError

            raise RunError(f"--eval-every: no validation examples for {', '.join(empty)}; raise --n-val.")
        self.chunks = chunks
        self._packed: Optional[list] = None
        self.best: Optional[dict[str, Any]] = None
        self.history: list[dict[str, Any]] = []
        self.since_best = 0

    # ------------------------------------------------------------------------------------------------ start / resume
    def start(self, resume_step: Optional[int]) -> None:
        """A fresh run (`resume_step` None) drops an earlier run's log and `best/`; a resumed one keeps the log up to
        its checkpoint's step and reads the best-so-far back from `best/selection.json`."""
        best_dir = self.out / BEST_DIR
        if resume_step is None:
            ranks.on_writer(_remove, self.log_path, best_dir)
            return
        ranks.on_writer(truncate_log, self.log_path, resume_step)
        if self.log_path.exists():
            self.history = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        selection = best_dir / SELECTION_NAME
        if selection.is_file() and (best_dir / "adapter_model.safetensors").is_file():
            # may be of a step after the checkpoint (a crash between best/ and the checkpoint): its adapter and loss
            # are still those of that step, which the resumed run recomputes
            self.best = json.loads(selection.read_text())
        candidates = [r for r in self.history if r.get("candidate", True) and _finite(r["loss"])]
        if self.best is not None:
            later = [r for r in candidates if r["step"] > self.best["step"]]
            self.since_best = len(later)

    # -------------------------------------------------------------------------------------------------- evaluation
    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    @torch.no_grad()
    def losses(self, model) -> dict[str, float]:
        """Each task's validation loss (the mean of its batches' losses, weighted by their sizes)."""
        from ..tasks import multitask_losses, pack_batches, supports_packing

        if self._packed is None:
            pack = supports_packing(model)
            self._packed = [pack_batches(chunk) if pack else None for chunk in self.chunks]
        totals = dict.fromkeys(self.tasks, 0.0)
        was_training = model.training
        model.eval()
        try:
            for chunk, packed in zip(self.chunks, self._packed, strict=True):
                values = multitask_losses(model, packed if packed is not None else chunk).float().cpu().tolist()
                for task, value in zip(chunk, values, strict=True):
                    totals[task] += value * len(chunk[task])
        finally:
            model.train(was_training)
        totals = ranks.sum_over_ranks(totals)
        return {task: totals[task] / self.counts[task] for task in self.tasks}

    def observe(self, step: int, model, candidate: bool = True) -> dict[str, Any]:
        """Evaluate at `step`, log it, and save `best/` when the mean loss is the lowest so far (`candidate`)."""
        losses = self.losses(model)
        mean = sum(losses.values()) / len(losses)
        improved = candidate and _finite(mean) and (self.best is None or mean < self.best["loss"])
        record = {"step": step, "loss": mean, "losses": losses, "candidate": candidate, "best": improved}
        if improved:
            selection = {"step": step, "loss": mean, "losses": losses}
            ranks.on_writer(self._save_best, model, selection)
            self.best = selection  # on every rank (the losses are the same everywhere)
            self.since_best = 0
        elif candidate:
            self.since_best += 1
        try:
            with ranks.open_log(self.log_path) as log:
                log.write(json.dumps(record) + "\n")
        except OSError as error:
            raise checkpoint_error(error, VALIDATION_LOG, self.out) from error
        self.history.append(record)
        logger.info("step %d: validation loss %.4f%s", step, mean, " (best so far)" if improved else "")
        return record

    def should_stop(self) -> bool:
        return bool(self.patience) and self.best is not None and self.since_best >= self.patience

    def _save_best(self, model, selection: dict[str, Any]) -> None:
        def write(staging: Path) -> None:
            model.save_pretrained(staging)
            (staging / SELECTION_NAME).write_text(json.dumps(selection, indent=2))

        try:
            save_dir_atomically(self.out / BEST_DIR, write)
        except OSError as error:
            raise checkpoint_error(error, "the best adapter (best/)", self.out) from error
        self.best = selection

    # ---------------------------------------------------------------------------------------------------- outcome
    def load_best(self, model) -> Optional[int]:
        """Load `best/` into `model` (in place); returns its step, or None when no finite loss was seen."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.best is None:
            return None
        set_peft_model_state_dict(model, load_file(self.out / BEST_DIR / "adapter_model.safetensors"))
        return int(self.best["step"])

    def summary(self, stopped_at: Optional[int]) -> dict[str, Any]:
        """What results.json records of the selection: the selected step and loss, and the curve (step, mean)."""
        return {
            "selected_step": None if self.best is None else int(self.best["step"]),
            "best_loss": None if self.best is None else self.best["loss"],
            "eval_every": self.every,
            "examples_per_task": dict(self.counts),
            "stopped_early_at": stopped_at,
            "curve": [[r["step"], r["loss"]] for r in self.history],
        }


def _remove(log_path: Path, best_dir: Path) -> None:
    log_path.unlink(missing_ok=True)
    shutil.rmtree(best_dir, ignore_errors=True)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
