"""Weight importance and the multi-task mask of MaZO (MAZO_SPEC §3): statistics, scores, driver and report.

The module has three parts, kept apart on purpose:

1. Pure functions on tensors (no model, any float dtype, used as-is by the tests in float64): `input_moments`,
   `damped_hessian`, `global_scores`, `greedy_scores`, `row_minmax`, `mazo_scores`, `wanda_scores`,
   `aggregate_scores`.
2. Input statistics: forward pre-hooks on the MaZO layers accumulate, per group of layers that read the same input
   tensor (q/k/v, gate/up), the token count N, the sum of the inputs and XᵀX (or only diag(XᵀX) for Wanda), in
   float32, over the non-padding tokens (`attention_mask != 0`).
3. The driver `compute_importance`: validation, calibration passes (bounded memory, see below), per-task scores,
   aggregation, top-k per row, and the `ImportanceReport`.

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

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .layer import MaZOLayer, mazo_layers, mazo_tuner, resolve_adapter
from .mask import index_dtype, indices_to_dense, topk_columns
from .quantized import dense_weight


logger = logging.getLogger(__name__)

DEFAULT_ETA = 1e-7
"""Learning rate η of the greedy score: the dense full-model ZO learning rate of MeZO/MaZO (MAZO_SPEC §1)."""
DEFAULT_DAMPING = 0.01
"""λ = damping · mean(diag(XᵀX / N)) (MAZO_SPEC §3, our reading)."""
DEFAULT_CUDA_STATS_BYTES = 1 << 30
"""Default budget for the statistics that live on a CUDA device at the same time (one window)."""

_BLOCK_ELEMENTS = 1 << 23  # float32 temporaries of token chunks, row blocks and inverse-diagonal blocks
_CHOLESKY_RETRIES = 4  # damping × 10 per retry
_DEFAULT_TASK = "task"

TaskData = Union[Iterable, Mapping[str, Iterable], Sequence[tuple[str, Iterable]]]


# ====================================================================================================================
# 1. pure functions
# ====================================================================================================================
def row_minmax(scores: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation along the last dimension: `(v - min) / (max - min)`, and 0 where `max == min`.

    Args:
        scores (`torch.Tensor`): (..., n) scores; a 1-D vector is one row.

    Returns:
        `torch.Tensor` of the same shape and dtype, with values in [0, 1].
    """
    low, high = torch.aminmax(scores, dim=-1, keepdim=True)
    span = high - low
    return (scores - low) / torch.where(span > 0, span, torch.ones_like(span))


