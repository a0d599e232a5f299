"""The run behind `mazo train` / `mazo eval`, one job per module.

- `config`: `RunConfig` (the run's settings) and the run's errors;
- `preflight`: every check made before any work (`validate`);
- `checkpoint`: atomic checkpoints and `latest`;
- `loop`: the ZO training loop of one group of tasks;
- `losslog`: `losses.jsonl` and its plot;
- `ranks`: what each rank does under `torchrun` / `accelerate launch` (rank 0 writes; no-ops in one process);
- `job`: `run` and `evaluate_adapter`, which put them together.

Model loading (`load_model_and_tokenizer`, ...) lives in `peft_mazo.models` and is re-exported here.
"""

from ..models import dequantized_config, keep_bnb_cpu_layout, load_model_and_tokenizer, resolve_device
from .checkpoint import latest_checkpoint, load_checkpoint_state, remove_stale_files, save_checkpoint
from .config import RESUME_FIELDS, CheckpointError, EvalConfig, RunConfig, RunError, RunFailed
from .job import evaluate_adapter, run
from .losslog import plot_losses
from .preflight import check_free_space, estimate_adapter_bytes, validate


__all__ = [
    "RESUME_FIELDS",
    "CheckpointError",
    "EvalConfig",
    "RunConfig",
    "RunError",
    "RunFailed",
    "check_free_space",
    "dequantized_config",
    "estimate_adapter_bytes",
    "evaluate_adapter",
    "keep_bnb_cpu_layout",
    "latest_checkpoint",
    "load_checkpoint_state",
    "load_model_and_tokenizer",
    "plot_losses",
    "remove_stale_files",
    "resolve_device",
    "run",
    "save_checkpoint",
    "validate",
]
