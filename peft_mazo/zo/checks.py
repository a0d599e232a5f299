"""What `ZOSGD` checks in its input: hyperparameters, closures and the losses they return (`ValueError` with the
problem and the fix, before any tensor is touched)."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import nn

from .._checks import is_finite_number, is_int, is_number
from ..layer import MaZOLayer
from ..scorers import SCORERS
from .perturbation import PERTURBATION_MODES
from .weighting import TaskWeighting


Closure = Callable[[], Union[torch.Tensor, float]]


def check_hyperparameters(lr: Any, weight_decay: Any, momentum: Any, where: str = "ZOSGD") -> None:
    """Raise `ValueError` for a negative/non-finite lr or weight decay, or a momentum outside [0, 1)."""
    if not is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(
            f"{where}: lr must be a finite number >= 0, got {lr!r}. Use lr = 0 to evaluate without updating; a "
            "negative learning rate would ascend the loss."
        )
    if not is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    if not is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1) (0 disables it), got {momentum!r}.")


def as_closures(closure: Any) -> list[Closure]:
    """A closure or a non-empty sequence of closures (micro-batches) -> list; `ValueError` otherwise."""
    if closure is None:
        raise ValueError(
            "ZOSGD.step needs a closure that runs a forward pass and returns the loss, e.g. "
            "`opt.step(lambda: model(**batch).loss)`: a zeroth-order step has no gradients to apply."
        )
    if callable(closure):
        return [closure]
    if isinstance(closure, (list, tuple)) and closure and all(callable(c) for c in closure):
        return list(closure)
    raise ValueError(
        f"ZOSGD.step takes a callable closure or a non-empty list of them (one per micro-batch), got "
        f"{type(closure).__name__}."
    )


def call_closure(closure: Closure) -> Any:
    """Run a closure; a `backward()` inside it (which fails under ZOSGD's no_grad) gets a message that says why."""
    try:
        return closure()
    except RuntimeError as error:
        if "does not require grad" not in str(error):
            raise
        raise RuntimeError(
            "The closure passed to ZOSGD.step called backward(): ZOSGD closures return the loss and never call "
            "backward (a zeroth-order step needs forward passes only, and runs them under torch.no_grad()). Return "
            "`model(**batch).loss` without `.backward()`. The parameters were not changed."
        ) from error


def loss_vector(value: Any) -> torch.Tensor:
    """The closure's return value as a detached 1-D tensor of T >= 1 losses; `ValueError` for anything else."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(
                f"The closure passed to ZOSGD.step returned a {value.dtype} tensor; return the loss as a floating "
                "point tensor (e.g. `accuracy.float()`)."
            )
        if value.dim() == 0:
            return value.detach().reshape(1)
        if value.dim() == 1 and value.numel() > 0:
            return value.detach()
        raise ValueError(
            "The closure passed to ZOSGD.step must return a scalar loss or a 1-D tensor of per-task losses, got a "
            f"tensor of shape {tuple(value.shape)}."
        )
    if is_number(value):
        return torch.tensor([float(value)], dtype=torch.float64)
    hint = " (a model output? return `model(**batch).loss`)" if hasattr(value, "loss") else ""
    raise ValueError(
        "The closure passed to ZOSGD.step must return the loss as a torch.Tensor (a scalar, or a 1-D tensor of "
        f"per-task losses) or a Python float, got {type(value).__name__}{hint}."
    )


def mean_losses(values: list[torch.Tensor]) -> torch.Tensor:
    """(T,) float64 mean over micro-batches of per-micro-batch (T,) losses (on the first one's device)."""
    num_tasks = values[0].numel()
    if any(v.numel() != num_tasks for v in values):
        raise ValueError(
            "The closures passed to ZOSGD.step returned different numbers of task losses "
            f"({sorted({v.numel() for v in values})}); every call must return the same T losses."
        )
    device = values[0].device
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).mean(dim=0)


def check_arguments(
    model: Any,
    lr: Any,
    eps: Any,
    weight_decay: Any,
    momentum: Any,
    seed: Any,
    weighting: Any,
    max_consecutive_skips: Any,
    perturbation: Any,
) -> None:
    """`ZOSGD`'s constructor arguments: `TypeError` / `ValueError` naming the argument and the fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"ZOSGD takes the model first (it runs the closures and owns the trainable tensors), got "
            f"{type(model).__name__}. Use ZOSGD(model, lr=...)."
        )
    check_hyperparameters(lr, weight_decay, momentum)
    if not is_finite_number(eps) or eps <= 0:
        raise ValueError(f"ZOSGD: eps must be a finite number > 0 (MeZO/MaZO default 1e-3), got {eps!r}.")
    if not is_int(seed):
        raise ValueError(f"ZOSGD: seed must be an integer, got {seed!r}.")
    if max_consecutive_skips is not None and (not is_int(max_consecutive_skips) or max_consecutive_skips < 1):
        raise ValueError(
            f"ZOSGD: max_consecutive_skips must be None or an integer >= 1, got {max_consecutive_skips!r}."
        )
    if perturbation not in PERTURBATION_MODES:
        raise ValueError(f"ZOSGD: perturbation must be one of {PERTURBATION_MODES}, got {perturbation!r}.")
    if weighting is not None and not isinstance(weighting, TaskWeighting):
        raise ValueError(
            f"ZOSGD: weighting must be a peft_mazo.TaskWeighting, got {type(weighting).__name__}; subclass "
            "TaskWeighting to add one."
        )


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a `torch.distributed` `DTensor` (e.g. a parameter sharded by FSDP2); no DTensor exists before
    `torch.distributed.tensor` is imported, so this never imports it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def check_trainable_tensor(p: Any, model_param_ids: set[int]) -> None:
    """A tensor given to `ZOSGD` must be a trainable floating-point parameter of the model on a real device."""
    if not isinstance(p, torch.Tensor) or not p.is_floating_point():
        raise ValueError(
            f"ZOSGD can only train floating-point tensors, got {type(p).__name__} of dtype "
            f"{getattr(p, 'dtype', None)} (quantized base weights are frozen and never trained)."
        )
    if not p.requires_grad:
        raise ValueError(
            f"ZOSGD was given a tensor of shape {tuple(p.shape)} with requires_grad=False: frozen weights are "
            "never perturbed or written. Pass only trainable parameters (the default selects them)."
        )
    if is_dtensor(p):
        raise ValueError(
            f"ZOSGD was given a sharded tensor (DTensor) of shape {tuple(p.shape)}: FSDP sharded the adapter "
            "itself. ZOSGD perturbs and updates full adapter tensors with the same z on every rank, so the "
            "adapter must stay replicated: shard only the frozen base with peft_mazo.sharding.shard_base(model) "
            "(fully_shard with ignored_params=the adapter's tensors)."
        )
    if p.device.type == "meta":
        raise ValueError(
            f"ZOSGD was given a tensor of shape {tuple(p.shape)} on the meta device (an offloaded module?): "
            "trainable tensors must live on a real device. With device_map='auto', give the model enough GPU "
            "memory (max_memory) that no adapted layer is offloaded to 'cpu' or 'disk'."
        )
    if id(p) not in model_param_ids:
        raise ValueError(
            f"ZOSGD was given a tensor of shape {tuple(p.shape)} that is not a parameter of the model; the "
            "closure could not see its perturbation."
        )


def no_trainable_error(model: nn.Module) -> ValueError:
    """The error for a model without trainable tensors, with the fix that applies to it."""
    if any(isinstance(m, MaZOLayer) for m in model.modules()):
        return ValueError(
            "ZOSGD found no trainable parameters: the model holds a MaZO adapter loaded for inference "
            "(PeftModel.from_pretrained freezes it by default). Load it with "
            "PeftModel.from_pretrained(base, path, is_trainable=True) to train it further."
        )
    return ValueError(
        "ZOSGD found no trainable parameters: every parameter of the model has requires_grad=False. Wrap "
        "the model with a MaZO adapter first (peft.get_peft_model(model, peft_mazo.MaZOConfig(...))), or "
        "pass the tensors to train with `params=`."
    )


def warn_if_mask_pending(model: nn.Module) -> None:
    """Say once when an adapter meant to get a data-driven mask still has the data-free |W| mask it was created with:
    training would silently run with another mask than the one configured."""
    pending = sorted({name for m in model.modules() if isinstance(m, MaZOLayer) for name in m.mazo_mask_pending})
    if pending:
        data_driven = " or ".join(f"'{name}'" for name, scorer in SCORERS.items() if scorer.needs_data)
        warnings.warn(
            f"ZOSGD: the MaZO adapter(s) {pending} use a data-driven mask (scorer {data_driven}) that has not been "
            "computed: the mask is still the data-free |W| one the adapter was created with. Call "
            "model.compute_importance({task: loader, ...}) before training, or create the adapter with "
            "scorer='magnitude' to train with the |W| mask on purpose.",
            UserWarning,
            stacklevel=3,
        )
