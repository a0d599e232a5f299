"""`ZOSGD`: exact, seed-regenerated (masked) zeroth-order SGD over the trainable state of a model (MAZO_SPEC §1).

One step, for trainable parameters θ (the MaZO adapter's (out, k) values, or its LoRA A and B) and a direction
z ~ N(0, I) regenerated from `(seed, step, tensor index)`:

    L⁺ = L(θ + εz),  L⁻ = L(θ - εz)                      # two forward passes, no backward
    ĝ_t = (L⁺_t - L⁻_t) / (2ε)                            # per-task projected gradients (T = 1 for a scalar loss)
    ĝ = Σ_t w_t ĝ_t                                        # task weights from a `TaskWeighting` (equal by default)
    θ ← θ - lr · (ĝ z + wd · θ)                            # or with momentum: m ← μ m + ĝ z + wd θ; θ ← θ - lr m

Exactness. The perturbed forwards never write θ (`zo.perturbation`: each trainable tensor points at a copy holding
θ ± εz while a forward runs), so the parameters after a step are bit-for-bit `θ` plus the update, and exactly `θ` when
the update is skipped (lr = 0, non-finite loss, an exception in the closure). The frozen base weights (fp32, bf16,
bitsandbytes 4-bit) are never touched at all. `perturbation="eager"` keeps z and the perturbed copy for the whole step
(fast), "lazy" perturbs one MaZO layer at a time inside its forward and regenerates z (lean), "auto" (default) picks
eager up to `EAGER_MAX_BYTES` (1 GiB) of extra memory.

The parts: `zo.directions` (the seed stream), `zo.perturbation` (θ ± εz in the forwards), `zo.checks` (input and
closure checks), `zo.update` (the update rule as functions) and this module (`ZOSGD`: the step and its state).

Randomness. z comes from a dedicated `torch.Generator` per device, reseeded for every tensor of every step from
`(seed, step, tensor index)`, so both modes draw the very same z. The global RNG (`torch.get_rng_state()`, CUDA's) is
never used, and resuming from `state_dict()` regenerates the same z for the same step.

Data parallel (`torch.distributed`, see docs/distributed.md). Every rank draws the same z (same seed stream, checked at
construction), evaluates the closures on its own shard of the batch, and the stacked (2, T) loss pair is averaged over
the ranks with ONE all-reduce per step, right where L⁺ and L⁻ are known; every rank then computes the same ĝ and applies
the identical update (and agrees on skipping a non-finite step). No gradient or parameter crosses the wire.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .. import distributed as _dist
from .checks import (
    Closure,
    as_closures,
    call_closure,
    check_arguments,
    check_hyperparameters,
    check_trainable_tensor,
    loss_vector,
    mean_losses,
    no_trainable_error,
    warn_if_mask_pending,
)
from .directions import DirectionStream, tensor_seed
from .perturbation import EAGER_MAX_BYTES, PERTURBATION_MODES, Perturbation
from .result import ZOStepResult
from .update import zo_sgd_foreach_update_, zo_sgd_update_
from .weighting import EqualWeighting, TaskWeighting


__all__ = ["EAGER_MAX_BYTES", "PERTURBATION_MODES", "ZOSGD", "ZOStepResult", "tensor_seed"]

ParamsArg = Union[Iterable[nn.Parameter], Iterable[dict[str, Any]]]


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO-style SPSA) over the trainable state of `model`, exact and forward-only.

    Works on any model whose trainable parameters are read in its forward; with a MaZO adapter these are the masked
    (out, k) values (dense mode) or LoRA A (r, in) and B (out, r), and the (masked) update is exactly MaZO. Build it
    after the model is on its final device (momentum buffers are created where the parameters are).

    Example:

        ```py
        >>> opt = peft_mazo.ZOSGD(model, lr=3e-4, eps=1e-3, seed=0)
        >>> loss = opt.step(lambda: model(**batch).loss)  # two forwards, no backward
        >>> loss = opt.step([lambda b=b: model(**b).loss for b in micro_batches])  # accumulation: one shared z
        ```

    Args:
        model (`torch.nn.Module`): the model the closures run (e.g. a `PeftModel` with a MaZO adapter).
        lr (`float`): learning rate (>= 0). Stored in the param groups, so `torch.optim.lr_scheduler` works.
        eps (`float`): perturbation scale ε (> 0). Paper / MeZO default: 1e-3.
        weight_decay (`float`): `θ ← θ - lr · wd · θ` added to the step (>= 0).
        momentum (`float`): ZO-SGD with momentum (ZO-SGD-MMT) when > 0: `m ← μ m + ĝ z + wd θ`, `θ ← θ - lr m`.
            Costs one buffer of the trainable state's size.
        seed (`int`): seed of the direction stream; z of step s is a function of (seed, s) only.
        params (iterable of `nn.Parameter` or of param-group dicts, *optional*): the tensors to train, all of them
            `requires_grad=True` parameters of `model`. Defaults to every parameter of `model` with `requires_grad`.
        weighting (`TaskWeighting`, *optional*): how per-task losses are combined when the closure returns a 1-D
            tensor (default: `EqualWeighting`).
        max_consecutive_skips (`int`, *optional*): raise `RuntimeError` after this many steps in a row were skipped
            for a non-finite loss. None (default): never raise.
        perturbation (`str`): "eager": every tensor perturbed for the whole pass, z drawn once per step (fast; two
            extra copies of the trainable state). "lazy": MaZO layers' tensors perturbed inside their own forward,
            one layer at a time, z regenerated (lean). "auto" (default): eager up to `EAGER_MAX_BYTES` of extra
            memory, else lazy. Use "eager" if a MaZO layer's tensors are read outside its forward.
        distributed (`bool`, *optional*): data-parallel mode: the (2, T) losses of every step are averaged over the
            ranks of the default process group with one all-reduce (each rank's closures should see an equal-size
            shard of the batch, so that the mean over ranks is the full-batch loss). None (default): on when a process
            group with more than one rank is initialised. The constructor checks (a collective) that every rank has
            the same seed, eps and trainable shapes, and raises `DistributedSyncError` otherwise.

    Attributes:
        last_step (`ZOStepResult` or `None`): what the last step measured (losses, per-task projected gradients).
        state["zo"] (`dict`): `seed`, `step` (position in the seed stream), `eps`, `skipped_steps`,
            `consecutive_skips` and the weighting's state; saved by `state_dict()`.
        distributed (`bool`): whether steps all-reduce the losses.
        comm_bytes (`int`): payload bytes all-reduced by all steps so far (`last_step.comm_bytes` per step).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        seed: int = 0,
        *,
        params: Optional[ParamsArg] = None,
        weighting: Optional[TaskWeighting] = None,
        max_consecutive_skips: Optional[int] = None,
        perturbation: Literal["auto", "eager", "lazy"] = "auto",
        distributed: Optional[bool] = None,
    ) -> None:
        check_arguments(model, lr, eps, weight_decay, momentum, seed, weighting, max_consecutive_skips, perturbation)

        self._model_param_ids = {id(p) for p in model.parameters()}
        self._planned = False
        if params is None:
            groups: list[Any] = [p for p in model.parameters() if p.requires_grad]
        else:
            groups = list(params)
            if groups and isinstance(groups[0], dict):
                groups = [dict(g, params=_as_param_list(g.get("params", []))) for g in groups]
                groups = [g for g in groups if g["params"]]
        if not groups:
            raise no_trainable_error(model)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(groups, defaults)

        self.model = model
        self.weighting: TaskWeighting = weighting if weighting is not None else EqualWeighting()
        self.max_consecutive_skips = max_consecutive_skips
        self.perturbation = perturbation
        self.last_step: Optional[ZOStepResult] = None
        self.directions = DirectionStream()
        self._warned_nonfinite = False
        self.state["zo"] = {
            "seed": int(seed),
            "step": 0,
            "eps": float(eps),
            "skipped_steps": 0,
            "consecutive_skips": 0,
            "weighting": {},
        }
        self._plan()
        warn_if_mask_pending(model)
        self.comm_bytes = 0
        self.distributed = _dist.is_distributed() if distributed is None else bool(distributed)
        if self.distributed:
            if not _dist.is_distributed():
                raise ValueError(
                    "ZOSGD(distributed=True) needs an initialised torch.distributed process group with more than one "
                    "rank; call peft_mazo.distributed.init_from_env() under torchrun, or pass distributed=False."
                )
            shapes = [tuple(p.shape) for p in self._params()]
            _dist.assert_same_on_all_ranks(
                (int(seed), float(eps), shapes), "ZOSGD's seed stream and trainable state (seed, eps, shapes)"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # parameters and the perturbation plan
    # ----------------------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking that its tensors are trainable floating-point parameters of the model."""
        params = _as_param_list(param_group["params"])
        param_group = dict(param_group, params=params)
        for p in params:
            check_trainable_tensor(p, self._model_param_ids)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameters(group["lr"], group["weight_decay"], group["momentum"])
        if self._planned:
            self._plan()

    def _plan(self) -> None:
        """Index the trainable tensors and decide, per tensor, where its perturbation is applied."""
        self.perturbation_plan = Perturbation(self.model, list(self._params()), self.perturbation, self.directions)
        self._planned = True

    @property
    def mode(self) -> str:
        """The perturbation mode in use: "eager" or "lazy" ("auto" resolved)."""
        return self.perturbation_plan.mode

    @property
    def _param_index(self) -> dict[torch.Tensor, int]:
        return self.perturbation_plan.param_index

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    @property
    def num_trainable(self) -> int:
        """Number of trainable values (the ZO dimension d)."""
        return sum(p.numel() for p in self._params())

    @torch.no_grad()
    def perturbation_direction(self, step: Optional[int] = None) -> list[torch.Tensor]:
        """Regenerate the direction z of optimizer step `step` (default: the last step), one tensor per parameter in
        param-group order. For analysis and tests; costs one copy of the trainable state."""
        if step is None:
            step = self.state["zo"]["step"] - 1
        if step < 0:
            raise ValueError("No step has been taken yet; pass step=0 for the direction of the first step.")
        seed = self.state["zo"]["seed"]
        return [self.directions.draw(seed, step, self._param_index[p], p) for p in self._params()]

    # ----------------------------------------------------------------------------------------------------------------
    # the step
    # ----------------------------------------------------------------------------------------------------------------
    def _check_groups(self) -> None:
        for group in self.param_groups:
            check_hyperparameters(group["lr"], group["weight_decay"], group["momentum"], where="ZOSGD param group")

    @torch.no_grad()
    def step(self, closure: Union[Closure, Sequence[Closure], None] = None) -> torch.Tensor:  # type: ignore[override]
        """One ZO step: the + forwards of every closure, the - forwards of every closure, then the update.

        Args:
            closure (callable or list of callables): each runs a forward pass and returns the loss: a scalar, a 1-D
                (T,) tensor of per-task losses, or a Python float (any objective, differentiable or not). Several
                closures are micro-batches that share one z; their losses are averaged.

        Returns:
            `torch.Tensor`: 0-d float32 `Σ_t w_t (L⁺_t + L⁻_t) / 2` on the losses' device (see `ZOStepResult`).
        """
        closures = as_closures(closure)
        self._check_groups()
        zo = self.state["zo"]
        step, eps = int(zo["step"]), float(zo["eps"])

        with self.perturbation_plan.passes(zo["seed"], step) as set_scale:
            set_scale(eps)
            plus = [loss_vector(call_closure(c)) for c in closures]
            set_scale(-eps)
            minus = [loss_vector(call_closure(c)) for c in closures]
        losses_plus, losses_minus = mean_losses(plus), mean_losses(minus)
        if losses_plus.numel() != losses_minus.numel():
            raise ValueError("The closure returned a different number of task losses in the + and - passes.")
        device = losses_plus.device
        both = torch.stack([losses_plus, losses_minus.to(device)])
        comm_bytes = 0
        if self.distributed:  # the step's one collective: the mean of (L+, L-) over the ranks' shards
            _dist.all_reduce_mean_(both)
            comm_bytes = both.numel() * both.element_size()
            self.comm_bytes += comm_bytes
        both = both.cpu()  # the step's one host sync
        losses_plus, losses_minus = both[0], both[1]
        projected_grads = (losses_plus - losses_minus) / (2.0 * eps)

        if not bool(torch.isfinite(both).all()):
            return self._skip(step, losses_plus, losses_minus, projected_grads, device, comm_bytes)

        weights = self._task_weights(step, losses_plus, losses_minus)
        projected_grad = float((weights * projected_grads).sum())
        self._apply_update(step, projected_grad)
        self.weighting.update(
            step, losses_plus.clone(), losses_minus.clone(), projected_grads.clone(), weights.clone()
        )
        zo["step"] = step + 1
        zo["consecutive_skips"] = 0
        loss = float((weights * (losses_plus + losses_minus) / 2.0).sum())
        self.last_step = ZOStepResult(
            step, loss, losses_plus, losses_minus, projected_grads, weights, projected_grad, False, comm_bytes
        )
        return torch.tensor(loss, dtype=torch.float32, device=device)

    def _task_weights(self, step: int, losses_plus: torch.Tensor, losses_minus: torch.Tensor) -> torch.Tensor:
        num_tasks = losses_plus.numel()
        weights = self.weighting.weights(step, losses_plus.clone(), losses_minus.clone())
        weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().flatten()
        if weights.numel() != num_tasks or not bool(torch.isfinite(weights).all()):
            raise ValueError(
                f"{type(self.weighting).__name__}.weights must return {num_tasks} finite task weights, got "
                f"{weights.tolist()}."
            )
        return weights

    def _skip(
        self,
        step: int,
        losses_plus: torch.Tensor,
        losses_minus: torch.Tensor,
        projected_grads: torch.Tensor,
        device: torch.device,
        comm_bytes: int = 0,
    ) -> torch.Tensor:
        """A loss was not finite: leave θ as it was (it was never written), count, warn once, maybe raise."""
        zo = self.state["zo"]
        zo["step"] = step + 1
        zo["skipped_steps"] += 1
        zo["consecutive_skips"] += 1
        loss = float(((losses_plus + losses_minus) / 2.0).mean())
        self.last_step = ZOStepResult(
            step, loss, losses_plus, losses_minus, projected_grads, None, float("nan"), True, comm_bytes
        )
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"ZOSGD step {step}: a loss was not finite (L+ = {losses_plus.tolist()}, L- = {losses_minus.tolist()}); "
                "the step was skipped and the parameters left exactly as they were. Further skips are counted in "
                "optimizer.state['zo']['skipped_steps'] without warning. Check the data, or lower lr / eps.",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.max_consecutive_skips is not None and zo["consecutive_skips"] >= self.max_consecutive_skips:
            raise RuntimeError(
                f"ZOSGD skipped {zo['consecutive_skips']} steps in a row because the loss was not finite "
                f"(max_consecutive_skips={self.max_consecutive_skips}); the parameters are unchanged since the last "
                "finite step. Check the data and the model, or lower lr / eps."
            )
        return torch.tensor(loss, dtype=torch.float32, device=device)

    @torch.no_grad()
    def _apply_update(self, step: int, projected_grad: float) -> None:
        """Apply the update of every param group with the step's z (kept in eager mode, regenerated in lazy mode).

        Plain SGD in eager mode is two multi-tensor operations per group; momentum, lazy mode or an overridden
        `_update_param` go tensor by tensor through `_update_param`."""
        eager = self.mode == "eager"
        seed = self.state["zo"]["seed"]
        directions = self.directions.of_step(seed, step, self._param_index) if eager else None
        for group in self.param_groups:
            if group["lr"] == 0.0 and group["momentum"] == 0.0:
                continue  # nothing can change: skip (lr = 0 leaves θ bit-for-bit as it was)
            params = group["params"]
            if eager and group["momentum"] == 0.0 and type(self)._update_param is _PLAIN_UPDATE:
                zs = [directions[self._param_index[p]] for p in params]
                zo_sgd_foreach_update_(params, zs, projected_grad, lr=group["lr"], weight_decay=group["weight_decay"])
                continue
            for param in params:
                index = self._param_index[param]
                direction = directions[index].clone() if eager else self.directions.draw(seed, step, index, param)
                self._update_param(param, direction, projected_grad, group, self.state[param])

    def _update_param(
        self,
        param: torch.Tensor,
        direction: torch.Tensor,
        projected_grad: float,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        """The update rule for one tensor, given its z (a fresh tensor this method may overwrite).

        SGD: `θ ← θ(1 - lr·wd) - lr ĝ z`. Momentum μ > 0 (torch.optim.SGD's convention, no dampening):
        `m ← μ m + (ĝ z + wd θ)` (`m = ĝ z + wd θ` on the first step), `θ ← θ - lr m`. Override this method for other
        rules (e.g. ZO-Adam, keeping its moments in `state`).
        """
        zo_sgd_update_(
            param,
            direction,
            projected_grad,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            state=state,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # state
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def last_projected_grads(self) -> Optional[torch.Tensor]:
        """(T,) per-task projected gradients of the last step (float64, CPU), or None before the first step."""
        return None if self.last_step is None else self.last_step.projected_grads

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (param groups with lr etc., momentum buffers) plus `state["zo"]`: the seed, the
        step (so the same z are regenerated), eps, the skip counters and the weighting's state."""
        self.state["zo"]["weighting"] = self.weighting.state_dict()
        state_dict = super().state_dict()
        state_dict["state"] = dict(state_dict["state"])
        state_dict["state"]["zo"] = _copy_state(self.state["zo"])
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a `state_dict()` (the checkpoint's seed, step and eps win over the constructor's)."""
        if "zo" not in state_dict.get("state", {}):
            raise ValueError(
                "This is not a ZOSGD state dict (no state['zo'] with the seed stream); it was probably saved by "
                "another optimizer."
            )
        super().load_state_dict(state_dict)
        zo = _copy_state(self.state["zo"])
        for key in ("seed", "step", "skipped_steps", "consecutive_skips"):
            zo[key] = int(zo[key])
        zo["eps"] = float(zo["eps"])
        self.state["zo"] = zo
        for key, value in list(self.state.items()):
            if isinstance(key, torch.Tensor):  # own the loaded buffers (torch may alias the caller's tensors)
                self.state[key] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        self.weighting.load_state_dict(zo.get("weighting", {}))
        self.directions.invalidate()


_PLAIN_UPDATE = ZOSGD._update_param  # the multi-tensor update applies only while this rule is the one in use


def _as_param_list(params: Any) -> list[Any]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _copy_state(value: Any) -> Any:
    """Deep copy of nested dicts/lists with tensors cloned (the `zo` entry is small)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_state(v) for v in value)
    return value
