"""Evaluation of a causal LM on task examples: accuracy by candidate ranking, SQuAD F1 by greedy generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._checks import is_int
from .encoding import encode_batch
from .example import Example
from .metrics import accuracy, squad_f1
from .registry import TaskSpec, canonical_task_name, get_task
from .scoring import MAX_NEW_TOKENS, generate_answers, model_device, predict


def _checked(task_name: str, examples: Sequence[Example], batch_size: int) -> tuple[TaskSpec, list[Example]]:
    spec = get_task(task_name)
    examples = list(examples)
    if not examples:
        raise ValueError(f"No examples to evaluate task '{spec.name}' on.")
    others = sorted({e.task for e in examples} - {spec.name})
    if others:
        raise ValueError(f"evaluate_task('{spec.name}') got examples of other tasks: {', '.join(others)}.")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return spec, examples


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task_name: str,
    examples: Sequence[Example],
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Scores a model on examples of one task, under `torch.no_grad()` with `model.eval()` (mode restored after).

    Classification / multiple choice: accuracy of the highest length-normalised log-likelihood candidate (MultiRC:
    over answer options). SQuAD: greedy generation (≤ `max_new_tokens`, stop at newline), mean SQuAD F1 (max over the
    gold answers). Examples are processed longest prompt first, `batch_size` examples per forward.

    Returns:
        `dict`: `{"metric": "accuracy" | "f1", "score": float in [0, 100], "n": number of examples}`.
    """
    spec, examples = _checked(task_name, examples, batch_size)
    examples = sorted(examples, key=lambda e: len(e.prompt), reverse=True)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if spec.kind == "generation":
                f1 = []
                for start in range(0, len(examples), batch_size):
                    chunk = examples[start : start + batch_size]
                    answers = generate_answers(
                        model, tokenizer, chunk, max_new_tokens=max_new_tokens, max_length=max_length
                    )
                    f1.extend(squad_f1(a, e.answers) for a, e in zip(answers, chunk, strict=True))
                value = sum(f1) / len(f1)
            else:
                predictions: list[int] = []
                for start in range(0, len(examples), batch_size):
                    batch = encode_batch(tokenizer, examples[start : start + batch_size], max_length).to(device)
                    predictions.extend(predict(model, batch).tolist())
                value = accuracy(predictions, [e.label for e in examples])
    finally:
        model.train(was_training)
    return {"metric": spec.metric, "score": 100.0 * value, "n": len(examples)}


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    examples_by_task: Mapping[str, Sequence[Example]],
    batch_size: int = 8,
    *,
    max_length: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, dict[str, Any]]:
    """`evaluate_task` for several tasks (all checked before the first is scored), keyed by canonical task name."""
    if not examples_by_task:
        raise ValueError("No tasks to evaluate.")
    checked = {canonical_task_name(t): _checked(t, ex, batch_size)[1] for t, ex in examples_by_task.items()}
    return {
        name: evaluate_task(
            model, tokenizer, name, examples, batch_size, max_length=max_length, max_new_tokens=max_new_tokens
        )
        for name, examples in checked.items()
    }


def average_score(results: Mapping[str, Mapping[str, Any]]) -> float:
    """The unweighted mean of the tasks' scores (the paper's "Avg" column)."""
    if not results:
        raise ValueError("No results to average.")
    return sum(float(r["score"]) for r in results.values()) / len(results)
