"""The mask search of MaZO (MAZO_SPEC §3): weight importance from calibration data, one job per module:

- the scores themselves are pure functions on tensors in `peft_mazo.scores` (no model, any float dtype, used as-is by
  the tests in float64), re-exported here: `input_moments`, `damped_hessian`, `global_scores`, `greedy_scores`,
  `row_minmax`, `mazo_scores`, `wanda_scores`, `aggregate_scores`;
- `statistics`: forward pre-hooks on the MaZO layers that accumulate, per group of layers that read the same input
  tensor (q/k/v, gate/up), the token count N, the sum of the inputs and XᵀX (or only diag(XᵀX) for Wanda), in
  float32, over the non-padding tokens (`attention_mask != 0`); the statistics windows; their sum over ranks;
- `passes`: the calibration data and the forward passes that fill the statistics, window by window;
- `report`: `ImportanceReport`, what a search saw and chose;
- `search`: the driver `compute_importance`: validation, calibration passes (bounded memory, see below), per-task
  scores, aggregation, top-k per row, and the masks.

Memory. The n×n statistics of every layer cannot all live on the accelerator (Llama-2-7B: about 21 GiB), so the
groups are processed in *windows* whose statistics fit `max_stats_bytes` (default 1 GiB on CUDA, unlimited on the
CPU). Each window runs every task's calibration batches once, stopping the forward pass right after the window's last
layer, reduces its statistics to n-vectors (S_global, S_greedy) one group at a time, and frees them. The batches are
taken from the loaders once, up front, so that every window sees exactly the same data. Masks are then chosen one
layer at a time, in blocks of rows, and written only after every layer has been scored.

Data parallel. Under `torch.distributed` (more than one rank), every rank runs its own shard of each task's
calibration batches; when a window's statistics of a task are complete they are summed over the ranks (one all-reduce
per group of its Σx and XᵀX, packed in one buffer, and one of the window's token counts N), so every rank scores the
union of the data and builds the same mask.
"""

from ..scores import (
    DEFAULT_DAMPING,
    DEFAULT_ETA,
    aggregate_scores,
    damped_hessian,
    global_scores,
    greedy_scores,
    input_moments,
    mazo_scores,
    row_minmax,
    wanda_scores,
)
from .passes import DEFAULT_CUDA_STATS_BYTES, TaskData
from .report import ImportanceReport, LayerTaskRecord
from .search import compute_importance


__all__ = [
    "DEFAULT_CUDA_STATS_BYTES",
    "DEFAULT_DAMPING",
    "DEFAULT_ETA",
    "ImportanceReport",
    "LayerTaskRecord",
    "TaskData",
    "aggregate_scores",
    "compute_importance",
    "damped_hessian",
    "global_scores",
    "greedy_scores",
    "input_moments",
    "mazo_scores",
    "row_minmax",
    "wanda_scores",
]
