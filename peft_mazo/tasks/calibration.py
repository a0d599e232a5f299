"""Calibration batches for `compute_importance`: prompt + gold continuation from a task's training split."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import torch

from .._checks import is_int
from .data import check_data_files, load_examples
from .encoding import encode_continuations, pad_sequences, pad_token_id
from .example import Example
from .registry import canonical_task_name


def calibration_batches(
    task: str,
    tokenizer: Any,
    batch_size: int = 8,
    num_batches: int = 16,
    *,
    examples: Sequence[Example] | None = None,
    data_dir: str | PathLike | None = None,
    seed: int = 0,
    max_length: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of prompt + gold continuation (gold candidate, or ` {answer}\\n` for SQuAD) for one task.

    Args:
        task (`str`): task name.
        tokenizer: the model's tokenizer (tokenization rule of `encoding`).
        batch_size (`int`), num_batches (`int`): `batch_size * num_batches` examples are drawn without replacement.
        examples (`Sequence[Example]`, *optional*): the pool to draw from, normally the sampled training split
            (`sample_task(...).train`); `None` loads the task's train file (`data_dir`, or the hub when `None`).
        seed (`int`): the same seed gives the same batches.
        max_length (`int`, *optional*): length limit (prompt truncated from the left).

    Returns:
        `list[dict[str, torch.Tensor]]`: `{"input_ids", "attention_mask"}`, each `(batch_size, L)` long and
        right-padded (the last batch may be smaller when the pool is short, which warns).
    """
    name = canonical_task_name(task)
    for arg, value in (("batch_size", batch_size), ("num_batches", num_batches)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}.")
    pool = list(load_examples(name, "train", data_dir) if examples is None else examples)
    others = sorted({e.task for e in pool} - {name})
    if others:
        raise ValueError(f"Calibration examples for task '{name}' include examples of {', '.join(others)}.")
    wanted = batch_size * num_batches
    if len(pool) < wanted:
        warnings.warn(
            f"Task '{name}': requested {num_batches} calibration batches of {batch_size} ({wanted} examples), but only "
            f"{len(pool)} training examples are available; using all of them."
        )
    if not pool:
        return []
    chosen = random.Random(f"{seed}:{name}:calibration").sample(pool, min(wanted, len(pool)))
    pad_id = pad_token_id(tokenizer)
    batches = []
    for start in range(0, len(chosen), batch_size):
        chunk = chosen[start : start + batch_size]
        pairs = encode_continuations(tokenizer, [e.prompt for e in chunk], [e.target for e in chunk], max_length)
        input_ids, attention_mask = pad_sequences([ctx + cont for ctx, cont in pairs], pad_id)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def calibration_loaders(
    tasks: Sequence[str],
    tokenizer: Any,
    batch_size: int = 8,
    num_batches: int = 16,
    *,
    examples_by_task: Mapping[str, Sequence[Example]] | None = None,
    data_dir: str | PathLike | None = None,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """`calibration_batches` for several tasks, keyed by canonical task name (one loader per task)."""
    names = [canonical_task_name(t) for t in tasks]
    pools = {canonical_task_name(t): ex for t, ex in (examples_by_task or {}).items()}
    if data_dir is not None:
        check_data_files([n for n in names if n not in pools], data_dir, splits=("train",))
    return {
        name: calibration_batches(
            name,
            tokenizer,
            batch_size,
            num_batches,
            examples=pools.get(name),
            data_dir=data_dir,
            seed=seed,
            max_length=max_length,
        )
        for name in names
    }