def input_moments(n_tokens: int, input_sum: torch.Tensor, xtx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean input `g = Σx / N` (n,) and uncentred second moment `XᵀX / N` (n, n) from accumulated statistics."""
    if n_tokens <= 0:
        raise ValueError("input_moments needs at least one token (n_tokens > 0).")
    return input_sum / n_tokens, xtx / n_tokens


def damped_hessian(second_moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """`H = XᵀX / N + λ I` with `λ = damping · mean(diag(XᵀX / N))` (MAZO_SPEC §3, our reading).

    If the inputs are all zero (mean diagonal 0), `λ = damping` so that H stays positive definite.

    Args:
        second_moment (`torch.Tensor`): (n, n) `XᵀX / N`.
        damping (`float`): relative damping, > 0.

    Returns:
        `torch.Tensor` (n, n), a new tensor.
    """
    hessian = second_moment.clone()
    _add_damping_(hessian, damping)
    return hessian


def global_scores(g: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """`S_global[j] = (H⁻¹ g)[j]² / (2 (H⁻¹)[j, j])`: the loss decrease lost when parameter j is frozen (OBS).

    Computed from a Cholesky factor of H (`cholesky_solve` for H⁻¹g, triangular solves for diag(H⁻¹)); H is never
    inverted explicitly. If the factorisation fails, the diagonal is raised by `10^a · 0.01 · mean(diag(H))` and the
    factorisation retried (a = 1 .. 4), with a warning.

    Args:
        g (`torch.Tensor`): (n,) mean input.
        hessian (`torch.Tensor`): (n, n) symmetric positive definite H.

    Returns:
        `torch.Tensor` (n,), ≥ 0.
    """
    factor = _cholesky_with_retry(hessian, DEFAULT_DAMPING * _positive_scale(hessian))
    return _global_from_factor(g, factor)


def greedy_scores(g: torch.Tensor, hessian: torch.Tensor, eta: float = DEFAULT_ETA) -> torch.Tensor:
    """`S_greedy[j] = η g[j]² + η² H[j, j] g[j]² − 4 η² g[j] (H g)[j]`: loss change of one ZO step caused by freezing j.

    Args:
        g (`torch.Tensor`): (n,) mean input.
        hessian (`torch.Tensor`): (n, n) H.
        eta (`float`): learning rate η.

    Returns:
        `torch.Tensor` (n,).
    """
    return _greedy_from_parts(g, hessian.diagonal(), hessian @ g, eta)


def mazo_scores(
    weight_abs: torch.Tensor,
    s_global: torch.Tensor,
    s_greedy: torch.Tensor,
    alpha: float = 10.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """Combined score of one task, `S^t = norm_i(S_global) + α norm_i(S_greedy) + β norm_i(|W|)` (MAZO_SPEC §3).

    Args:
        weight_abs (`torch.Tensor`): (out, in) |W| (or a block of its rows).
        s_global (`torch.Tensor`): (in,) global scores (the same for every row).
        s_greedy (`torch.Tensor`): (in,) greedy scores.
        alpha (`float`), beta (`float`): weights of the greedy and magnitude parts (paper: 10 and 1).

    Returns:
        `torch.Tensor` (out, in) in the dtype of `weight_abs`, not yet row-normalised.
    """
    return _mazo_vector(s_global, s_greedy, alpha, weight_abs.dtype) + beta * row_minmax(weight_abs)


def _mazo_vector(s_global: torch.Tensor, s_greedy: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """The part of `S^t` shared by every row: `norm(S_global) + α norm(S_greedy)`, (in,)."""
    return row_minmax(s_global).to(dtype) + alpha * row_minmax(s_greedy).to(dtype)


def wanda_scores(weight_abs: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda score `|W[i, j]| · ‖X[:, j]‖₂`, with `‖X[:, j]‖₂² = Σ_tokens x_j²` = diag(XᵀX).

    Args:
        weight_abs (`torch.Tensor`): (out, in) |W| (or a block of its rows).
        input_sq_sum (`torch.Tensor`): (in,) sum of squared inputs over the calibration tokens.

    Returns:
        `torch.Tensor` (out, in) in the dtype of `weight_abs`.
    """
    return weight_abs * input_sq_sum.sqrt().to(weight_abs.dtype)


def aggregate_scores(task_scores: Iterable[torch.Tensor]) -> torch.Tensor:
    """Multi-task score `S = Σ_t norm_i(S^t)` (per-task row normalisation, then a sum), (out, in)."""
    total = None
    for scores in task_scores:
        normalised = row_minmax(scores)
        total = normalised if total is None else total + normalised
    if total is None:
        raise ValueError("aggregate_scores needs the scores of at least one task.")
    return total


def _positive_scale(matrix: torch.Tensor) -> float:
    """mean(diag(matrix)), or 1 where that is not positive (all-zero inputs)."""
    scale = float(matrix.diagonal().mean())
    return scale if scale > 0 else 1.0


def _add_damping_(matrix: torch.Tensor, damping: float) -> float:
    """Add `λ = damping · mean(diag)` to the diagonal in place; returns λ."""
    lam = damping * _positive_scale(matrix)
    matrix.diagonal().add_(lam)
    return lam


def _cholesky_with_retry(hessian: torch.Tensor, jitter: float) -> torch.Tensor:
    """Lower Cholesky factor of `hessian`; on failure retries with `jitter · (10^a − 1)` added to the diagonal."""
    factor, info = torch.linalg.cholesky_ex(hessian)
    for attempt in range(1, _CHOLESKY_RETRIES + 1):
        if int(info) == 0:
            return factor
        extra = jitter * (10.0**attempt - 1.0)
        logger.warning(
            "Cholesky factorisation of a %d×%d Hessian failed; retrying with the damping raised %d×.",
            hessian.shape[0],
            hessian.shape[0],
            10**attempt,
        )
        del factor
        damped = hessian.clone()
        damped.diagonal().add_(extra)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
    if int(info) != 0:
        raise RuntimeError(
            f"The {hessian.shape[0]}×{hessian.shape[0]} Hessian is not positive definite even with the damping raised "
            f"{10**_CHOLESKY_RETRIES}×; the calibration inputs contain non-finite or degenerate values."
        )
    return factor


def _inverse_diagonal(factor: torch.Tensor) -> torch.Tensor:
    """diag(H⁻¹) from the lower Cholesky factor L of H: `(H⁻¹)[j, j] = ‖L⁻¹[:, j]‖²`, in column blocks.

    Memory: one (n, b) block at a time, b = max(1, 2²³ // n); no n×n inverse is formed.
    """
    n = factor.shape[0]
    block = max(1, min(n, _BLOCK_ELEMENTS // n))
    result = torch.empty(n, dtype=factor.dtype, device=factor.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        unit = torch.zeros(n, stop - start, dtype=factor.dtype, device=factor.device)
        unit.diagonal(offset=-start).fill_(1.0)  # unit[start + i, i] = 1
        columns = torch.linalg.solve_triangular(factor, unit, upper=False)
        result[start:stop] = columns.square().sum(dim=0)
    return result


def _global_from_factor(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    solution = torch.cholesky_solve(g.unsqueeze(-1).to(factor.dtype), factor).squeeze(-1)
    return solution.square() / (2.0 * _inverse_diagonal(factor))


def _greedy_from_parts(g: torch.Tensor, h_diag: torch.Tensor, h_g: torch.Tensor, eta: float) -> torch.Tensor:
    g_sq = g.square()
    return eta * g_sq + eta**2 * h_diag * g_sq - 4.0 * eta**2 * g * h_g


# ====================================================================================================================
# 2. input statistics
# ====================================================================================================================
@contextmanager
def _ieee_float32():
    """Full float32 matmuls (no TF32) for the statistics and the solves, whatever the user set globally."""
    try:
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    except RuntimeError:  # a precision set through another API that cannot be read back: leave it alone
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            torch.set_float32_matmul_precision(previous)


class _StopForward(Exception):
    """Raised by a hook once the last layer of the current statistics window has seen the batch."""


@dataclass
class _Group:
    """Layers that read the same input tensor; the leader's hook accumulates the statistics for all of them."""

    index: int
    leader: str
    members: list[str]
    in_features: int
    device: torch.device
    last_call: int = -1  # position of the leader's last call in the probe's call sequence

    def stats_bytes(self, full: bool) -> int:
        n = self.in_features
        return 4 * (n * n + n) if full else 4 * n


class _GroupStats:
    """Float32 running statistics of one group over one task: N, Σx and XᵀX (`full`) or Σx² (Wanda)."""

    def __init__(self, in_features: int, device: torch.device, full: bool) -> None:
        n = in_features
        self.tokens = 0
        self.full = full
        # one buffer [Σx, XᵀX] (or Σx²), so that data-parallel ranks sum a group's statistics with one all-reduce
        self.buffer: Optional[torch.Tensor] = torch.zeros(n * n + n if full else n, dtype=torch.float32, device=device)
        self.input_sum = self.buffer[:n] if full else None
        self.xtx = self.buffer[n:].view(n, n) if full else None
        self.sq_sum = None if full else self.buffer

    def add(self, rows: torch.Tensor, drop: Optional[torch.Tensor], kept: int) -> None:
        """Accumulate the (tokens, n) `rows`, zeroing those where `drop` (tokens,) is True, in token chunks."""
        n = rows.shape[-1]
        chunk = max(1, _BLOCK_ELEMENTS // n)
        with _ieee_float32():
            self._add_chunks(rows, drop, chunk)
        self.tokens += kept

    def _add_chunks(self, rows: torch.Tensor, drop: Optional[torch.Tensor], chunk: int) -> None:
        for start in range(0, rows.shape[0], chunk):
            x = rows[start : start + chunk]
            if drop is not None or x.dtype != torch.float32:
                x = x.to(torch.float32, copy=True)
            if drop is not None:
                x.masked_fill_(drop[start : start + chunk, None], 0.0)
            if self.full:
                self.input_sum += x.sum(dim=0)
                self.xtx.addmm_(x.T, x)
            else:
                self.sq_sum += x.square().sum(dim=0)


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"a MaZO layer was called without a tensor input (got {type(x).__name__}).")
    return x


class _Recorder:
    """Forward pre-hooks on the MaZO layers, in two modes.

    - probe (one forward on the first batch): the call order of the layers and their groups. Layers whose first input
      is the very tensor object (`is`) that an earlier layer read first share its group. Tensors are held by weak
      references only, so no activation is kept alive and a freed address cannot be mistaken for a shared input.
    - statistics: the leaders of the current window's groups accumulate `_GroupStats`; other members only check that
      they read the leader's tensor. Once the call sequence has passed the window's last leader call (as seen in the
      probe), `_StopForward` ends the forward pass early.
    """

    def __init__(self, layers: dict[str, MaZOLayer]) -> None:
        self.layers = layers
        self.calls: list[str] = []
        self.groups: list[_Group] = []
        self.group_of: dict[str, _Group] = {}
        self._probing = False
        self._probe_refs: list[tuple[weakref.ref, _Group]] = []
        self._stats: dict[int, _GroupStats] = {}
        self._stop_after: Optional[int] = None
        self._call_index = 0
        self._follows_probe = True
        self._latest: dict[int, weakref.ref] = {}
        self._keep_shape: Optional[torch.Size] = None
        self._drop: dict[torch.device, torch.Tensor] = {}
        self._kept = 0
        self._handles: list = []

    def __enter__(self) -> _Recorder:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(partial(self._hook, name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stats.clear()

    # -- per batch -----------------------------------------------------------------------------------------------
    def begin_batch(self, attention_mask: Optional[torch.Tensor]) -> int:
        """Reset the per-forward state and set the token mask; returns the number of kept tokens (-1: unknown)."""
        self._call_index = 0
        self._follows_probe = True
        self._latest.clear()
        self._drop.clear()
        self._keep_shape = None
        if attention_mask is None:
            return -1
        keep = attention_mask != 0
        if bool(keep.all()):
            return -1
        self._keep_shape = keep.shape
        self._drop[keep.device] = ~keep.reshape(-1)
        self._kept = int(keep.sum())
        return self._kept

    def _rows(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
        rows = x.reshape(-1, x.shape[-1])
        if self._keep_shape is None:
            return rows, None, rows.shape[0]
        if x.shape[:-1] != self._keep_shape:
            raise ValueError(
                f"Layer '{name}' received an input of shape {tuple(x.shape)}, which does not match the batch's "
                f"attention_mask {tuple(self._keep_shape)}; padding cannot be excluded for it. Pass calibration "
                "batches without padding (no attention_mask, or all ones)."
            )
        drop = self._drop.get(x.device)
        if drop is None:
            drop = self._drop[x.device] = next(iter(self._drop.values())).to(x.device)
        return rows, drop, self._kept

    # -- modes ---------------------------------------------------------------------------------------------------
    @contextmanager
    def probing(self):
        """Record the call order and the groups during one forward pass."""
        self._probing = True
        try:
            yield
        finally:
            self._probing = False
            self._probe_refs.clear()
        for group in self.groups:
            group.last_call = max(i for i, name in enumerate(self.calls) if name == group.leader)

    def start_window(self, groups: list[_Group], full: bool) -> None:
        """Allocate fresh statistics for `groups` and stop each forward right after their last leader call."""
        self._stats = {group.index: _GroupStats(group.in_features, group.device, full) for group in groups}
        self._stop_after = max(group.last_call for group in groups)

    def finish_window(self) -> dict[int, _GroupStats]:
        stats, self._stats, self._stop_after = self._stats, {}, None
        return stats

    # -- the hook ------------------------------------------------------------------------------------------------
    def _hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _layer_input(args, kwargs)
        if self._probing:
            self._probe_call(name, x)
            return
        group = self.group_of.get(name)
        if group is None:
            raise RuntimeError(
                f"Layer '{name}' ran during calibration but not during the first (probe) forward pass; "
                "compute_importance needs the same layers to run for every batch."
            )
        if name == group.leader:
            self._latest[group.index] = weakref.ref(x)
            stats = self._stats.get(group.index)
            if stats is not None:
                stats.add(*self._rows(name, x))
        elif group.index in self._stats:
            latest = self._latest.get(group.index)
            if latest is None or latest() is not x:
                raise RuntimeError(
                    f"Layer '{name}' shared its input with '{group.leader}' in the probe forward pass but reads a "
                    "different tensor now; compute_importance needs the same control flow for every batch."
                )
        index = self._call_index
        self._call_index += 1
        if self._follows_probe and (index >= len(self.calls) or self.calls[index] != name):
            self._follows_probe = False  # another call order than the probe: run the whole forward pass
        if self._follows_probe and self._stop_after is not None and index >= self._stop_after:
            raise _StopForward

    def _probe_call(self, name: str, x: torch.Tensor) -> None:
        self.calls.append(name)
        if name in self.group_of:
            return
        for ref, group in self._probe_refs:
            if ref() is x:
                group.members.append(name)
                self.group_of[name] = group
                return
        group = _Group(len(self.groups), name, [name], x.shape[-1], x.device)
        self.groups.append(group)
        self.group_of[name] = group
        self._probe_refs.append((weakref.ref(x), group))


def _plan_windows(groups: list[_Group], full: bool, budget: float) -> list[list[_Group]]:
    """Consecutive groups (in call order) whose statistics fit `budget` bytes; at least one group per window."""
    windows: list[list[_Group]] = []
    current: list[_Group] = []
    used = 0
    for group in sorted(groups, key=lambda g: g.last_call):
        size = group.stats_bytes(full)
        if current and used + size > budget:
            windows.append(current)
            current, used = [], 0
        current.append(group)
        used += size
    if current:
        windows.append(current)
    return windows


# ====================================================================================================================
# 3. the report
# ====================================================================================================================
@dataclass(frozen=True)
class LayerTaskRecord:
    """What one task contributed to one layer's mask.

    Attributes:
        task (`str`), layer (`str`): the task and the module name.
        tokens (`int`): non-padding tokens whose inputs reached the layer.
        seconds (`float`): wall time of this task's score for this layer (its share of the group's Cholesky work,
            the combination and the top-k), excluding the forward passes (see `ImportanceReport.task_seconds`).
        overlap (`float`): |task's own top-k set ∩ final mask| / (out · k).
        kept (`int`): out · k, the number of kept entries of the layer.
    """

    task: str
    layer: str
    tokens: int
    seconds: float
    overlap: float
    kept: int


@dataclass
class ImportanceReport:
    """Result of `compute_importance`: per task and layer, tokens seen, wall time and mask overlap.

    `print(report)` shows a short table: per task the tokens, the time, and the overlap between the task's own top-k
    set and the final multi-task mask (1.0 = the task alone would have chosen the same mask); per layer too when there
    are few layers (or with `report.table(per_layer=True)`).
    """

    scorer: str
    adapter_name: str
    tasks: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    records: list[LayerTaskRecord] = field(default_factory=list)
    task_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def overlap(self, task: Optional[str] = None, layer: Optional[str] = None) -> float:
        """Overlap of `task` (all tasks if None) on `layer` (all layers if None), weighted by each layer's out · k."""
        chosen = [r for r in self.records if (task is None or r.task == task) and (layer is None or r.layer == layer)]
        kept = sum(r.kept for r in chosen)
        return sum(r.overlap * r.kept for r in chosen) / kept if kept else float("nan")

    def tokens(self, task: str) -> int:
        """Non-padding calibration tokens of `task` (the largest count over layers)."""
        return max((r.tokens for r in self.records if r.task == task), default=0)

    def scoring_seconds(self, task: str) -> float:
        return sum(r.seconds for r in self.records if r.task == task)

    def table(self, per_layer: Optional[bool] = None, markdown: bool = False) -> str:
        """A short text (or markdown) table; `per_layer=None` adds the per-layer overlaps when there are ≤ 24 layers."""
        head = (
            f"MaZO mask search: scorer={self.scorer}, adapter '{self.adapter_name}', {len(self.tasks)} task(s), "
            f"{len(self.layers)} layer(s), {self.total_seconds:.1f} s"
        )
        if not self.records:
            return head + ("" if self.scorer == "none" else " (data-free scorer: no per-task statistics)")
        rows = [
            [
                task,
                str(self.tokens(task)),
                f"{self.task_seconds.get(task, 0.0):.2f}",
                f"{self.scoring_seconds(task):.2f}",
                f"{self.overlap(task):.3f}",
            ]
            for task in self.tasks
        ]
        lines = [head, ""]
        lines += _format_table(["task", "tokens", "stats s", "scoring s", "overlap"], rows, markdown)
        if per_layer or (per_layer is None and len(self.layers) <= 24):
            layer_rows = [[layer] + [f"{self.overlap(t, layer):.3f}" for t in self.tasks] for layer in self.layers]
            lines += [""] + _format_table(["layer"] + self.tasks, layer_rows, markdown)
        lines += [
            "",
            "overlap = |task's own top-k set ∩ final mask| / (out·k), weighted by out·k; 1.0 = same mask as the task "
            "alone would choose.",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "scorer": self.scorer,
            "adapter_name": self.adapter_name,
            "tasks": self.tasks,
            "layers": self.layers,
            "total_seconds": self.total_seconds,
            "task_seconds": self.task_seconds,
            "settings": self.settings,
            "overlap": {task: self.overlap(task) for task in self.tasks},
            "records": [vars(r) for r in self.records],
        }


def _format_table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*header)] + [fmt.format(*row) for row in rows]


# ====================================================================================================================
# 4. the driver
# ====================================================================================================================
def compute_importance(
    model: nn.Module,
    calib_loaders: Optional[TaskData] = None,
    num_batches: Optional[int] = None,
    eta: Optional[float] = None,
    progress: bool = True,
    adapter_name: Optional[str] = None,
    reset: bool = False,
    *,
    damping: float = DEFAULT_DAMPING,
    max_stats_bytes: Optional[int] = None,
) -> ImportanceReport:
    """Choose the mask of every layer of a MaZO adapter from per-task importance scores (MAZO_SPEC §3).

    For `scorer="mazo"`, per task t and layer: g (mean input), H = XᵀX/N + λI, S_global (Cholesky solve), S_greedy,
    `S^t = norm(S_global) + α norm(S_greedy) + β norm(|W|)`; then `S = Σ_t norm(S^t)` and the top-k of every row
    (ties to the lower column index). `"wanda"` uses `|W_ij| · ‖X_j‖₂` per task with the same aggregation;
    `"magnitude"` and `"random"` need no data and recompute the adapter's data-free mask; `"none"` has no mask.

    Args:
        model (`nn.Module`): a `PeftModel` or `MaZOModel` holding the MaZO adapter.
        calib_loaders: `{task: loader}`, a sequence of `(task, loader)` pairs, or one loader (a single task). Each
            loader yields mappings accepted by `model(**batch)`; tokens where `attention_mask == 0` are ignored.
            The batches are taken once up front (they are small: token ids) and reused by every statistics window.
            Under `torch.distributed`, pass each rank its own shard (at least one batch per task on every rank): the
            statistics are summed over the ranks, and every rank writes the same mask.
        num_batches (`int`, *optional*): batches per task; None = the whole loader.
        eta (`float`, *optional*): learning rate η of the greedy score; default `DEFAULT_ETA` = 1e-7.
        progress (`bool`): tqdm bars per task (forward passes) and per layer (scores).
        adapter_name (`str`, *optional*): defaults to the first active adapter.
        reset (`bool`): allow an adapter whose delta is non-zero: the delta is set to zero with the new mask.
            Without it, such an adapter is refused before any forward pass.
        damping (`float`): λ = damping · mean(diag(XᵀX / N)).
        max_stats_bytes (`int`, *optional*): budget for the statistics held at once (one window). Default: 1 GiB when
            the layer inputs are on CUDA, unlimited otherwise. More windows = more (partial) forward passes.

    Returns:
        `ImportanceReport`. The masks are written into the adapter only after every layer has been scored.
    """
    start = time.perf_counter()
    tuner = mazo_tuner(model, caller="compute_importance")
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    scorer = config.scorer
    layers = {n: layer for n, layer in mazo_layers(tuner).items() if adapter_name in layer.mazo_k}
    if not layers:
        raise ValueError(f"MaZO adapter '{adapter_name}' adapts no layer; there is no mask to compute.")
    report = ImportanceReport(scorer=scorer, adapter_name=adapter_name, layers=list(layers))
    if scorer == "none":
        logger.warning(
            "MaZO adapter '%s' uses scorer='none' (no mask): compute_importance has nothing to do.", adapter_name
        )
        return report
    eta = _positive("eta", DEFAULT_ETA if eta is None else eta)
    damping = _positive("damping", damping)
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive integer or None (the whole loader), got {num_batches!r}.")
    if max_stats_bytes is not None:
        max_stats_bytes = _positive("max_stats_bytes", max_stats_bytes)
    _check_layers(layers, adapter_name, reset)
    report.settings = {"sparsity": config.sparsity, "num_batches": num_batches}

    if scorer in ("random", "magnitude"):
        if calib_loaders is not None:
            logger.info("scorer=%r is data-free: the calibration loaders are not used.", scorer)
        columns = {
            name: topk_columns(layer.initial_mask_scores(config, name), layer.mazo_k[adapter_name]).cpu()
            for name, layer in layers.items()
        }
        _write_masks(layers, columns, adapter_name, reset)
        report.total_seconds = time.perf_counter() - start
        logger.info(
            "MaZO mask (scorer=%s, data-free): %d layer(s) in %.1f s", scorer, len(layers), report.total_seconds
        )
        return report

    tasks = _take_batches(calib_loaders, num_batches)
    report.tasks = [task for task, _ in tasks]
    if _dist.is_distributed():  # every rank must run the same tasks: their statistics are summed over the ranks
        _dist.assert_same_on_all_ranks((report.tasks, scorer), "compute_importance's calibration tasks and scorer")
    full = scorer == "mazo"
    report.settings.update({"eta": eta, "damping": damping} if full else {})
    report.settings.update({"alpha": config.alpha, "beta": config.beta} if full else {})

    vectors, tokens, vector_seconds, groups, windows, passes = _collect_task_vectors(
        tuner, layers, tasks, full, eta, damping, max_stats_bytes, progress, report.task_seconds
    )
    report.settings.update({"windows": windows, "forward_passes": passes})
    group_of = {name: group for group in groups for name in group.members}

    columns: dict[str, torch.Tensor] = {}
    for name, layer in tqdm(layers.items(), desc="MaZO scores", disable=not progress, leave=False):
        group = group_of[name]
        k = layer.mazo_k[adapter_name]
        task_vectors = [(task, vectors[task][group.index]) for task in report.tasks]
        columns[name], overlaps, seconds = _score_layer(layer, k, task_vectors, config.alpha, config.beta, full)
        for task in report.tasks:
            share = vector_seconds[task][group.index] / len(group.members)
            report.records.append(
                LayerTaskRecord(
                    task=task,
                    layer=name,
                    tokens=tokens[task][group.index],
                    seconds=seconds[task] + share,
                    overlap=overlaps[task],
                    kept=layer.out_features * k,
                )
            )
    _write_masks(layers, columns, adapter_name, reset)
    report.total_seconds = time.perf_counter() - start
    logger.info(
        "MaZO mask search (scorer=%s): %d task(s), %d layer(s), %d forward pass(es) in %d statistics window(s): %.1f s",
        scorer,
        len(report.tasks),
        len(layers),
        passes,
        windows,
        report.total_seconds,
    )
    return report


def _positive(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def _check_layers(layers: dict[str, MaZOLayer], adapter_name: str, reset: bool) -> None:
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} MaZO layer(s) are merged (e.g. '{merged[0]}'); call unmerge_adapter() before "
            "compute_importance."
        )
    if not reset:
        nonzero = [name for name, layer in layers.items() if layer.delta_is_nonzero(adapter_name)]
        if nonzero:
            raise ValueError(
                f"Adapter '{adapter_name}' already has a non-zero delta in {len(nonzero)} layer(s) (e.g. "
                f"'{nonzero[0]}'); a new mask would silently change the trained adapter. Pass reset=True to zero the "
                "delta and compute the mask."
            )


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


def _take_batches(calib_loaders: Optional[TaskData], num_batches: Optional[int]) -> list[tuple[str, list[Mapping]]]:
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


def _forward(model: nn.Module, batch: Mapping, device: Optional[torch.device], no_cache: bool, recorder: _Recorder):
    """One calibration forward: move the batch, set the token mask, run until the window's last layer."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}
    if no_cache and "use_cache" not in inputs:
        inputs["use_cache"] = False  # no KV cache: it would only cost memory
    recorder.begin_batch(inputs.get("attention_mask"))
    try:
        model(**inputs)
    except _StopForward:
        pass


def _synchronize(devices: Iterable[torch.device]) -> None:
    for device in set(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _collect_task_vectors(
    tuner: nn.Module,
    layers: dict[str, MaZOLayer],
    tasks: list[tuple[str, list[Mapping]]],
    full: bool,
    eta: float,
    damping: float,
    max_stats_bytes: Optional[int],
    progress: bool,
    task_seconds: dict[str, float],
):
    """Calibration passes, window by window, reduced to n-vectors per (task, group) as soon as a window is done.

    Returns:
        `(vectors, tokens, vector_seconds, groups, windows, passes)` with `vectors[task][group]` = (S_global,
        S_greedy) normalised to float32 (mazo) or Σx² (wanda), `tokens[task][group]`, `vector_seconds[task][group]`.
    """
    model = tuner.model
    device = _input_device(model)
    no_cache = "use_cache" in inspect.signature(model.forward).parameters
    vectors = {task: {} for task, _ in tasks}
    tokens = {task: {} for task, _ in tasks}
    vector_seconds = {task: {} for task, _ in tasks}
    passes = 0
    with _calibration_mode(tuner), _Recorder(layers) as recorder:
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
        windows = _plan_windows(recorder.groups, full, budget)
        devices = [group.device for group in recorder.groups]
        for w, window in enumerate(windows):
            for task, batches in tasks:
                desc = f"MaZO stats [{task}]" + (f" window {w + 1}/{len(windows)}" if len(windows) > 1 else "")
                _synchronize(devices)
                begin = time.perf_counter()
                recorder.start_window(window, full)
                for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                    _forward(model, batch, device, no_cache, recorder)
                    passes += 1
                stats = recorder.finish_window()
                _all_reduce_stats(stats)  # data parallel: the window's statistics over every rank's shard
                _synchronize(devices)
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
                    with _ieee_float32():
                        vectors[task][group.index] = _reduce(group_stats, full, eta, damping, task, group.leader)
                    del group_stats
                    _synchronize([group.device])
                    vector_seconds[task][group.index] = time.perf_counter() - begin
    return vectors, tokens, vector_seconds, recorder.groups, len(windows), passes


def _all_reduce_stats(stats: dict[int, _GroupStats]) -> None:
    """Sum one window's statistics of one task over the ranks (no-op in a single process): one all-reduce of the
    token counts, then one per group of its packed [Σx, XᵀX] (or Σx²) buffer. Every rank then holds the statistics
    of the union of the ranks' calibration batches."""
    if not _dist.is_distributed():
        return
    order = sorted(stats)
    counts = torch.tensor([stats[i].tokens for i in order], dtype=torch.int64)
    _dist.all_reduce_sum_(counts)
    for index, count in zip(order, counts.tolist(), strict=True):
        _dist.all_reduce_sum_(stats[index].buffer)
        stats[index].tokens = int(count)


def _reduce(stats: _GroupStats, full: bool, eta: float, damping: float, task: str, layer: str):
    """One group's statistics of one task -> its score vectors, freeing the n×n matrix as early as possible.

    Returns:
        mazo: `(norm(S_global), norm(S_greedy))`, two (n,) float32 vectors (min-max normalised in float64);
        wanda: `(Σx²,)`, one (n,) float32 vector.
    """
    if not full:
        _check_finite(stats.sq_sum, task, layer)
        return (stats.sq_sum,)
    g = stats.input_sum / stats.tokens
    hessian, stats.xtx, stats.input_sum, stats.buffer = stats.xtx, None, None, None  # `del hessian` frees the buffer
    hessian.div_(stats.tokens)  # XᵀX / N, in place
    _check_finite(hessian, task, layer)
    lam = _add_damping_(hessian, damping)
    h_diag = hessian.diagonal().clone()
    h_g = hessian @ g
    greedy = _greedy_from_parts(g.double(), h_diag.double(), h_g.double(), eta)
    factor = _cholesky_with_retry(hessian, lam)
    del hessian
    glob = _global_from_factor(g, factor).double()
    del factor
    return row_minmax(glob).float(), row_minmax(greedy).float()


def _check_finite(tensor: torch.Tensor, task: str, layer: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"The inputs of '{layer}' on task '{task}' contain inf or NaN; no score can be computed.")


def _score_layer(
    layer: MaZOLayer,
    k: int,
    task_vectors: list[tuple[str, tuple[torch.Tensor, ...]]],
    alpha: float,
    beta: float,
    full: bool,
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """Top-k columns of `S = Σ_t norm(S^t)` for one layer, in blocks of rows (every step is row-wise).

    Returns:
        `(columns, overlaps, seconds)`: (out, k) kept columns on the CPU (index dtype), and per task the overlap of
        its own top-k set with the final mask and its wall time on this layer.
    """
    tasks = [task for task, _ in task_vectors]
    weight = dense_weight(layer.get_base_layer())
    out_features, in_features = weight.shape
    device = weight.device
    vectors = [(task, tuple(v.to(device) for v in vecs)) for task, vecs in task_vectors]
    rows = max(1, _BLOCK_ELEMENTS // in_features)
    columns = torch.empty(out_features, k, dtype=index_dtype(in_features))
    hits = {task: torch.zeros((), dtype=torch.int64, device=device) for task in tasks}
    seconds = dict.fromkeys(tasks, 0.0)
    shared = 0.0
    if full:  # the row-independent part of S^t, once per task (mazo_scores = this + β norm_i(|W|))
        vectors = [(task, _mazo_vector(*vecs, alpha, torch.float32)) for task, vecs in vectors]
    for start in range(0, out_features, rows):
        begin = time.perf_counter()
        weight_abs = weight[start : start + rows].abs().float()
        weight_part = beta * row_minmax(weight_abs) if full else None  # shared by the tasks
        total = torch.zeros_like(weight_abs)
        own = {}
        shared += time.perf_counter() - begin
        for task, vecs in vectors:
            begin = time.perf_counter()
            scores = vecs + weight_part if full else wanda_scores(weight_abs, *vecs)
            scores = row_minmax(scores)
            total += scores
            if len(tasks) > 1:
                own[task] = topk_columns(scores, k)
            del scores
            _synchronize([device])
            seconds[task] += time.perf_counter() - begin
        begin = time.perf_counter()
        final = topk_columns(total, k)
        for task, chosen in own.items():
            hits[task] += indices_to_dense(chosen, in_features).gather(1, final).sum()
        columns[start : start + rows] = final.to("cpu", dtype=columns.dtype)
        shared += time.perf_counter() - begin
    kept = out_features * k
    overlaps = {task: (int(hits[task]) / kept if len(tasks) > 1 else 1.0) for task in tasks}
    seconds = {task: value + shared / len(tasks) for task, value in seconds.items()}
    return columns, overlaps, seconds


def _write_masks(
    layers: dict[str, MaZOLayer], columns: dict[str, torch.Tensor], adapter_name: str, reset: bool
) -> None:
    for name, layer_columns in columns.items():
        layers[name].set_mask_columns(adapter_name, layer_columns, reset=reset)
