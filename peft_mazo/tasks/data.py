"""Task data: JSON Lines files in the original field names (or the Hugging Face hub), checks, and seeded sampling.

Layout of a data directory (as `../shared/data`)::

    <data_dir>/<task>/train.jsonl
    <data_dir>/<task>/validation.jsonl

Protocol (MeZO's, used by the MaZO paper): the training and validation examples are drawn disjointly from the
train file, the test examples from the validation file. Sizes count *examples*, so for MultiRC they count answer
options (each passage record gives one example per option; see `templates.render_multirc`).

Every check (task names, directories, files, fields of every record) runs before anything is rendered or sampled,
and errors name what to fix: the path, or the file, line number and field of a bad record. Without a data directory,
offline mode (`HF_HUB_OFFLINE=1`) without a cached copy of the datasets, or an unreachable hub, raises
`HubUnavailableError` naming the files to provide instead, before any load (and without `datasets`' retries).
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from .._checks import is_int
from .example import Example
from .registry import TaskSpec, canonical_task_name, get_task


Split = Literal["train", "validation"]
SPLITS: tuple[str, ...] = ("train", "validation")
DEFAULT_N_TRAIN, DEFAULT_N_VAL, DEFAULT_N_TEST = 500, 250, 500

# Hub datasets (path, configuration) used when no data directory is given; their rows are mapped to the field names
# of the JSON Lines files by `hub_rows_to_records`. `aps/super_glue` is the current home of the `super_glue` dataset.
HUB_SOURCES: dict[str, tuple[str, str | None]] = {
    "sst2": ("nyu-mll/glue", "sst2"),
    "boolq": ("aps/super_glue", "boolq"),
    "rte": ("aps/super_glue", "rte"),
    "wsc": ("aps/super_glue", "wsc.fixed"),
    "wic": ("aps/super_glue", "wic"),
    "multirc": ("aps/super_glue", "multirc"),
    "copa": ("aps/super_glue", "copa"),
    "squad": ("rajpurkar/squad", None),
}


class TaskDataError(ValueError):
    """A data record that cannot be used; the message names the file (or hub dataset), the line and the field."""


class HubUnavailableError(ConnectionError):
    """No data directory was given and the tasks' hub datasets cannot be loaded (offline mode without a cached copy,
    or the hub cannot be reached); the message names the files to provide instead and where to put them."""


@dataclass(frozen=True)
class TaskSplits:
    """The sampled examples of one task.

    Args:
        task (`str`): canonical task name.
        train (`tuple[Example, ...]`): training examples (from the train file).
        val (`tuple[Example, ...]`): validation examples (from the train file, disjoint from `train`).
        test (`tuple[Example, ...]`): test examples (from the validation file).
    """

    task: str
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]


# ----------------------------------------------------------------------------------------------------- files and paths
def data_file(data_dir: str | PathLike, task: str, split: str) -> Path:
    """The path `<data_dir>/<task>/<split>.jsonl`, checked to exist.

    Raises:
        FileNotFoundError: the directory or the file is missing; the message names the path and the fix.
    """
    name = canonical_task_name(task)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Task data directory {str(root)!r} does not exist. Pass the directory that holds <task>/train.jsonl and "
            "<task>/validation.jsonl (e.g. ../shared/data), or no data directory to load the tasks from the Hugging "
            "Face hub."
        )
    path = root / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"Missing data file {str(path)!r} for task '{name}' ({split} split). The data directory must hold "
            f"<task>/train.jsonl and <task>/validation.jsonl, one JSON record per line in the dataset's original "
            "field names; add the file, point to another directory, or leave the task out."
        )
    return path


def check_data_files(tasks: Iterable[str], data_dir: str | PathLike, splits: Iterable[str] = SPLITS) -> None:
    """Checks that every file the tasks need exists and holds at least one record (raises `FileNotFoundError` for the
    first missing one, `ValueError` for the first empty one)."""
    for task in tasks:
        for split in splits:
            path = data_file(data_dir, task, split)
            with open(path, encoding="utf-8") as handle:
                if not any(line.strip() for line in handle):
                    raise ValueError(
                        f"{path} holds no examples (the file is empty). Put the task's JSON Lines records in it (one "
                        "object per line, see ../shared/data/SOURCES.md), or leave the task out of --tasks."
                    )


# -------------------------------------------------------------------------------------------------- record checking
def missing_field(record: Any, path: str) -> str | None:
    """The first element of a dotted field path that `record` lacks (or holds as null), or `None`.

    `"passage.questions[].answers[].label"` checks the label of every answer of every question; a missing one is
    returned with its position, e.g. `"passage.questions[2].answers[0].label"`.
    """
    parts = path.split(".")

    def walk(obj: Any, depth: int, prefix: str) -> str | None:
        if depth == len(parts):
            return None
        part = parts[depth]
        each = part.endswith("[]")
        key = part[:-2] if each else part
        if not isinstance(obj, Mapping) or obj.get(key) is None:
            return prefix + key
        value = obj[key]
        if not each:
            return walk(value, depth + 1, f"{prefix}{key}.")
        if not isinstance(value, list):
            return f"{prefix}{key} (a list)"
        for i, item in enumerate(value):
            found = walk(item, depth + 1, f"{prefix}{key}[{i}].")
            if found is not None:
                return found
        return None

    return walk(record, 0, "")


def records_to_examples(
    task: str, records: Iterable[tuple[int, Any]], source: str, unit: str = "line"
) -> list[Example]:
    """Checks every record's fields, then renders them with the task's template.

    Args:
        task (`str`): task name.
        records (`Iterable[tuple[int, Any]]`): `(line number, record)` pairs.
        source (`str`): the file or hub dataset, for error messages.
        unit (`str`): what the numbers count (`"line"` for files, `"row"` for hub datasets).

    Raises:
        TaskDataError: a record is not an object, lacks a field, or holds a value the template rejects.
    """
    spec = get_task(task)
    records = list(records)
    for number, record in records:
        if not isinstance(record, Mapping):
            raise TaskDataError(
                f"{source}, {unit} {number}: expected a JSON object, got {type(record).__name__}. Fix or remove "
                f"that {unit}."
            )
        for path in spec.required_fields:
            field = missing_field(record, path)
            if field is not None:
                raise TaskDataError(
                    f"{source}, {unit} {number}: the record has no field '{field}', which task '{spec.name}' needs "
                    f"(required: {', '.join(spec.required_fields)}). Add the field to that {unit} or remove the "
                    f"{unit}."
                )
    examples: list[Example] = []
    for number, record in records:
        uid = f"{spec.name}/{record.get('idx', record.get('id', number))}"
        try:
            examples.extend(spec.render(record, uid))
        except (ValueError, TypeError, KeyError) as err:
            raise TaskDataError(f"{source}, {unit} {number}: {err}") from err
    return examples


def read_jsonl(path: str | PathLike) -> list[tuple[int, Any]]:
    """The `(line number, record)` pairs of a JSON Lines file (blank lines skipped; numbers start at 1)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise TaskDataError(
                    f"{path}, line {number}: not valid JSON ({err.msg}). Fix or remove that line (one JSON object "
                    "per line)."
                ) from err
    return records


