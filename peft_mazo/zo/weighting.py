"""Task weightings for multi-task zeroth-order steps (MAZO_SPEC §1, §6).

Under ZO every task's gradient estimate is a scalar multiple of the same direction `z`: the per-task projected
gradients `ĝ_t = (L_t(θ + εz) - L_t(θ - εz)) / (2ε)` are combined into one scalar `ĝ = Σ_t w_t ĝ_t`, and the step is
`θ ← θ - η ĝ z`. A weighting only chooses the `w_t`; this module holds the interface the optimizer calls and the
weightings that need no extra data. FAMO and CoBa (MAZO_SPEC §6) plug into the same interface:

- FAMO needs every task's loss before and after a step: `weights()` sees the losses of the current step (their mean
  `(L⁺ + L⁻) / 2` estimates `L_t(θ)`), and `update()` is called after the step with the same losses, so FAMO can keep
  the previous step's losses and use the current ones as its `L'_t` (no extra forward).
- CoBa needs validation losses, which the training loop feeds in through `observe_validation()`.

Every tensor the optimizer passes in is a float64 CPU tensor of shape (T,); `weights()` returns (T,) weights
(anything `torch.as_tensor` accepts). The optimizer checks the shape and finiteness of what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch


class TaskWeighting:
    """Interface of a multi-task loss weighting for `ZOSGD` (subclass it; the base class weights tasks equally).

    The optimizer calls, for every step that is taken (not for steps skipped because a loss was not finite):

    1. `weights(step, losses_plus, losses_minus)` -> (T,) weights `w_t`, after both forward passes;
    2. `update(step, losses_plus, losses_minus, projected_grads, weights)` after the parameters were updated.

    `state_dict()` / `load_state_dict()` are saved with the optimizer's state, so a resumed run continues with the same
    weighting state. Keep the state to tensors and Python numbers/lists/dicts (it is loaded with
    `torch.load(weights_only=True)` by the HF Trainer).
    """

    def weights(self, step: int, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        """Task weights for this step.

        Args:
            step (`int`): index of the optimizer step (0-based; also counts skipped steps).
            losses_plus (`torch.Tensor`): (T,) float64 losses at `θ + εz`, averaged over micro-batches.
            losses_minus (`torch.Tensor`): (T,) float64 losses at `θ - εz`.

        Returns:
            `torch.Tensor` of shape (T,): the weights `w_t` of `ĝ = Σ_t w_t ĝ_t`.
        """
        num_tasks = losses_plus.numel()
        return torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def update(
        self,
        step: int,
        losses_plus: torch.Tensor,
        losses_minus: torch.Tensor,
        projected_grads: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Hook called after a step was applied (all tensors (T,) float64 on CPU). No-op by default."""

    def observe_validation(self, step: int, losses: Union[torch.Tensor, Sequence[float]]) -> None:
        """Feed per-task validation losses (T,) measured at optimizer step `step` (CoBa uses them). No-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """The weighting's state (tensors and Python scalars/containers only)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state returned by `state_dict()`."""


class EqualWeighting(TaskWeighting):
    """`w_t = 1 / T` for every task (the default, MTL-ZO in the paper). Stateless."""


