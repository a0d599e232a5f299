"""Calibration passes of the mask search: the calibration data (task names, batches taken once up front), the model in
calibration mode, one forward per batch, and the window-by-window passes that reduce every task's statistics to score
vectors as soon as a window is done.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from ..layer import MaZOLayer
from ..scorers import Scorer
from .statistics import Recorder, StopForward, all_reduce_stats, ieee_float32, plan_windows


DEFAULT_CUDA_STATS_BYTES = 1 << 30
"""Default budget for the statistics that live on a CUDA device at the same time (one window)."""

_DEFAULT_TASK = "task"

TaskData = Union[Iterable, Mapping[str, Iterable], Sequence[tuple[str, Iterable]]]


def progress_bar(enabled: bool, desc: str) -> Any:
    """The mask search's one progress bar (its total grows as the work becomes known, see `grow_total`).

    It is transformers' `logging.tqdm`, so `transformers.utils.logging.disable_progress_bar()` and
    `HF_HUB_DISABLE_PROGRESS_BARS=1` turn it off; `disable` is passed only when `enabled` is False, so that tqdm's
    own `TQDM_DISABLE=1` applies too.
    """
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {} if enabled else {"disable": True}
    return hf_logging.tqdm(total=0, desc=desc, unit="step", leave=False, **kwargs)


def grow_total(bar: Any, steps: int) -> None:
    """Add `steps` to the total of a bar from `progress_bar` (a no-op on transformers' stand-in when bars are off)."""
    total = getattr(bar, "total", None)
    if isinstance(total, (int, float)):
        bar.total = total + steps
        bar.refresh()


def _named_loaders(calib_loaders: Optional[TaskData]) -> list[tuple[str, Any]]:
    """`{task: loader}`, `[(task, loader), ...]` or one loader -> `[(task, loader), ...]` with unique names."""
    if calib_loaders is None:
        raise ValueError("compute_importance needs calibration data: {task: loader} or one loader of batches.")
    if isinstance(calib_loaders, Mapping):
        if any(isinstance(v, torch.Tensor) for v in calib_loaders.values()):
            raise TypeError(
                "calib_loaders looks like a single batch (a mapping of tensors); pass a list of batches, a DataLoader, "
                "or {task: loader}."
            )
        pairs = list(calib_loaders.items())
    elif isinstance(calib_loaders, (str, bytes, torch.Tensor)) or not isinstance(calib_loaders, Iterable):
        raise TypeError(
            f"calib_loaders must be {{task: loader}}, a list of (task, loader) pairs or one loader, got "
            f"{type(calib_loaders).__name__}."
        )
    elif (
        isinstance(calib_loaders, (list, tuple))
        and calib_loaders
        and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and not isinstance(p[1], (str, Mapping))
            for p in calib_loaders
        )
    ):
        pairs = list(calib_loaders)
    else:
        pairs = [(_DEFAULT_TASK, calib_loaders)]
    if not pairs:
        raise ValueError("calib_loaders names no task.")
    seen: set[str] = set()
    for name, _ in pairs:
        if not isinstance(name, str) or not name:
            raise TypeError(f"task names must be non-empty strings, got {name!r}.")
        if name in seen:
            raise ValueError(f"task name '{name}' appears more than once in calib_loaders; task names must be unique.")
        seen.add(name)
    return pairs


def take_batches(calib_loaders: Optional[TaskData], num_batches: Optional[int]) -> list[tuple[str, list[Mapping]]]:
    """Materialise up to `num_batches` batches of every task, checking their types, before any forward pass."""
    tasks = []
    for name, loader in _named_loaders(calib_loaders):
        if isinstance(loader, (str, bytes, torch.Tensor)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"The calibration data of task '{name}' is a {type(loader).__name__}, not an iterable of batches "
                "(e.g. a DataLoader or a list of {'input_ids': ..., 'attention_mask': ...} dicts)."
            )
        batches = []
        for batch in loader:
            if not isinstance(batch, Mapping) or not all(isinstance(key, str) for key in batch):
                raise TypeError(
                    f"Task '{name}': batch {len(batches)} is a {type(batch).__name__}; compute_importance calls "
                    "model(**batch), so every batch must be a mapping of keyword arguments such as "
                    "{'input_ids': ..., 'attention_mask': ...} (what a DataLoader with a transformers collator yields)."
                )
            batches.append(batch)
            if num_batches is not None and len(batches) >= num_batches:
                break
        if not batches:
            raise ValueError(f"The calibration loader of task '{name}' is empty; give every task at least one batch.")
        tasks.append((name, batches))
    return tasks


