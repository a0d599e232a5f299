"""The task suite of the MaZO paper: SST-2, BoolQ, RTE, WSC, WiC, MultiRC, COPA and SQuAD v1.1.

Modules, one responsibility each:

- `example`: the `Example` dataclass.
- `templates`: the prompt formats and candidates of MAZO_SPEC §5 (pure functions record → examples).
- `registry`: `TaskSpec` per task (kind, metric, template, required fields), name lookup.
- `data`: JSON Lines / hub loading with field checks, seeded train / val / test sampling.
- `encoding`: tokenization rule and padded tensors (`EncodedBatch`).
- `scoring`: log-likelihoods, losses, predictions, greedy generation, `multitask_losses`.
- `packing`: all tasks of a step in one padding-free forward (`pack_batches`, `packed_losses`).
- `graphs`: `CUDAGraphLosses`, the packed forward replayed from CUDA graphs.
- `metrics`: accuracy, SQuAD normalisation and token F1.
- `evaluation`: `evaluate_task` / `evaluate_tasks`.
- `sampler`: `MultiTaskSampler` (one micro-batch per task per step).
- `calibration`: calibration batches for `compute_importance`.

Typical use::

    splits = sample_tasks(["sst2", "squad"], data_dir="../shared/data", seed=0)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=16, seed=0)
    steps = sampler.encoded(tokenizer, max_length=2048)
    batches = next(steps)
    closure = lambda: multitask_losses(model, batches)  # (T,) losses
    results = evaluate_tasks(model, tokenizer, {t: s.test for t, s in splits.items()})
"""

from .calibration import calibration_batches, calibration_loaders
from .data import (
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    DEFAULT_N_VAL,
    HUB_SOURCES,
    HubUnavailableError,
    TaskDataError,
    TaskSplits,
    load_examples,
    sample_examples,
    sample_task,
    sample_tasks,
)
from .encoding import EncodedBatch, encode_batch, encode_continuations
from .evaluation import average_score, evaluate_task, evaluate_tasks
from .example import Example
from .graphs import CUDAGraphLosses
from .metrics import accuracy, exact_match, normalize_answer, squad_exact_match, squad_f1, token_f1
from .packing import PackedBatch, pack_batches, packed_losses, supports_packing
from .registry import TASK_NAMES, TASKS, TaskSpec, UnknownTaskError, canonical_task_name, get_task
from .sampler import MultiTaskSampler
from .scoring import (
    batch_error,
    batch_loss,
    candidate_scores,
    generate_answers,
    multitask_losses,
    predict,
    score_candidates,
    sequence_log_likelihoods,
)


__all__ = [
    "CUDAGraphLosses",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "DEFAULT_N_VAL",
    "HUB_SOURCES",
    "TASKS",
    "TASK_NAMES",
    "EncodedBatch",
    "Example",
    "HubUnavailableError",
    "MultiTaskSampler",
    "PackedBatch",
    "TaskDataError",
    "TaskSpec",
    "TaskSplits",
    "UnknownTaskError",
    "accuracy",
    "average_score",
    "batch_error",
    "batch_loss",
    "calibration_batches",
    "calibration_loaders",
    "candidate_scores",
    "canonical_task_name",
    "encode_batch",
    "encode_continuations",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "generate_answers",
    "get_task",
    "load_examples",
    "multitask_losses",
    "normalize_answer",
    "pack_batches",
    "packed_losses",
    "predict",
    "sample_examples",
    "sample_task",
    "sample_tasks",
    "score_candidates",
    "sequence_log_likelihoods",
    "squad_exact_match",
    "squad_f1",
    "supports_packing",
    "token_f1",
]
