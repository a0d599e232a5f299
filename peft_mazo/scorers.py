"""The mask scorers by name (`MaZOConfig.scorer`), in the spirit of peft SHiRA's `mask_functions.py`: each scorer is
one small `Scorer`, and whatever depends on the scorer an adapter uses (the adapter's first mask, whether it has a
mask at all, whether it needs calibration data, and how `compute_importance` scores) reads it here.

- `"mazo"`: the top-k of every row of `Σ_t norm_i(S^t)`, S^t from S_global, S_greedy and |W| (MAZO_SPEC §3); needs
  Σx and XᵀX per task; a new adapter holds the |W| mask until `compute_importance` runs.
- `"wanda"`: the same with `S^t = |W_ij| · ‖X^t_j‖₂`; needs Σx² per task; |W| until then.
- `"magnitude"`: |W|; `"random"`: uniform scores seeded by `mask_seed` and the module name. Data-free: a new
  adapter's mask is final.
- `"none"`: no mask; every entry trains.

Every scorer has the same parts, with the same signatures:

- `initial_scores(base_layer, config, module_key)`: the data-free (out, in) scores of a new adapter's mask (the layer
  keeps the row-wise top-k); None for `"none"`;
- `statistics`: what `compute_importance` gathers per task and group of layers: `"moments"` (N, Σx and XᵀX),
  `"squares"` (N and Σx²), or None for a data-free scorer;
- `task_vectors(stats, eta, damping)`: one task's statistics on one group -> the (in,) vectors its scores need;
- `task_scores(weight_abs, task_vectors, config)`: for a block of rows of |W|, the (rows, in) `S^t` of every task in
  turn; `compute_importance` sums their row-normalised values and keeps the top-k of every row.

`stats` is the task's `peft_mazo.importance.statistics.GroupStats` of the group; `config` is the adapter's
`MaZOConfig`. This module imports only `scores` and `quantized`, so that `config` and `layer` can use it without an
import cycle.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .quantized import dense_weight
from .scores import (
    add_damping_,
    cholesky_with_retry,
    global_from_factor,
    greedy_from_parts,
    input_moments,
    mazo_task_scores,
    row_minmax,
    wanda_scores,
)


# ----------------------------------------------------------------------------------------------------------------------
# data-free scores: a new adapter's mask
# ----------------------------------------------------------------------------------------------------------------------
def magnitude_scores(base_layer: nn.Module, config: Any, module_key: str) -> torch.Tensor:
    """|W| in float32 (dequantized for a bitsandbytes base): the row-wise top-k keeps the largest weights."""
    return dense_weight(base_layer).abs().float()


def random_scores(base_layer: nn.Module, config: Any, module_key: str) -> torch.Tensor:
    """Uniform scores from a generator seeded by `config.mask_seed` and the module's name (reproducible, different for
    every layer), on the CPU."""
    generator = torch.Generator().manual_seed(config.mask_seed * 1_000_003 + zlib.crc32(module_key.encode()))
    return torch.rand(base_layer.out_features, base_layer.in_features, generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# data-driven scores: one task's statistics -> its vectors, and its scores for a block of rows
# ----------------------------------------------------------------------------------------------------------------------
def mazo_vectors(stats: Any, eta: float, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(S_global), norm(S_greedy))`, two (in,) float32 vectors (min-max normalised in float64), of one task on
    one group, from its float32 statistics `stats` (`tokens`, `input_sum`, `xtx`; released here).

    XᵀX is divided and damped in place and freed before the triangular solves, so that at most the n×n statistics
    and their Cholesky factor are alive at once.
    """
    tokens, input_sum, xtx = stats.tokens, stats.input_sum, stats.xtx
    stats.release()  # from here `hessian` is the only reference to the n×n buffer: `del hessian` frees it
    g, hessian = input_moments(tokens, input_sum, xtx, inplace=True)  # XᵀX / N, in place
    del input_sum, xtx
    lam = add_damping_(hessian, damping)
    greedy = greedy_from_parts(g.double(), hessian.diagonal().double(), (hessian @ g).double(), eta)
    factor = cholesky_with_retry(hessian, lam)
    del hessian
    glob = global_from_factor(g, factor).double()
    del factor
    return row_minmax(glob).float(), row_minmax(greedy).float()


def mazo_block_scores(
    weight_abs: torch.Tensor, task_vectors: Sequence[tuple[torch.Tensor, ...]], config: Any
) -> Iterator[torch.Tensor]:
    """`S^t = norm_i(S_global) + α norm_i(S_greedy) + β norm_i(|W|)` of every task in turn, α and β from `config`
    (`scores.mazo_task_scores`)."""
    return mazo_task_scores(weight_abs, task_vectors, config.alpha, config.beta)


def wanda_vectors(stats: Any, eta: float, damping: float) -> tuple[torch.Tensor]:
    """`(Σx²,)`, one (in,) float32 vector, of one task on one group (η and the damping do not apply)."""
    return (stats.sq_sum,)


def wanda_block_scores(
    weight_abs: torch.Tensor, task_vectors: Sequence[tuple[torch.Tensor, ...]], config: Any
) -> Iterator[torch.Tensor]:
    """`|W_ij| · ‖X^t_j‖₂` of every task in turn (`scores.wanda_scores`)."""
    return (wanda_scores(weight_abs, sq_sum) for (sq_sum,) in task_vectors)


# ----------------------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scorer:
    """How one scorer chooses the mask (see the module docstring for the signatures).

    Attributes:
        name (`str`): the `MaZOConfig.scorer` value.
        initial_scores (`Callable`, *optional*): data-free (out, in) scores of a new adapter's mask; None: no mask.
        statistics (`str`, *optional*): `"moments"`, `"squares"`, or None for a data-free scorer.
        task_vectors (`Callable`, *optional*), task_scores (`Callable`, *optional*): the data-driven steps.
    """

    name: str
    initial_scores: Optional[Callable[[nn.Module, Any, str], torch.Tensor]]
    statistics: Optional[str] = None
    task_vectors: Optional[Callable[[Any, float, float], tuple[torch.Tensor, ...]]] = None
    task_scores: Optional[Callable[[torch.Tensor, Sequence[tuple[torch.Tensor, ...]], Any], Iterator]] = None

    @property
    def masked(self) -> bool:
        """False for a scorer without a mask (`"none"`: the delta covers every entry)."""
        return self.initial_scores is not None

    @property
    def needs_data(self) -> bool:
        """True when `compute_importance` needs calibration data to choose the mask."""
        return self.statistics is not None


SCORERS: dict[str, Scorer] = {
    scorer.name: scorer
    for scorer in (
        Scorer("mazo", magnitude_scores, "moments", task_vectors=mazo_vectors, task_scores=mazo_block_scores),
        Scorer("wanda", magnitude_scores, "squares", task_vectors=wanda_vectors, task_scores=wanda_block_scores),
        Scorer("magnitude", magnitude_scores),
        Scorer("random", random_scores),
        Scorer("none", initial_scores=None),
    )
}
"""Every scorer by name, in the order the docs list them. A new scorer is one more entry (and its name in the
`Literal` of `MaZOConfig.scorer`, which the tests check against this table)."""


def get_scorer(name: str) -> Scorer:
    """The scorer called `name`; `ValueError` naming the known scorers otherwise."""
    scorer = SCORERS.get(name) if isinstance(name, str) else None
    if scorer is None:
        raise ValueError(f"Unknown MaZO scorer {name!r}; the known scorers are {tuple(SCORERS)}.")
    return scorer
