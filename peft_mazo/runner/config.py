"""A run's settings (`RunConfig`), the settings a resumed run must share with its checkpoint, and the run's errors."""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Optional

from .._checks import is_finite_number, is_int
from ..tasks.data import DEFAULT_N_TEST, DEFAULT_N_TRAIN, DEFAULT_N_VAL


# Settings a resumed run must share with its checkpoint (anything else would silently train another model).
RESUME_FIELDS = (
    "model",
    "dtype",
    "load_in_4bit",
    "tasks",
    "method",
    "seed",
    "lr",
    "eps",
    "batch_size",
    "sparsity",
    "r",
    "n_train",
    "n_val",
    "max_length",
    "calib_batches",
    "calib_batch_size",
    "coba_every",
)


DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


# What `mazo eval` (and the before / after evaluation of `mazo train`) scores: the test examples (drawn from
# validation.jsonl) or the validation examples (drawn from train.jsonl, disjoint from the training examples).
SPLITS = ("test", "validation")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    """A `RunConfig` field: its default and its `--help` text (read by `transformers.HfArgumentParser`)."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RunConfig:
    """Everything one run needs: the only home of the run's defaults and of the checks on single values.

    `mazo train` parses it with `transformers.HfArgumentParser` (the flags, their help and their defaults come from the
    fields below); `mazo eval` uses the fields named in `EVAL_FIELDS`. Value checks (`check`) run at construction and again
    in `runner.validate`, which also checks files, disk space and `--resume` before any work.
    """

    model: str = field(metadata={"help": "local path, hub id, or 'smollm2-135m' (installed offline)"})
    tasks: list[str] = field(metadata={"help": "comma-separated (or space-separated), e.g. sst2,boolq,copa"})
    method: str = _option("mazo-lora", "see `mazo methods`")
    out: str = _option("runs/mazo", "run directory (results.json, logs, checkpoints)")
    data_dir: Optional[str] = _option(None, "directory of <task>/{train,validation}.jsonl; default: the HF hub")
    steps: int = _option(1000, "ZO steps (each: two forward passes)")
    lr: Optional[float] = _option(None, "learning rate (default: the method's, 1e-6 dense / 3e-4 LoRA)")
    eps: float = _option(1e-3, "ZO perturbation scale")
    batch_size: int = _option(4, "examples per task per step")
    eval_batch_size: int = _option(16, "examples per evaluation batch")
    n_train: Optional[int] = _option(DEFAULT_N_TRAIN, "training examples per task ('all': the whole train file)")
    n_val: int = _option(DEFAULT_N_VAL, "validation examples per task (drawn from the train file)")
    n_test: Optional[int] = _option(DEFAULT_N_TEST, "test examples per task ('all': the whole file)")
    seed: int = _option(0, "seed of the data sampling, the adapter's initialisation and the ZO directions")
    save_every: int = _option(100, "checkpoint every K steps")
    sparsity: Optional[float] = _option(None, "override the method's mask sparsity (masked methods only)")
    r: Optional[int] = _option(None, "override the method's LoRA rank (0 = dense)")
    calib_batches: int = _option(8, "calibration batches per task for the mask")
    calib_batch_size: int = _option(8, "examples per calibration batch")
    max_length: int = _option(512, "tokens per sequence (prompt cut on the left)")
    load_in_4bit: bool = _option(False, "nf4 base through bitsandbytes")
    dtype: str = _option("auto", "base dtype: auto (bf16 on GPU, fp32 on CPU), float32, ...")
    device: str = _option("auto", "auto, cpu, cuda, cuda:1, ...")
    resume: bool = _option(False, "continue from the run directory's latest checkpoint")
    evaluate_before: bool = _option(True, "evaluate zero-shot before training (--no-eval-before: skip it)")
    coba_every: int = _option(4, "CoBa: steps between validation-loss observations")
    max_skipped_steps: int = _option(
        10, "stop after this many consecutive steps with a non-finite (NaN/inf) loss; 0 = never stop"
    )
    cuda_graphs: bool = _option(
        True, "replay CUDA graphs of the packed step (GPU only; --no-cuda-graphs: run every forward directly)"
    )
    overwrite: bool = _option(False, "replace the run already in --out (default: refuse a used --out)")
    eval_every: int = _option(
        0,
        "every K steps (and at the last step) log the mean validation loss over the tasks to validation.jsonl and "
        "keep the adapter with the lowest one as best/, which the final evaluation then scores; results.json also "
        "gets its validation metrics (zero-shot: the base model's). 0 = off",
    )
    n_val_eval: Optional[int] = _option(
        None, "validation examples per task in the --eval-every loss (the first of the --n-val ones; 'all': every one)"
    )
    patience: int = _option(
        0, "with --eval-every: stop training after this many evaluations without a lower validation loss; 0 = never"
    )
    split: str = _option(
        "test",
        "the examples the before/after evaluation scores: test (from validation.jsonl) or validation (the --n-val "
        "examples drawn from train.jsonl, for choices that must not see the test set)",
        choices=list(SPLITS),
    )

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if isinstance(self.tasks, (list, tuple)):  # "--tasks sst2,boolq" and "--tasks sst2 boolq" alike
            self.tasks = [t.strip() for item in self.tasks for t in str(item).split(",") if t.strip()]
        self.check()

    def check(self) -> None:
        """Raise `RunError` for a value that is wrong on its own (a type, a range); the method decides what applies."""
        from ..methods import get_method

        try:
            method = get_method(self.method)
        except ValueError as error:
            raise RunError(str(error)) from None
        if not self.tasks:
            raise RunError("No tasks given: pass --tasks, e.g. --tasks sst2,boolq,copa.")
        if len(set(self.tasks)) != len(self.tasks):
            raise RunError(f"--tasks names a task twice: {self.tasks}. Give every task once.")
        if method.trains:
            if not is_int(self.steps) or self.steps < 1:
                raise RunError(
                    f"--steps must be a positive integer for method '{method.name}', got {self.steps}; e.g. --steps "
                    "1000 (use --method zero-shot to only evaluate)."
                )
            if not is_int(self.save_every) or self.save_every < 1:
                raise RunError(
                    f"--save-every must be a positive integer, got {self.save_every!r}; e.g. --save-every 100."
                )
            if self.n_train is not None and (not is_int(self.n_train) or self.n_train < 1):
                raise RunError(
                    f"--n-train must be a positive integer or 'all' for method '{method.name}', got {self.n_train!r}."
                )
        for name in ("batch_size", "eval_batch_size", "calib_batches", "calib_batch_size", "max_length", "coba_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise RunError(f"{_flag(name)} must be a positive integer, got {value!r}.")
        for name in ("n_val", "n_train", "n_test"):
            value = getattr(self, name)
            if not (value is None and name != "n_val") and (not is_int(value) or value < 0):
                raise RunError(f"{_flag(name)} must be an integer >= 0, got {value!r}.")
        if self.n_test == 0:
            raise RunError(
                "--n-test 0 leaves nothing to evaluate; pass at least 1 (or 'all' for the whole validation file)."
            )
        if not is_int(self.seed):
            raise RunError(f"--seed must be an integer, got {self.seed!r}.")
        if not is_int(self.eval_every) or self.eval_every < 0:
            raise RunError(
                f"--eval-every must be an integer >= 0 (0 = no validation-based selection), got {self.eval_every!r}; "
                "e.g. --eval-every 50."
            )
        if not is_int(self.patience) or self.patience < 0:
            raise RunError(f"--patience must be an integer >= 0 (0 = never stop early), got {self.patience!r}.")
        if self.patience and not self.eval_every:
            raise RunError(
                f"--patience {self.patience} counts validation evaluations, but --eval-every is 0 (none are made). "
                "Pass --eval-every K too, or drop --patience."
            )
        if self.n_val_eval is not None and (not is_int(self.n_val_eval) or self.n_val_eval < 1):
            raise RunError(f"--n-val-eval must be a positive integer or 'all', got {self.n_val_eval!r}.")
        if self.split not in SPLITS:
            raise RunError(
                f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}: test scores the test examples, "
                "validation the --n-val examples drawn from train.jsonl."
            )
        if (self.eval_every or self.split == "validation") and self.n_val == 0:
            what = f"--eval-every {self.eval_every}" if self.eval_every else "--split validation"
            raise RunError(f"{what} needs validation examples, but --n-val is 0; pass --n-val >= 1 (e.g. 250).")
        if not is_int(self.max_skipped_steps) or self.max_skipped_steps < 0:
            raise RunError(
                f"--max-skipped-steps must be an integer >= 0 (0 = never stop on non-finite losses), got "
                f"{self.max_skipped_steps!r}."
            )
        if self.lr is not None and not (is_finite_number(self.lr) and self.lr >= 0):
            raise RunError(f"--lr must be a finite number >= 0, got {self.lr}; e.g. --lr 3e-4 for LoRA, 1e-6 dense.")
        if not (is_finite_number(self.eps) and self.eps > 0):
            raise RunError(f"--eps must be a finite number > 0, got {self.eps}; the paper uses --eps 1e-3.")
        if self.r is not None and (not is_int(self.r) or self.r < 0):
            raise RunError(f"--r must be an integer >= 0 (0 = dense masked delta, > 0 = LoRA rank), got {self.r!r}.")
        if self.dtype not in DTYPES:
            raise RunError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if method.trains and self.sparsity is not None and method.adapter.get("scorer") == "none":
            raise RunError(
                f"--sparsity {self.sparsity}: method '{method.name}' trains every weight (no mask), so a sparsity "
                "would be ignored. Drop --sparsity, or choose a masked method (mazo, mazo-lora, mask-random, ...)."
            )
        if method.trains:  # --sparsity and --r are checked where the adapter's own settings are: by MaZOConfig
            from ..config import MaZOConfig

            try:
                MaZOConfig(**method.adapter_config(sparsity=self.sparsity, r=self.r))
            except (TypeError, ValueError) as error:
                raise RunError(f"method '{method.name}' with --sparsity/--r: {error}") from None


# The RunConfig fields that `mazo eval` takes too.
# `n_train` and `n_val` decide which examples of train.jsonl are the validation ones (`--split validation`).
EVAL_FIELDS = (
    "model", "tasks", "out", "data_dir", "n_test", "seed", "eval_batch_size", "max_length", "load_in_4bit", "dtype",
    "device", "split", "n_train", "n_val",
)  # fmt: skip


def _eval_config_class() -> type:
    """`EvalConfig`: the `RunConfig` fields named in `EVAL_FIELDS` (same defaults and help), `--out` required, and
    `--adapter`. Built from `RunConfig` so that `mazo eval` and `mazo train` share one definition of each flag."""
    hints = typing.get_type_hints(RunConfig)
    specs = []
    for spec in fields(RunConfig):
        if spec.name not in EVAL_FIELDS:
            continue
        if spec.default is MISSING or spec.name == "out":
            specs.append((spec.name, hints[spec.name], field(metadata=spec.metadata)))
        else:
            specs.append((spec.name, hints[spec.name], field(default=spec.default, metadata=spec.metadata)))
    adapter_help = "adapter directory written by save_pretrained (omit: the base model, zero-shot)"
    specs.append(("adapter", Optional[str], field(default=None, metadata={"help": adapter_help})))
    return make_dataclass("EvalConfig", specs)


EvalConfig = _eval_config_class()


class RunError(ValueError):
    """A run cannot start: the message names the problem and the fix. Raised before any work."""


class RunFailed(RuntimeError):
    """A run stopped after it started (a checkpoint could not be written, only non-finite losses, ...).

    The message names the problem, the fix and the last complete checkpoint, which is left intact.
    """


class CheckpointError(RunFailed):
    """Writing a checkpoint (or the final adapter) failed with an `OSError`; the previous checkpoint is intact."""