@contextmanager
def _calibration_mode(tuner: nn.Module):
    """Eval mode, no autograd, every MaZO layer disabled (the statistics are those of the base model); restored after."""
    training = {module: module.training for module in tuner.modules()}
    mazo = [module for module in tuner.modules() if isinstance(module, MaZOLayer)]
    disabled = [layer._disable_adapters for layer in mazo]
    try:
        tuner.eval()
        for layer in mazo:
            layer._disable_adapters = True
        with torch.no_grad():
            yield
    finally:
        for layer, flag in zip(mazo, disabled, strict=True):
            layer._disable_adapters = flag
        for module, flag in training.items():
            module.training = flag


def _input_device(model: nn.Module) -> Optional[torch.device]:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else None


def _forward(model: nn.Module, batch: Mapping, device: Optional[torch.device], no_cache: bool, recorder: Recorder):
    """One calibration forward: move the batch, set the token mask, run until the window's last layer."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}
    if no_cache and "use_cache" not in inputs:
        inputs["use_cache"] = False  # no KV cache: it would only cost memory
    recorder.begin_batch(inputs.get("attention_mask"))
    try:
        model(**inputs)
    except StopForward:
        pass


def synchronize(devices: Iterable[torch.device]) -> None:
    for device in set(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def collect_task_vectors(
    tuner: nn.Module,
    layers: dict[str, MaZOLayer],
    tasks: list[tuple[str, list[Mapping]]],
    scorer: Scorer,
    eta: float,
    damping: float,
    max_stats_bytes: Optional[int],
    bar: Any,
    task_seconds: dict[str, float],
):
    """Calibration passes, window by window, reduced to n-vectors per (task, group) as soon as a window is done.

    The statistics are those the scorer asks for (`scorer.statistics`), and `scorer.task_vectors` reduces them.
    `bar` (from `progress_bar`) advances by one step per forward pass; its total grows by the passes planned.

    Returns:
        `(vectors, tokens, vector_seconds, groups, windows, passes)` with `vectors[task][group]` = the scorer's
        vectors ((S_global, S_greedy) normalised to float32 for mazo, (Σx²,) for wanda), `tokens[task][group]`,
        `vector_seconds[task][group]`.
    """
    full = scorer.statistics == "moments"  # Σx and XᵀX; otherwise Σx² only
    model = tuner.model
    device = _input_device(model)
    no_cache = "use_cache" in inspect.signature(model.forward).parameters
    vectors = {task: {} for task, _ in tasks}
    tokens = {task: {} for task, _ in tasks}
    vector_seconds = {task: {} for task, _ in tasks}
    passes = 0
    with _calibration_mode(tuner), Recorder(layers) as recorder:
        with recorder.probing():
            _forward(model, tasks[0][1][0], device, no_cache, recorder)
        silent = [name for name in layers if name not in recorder.group_of]
        if silent:
            raise RuntimeError(
                f"{len(silent)} MaZO layer(s) never ran in a forward pass of the calibration data (e.g. '{silent[0]}'); "
                "they cannot be scored. Use data that reaches every adapted layer, or narrow target_modules."
            )
        budget = max_stats_bytes
        if budget is None:
            on_cuda = any(group.device.type == "cuda" for group in recorder.groups)
            budget = DEFAULT_CUDA_STATS_BYTES if on_cuda else math.inf
        windows = plan_windows(recorder.groups, full, budget)
        grow_total(bar, len(windows) * sum(len(batches) for _, batches in tasks))
        devices = [group.device for group in recorder.groups]
        for w, window in enumerate(windows):
            for task, batches in tasks:
                bar.set_postfix_str(task + (f", window {w + 1}/{len(windows)}" if len(windows) > 1 else ""))
                synchronize(devices)
                begin = time.perf_counter()
                recorder.start_window(window, full)
                for batch in batches:
                    _forward(model, batch, device, no_cache, recorder)
                    passes += 1
                    bar.update(1)
                stats = recorder.finish_window()
                all_reduce_stats(stats)  # data parallel: the window's statistics over every rank's shard
                synchronize(devices)
                task_seconds[task] = task_seconds.get(task, 0.0) + time.perf_counter() - begin
                for group in window:
                    begin = time.perf_counter()
                    group_stats = stats.pop(group.index)
                    if group_stats.tokens == 0:
                        raise ValueError(
                            f"Task '{task}' has no non-padding token (attention_mask is all zero); nothing reaches "
                            f"'{group.leader}'."
                        )
                    tokens[task][group.index] = group_stats.tokens
                    _check_finite(group_stats.buffer, task, group.leader)
                    with ieee_float32():
                        vectors[task][group.index] = scorer.task_vectors(group_stats, eta, damping)
                    del group_stats
                    synchronize([group.device])
                    vector_seconds[task][group.index] = time.perf_counter() - begin
    return vectors, tokens, vector_seconds, recorder.groups, len(windows), passes


def _check_finite(tensor: torch.Tensor, task: str, layer: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"The inputs of '{layer}' on task '{task}' contain inf or NaN; no score can be computed.")