class StaticWeighting(TaskWeighting):
    """Fixed user-given weights `w_t` (e.g. to emphasise one task, or `[1, 0, ...]` to train on one task only).

    Args:
        weights (`Sequence[float]` or `torch.Tensor`): (T,) non-negative weights. They are used as given, not
            normalised, so that the caller decides the scale of the step.
    """

    def __init__(self, weights: Union[Sequence[float], torch.Tensor]) -> None:
        values = torch.as_tensor(weights, dtype=torch.float64).flatten().clone()
        if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"StaticWeighting needs a non-empty list of finite weights >= 0, got {values.tolist()}.")
        self._weights = values

    def weights(self, step: int, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        if losses_plus.numel() != self._weights.numel():
            raise ValueError(
                f"StaticWeighting has {self._weights.numel()} weights but the closure returned "
                f"{losses_plus.numel()} task losses; give one weight per task."
            )
        return self._weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self._weights.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "weights" in state_dict:
            self._weights = torch.as_tensor(state_dict["weights"], dtype=torch.float64).flatten().clone()


class FAMOWeighting(TaskWeighting):
    """FAMO (Liu et al., 2024), MAZO_SPEC §6, under ZO: `w_t = c · z_t / L̃_t` with `z = softmax(ξ)`,
    `c = (Σ_t z_t / L̃_t)⁻¹`, and after every step `ξ` moves by Adam on the gradient `Jᵀ d`, where
    `d_t = log L̃_t(previous step) − log L̃_t(this step)` and `J = diag(z) − z zᵀ`.

    `L_t` is the step's loss estimate `(L⁺_t + L⁻_t) / 2`; the next step's losses (new batches) serve as `L'_t`, so FAMO
    costs no extra forward. The shifted loss is `L̃_t = max(L_t − m_t, 0) + epsilon` with fixed lower bounds `m_t`
    (default 0, as in FAMO's reference code). MAZO_SPEC reads the shift as a *running* minimum; we do not: with noisy
    mini-batch losses every improving task then sits at `L̃ ≈ epsilon`, `d` becomes equal across tasks and `Jᵀ d`
    vanishes, so the weighting never moves.

    Args:
        num_tasks (`int`): T.
        lr (`float`): Adam learning rate of the logits (FAMO's reference code: 0.025).
        weight_decay (`float`): γ, decay of the logits (reference: 0.01).
        epsilon (`float`): added to the shifted losses so that `log` and `1/L̃` stay finite.
        min_losses (`Sequence[float]`, *optional*): (T,) lower bounds `m_t` of the losses; default zeros.
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        weight_decay: float = 0.01,
        epsilon: float = 1e-8,
        min_losses: Optional[Sequence[float]] = None,
    ) -> None:
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, requires_grad=True)
        self._adam = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self.epsilon = epsilon
        bounds = torch.zeros(num_tasks) if min_losses is None else torch.as_tensor(min_losses)
        self.min_losses = bounds.to(torch.float64)
        self.previous: Optional[torch.Tensor] = None

    def _shifted(self, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        """(T,) `L̃`, on the CPU in float64 (where the logits live), whatever device the losses come from."""
        mean = ((losses_plus + losses_minus) / 2).detach().to("cpu", torch.float64)
        return (mean - self.min_losses).clamp_min(0.0) + self.epsilon

    def weights(self, step: int, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        z = torch.softmax(self.logits.detach(), dim=0)
        inverse = z / self._shifted(losses_plus, losses_minus)
        return inverse / inverse.sum()

    def update(self, step, losses_plus, losses_minus, projected_grads, weights) -> None:
        current = self._shifted(losses_plus, losses_minus)
        if self.previous is not None:
            d = self.previous.log() - current.log()
            z = torch.softmax(self.logits.detach(), dim=0)
            jacobian = torch.diag(z) - torch.outer(z, z)
            self._adam.zero_grad()
            self.logits.grad = jacobian.T @ d
            self._adam.step()
        self.previous = current

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().clone(),
            "adam": self._adam.state_dict(),
            "previous": None if self.previous is None else self.previous.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with torch.no_grad():
            self.logits.copy_(state_dict["logits"])
        self._adam.load_state_dict(state_dict["adam"])
        self.previous = None if state_dict["previous"] is None else state_dict["previous"].clone()


class CoBaWeighting(TaskWeighting):
    """CoBa (Gong et al., 2024), MAZO_SPEC §6: weights from the slopes of the tasks' validation-loss curves.

    The training loop calls `observe_validation(step, losses)` every few steps with per-task validation losses on fixed
    batches. With `r_t(j) = L_val_t(j) / L_val_t(0)` and `α_t` the least-squares slope of the last `window` ratios
    against the observation index:

    - `RCS = softmax(T · α / Σ_t |α_t|)` (faster-converging tasks get less),
    - `ACS = softmax(−N · α / Σ_{last window} |α_t(j)|)` with N the slopes in that window (`window` once enough
      exist) (diverging tasks get less),
    - `DF = min(n · softmax_j(j · α_max(j) / Σ_{k ≤ j} α_max(k))[last], 1)` over the n slopes seen so far,
    - `w = DF · RCS + (1 − DF) · ACS`; equal weights until `warmup` observations exist.

    Our reading of DF: the softmax over the history is multiplied by its length n so that a flat history gives 1
    (without it, "min(·, 1)" could never bind).

    Args:
        num_tasks (`int`): T.
        window (`int`): N, validation observations in a slope (paper: 5 M = 20).
        warmup (`int`): W, observations before the weighting starts (paper: M = 4).
    """

    def __init__(self, num_tasks: int, window: int = 20, warmup: int = 4) -> None:
        if window < 2 or warmup < 2:
            raise ValueError(f"CoBaWeighting needs window >= 2 and warmup >= 2, got {window} and {warmup}.")
        self.num_tasks = num_tasks
        self.window = window
        self.warmup = warmup
        self.ratios: list[list[float]] = []  # per observation, (T,) L_val / L_val(0)
        self.first: Optional[list[float]] = None
        self.slopes: list[list[float]] = []  # per observation after the second, (T,) slopes
        self._weights = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def observe_validation(self, step: int, losses: Union[torch.Tensor, Sequence[float]]) -> None:
        # the history is kept on the CPU in float64, whatever device the losses come from (a model on a GPU)
        values = torch.as_tensor(losses, dtype=torch.float64).detach().cpu().flatten()
        if values.numel() != self.num_tasks or not bool(torch.isfinite(values).all()):
            raise ValueError(f"CoBa expects {self.num_tasks} finite validation losses, got {values.tolist()}.")
        if self.first is None:
            self.first = values.clamp_min(1e-12).tolist()
        self.ratios.append((values / torch.tensor(self.first, dtype=torch.float64)).tolist())
        if len(self.ratios) >= 2:
            recent = torch.tensor(self.ratios[-self.window :], dtype=torch.float64)  # (n, T)
            x = torch.arange(recent.shape[0], dtype=torch.float64)
            x = x - x.mean()
            slope = (x[:, None] * (recent - recent.mean(dim=0))).sum(dim=0) / (x**2).sum()
            self.slopes.append(slope.tolist())
        if len(self.ratios) >= self.warmup:
            self._weights = self._combine()

    def _combine(self) -> torch.Tensor:
        slopes = torch.tensor(self.slopes, dtype=torch.float64)  # (n, T)
        alpha = slopes[-1]
        tiny = 1e-12
        rcs = torch.softmax(self.num_tasks * alpha / (alpha.abs().sum() + tiny), dim=0)
        recent = slopes[-self.window :]
        acs = torch.softmax(-recent.shape[0] * alpha / (recent.abs().sum(dim=0) + tiny), dim=0)
        alpha_max = slopes.max(dim=1).values  # (n,)
        index = torch.arange(1, alpha_max.numel() + 1, dtype=torch.float64)
        # signed: while every task converges, α_max and its running sum are both negative and the trend is positive;
        # a task turning to divergence (α_max > 0) makes it negative and DF small, so that ACS cuts that task
        cumulative = alpha_max.cumsum(dim=0)
        cumulative = torch.where(cumulative.abs() < tiny, torch.full_like(cumulative, tiny), cumulative)
        trend = index * alpha_max / cumulative
        divergence = min(float(alpha_max.numel() * torch.softmax(trend, dim=0)[-1]), 1.0)
        return divergence * rcs + (1.0 - divergence) * acs

    def weights(self, step: int, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        return self._weights

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": self.ratios, "first": self.first, "slopes": self.slopes, "weights": self._weights.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ratios = [list(r) for r in state_dict["ratios"]]
        self.first = None if state_dict["first"] is None else list(state_dict["first"])
        self.slopes = [list(s) for s in state_dict["slopes"]]
        self._weights = state_dict["weights"].clone()


WEIGHTINGS = {"equal": EqualWeighting, "famo": FAMOWeighting, "coba": CoBaWeighting}


def make_weighting(name: str, num_tasks: int, **kwargs: Any) -> TaskWeighting:
    """The task weighting called `name` ("equal", "famo" or "coba") for `num_tasks` tasks."""
    if name not in WEIGHTINGS:
        raise ValueError(f"Unknown task weighting '{name}'; known: {', '.join(WEIGHTINGS)}.")
    if name == "equal":
        return EqualWeighting()
    return WEIGHTINGS[name](num_tasks, **kwargs)
