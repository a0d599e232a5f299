"""The importance scores of MAZO_SPEC §3 as pure functions on tensors (no model; any float dtype, used as-is by the
tests in float64).

Each formula is written once, as a building block that the mask search (through `peft_mazo.scorers`) calls itself:
`row_minmax`, `input_moments`, `add_damping_` (λ), `cholesky_with_retry`, `global_from_factor` (S_global),
`greedy_from_parts` (S_greedy), `mazo_task_scores` (S^t), `wanda_scores`, `aggregate_scores` (S). The one-call
functions `damped_hessian`, `global_scores`, `greedy_scores` and `mazo_scores` are thin compositions of those blocks;
the search composes the same blocks in bounded memory (in place, the n×n matrix freed before the triangular solves,
rows in blocks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional

import torch


logger = logging.getLogger(__name__)

DEFAULT_ETA = 1e-7
"""Learning rate η of the greedy score: the dense full-model ZO learning rate of MeZO/MaZO (MAZO_SPEC §1)."""
DEFAULT_DAMPING = 0.01
"""λ = damping · mean(diag(XᵀX / N)) (MAZO_SPEC §3, our reading)."""

BLOCK_ELEMENTS = 1 << 23  # float32 temporaries of token chunks, row blocks and inverse-diagonal blocks
_CHOLESKY_RETRIES = 4  # damping × 10 per retry
_INVERSE_BLOCKS = 8  # diag(H⁻¹) in at least this many column blocks (each solved against a trailing factor)


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


def input_moments(
    n_tokens: int, input_sum: torch.Tensor, xtx: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean input `g = Σx / N` (n,) and uncentred second moment `XᵀX / N` (n, n) from accumulated statistics.

    With `inplace=True`, `xtx` itself is divided and returned (the mask search does so, to hold one n×n matrix).
    """
    if n_tokens <= 0:
        raise ValueError("input_moments needs at least one token (n_tokens > 0).")
    return input_sum / n_tokens, xtx.div_(n_tokens) if inplace else xtx / n_tokens


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
    add_damping_(hessian, damping)
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
    factor = cholesky_with_retry(hessian, DEFAULT_DAMPING * _positive_scale(hessian))
    return global_from_factor(g, factor)


def greedy_scores(g: torch.Tensor, hessian: torch.Tensor, eta: float = DEFAULT_ETA) -> torch.Tensor:
    """`S_greedy[j] = η g[j]² + η² H[j, j] g[j]² − 4 η² g[j] (H g)[j]`: loss change of one ZO step caused by freezing j.

    Args:
        g (`torch.Tensor`): (n,) mean input.
        hessian (`torch.Tensor`): (n, n) H.
        eta (`float`): learning rate η.

    Returns:
        `torch.Tensor` (n,).
    """
    return greedy_from_parts(g, hessian.diagonal(), hessian @ g, eta)


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
    (scores,) = mazo_task_scores(weight_abs, [(s_global, s_greedy)], alpha, beta)
    return scores


def mazo_task_scores(
    weight_abs: torch.Tensor, task_vectors: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float, beta: float
) -> Iterator[torch.Tensor]:
    """`S^t` of every task in turn (see `mazo_scores`), for one block of rows; `β norm_i(|W|)` is computed once.

    Args:
        weight_abs (`torch.Tensor`): (rows, in) |W| of a block of rows.
        task_vectors: per task, its (in,) `(S_global, S_greedy)`.
        alpha (`float`), beta (`float`): weights of the greedy and magnitude parts.

    Yields:
        `torch.Tensor` (rows, in) in the dtype of `weight_abs`, one task at a time.
    """
    weight_part = beta * row_minmax(weight_abs)
    for s_global, s_greedy in task_vectors:
        yield _mazo_vector(s_global, s_greedy, alpha, weight_abs.dtype) + weight_part


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


def aggregate_scores(
    task_scores: Iterable[torch.Tensor], each: Optional[Callable[[int, torch.Tensor], None]] = None
) -> torch.Tensor:
    """Multi-task score `S = Σ_t norm_i(S^t)` (per-task row normalisation, then a sum), (out, in).

    Args:
        task_scores: the `S^t`, one task at a time (a generator keeps one task's scores in memory at a time).
        each (`Callable`, *optional*): called as `each(t, norm_i(S^t))` for every task before its scores are added
            (the mask search reads each task's own top-k there); the first task's tensor becomes the sum, so copy it
            to keep it.
    """
    total = None
    for t, scores in enumerate(task_scores):
        normalised = row_minmax(scores)
        del scores
        if each is not None:
            each(t, normalised)
        total = normalised if total is None else total.add_(normalised)
    if total is None:
        raise ValueError("aggregate_scores needs the scores of at least one task.")
    return total


def _positive_scale(matrix: torch.Tensor) -> float:
    """mean(diag(matrix)), or 1 where that is not positive (all-zero inputs)."""
    scale = float(matrix.diagonal().mean())
    return scale if scale > 0 else 1.0


def add_damping_(matrix: torch.Tensor, damping: float) -> float:
    """Add `λ = damping · mean(diag)` to the diagonal in place; returns λ."""
    lam = damping * _positive_scale(matrix)
    matrix.diagonal().add_(lam)
    return lam


def cholesky_with_retry(hessian: torch.Tensor, jitter: float) -> torch.Tensor:
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

    L⁻¹ is lower triangular, so the columns `start:stop` of L⁻¹ are zero above row `start`: each block is solved
    against the trailing factor `L[start:, start:]` only, about n³/3 operations in all instead of n³ for a solve
    against the whole identity (3.5× faster at n = 1536). Memory: one (n, b) block at a time,
    b = min(⌈n / 8⌉, 2²³ // n); no n×n inverse is formed.
    """
    n = factor.shape[0]
    block = max(1, min(math.ceil(n / _INVERSE_BLOCKS), BLOCK_ELEMENTS // n))
    result = torch.empty(n, dtype=factor.dtype, device=factor.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        unit = torch.zeros(n - start, stop - start, dtype=factor.dtype, device=factor.device)
        unit.diagonal().fill_(1.0)  # the columns start:stop of the identity, from row start on
        columns = torch.linalg.solve_triangular(factor[start:, start:], unit, upper=False)
        result[start:stop] = columns.square().sum(dim=0)
    return result


def global_from_factor(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`S_global = (H⁻¹ g)² / (2 diag(H⁻¹))` from the lower Cholesky factor L of H, (n,)."""
    solution = torch.cholesky_solve(g.unsqueeze(-1).to(factor.dtype), factor).squeeze(-1)
    return solution.square() / (2.0 * _inverse_diagonal(factor))


def greedy_from_parts(g: torch.Tensor, h_diag: torch.Tensor, h_g: torch.Tensor, eta: float) -> torch.Tensor:
    """`S_greedy = η g² + η² diag(H) g² − 4 η² g (H g)` from g, diag(H) and H g (any dtype: the search uses float64)."""
    g_sq = g.square()
    return eta * g_sq + eta**2 * h_diag * g_sq - 4.0 * eta**2 * g * h_g
