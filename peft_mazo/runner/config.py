"""A run's settings (`RunConfig`), the settings a resumed run must share with its checkpoint, and the run's errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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


@dataclass
class RunConfig:
    """Everything one run needs; `mazo train` fills it from the command line.

    `max_skipped_steps`: stop with `RunFailed` after this many consecutive steps with a non-finite loss (0: never).
    """

    model: str
    tasks: list[str]
    method: str = "mazo-lora"
    out: str = "runs/mazo"
    data_dir: Optional[str] = None
    steps: int = 1000
    lr: Optional[float] = None
    eps: float = 1e-3
    batch_size: int = 4
    eval_batch_size: int = 16
    n_train: Optional[int] = 500
    n_val: int = 250
    n_test: Optional[int] = 500
    seed: int = 0
    save_every: int = 100
    sparsity: Optional[float] = None
    r: Optional[int] = None
    calib_batches: int = 8
    calib_batch_size: int = 8
    max_length: int = 512
    load_in_4bit: bool = False
    dtype: str = "auto"
    device: str = "auto"
    resume: bool = False
    evaluate_before: bool = True
    coba_every: int = 4
    max_skipped_steps: int = 10
    cuda_graphs: bool = True
    overwrite: bool = False


class RunError(ValueError):
    """A run cannot start: the message names the problem and the fix. Raised before any work."""


class RunFailed(RuntimeError):
    """A run stopped after it started (a checkpoint could not be written, only non-finite losses, ...).

    The message names the problem, the fix and the last complete checkpoint, which is left intact.
    """


class CheckpointError(RunFailed):
    """Writing a checkpoint (or the final adapter) failed with an `OSError`; the previous checkpoint is intact."""
