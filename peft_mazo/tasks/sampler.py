"""Multi-task batch mixing: every step gives one micro-batch per task, deterministically from a seed."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .._checks import is_int
from .encoding import EncodedBatch, encode_batch
from .example import Example


class MultiTaskSampler:
    """Yields, at every step, a micro-batch of examples for every task.

    Each task walks through its own examples in a seeded random order, epoch after epoch, with a fresh order every
    epoch (seeded by `seed`, the task and the epoch); a micro-batch that runs past the end of an epoch is filled from
    the next one, so micro-batches always have their full size. The sampler is an infinite iterator; its position
    is `state_dict()` and can be restored with `load_state_dict`.

    Args:
        examples_by_task (`Mapping[str, Sequence[Example]]`): training examples per task; the order of the keys is
            the order of the tasks in every step (and in `multitask_losses`).
        batch_size (`int` or `Mapping[str, int]`): examples per task per step (one size, or one per task).
        seed (`int`): the same seed gives the same batches.
    """

    def __init__(
        self,
        examples_by_task: Mapping[str, Sequence[Example]],
        batch_size: int | Mapping[str, int] = 16,
        *,
        seed: int = 0,
    ) -> None:
        if not examples_by_task:
            raise ValueError("MultiTaskSampler needs examples for at least one task.")
        self.task_names: tuple[str, ...] = tuple(examples_by_task)
        self.examples: dict[str, tuple[Example, ...]] = {t: tuple(ex) for t, ex in examples_by_task.items()}
        empty = [t for t, ex in self.examples.items() if not ex]
        if empty:
            raise ValueError(f"No training examples for task(s): {', '.join(empty)}.")
        self.batch_sizes: dict[str, int] = self._batch_sizes(batch_size)
        self.seed = seed
        self._epoch = dict.fromkeys(self.task_names, 0)
        self._position = dict.fromkeys(self.task_names, 0)
        self._orders: dict[str, list[int]] = {t: self._order(t, 0) for t in self.task_names}
        self.step = 0

    def _batch_sizes(self, batch_size: int | Mapping[str, int]) -> dict[str, int]:
        if isinstance(batch_size, Mapping):
            missing = [t for t in self.task_names if t not in batch_size]
            extra = [t for t in batch_size if t not in self.examples]
            if missing or extra:
                raise ValueError(f"batch_size per task: missing {missing}, unknown {extra}; give one per task.")
            sizes = {t: batch_size[t] for t in self.task_names}
        else:
            sizes = dict.fromkeys(self.task_names, batch_size)
        for task, size in sizes.items():
            if not is_int(size) or size < 1:
                raise ValueError(f"batch_size of task '{task}' must be a positive integer, got {size!r}.")
        return sizes

    def _order(self, task: str, epoch: int) -> list[int]:
        n = len(self.examples[task])
        return random.Random(f"{self.seed}:{task}:epoch{epoch}").sample(range(n), n)

    def _take(self, task: str) -> list[Example]:
        pool, size, out = self.examples[task], self.batch_sizes[task], []
        while len(out) < size:
            if self._position[task] == len(pool):
                self._epoch[task] += 1
                self._position[task] = 0
                self._orders[task] = self._order(task, self._epoch[task])
            pos = self._position[task]
            n = min(size - len(out), len(pool) - pos)
            out.extend(pool[i] for i in self._orders[task][pos : pos + n])
            self._position[task] = pos + n
        return out

    def __iter__(self) -> MultiTaskSampler:
        return self

    def __next__(self) -> dict[str, list[Example]]:
        """The next step: `{task: micro-batch of examples}` in task order."""
        self.step += 1
        return {task: self._take(task) for task in self.task_names}

    def encoded(self, tokenizer: Any, max_length: int | None = None) -> Iterator[dict[str, EncodedBatch]]:
        """The same steps, tokenized: `{task: EncodedBatch}` (infinite), ready for `multitask_losses`."""
        for step in self:
            yield {task: encode_batch(tokenizer, examples, max_length) for task, examples in step.items()}

    def epoch(self, task: str) -> float:
        """How many passes over a task's examples the sampler has made (fractional)."""
        return self._epoch[task] + self._position[task] / len(self.examples[task])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position (JSON-serialisable)."""
        return {
            "seed": self.seed,
            "step": self.step,
            "epoch": dict(self._epoch),
            "position": dict(self._position),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by `state_dict` (same tasks, examples and seed)."""
        if state["seed"] != self.seed or set(state["epoch"]) != set(self.task_names):
            raise ValueError("The state was saved by a sampler with another seed or other tasks.")
        self.step = int(state["step"])
        for task in self.task_names:
            self._epoch[task] = int(state["epoch"][task])
            self._position[task] = int(state["position"][task])
            self._orders[task] = self._order(task, self._epoch[task])
