"""Input statistics of the mask search: forward pre-hooks on the MaZO layers, the groups of layers that read the same
input tensor (q/k/v, gate/up), their float32 running statistics per task, the statistics windows, and their sum over
data-parallel ranks.

The hooks accumulate, per group, the token count N, the sum of the inputs and XᵀX (or only diag(XᵀX) for Wanda), in
float32, over the non-padding tokens (`attention_mask != 0`).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed as _dist
from ..layer import MaZOLayer
from ..scores import BLOCK_ELEMENTS


@contextmanager
def ieee_float32():
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


class StopForward(Exception):
    """Raised by a hook once the last layer of the current statistics window has seen the batch."""


@dataclass
class Group:
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


class GroupStats:
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

    def release(self) -> None:
        """Drop the references to the buffer, so that a consumer holding its own views frees it by dropping them."""
        self.buffer = self.input_sum = self.xtx = self.sq_sum = None

    def add(self, rows: torch.Tensor, drop: Optional[torch.Tensor], kept: int) -> None:
        """Accumulate the (tokens, n) `rows`, zeroing those where `drop` (tokens,) is True, in token chunks."""
        n = rows.shape[-1]
        chunk = max(1, BLOCK_ELEMENTS // n)
        with ieee_float32():
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


class Recorder:
    """Forward pre-hooks on the MaZO layers, in two modes.

    - probe (one forward on the first batch): the call order of the layers and their groups. Layers whose first input
      is the very tensor object (`is`) that an earlier layer read first share its group. Tensors are held by weak
      references only, so no activation is kept alive and a freed address cannot be mistaken for a shared input.
    - statistics: the leaders of the current window's groups accumulate `GroupStats`; other members only check that
      they read the leader's tensor. Once the call sequence has passed the window's last leader call (as seen in the
      probe), `StopForward` ends the forward pass early.
    """

    def __init__(self, layers: dict[str, MaZOLayer]) -> None:
        self.layers = layers
        self.calls: list[str] = []
        self.groups: list[Group] = []
        self.group_of: dict[str, Group] = {}
        self._probing = False
        self._probe_refs: list[tuple[weakref.ref, Group]] = []
        self._stats: dict[int, GroupStats] = {}
        self._stop_after: Optional[int] = None
        self._call_index = 0
        self._follows_probe = True
        self._latest: dict[int, weakref.ref] = {}
        self._keep_shape: Optional[torch.Size] = None
        self._drop: dict[torch.device, torch.Tensor] = {}
        self._kept = 0
        self._handles: list = []

    def __enter__(self) -> Recorder:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(partial(self._hook, name), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stats.clear()

    # -- per batch -----------------------------------------------------------------------------------------------
    def begin_batch(self, attention_mask: Optional[torch.Tensor]) -> None:
        """Reset the per-forward state and set the token mask (none when every token counts)."""
        self._call_index = 0
        self._follows_probe = True
        self._latest.clear()
        self._drop.clear()
        self._keep_shape = None
        if attention_mask is None:
            return
        keep = attention_mask != 0
        if bool(keep.all()):
            return
        self._keep_shape = keep.shape
        self._drop[keep.device] = ~keep.reshape(-1)
        self._kept = int(keep.sum())

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

    def start_window(self, groups: list[Group], full: bool) -> None:
        """Allocate fresh statistics for `groups` and stop each forward right after their last leader call."""
        self._stats = {group.index: GroupStats(group.in_features, group.device, full) for group in groups}
        self._stop_after = max(group.last_call for group in groups)

    def finish_window(self) -> dict[int, GroupStats]:
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
            raise StopForward

    def _probe_call(self, name: str, x: torch.Tensor) -> None:
        self.calls.append(name)
        if name in self.group_of:
            return
        for ref, group in self._probe_refs:
            if ref() is x:
                group.members.append(name)
                self.group_of[name] = group
                return
        group = Group(len(self.groups), name, [name], x.shape[-1], x.device)
        self.groups.append(group)
        self.group_of[name] = group
        self._probe_refs.append((weakref.ref(x), group))


def plan_windows(groups: list[Group], full: bool, budget: float) -> list[list[Group]]:
    """Consecutive groups (in call order) whose statistics fit `budget` bytes; at least one group per window."""
    windows: list[list[Group]] = []
    current: list[Group] = []
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


def all_reduce_stats(stats: dict[int, GroupStats]) -> None:
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
