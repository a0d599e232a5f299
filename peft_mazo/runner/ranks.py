"""The run under `torchrun` / `accelerate launch`: which rank does what (see docs/distributed.md).

Every rank validates, samples the same splits and builds the same steps (same seeds); each keeps its contiguous share
of every task's examples of a step (`encoded_shards`) and of the calibration batches (`shard_calibration`), and
`ZOSGD` / `compute_importance` combine the ranks (one all-reduce of the losses per step; the mask statistics summed).
Rank 0, the writer, alone takes the `--out` lock and writes files (checkpoints, logs, results, the adapter), shows
progress bars and INFO logs. Evaluation is sharded: each rank scores a strided share of every task's test examples
and the scores are combined exactly (they are means over examples).

Every function here is a no-op (or the identity) in a single process, so the runner calls them unconditionally.
A `RunError` / `RunFailed` raised inside `agreed()` on any rank is raised on every rank (no rank is left waiting in a
collective); `on_writer(fn)` runs `fn` on rank 0 inside such an agreement, which is also the barrier the other ranks
wait at (after a checkpoint, before reading files rank 0 changed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .. import distributed as _dist
from .config import CheckpointError, RunConfig, RunError, RunFailed


logger = logging.getLogger(__name__)

T = TypeVar("T")

_SHARED_ERRORS = {cls.__name__: cls for cls in (RunError, RunFailed, CheckpointError)}


# ----------------------------------------------------------------------------------------------------------------------
# the process group of the run
# ----------------------------------------------------------------------------------------------------------------------
def launched_world_size() -> int:
    """`WORLD_SIZE` set by the launcher (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_writer() -> bool:
    """True on the rank that writes files, logs and progress bars: rank 0 of the group, or the launcher's `RANK` 0
    when no group is initialised (before `process_group` or after it ended); True in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _dist.is_main_process()
    return int(os.environ.get("RANK", "0") or 0) == 0


def log_level() -> int:
    """INFO on the writer, WARNING on the other ranks (the CLI's logging level)."""
    return logging.INFO if is_writer() else logging.WARNING


def launched(function: Callable[..., T]) -> Callable[..., T]:
    """Run `function(config, ...)` (`run`, `evaluate_adapter`) inside `process_group(config)`."""

    @functools.wraps(function)
    def wrapper(config: RunConfig, *args: Any, **kwargs: Any) -> T:
        with process_group(config):
            return function(config, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def process_group(config: RunConfig) -> Iterator[None]:
    """Join the launcher's process group for the run (no-op in a single process, or when the caller already
    initialised one, which is then kept). Gloo with `--device cpu` (or no CUDA), else NCCL on `cuda:LOCAL_RANK`;
    the group is destroyed at the end when this call created it."""
    created = False
    if launched_world_size() > 1 and not torch.distributed.is_initialized():
        backend = "gloo" if str(config.device).startswith("cpu") or not torch.cuda.is_available() else None
        created = _dist.init_from_env(backend=backend)
        if created and not is_writer():  # progress bars from rank 0 only (loading weights, saving)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_run(config: RunConfig, method: Any = None) -> None:
    """`RunError` for settings that a data-parallel run cannot split over its ranks (`method`: the run's `Method`;
    None for an evaluation); maps `--device auto`/`cuda` to this rank's GPU (`cuda:LOCAL_RANK`). Call inside
    `agreed()`, after `validate`."""
    rank, size = _dist.world()
    if size == 1:
        return
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    device = str(config.device)
    if device != "cpu" and torch.cuda.is_available():
        if device in ("auto", "cuda"):
            config.device = f"cuda:{local_rank}"
        elif local_size > 1:
            raise RunError(
                f"--device {device} under {size} processes: every rank would use that one GPU. Pass --device auto "
                "(or cuda): each rank takes the GPU of its LOCAL_RANK."
            )
    if method is None or not method.trains:
        return
    if config.batch_size % size:
        raise RunError(
            f"--batch-size {config.batch_size} cannot be split over {size} processes: every rank takes an equal share "
            f"of each task's batch (so that the mean of the ranks' losses is the full batch's). Pass a multiple of "
            f"{size}, e.g. --batch-size {-(-config.batch_size // size) * size}."
        )
    if method.needs_calibration and config.calib_batches % size:
        raise RunError(
            f"--calib-batches {config.calib_batches} cannot be split over {size} processes: every rank computes the "
            f"mask statistics on an equal share of each task's calibration batches. Pass a multiple of {size}, e.g. "
            f"--calib-batches {-(-config.calib_batches // size) * size}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# agreement and the writer
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Every rank leaves the block together: if any rank raised an `Exception` in it, every rank raises (the failing
    rank its own exception, the others the first failing rank's `RunError`/`RunFailed`/`CheckpointError` with the
    same message, or `RunFailed` naming it). One small all-gather; nothing in a single process."""
    if not _dist.is_distributed():
        yield
        return
    failure = None
    try:
        yield
    except Exception as error:
        failure = error
    report = None if failure is None else (type(failure).__name__, str(failure))
    reports = _dist.all_gather_object(report)
    if failure is not None:
        raise failure
    for rank, other in enumerate(reports):
        if other is not None:
            name, message = other
            cls = _SHARED_ERRORS.get(name)
            raise cls(message) if cls is not None else RunFailed(f"rank {rank} failed: {name}: {message}")


def on_writer(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)` on the writer (its result; None on the other ranks), the other ranks waiting for it: an
    error in `fn` is raised on every rank (`agreed`)."""
    with agreed():
        return fn(*args, **kwargs) if is_writer() else None


@contextlib.contextmanager
def writer_context(context: contextlib.AbstractContextManager) -> Iterator[None]:
    """Enter `context` on the writer only (e.g. the `--out` lock); failing to enter it raises on every rank."""
    with contextlib.ExitStack() as stack:
        with agreed():
            if is_writer():
                stack.enter_context(context)
        yield


class NullLog:
    """What the non-writer ranks "write" the loss log to."""

    def __enter__(self) -> NullLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


def open_log(path: os.PathLike, mode: str = "a") -> Any:
    """The loss log opened on the writer, a `NullLog` elsewhere."""
    return open(path, mode) if is_writer() else NullLog()


def check_in_sync(model: torch.nn.Module, optimizer: Any = None) -> None:
    """`DistributedSyncError` unless every rank holds bit-identical adapter tensors and masks (and optimizer state);
    a collective, no-op in a single process."""
    if not _dist.is_distributed():
        return
    from ..sharding import replicated_state

    _dist.check_in_sync(replicated_state(model), step=0, what="adapter and masks")
    if optimizer is not None:
        _dist.check_in_sync(optimizer, step=0, what="optimizer state")


# ----------------------------------------------------------------------------------------------------------------------
# this rank's share of the data
# ----------------------------------------------------------------------------------------------------------------------
def shard_calibration(loaders: Mapping[str, Sequence[T]]) -> dict[str, Sequence[T]]:
    """This rank's contiguous share of every task's calibration batches (`compute_importance` sums the statistics
    over the ranks); the loaders themselves in a single process."""
    if not _dist.is_distributed():
        return dict(loaders)
    try:
        return {task: _dist.shard(list(batches)) for task, batches in loaders.items()}
    except ValueError as error:  # fewer batches than ranks (a short training split): the same on every rank
        raise RunError(f"The calibration batches cannot be shared by the ranks: {error}") from None


def shard_examples(examples: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous equal share of one task's examples of a step (`--batch-size` is a multiple of the
    world size); every example in a single process, or when there are too few to give every rank the same number."""
    _, size = _dist.world()
    if size == 1 or len(examples) % size:
        return examples
    return _dist.shard(examples)


def encoded_shards(sampler: Any, tokenizer: Any, max_length: int) -> Iterator[dict[str, Any]]:
    """`sampler.encoded(tokenizer, max_length)`, each rank encoding only its share of every task's examples (every
    rank's sampler yields the same steps: same examples and seed)."""
    if not _dist.is_distributed():
        yield from sampler.encoded(tokenizer, max_length=max_length)
        return
    from ..tasks import encode_batch

    for step in sampler:
        yield {task: encode_batch(tokenizer, shard_examples(examples), max_length) for task, examples in step.items()}


def strided_share(examples: Sequence[T]) -> list[T]:
    """This rank's strided share `examples[rank::world]` (the examples, sorted or not, spread evenly; shares may
    differ by one); all of them in a single process."""
    rank, size = _dist.world()
    return list(examples)[rank::size]


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """`{name: value}` summed over the ranks (float64, one all-reduce); the values themselves in a single process."""
    if not _dist.is_distributed():
        return dict(values)
    total = _dist.all_reduce_sum_(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, total.tolist(), strict=True))


def mean_over_ranks(losses: torch.Tensor) -> torch.Tensor:
    """The ranks' mean of per-task losses computed on equal shares (identical bits on every rank)."""
    return _dist.all_reduce_mean_(losses.detach().clone())


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, examples_by_task: Mapping[str, Sequence[Any]], **kwargs):
    """`peft_mazo.tasks.evaluate_tasks` with every rank scoring a strided share of each task's examples
    (`examples[rank::world]`, so that the longest prompts are spread over the ranks). The scores, means over
    examples, are combined exactly: score = Σ_r score_r · n_r / Σ_r n_r (one all-reduce); every rank returns them."""
    from ..tasks import evaluate_tasks as evaluate
    from ..tasks import get_task

    rank, size = _dist.world()
    if size == 1:
        return evaluate(model, tokenizer, examples_by_task, **kwargs)
    tasks = list(examples_by_task)
    mine = {task: strided_share(examples_by_task[task]) for task in tasks}
    with agreed():  # an error on one rank (a bad example) stops every rank
        scores = evaluate(model, tokenizer, {task: ex for task, ex in mine.items() if ex}, **kwargs)
    totals = torch.zeros(len(tasks), 2, dtype=torch.float64)
    for i, task in enumerate(tasks):
        name = get_task(task).name
        if name in scores:
            totals[i, 0] = scores[name]["score"] * scores[name]["n"]
            totals[i, 1] = scores[name]["n"]
    _dist.all_reduce_sum_(totals)
    return {
        get_task(task).name: {
            "metric": get_task(task).metric,
            "score": float(totals[i, 0] / totals[i, 1]),
            "n": int(totals[i, 1]),
        }
        for i, task in enumerate(tasks)
    }
