"""`ZOStepResult`: what one `ZOSGD.step` measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ZOStepResult:
    """What one `ZOSGD.step` measured (tensors are float64, on CPU).

    Attributes:
        step (`int`): index of the step (the seed-stream position of its z).
        loss (`float`): `Σ_t w_t (L⁺_t + L⁻_t) / 2`, an O(ε²) estimate of the weighted loss at θ (equal weights when
            the step was skipped).
        losses_plus (`torch.Tensor`): (T,) losses at θ + εz, averaged over micro-batches.
        losses_minus (`torch.Tensor`): (T,) losses at θ - εz.
        projected_grads (`torch.Tensor`): (T,) per-task projected gradients `(L⁺_t - L⁻_t) / (2ε)`.
        weights (`torch.Tensor` or `None`): (T,) task weights used (None when skipped).
        projected_grad (`float`): the combined `ĝ = Σ_t w_t ĝ_t` (NaN when skipped).
        skipped (`bool`): True when a loss was not finite and the parameters were left as they were.
        comm_bytes (`int`): payload bytes all-reduced by this step (`2 · T` float64 values when distributed, else 0).
    """

    step: int
    loss: float
    losses_plus: torch.Tensor
    losses_minus: torch.Tensor
    projected_grads: torch.Tensor
    weights: Optional[torch.Tensor]
    projected_grad: float
    skipped: bool
    comm_bytes: int = 0
