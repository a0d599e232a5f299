"""The ZO-SGD update rule as functions (as `torch.optim.sgd` keeps `sgd()` beside `SGD`), given the step's z.

SGD: `θ ← θ(1 - lr·wd) - lr ĝ z`. Momentum μ > 0 (torch.optim.SGD's convention, no dampening):
`m ← μ m + (ĝ z + wd θ)` (`m = ĝ z + wd θ` on the first step), `θ ← θ - lr m`.
"""

from __future__ import annotations

from typing import Any

import torch


def zo_sgd_update_(
    param: torch.Tensor,
    direction: torch.Tensor,
    projected_grad: float,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    state: dict[str, Any],
) -> None:
    """Update one tensor in place, given its z (a fresh tensor this function may overwrite) and ĝ; the momentum
    buffer lives in `state["momentum_buffer"]`."""
    if momentum == 0.0:
        if weight_decay:
            param.mul_(1.0 - lr * weight_decay)
        param.add_(direction, alpha=-lr * projected_grad)
        return
    update = direction.mul_(projected_grad)
    if weight_decay:
        update.add_(param, alpha=weight_decay)
    buffer = state.get("momentum_buffer")
    if buffer is None:
        state["momentum_buffer"] = buffer = update
    else:
        buffer.mul_(momentum).add_(update)
    if lr:
        param.add_(buffer, alpha=-lr)


def zo_sgd_foreach_update_(
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
    projected_grad: float,
    *,
    lr: float,
    weight_decay: float,
) -> None:
    """Plain SGD (no momentum) on a list of tensors with multi-tensor operations; `directions` are not modified."""
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, directions, alpha=-lr * projected_grad)