# ------------------------------------------------------------------------------------------------------------- hub
def _bool(value: Any) -> Any:
    return bool(value) if value in (0, 1) else value


def hub_rows_to_records(task: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Maps rows of the hub datasets of `HUB_SOURCES` to records in the JSON Lines field names.

    The hub stores SuperGLUE labels as integers (`0` / `1`, RTE `0` = entailment), WSC spans as top-level
    fields, and MultiRC as one row per answer option with `idx = {paragraph, question, answer}`; MultiRC rows are
    grouped back into one record per passage (in order of first appearance).
    """
    name = canonical_task_name(task)
    rows = [dict(row) for row in rows]
    if name == "multirc":
        passages: dict[Any, dict[str, Any]] = {}
        questions: dict[tuple[Any, Any], dict[str, Any]] = {}
        for row in rows:
            idx = row["idx"]
            p_key, q_key = idx["paragraph"], (idx["paragraph"], idx["question"])
            if p_key not in passages:
                passages[p_key] = {"idx": p_key, "passage": {"text": row["paragraph"], "questions": []}}
            if q_key not in questions:
                questions[q_key] = {"question": row["question"], "idx": idx["question"], "answers": []}
                passages[p_key]["passage"]["questions"].append(questions[q_key])
            answer = {"text": row["answer"], "idx": idx["answer"], "label": row["label"]}
            questions[q_key]["answers"].append(answer)
        return list(passages.values())
    records = []
    for row in rows:
        if name in ("boolq", "wic"):
            row["label"] = _bool(row.get("label"))
        elif name == "rte":
            row["label"] = {0: "entailment", 1: "not_entailment"}.get(row.get("label"), row.get("label"))
        elif name == "wsc":
            spans = ("span1_index", "span1_text", "span2_index", "span2_text")
            row["target"] = {key: row.pop(key, None) for key in spans}
            row["label"] = _bool(row.get("label"))
        records.append(row)
    return records


def load_hub_records(task: str, split: str) -> list[dict[str, Any]]:
    """Loads one split of a task from the Hugging Face hub (`HUB_SOURCES`) as records in the JSON Lines schema."""
    name = canonical_task_name(task)
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise ImportError(
            "Loading tasks from the hub needs `pip install datasets`; or pass a data directory."
        ) from err
    path, config = HUB_SOURCES[name]
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except ConnectionError as error:  # datasets' "Couldn't reach ..." (offline mode, or after its retries)
        raise HubUnavailableError(_hub_unavailable_message([name], f"{error}")) from error
    return hub_rows_to_records(name, rows)


def _hub_unavailable_message(tasks: Sequence[str], reason: str) -> str:
    files = ", ".join(f"{task}/{split}.jsonl" for task in tasks for split in SPLITS)
    return (
        f"No data directory was given, so the tasks are loaded from the Hugging Face hub, but {reason}. Put the task "
        f"files in a directory DIR as DIR/<task>/train.jsonl and DIR/<task>/validation.jsonl (here: {files}; one JSON "
        "record per line in the dataset's original field names, as in ../shared/data) and pass --data-dir DIR "
        "(data_dir=DIR in Python). Or load the datasets once while online (later runs with HF_HUB_OFFLINE=1 read the "
        "Hugging Face cache)."
    )


def _hub_dataset_cached(path: str, config: str | None) -> bool:
    """Whether `datasets` can build the hub dataset from its local cache alone (called in offline mode only, when no
    request is made; reads the builder's metadata, not the data)."""
    import datasets

    try:
        datasets.load_dataset_builder(path, config)
    except (ConnectionError, FileNotFoundError):
        return False
    return True


def check_hub_available(tasks: Iterable[str]) -> None:
    """Raise `HubUnavailableError`, before any data is read, when the tasks cannot come from the hub.

    In offline mode (`HF_HUB_OFFLINE=1`, as `huggingface_hub` and `datasets` read it) every task's dataset must be in
    the local `datasets` cache. Otherwise one metadata request (no retries, 10 s timeout) tells whether the hub can be
    reached at all, instead of `datasets`' five retries with back-off before its `ConnectionError`. An HTTP error
    answer (the hub replied) is left to the real load.
    """
    import datasets
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    names = [canonical_task_name(task) for task in tasks]
    if not names:
        return
    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
        missing = [name for name in names if not _hub_dataset_cached(*HUB_SOURCES[name])]
        if missing:
            raise HubUnavailableError(
                _hub_unavailable_message(
                    missing, f"offline mode is on (HF_HUB_OFFLINE=1) and the cache holds no copy of {missing}"
                )
            )
        return
    try:
        HfApi().dataset_info(HUB_SOURCES[names[0]][0], timeout=10)
    except HfHubHTTPError:  # the hub answered (e.g. 401, 404): reachable; the load reports the problem itself
        return
    except Exception as error:  # noqa: BLE001 - any transport failure (DNS, refused, timeout): the hub is unreachable
        raise HubUnavailableError(
            _hub_unavailable_message(names, f"the hub cannot be reached ({type(error).__name__}: {error})")
        ) from None


# ---------------------------------------------------------------------------------------------------------- loading
def load_examples(task: str, split: Split, data_dir: str | PathLike | None = None) -> list[Example]:
    """All examples of one split of a task, in file order.

    Args:
        task (`str`): task name (any spelling `canonical_task_name` accepts).
        split (`"train"` or `"validation"`): which file.
        data_dir (`str` or `PathLike`, *optional*): the data directory; `None` loads from the hub (`HUB_SOURCES`).

    Raises:
        UnknownTaskError, FileNotFoundError, TaskDataError: see the module docstring.
    """
    spec: TaskSpec = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if data_dir is not None:
        path = data_file(data_dir, spec.name, split)
        return records_to_examples(spec.name, read_jsonl(path), str(path))
    path, config = HUB_SOURCES[spec.name]
    records = load_hub_records(spec.name, split)
    source = f"hub dataset {path}" + (f"/{config}" if config else "") + f" [{split}]"
    return records_to_examples(spec.name, enumerate(records, start=1), source, unit="row")


# --------------------------------------------------------------------------------------------------------- sampling
def _check_size(name: str, value: int | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer{' or None' if allow_none else ''}, got {value!r}.")


def train_val_sizes(task: str, available: int, n_train: int | None, n_val: int) -> tuple[int, int]:
    """How many training and validation examples to take from `available` (warns when there are too few).

    `n_train=None` takes everything left after the validation examples. When `n_train + n_val` exceeds what is
    available, both are shrunk in the requested proportion (validation rounded, training gets the rest).
    """
    if n_train is None:
        n_v = min(n_val, available)
        if n_v < n_val or n_v == available:
            warnings.warn(
                f"Task '{task}': requested {n_val} validation examples and the rest for training, but the train file "
                f"holds only {available} examples; using {available - n_v} training + {n_v} validation examples."
            )
        return available - n_v, n_v
    if n_train + n_val <= available:
        return n_train, n_val
    n_v = round(available * n_val / (n_train + n_val))
    warnings.warn(
        f"Task '{task}': requested {n_train} training + {n_val} validation examples, but the train file holds only "
        f"{available} examples; using {available - n_v} training + {n_v} validation examples (the requested "
        "proportion)."
    )
    return available - n_v, n_v


def sample_examples(
    train_pool: Sequence[Example],
    test_pool: Sequence[Example],
    task: str,
    *,
    n_train: int | None = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    n_test: int | None = DEFAULT_N_TEST,
    seed: int = 0,
) -> TaskSplits:
    """Seeded, disjoint train / val sample from `train_pool` and test sample from `test_pool` (pure, no I/O).

    One permutation of `train_pool` (seeded by `seed` and the task name) gives validation its first `n_val`
    examples and training the next `n_train`: changing `n_train` leaves the validation set unchanged, and a smaller
    training set is a prefix of a larger one. `n_test=None` takes the whole test pool (in a seeded order).
    """
    _check_size("n_train", n_train, allow_none=True)
    _check_size("n_val", n_val, allow_none=False)
    _check_size("n_test", n_test, allow_none=True)
    n_tr, n_v = train_val_sizes(task, len(train_pool), n_train, n_val)
    order = random.Random(f"{seed}:{task}:train").sample(range(len(train_pool)), len(train_pool))
    val = tuple(train_pool[i] for i in order[:n_v])
    train = tuple(train_pool[i] for i in order[n_v : n_v + n_tr])
    n_te = len(test_pool) if n_test is None else n_test
    if n_te > len(test_pool):
        warnings.warn(
            f"Task '{task}': requested {n_te} test examples, but the validation file holds only {len(test_pool)}; "
            f"using all {len(test_pool)}."
        )
        n_te = len(test_pool)
    test = tuple(test_pool[i] for i in random.Random(f"{seed}:{task}:test").sample(range(len(test_pool)), n_te))
    return TaskSplits(task, train, val, test)


def sample_task(
    task: str,
    *,
    data_dir: str | PathLike | None = None,
    n_train: int | None = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    n_test: int | None = DEFAULT_N_TEST,
    seed: int = 0,
) -> TaskSplits:
    """Loads one task and samples its train / val (from the train file) and test (from the validation file) sets.

    Args:
        task (`str`): task name.
        data_dir (`str` or `PathLike`, *optional*): data directory (layout in the module docstring); `None`: the hub.
        n_train (`int`, *optional*): training examples (paper: 500); `None` takes all there is. Too few available
            (for any split): a warning names the task, the request and what is available.
        n_val (`int`): validation examples (paper: 250).
        n_test (`int`, *optional*): test examples (paper: 500); `None` takes all there is.
        seed (`int`): sampling seed; the same seed gives the same examples.
    """
    return sample_tasks([task], data_dir=data_dir, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)[
        canonical_task_name(task)
    ]


def sample_tasks(
    tasks: Sequence[str],
    *,
    data_dir: str | PathLike | None = None,
    n_train: int | None = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    n_test: int | None = DEFAULT_N_TEST,
    seed: int = 0,
) -> dict[str, TaskSplits]:
    """`sample_task` for several tasks, keyed by canonical name in the given order.

    All names, sizes and (with a data directory) files are checked before any file is read; without one,
    `check_hub_available` refuses offline mode without a cached copy, or an unreachable hub, before any load.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [canonical_task_name(t) for t in tasks]
    if not names:
        raise ValueError("No tasks given.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Tasks given more than once: {', '.join(duplicates)}.")
    _check_size("n_train", n_train, allow_none=True)
    _check_size("n_val", n_val, allow_none=False)
    _check_size("n_test", n_test, allow_none=True)
    if data_dir is not None:
        check_data_files(names, data_dir, splits=SPLITS if n_test != 0 else ("train",))
    else:
        check_hub_available(names)
    splits = {}
    for name in names:
        train_pool = load_examples(name, "train", data_dir)
        test_pool = load_examples(name, "validation", data_dir) if n_test != 0 else []
        splits[name] = sample_examples(
            train_pool, test_pool, name, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed
        )
    return splits
