"""Compact mask storage: k per row, deterministic top-k, bit packing, invariants."""

import pytest
import torch

from peft_mazo import mask as mask_ops


@pytest.mark.parametrize(
    "in_features, sparsity, expected",
    [(10, 0.8, 2), (10, 0.9, 1), (64, 0.8, 13), (64, 0.0, 64), (4096, 0.9, 410), (11008, 0.8, 2202), (3, 0.99, 1)],
)
def test_kept_per_row_is_ceil_of_kept_fraction(in_features, sparsity, expected):
    assert mask_ops.kept_per_row(in_features, sparsity) == expected


def test_index_dtype_switches_at_int16_limit():
    assert mask_ops.index_dtype(32767) == torch.int16
    assert mask_ops.index_dtype(32768) == torch.int32


def test_topk_columns_breaks_ties_towards_lower_index_and_sorts():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    columns = mask_ops.topk_columns(scores, 3)
    assert columns.tolist() == [[1, 2, 3], [0, 1, 2]]


def test_topk_columns_matches_brute_force_on_random_scores():
    scores = torch.randn(32, 50, generator=torch.Generator().manual_seed(0))
    columns = mask_ops.topk_columns(scores, 7)
    for row in range(32):
        expected = sorted(sorted(range(50), key=lambda j: (-scores[row, j].item(), j))[:7])
        assert columns[row].tolist() == expected


def _stable_sort_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable descending sort, its first k columns, ascending."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


@pytest.mark.parametrize("kind", ["continuous", "ties", "constant", "infinite", "signed_zero"])
@pytest.mark.parametrize("k", [1, 5, 17, 40])
def test_topk_columns_and_mask_equal_a_stable_sort(kind, k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(24, 40, generator=generator)
    if kind == "ties":  # few distinct values: ties at the threshold in almost every row
        scores = (scores * 2).round()
    elif kind == "constant":
        scores = torch.full((24, 40), 0.5)
    elif kind == "infinite":
        scores[:, ::3] = float("-inf")
        scores[::4, 1::5] = float("inf")
    elif kind == "signed_zero":  # -0.0 == 0.0: one tie group, in column order
        scores = torch.where(scores > 0, torch.tensor(0.0), torch.tensor(-0.0))
    expected = _stable_sort_topk(scores, k)
    assert torch.equal(mask_ops.topk_columns(scores, k), expected)
    assert torch.equal(mask_ops.topk_mask(scores, k), mask_ops.indices_to_dense(expected, 40))


def test_topk_columns_of_no_rows():
    assert mask_ops.topk_columns(torch.zeros(0, 6), 2).shape == (0, 2)


def test_topk_columns_rejects_nan_and_bad_k():
    with pytest.raises(ValueError, match="NaN"):
        mask_ops.topk_columns(torch.tensor([[float("nan"), 1.0]]), 1)
    with pytest.raises(ValueError, match="k must be in"):
        mask_ops.topk_columns(torch.zeros(2, 3), 4)


@pytest.mark.parametrize("in_features", [1, 7, 8, 9, 64, 130])
def test_pack_unpack_round_trip_and_size(in_features):
    mask = torch.rand(5, in_features, generator=torch.Generator().manual_seed(in_features)) > 0.5
    packed = mask_ops.pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-in_features // 8))
    assert torch.equal(mask_ops.unpack_bits(packed, in_features), mask)


def test_indices_dense_round_trip():
    columns = mask_ops.topk_columns(torch.randn(6, 20, generator=torch.Generator().manual_seed(3)), 4)
    dense = mask_ops.indices_to_dense(columns, 20)
    assert dense.sum(dim=1).tolist() == [4] * 6
    assert torch.equal(mask_ops.dense_to_indices(dense), columns)


def test_check_row_counts_names_the_bad_row():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :2] = True
    mask_ops.check_row_counts(mask, 2)
    mask[1, 5] = True
    with pytest.raises(ValueError, match="row 1 keeps 3"):
        mask_ops.check_row_counts(mask, 2)


def test_check_columns_rejects_repeats_and_out_of_range():
    mask_ops.check_columns(torch.tensor([[0, 2], [1, 3]]), 4)
    with pytest.raises(ValueError, match="ascending"):
        mask_ops.check_columns(torch.tensor([[2, 2], [1, 3]]), 4)
    with pytest.raises(ValueError, match="range"):
        mask_ops.check_columns(torch.tensor([[0, 4], [1, 3]]), 4)
