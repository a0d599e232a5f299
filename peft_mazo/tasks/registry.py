"""The task registry: the eight tasks of the MaZO paper, their kind, metric, template and required fields."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .templates import RENDERERS, REQUIRED_FIELDS, Renderer


TaskKind = Literal["classification", "generation"]


class UnknownTaskError(ValueError):
    """A task name that is not in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class TaskSpec:
    """What the task suite knows about one task.

    Args:
        name (`str`): canonical name, also the sub-directory of the data directory (`<data_dir>/<name>/train.jsonl`).
        display_name (`str`): the name used in the paper's tables.
        kind (`"classification"` or `"generation"`): candidate ranking or greedy generation.
        metric (`"accuracy"` or `"f1"`): the evaluation metric, reported in [0, 100].
        render (`Callable[[Mapping, str], list[Example]]`): the template of MAZO_SPEC §5 (`templates.py`).
        required_fields (`tuple[str, ...]`): dotted field paths every record must have (`[]`: each list element).
    """

    name: str
    display_name: str
    kind: TaskKind
    metric: Literal["accuracy", "f1"]
    render: Renderer
    required_fields: tuple[str, ...]


def _spec(name: str, display_name: str, kind: TaskKind = "classification") -> TaskSpec:
    metric = "f1" if kind == "generation" else "accuracy"
    return TaskSpec(name, display_name, kind, metric, RENDERERS[name], REQUIRED_FIELDS[name])


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec("sst2", "SST-2"),
        _spec("boolq", "BoolQ"),
        _spec("rte", "RTE"),
        _spec("wsc", "WSC"),
        _spec("wic", "WiC"),
        _spec("multirc", "MultiRC"),
        _spec("copa", "COPA"),
        _spec("squad", "SQuAD", "generation"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
_ALIASES = {"squadv1": "squad", "squadv11": "squad", "squad11": "squad"}


def canonical_task_name(name: str) -> str:
    """Maps a task name to its registry key: case, `-`, `_`, `.` and spaces are ignored (`"SST-2"` → `"sst2"`).

    Raises:
        UnknownTaskError: the name matches no task; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise UnknownTaskError(f"Task names are strings, got {name!r}. Known tasks: {', '.join(TASK_NAMES)}.")
    key = re.sub(r"[\s_.\-]", "", name.lower())
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise UnknownTaskError(f"Unknown task {name!r}. Known tasks: {', '.join(TASK_NAMES)}.")
    return key


def get_task(name: str) -> TaskSpec:
    """The `TaskSpec` of a task, by any spelling `canonical_task_name` accepts."""
    return TASKS[canonical_task_name(name)]
