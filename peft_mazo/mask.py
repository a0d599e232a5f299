"""Compact storage of the MaZO mask and its invariants, as pure functions on tensors.

A mask `M` (out × in, bool) has exactly `k` ones in every row. It is stored in one of two compact forms:

- row indices: a (out, k) integer tensor of the kept column of every row, ascending (int16 when `in < 32768`);
- packed bits: a (out, ceil(in / 8)) uint8 tensor, bit `j % 8` of byte `j // 8` is `M[:, j]` (little-endian).

A dense bool mask is only ever built on demand (`unpack_bits`, `indices_to_dense`) and dropped after use.
"""

from __future__ import annotations

import math

import torch


_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)


def kept_per_row(in_features: int, sparsity: float) -> int:
    """Number of kept entries per row, `k = ceil((1 - sparsity) * in_features)`.

    The product is rounded to 9 decimals first so that e.g. `(1 - 0.8) * 10 = 2.0000000000000004` gives 2, not 3.
    """
    return min(in_features, max(1, math.ceil(round((1.0 - sparsity) * in_features, 9))))


def index_dtype(in_features: int) -> torch.dtype:
    """Smallest integer dtype that holds column indices `0 .. in_features - 1`."""
    return torch.int16 if in_features < 2**15 else torch.int32


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` largest scores of every row, ties broken towards the lower column index.

    The same set as a stable descending sort would choose, found without sorting: `torch.topk` gives each row's k-th
    largest score (the threshold); every score above it is kept, and of the scores equal to it the lowest columns fill
    the row up to `k`. Rows without a tie at the threshold (the usual case for real-valued scores) need no more.

    Args:
        scores (`torch.Tensor`): (out, in) float scores, no NaN (`topk_columns` checks).
        k (`int`): kept entries per row, `1 <= k <= in`.

    Returns:
        `torch.BoolTensor` of shape (out, in) with exactly `k` ones in every row.
    """
    threshold = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    kept = scores >= threshold
    if bool((kept.sum(dim=1) == k).all()):
        return kept
    above = scores > threshold
    tie = scores == threshold
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tie & (tie.cumsum(dim=1) <= room))


def topk_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the `k` largest scores of every row, ascending, ties broken towards the lower column index.

    Args:
        scores (`torch.Tensor`): (out, in) float scores.
        k (`int`): kept entries per row, `1 <= k <= in`.

    Returns:
        `torch.LongTensor` of shape (out, k), each row sorted ascending.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (out, in) tensor, got shape {tuple(scores.shape)}.")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}.")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; a mask cannot be chosen from them.")
    # nonzero() lists the kept entries row by row in column order: (out, k) ascending columns
    return topk_mask(scores, k).nonzero()[:, 1].view(scores.shape[0], k)


def indices_to_dense(columns: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, k) kept columns -> (out, in_features) bool mask."""
    mask = torch.zeros(columns.shape[0], in_features, dtype=torch.bool, device=columns.device)
    return mask.scatter_(1, columns.long(), True)


def dense_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool mask with the same count in every row -> (out, k) kept columns, ascending (int64)."""
    k = int(mask[0].sum()) if mask.shape[0] else 0
    check_row_counts(mask, k)
    return torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in / 8)) uint8, little-endian within each byte."""
    out_features, in_features = mask.shape
    padded = torch.zeros(out_features, math.ceil(in_features / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :in_features] = mask
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(out_features, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, ceil(in / 8)) uint8 -> (out, in) bool; the inverse of `pack_bits`."""
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.view(packed.shape[0], -1)[:, :in_features]


def check_row_counts(mask: torch.Tensor, k: int, name: str = "mask") -> None:
    """Raise `ValueError` unless the (out, in) bool `mask` has exactly `k` ones in every row."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}.")
    counts = mask.sum(dim=1)
    bad = (counts != k).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"{name} must keep exactly k = {k} entries in every row (k = ceil((1 - sparsity) * in_features)), but "
            f"{bad.numel()} row(s) differ, e.g. row {row} keeps {int(counts[row])}. Build the mask with "
            "peft_mazo.mask.topk_columns or compute_importance."
        )


def check_columns(columns: torch.Tensor, in_features: int, name: str = "mask indices") -> None:
    """Raise `ValueError` unless every row of the (out, k) `columns` is strictly ascending and within range."""
    if columns.numel() == 0:
        return
    columns = columns.long()
    if int(columns.min()) < 0 or int(columns.max()) >= in_features:
        raise ValueError(f"{name} must lie in [0, {in_features}); got values out of range.")
    if columns.shape[1] > 1 and not bool((columns[:, 1:] > columns[:, :-1]).all()):
        raise ValueError(f"{name} must be strictly ascending in every row (no repeated column).")
