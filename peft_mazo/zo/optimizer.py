"""`ZOSGD`: exact, seed-regenerated (masked) zeroth-order SGD over the trainable state of a model (MAZO_SPEC §1).

One step, for trainable parameters θ (the MaZO adapter's (out, k) values, or its LoRA A and B) and a direction
z ~ N(0, I) regenerated from `(seed, step, tensor index)`:

    L⁺ = L(θ + εz),  L⁻ = L(θ - εz)                      # two forward passes, no backward
    ĝ_t = (L⁺_t - L⁻_t) / (2ε)                            # per-task projected gradients (T = 1 for a scalar loss)
    ĝ = Σ_t w_t ĝ_t                                        # task weights from a `TaskWeighting` (equal by default)
    θ ← θ - lr · (ĝ z + wd · θ)                            # or with momentum: m ← μ m + ĝ z + wd θ; θ ← θ - lr m

Exactness. The perturbed forwards never write θ. For the duration of a module's forward, each of its trainable tensors
points (`param.data = ...`) at a fresh tensor `θ + εz`; when the module returns, the parameter points at the
untouched original again. So the parameters after a step are bit-for-bit `θ` plus the update, and exactly `θ` when
the update is skipped (lr = 0, non-finite loss, an exception in the closure). The frozen base weights (fp32, bf16,
bitsandbytes 4-bit) are never touched at all. Two ways to do the swap (`perturbation=`):

- "eager": every trainable tensor for the whole pass. z of the step is drawn once into buffers kept for the step, and
  the + and - copies and the update are a few multi-tensor (`torch._foreach_*`) operations. Costs two copies of the
  trainable state (z and θ ± εz); the fast path for adapters of small and mid-size models.
- "lazy": inside every MaZO layer's forward (forward pre-/post-hooks registered for the duration of the step only),
  so the perturbed copy costs one layer's trainable tensors at a time and z is regenerated for the + pass, the - pass
  and the update (MeZO's trick: never stored). Other trainable tensors (e.g. `modules_to_save` heads) are swapped for
  the whole pass. The memory-lean path for large adapters.
- "auto" (default): "eager" while the two extra copies take at most `EAGER_MAX_BYTES` (1 GiB), else "lazy".

Randomness. z comes from a dedicated `torch.Generator` per device, reseeded for every tensor of every step from
`(seed, step, tensor index)`, so both modes draw the very same z. The global RNG (`torch.get_rng_state()`, CUDA's) is
never used, and resuming from `state_dict()` regenerates the same z for the same step.

Data parallel (`torch.distributed`, see docs/distributed.md). Every rank draws the same z (same seed stream, checked at
construction), evaluates the closures on its own shard of the batch, and the stacked (2, T) loss pair is averaged over
the ranks with ONE all-reduce per step, right where L⁺ and L⁻ are known; every rank then computes the same ĝ and applies
the identical update (and agrees on skipping a non-finite step). No gradient or parameter crosses the wire.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from .. import distributed as _dist
from ..layer import MaZOLayer
from .weighting import EqualWeighting, TaskWeighting


Closure = Callable[[], Union[torch.Tensor, float]]
ParamsArg = Union[Iterable[nn.Parameter], Iterable[dict[str, Any]]]

_MASK64 = (1 << 64) - 1
PERTURBATION_MODES = ("auto", "eager", "lazy")
EAGER_MAX_BYTES = 2**30
"""`perturbation="auto"` keeps z and the perturbed copy for the whole step (eager) up to this many extra bytes."""


def _splitmix64(value: int) -> int:
    """One round of splitmix64 (a bijective 64-bit mixer), on Python ints."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def tensor_seed(seed: int, step: int, index: int) -> int:
    """The 63-bit seed of the direction of trainable tensor `index` at optimizer step `step` (deterministic)."""
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (step & _MASK64))
    mixed = _splitmix64(mixed ^ (index & _MASK64))
    return mixed >> 1


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


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyperparameters(lr: Any, weight_decay: Any, momentum: Any, where: str = "ZOSGD") -> None:
    """Raise `ValueError` for a negative/non-finite lr or weight decay, or a momentum outside [0, 1)."""
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(
            f"{where}: lr must be a finite number >= 0, got {lr!r}. Use lr = 0 to evaluate without updating; a "
            "negative learning rate would ascend the loss."
        )
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1) (0 disables it), got {momentum!r}.")


def _as_closures(closure: Any) -> list[Closure]:
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


def _call(closure: Closure) -> Any:
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


def _loss_vector(value: Any) -> torch.Tensor:
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
    if _is_number(value):
        return torch.tensor([float(value)], dtype=torch.float64)
    hint = " (a model output? return `model(**batch).loss`)" if hasattr(value, "loss") else ""
    raise ValueError(
        "The closure passed to ZOSGD.step must return the loss as a torch.Tensor (a scalar, or a 1-D tensor of "
        f"per-task losses) or a Python float, got {type(value).__name__}{hint}."
    )


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
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"ZOSGD takes the model first (it runs the closures and owns the trainable tensors), got "
                f"{type(model).__name__}. Use ZOSGD(model, lr=...)."
            )
        _check_hyperparameters(lr, weight_decay, momentum)
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"ZOSGD: eps must be a finite number > 0 (MeZO/MaZO default 1e-3), got {eps!r}.")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"ZOSGD: seed must be an integer, got {seed!r}.")
        if max_consecutive_skips is not None and (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, numbers.Integral)
            or max_consecutive_skips < 1
        ):
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

        self._model_param_ids = {id(p) for p in model.parameters()}
        self._planned = False
        if params is None:
            groups: list[Any] = [p for p in model.parameters() if p.requires_grad]
        else:
            groups = list(params)
            if groups and isinstance(groups[0], dict):
                groups = [dict(g, params=_as_param_list(g.get("params", []))) for g in groups]
                groups = [g for g in groups if g["params"]]
        if not groups and any(isinstance(m, MaZOLayer) for m in model.modules()):
            raise ValueError(
                "ZOSGD found no trainable parameters: the model holds a MaZO adapter loaded for inference "
                "(PeftModel.from_pretrained freezes it by default). Load it with "
                "PeftModel.from_pretrained(base, path, is_trainable=True) to train it further."
            )
        if not groups:
            raise ValueError(
                "ZOSGD found no trainable parameters: every parameter of the model has requires_grad=False. Wrap "
                "the model with a MaZO adapter first (peft.get_peft_model(model, peft_mazo.MaZOConfig(...))), or "
                "pass the tensors to train with `params=`."
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(groups, defaults)

        self.model = model
        self.weighting: TaskWeighting = weighting if weighting is not None else EqualWeighting()
        self.max_consecutive_skips = max_consecutive_skips
        self.perturbation = perturbation
        self.last_step: Optional[ZOStepResult] = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._step_directions: dict[int, torch.Tensor] = {}  # eager mode: z of one step, by tensor index
        self._directions_key: Optional[tuple[int, int]] = None  # (seed, step) that `_step_directions` holds
        self._perturbed_buffers: dict[int, torch.Tensor] = {}  # eager mode: θ ± εz during a pass, by tensor index
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
        self._warn_if_mask_pending()
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

    def _warn_if_mask_pending(self) -> None:
        """Say once when an adapter meant to get a data-driven mask (scorer "mazo" or "wanda") still has the data-free
        |W| mask it was created with: training would silently run with another mask than the one configured."""
        pending = sorted(
            {name for m in self.model.modules() if isinstance(m, MaZOLayer) for name in m.mazo_mask_pending}
        )
        if pending:
            warnings.warn(
                f"ZOSGD: the MaZO adapter(s) {pending} use a data-driven mask (scorer 'mazo' or 'wanda') that has not "
                "been computed: the mask is still the data-free |W| one the adapter was created with. Call "
                "model.compute_importance({task: loader, ...}) before training, or create the adapter with "
                "scorer='magnitude' to train with the |W| mask on purpose.",
                UserWarning,
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------------------------------
    # parameters and the perturbation plan
    # ----------------------------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking that its tensors are trainable floating-point parameters of the model."""
        params = _as_param_list(param_group["params"])
        param_group = dict(param_group, params=params)
        for p in params:
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
            if p.device.type == "meta":
                raise ValueError(
                    f"ZOSGD was given a tensor of shape {tuple(p.shape)} on the meta device (an offloaded module?): "
                    "trainable tensors must live on a real device. With device_map='auto', give the model enough GPU "
                    "memory (max_memory) that no adapted layer is offloaded to 'cpu' or 'disk'."
                )
            if id(p) not in self._model_param_ids:
                raise ValueError(
                    f"ZOSGD was given a tensor of shape {tuple(p.shape)} that is not a parameter of the model; the "
                    "closure could not see its perturbation."
                )
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["weight_decay"], group["momentum"])
        if self._planned:
            self._plan()

    def _plan(self) -> None:
        """Index the trainable tensors and decide, per tensor, where its perturbation is applied."""
        self._param_index: dict[torch.Tensor, int] = {}
        for p in self._params():
            self._param_index[p] = len(self._param_index)
        lazy: list[tuple[nn.Module, list[tuple[int, torch.Tensor]]]] = []
        assigned: set[int] = set()
        extra_bytes = 2 * sum(p.numel() * p.element_size() for p in self._param_index)
        self.mode = self.perturbation
        if self.mode == "auto":
            self.mode = "eager" if extra_bytes <= EAGER_MAX_BYTES else "lazy"
        self._step_directions, self._directions_key, self._perturbed_buffers = {}, None, {}
        if self.mode == "lazy":
            for module in self.model.modules():
                if not isinstance(module, MaZOLayer):
                    continue
                entries = []
                for container_name in module.adapter_layer_names:
                    for p in getattr(module, container_name).values():
                        if p in self._param_index and id(p) not in assigned:
                            entries.append((self._param_index[p], p))
                            assigned.add(id(p))
                if entries:
                    lazy.append((module, entries))
        self._lazy = lazy
        self._eager = [(i, p) for p, i in self._param_index.items() if id(p) not in assigned]
        self._planned = True

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    @property
    def num_trainable(self) -> int:
        """Number of trainable values (the ZO dimension d)."""
        return sum(p.numel() for p in self._params())

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator

    def _direction(self, step: int, index: int, param: torch.Tensor) -> torch.Tensor:
        """z of tensor `index` at `step`: N(0, 1) of `param`'s shape, dtype and device (a fresh tensor)."""
        generator = self._generator(param.device)
        generator.manual_seed(tensor_seed(self.state["zo"]["seed"], step, index))
        return torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)

    @torch.no_grad()
    def perturbation_direction(self, step: Optional[int] = None) -> list[torch.Tensor]:
        """Regenerate the direction z of optimizer step `step` (default: the last step), one tensor per parameter in
        param-group order. For analysis and tests; costs one copy of the trainable state."""
        if step is None:
            step = self.state["zo"]["step"] - 1
        if step < 0:
            raise ValueError("No step has been taken yet; pass step=0 for the direction of the first step.")
        return [self._direction(step, self._param_index[p], p) for p in self._params()]

    def _directions_of_step(self, step: int) -> dict[int, torch.Tensor]:
        """Eager mode: z of every trainable tensor at `step`, drawn once into buffers reused from step to step (the
        same numbers as `_direction`: `normal_` on a generator seeded with `tensor_seed`)."""
        key = (int(self.state["zo"]["seed"]), step)
        if self._directions_key != key:
            self._directions_key = None  # invalid while being refilled (an exception leaves no half-filled step)
            for param, index in self._param_index.items():
                buffer = _buffer_like(self._step_directions, index, param)
                generator = self._generator(param.device)
                generator.manual_seed(tensor_seed(key[0], step, index))
                buffer.normal_(generator=generator)
            self._directions_key = key
        return self._step_directions

    @contextlib.contextmanager
    def _perturbed(self, step: int, scale: float) -> Iterator[None]:
        """Lazy mode: within the context, every trainable tensor reads as `θ + scale · z` (per MaZO layer inside its
        forward, see module docstring); θ itself is never written, and every tensor points at its original storage
        again on exit."""
        originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        depth: dict[int, int] = {}

        def swap_in(entries: list[tuple[int, torch.Tensor]]) -> None:
            for index, param in entries:
                if id(param) in originals:
                    continue
                original = param.data
                direction = self._direction(step, index, param)
                param.data = torch.add(original, direction, alpha=scale, out=direction)
                originals[id(param)] = (param, original)

        def swap_out(entries: list[tuple[int, torch.Tensor]]) -> None:
            for _, param in entries:
                saved = originals.pop(id(param), None)
                if saved is not None:
                    param.data = saved[1]

        def pre_hook(entries: list[tuple[int, torch.Tensor]], module: nn.Module, args: Any) -> None:
            level = depth.get(id(module), 0)
            depth[id(module)] = level + 1
            if level == 0:
                swap_in(entries)

        def post_hook(entries: list[tuple[int, torch.Tensor]], module: nn.Module, args: Any, output: Any) -> None:
            level = depth.get(id(module), 1) - 1
            depth[id(module)] = level
            if level == 0:
                swap_out(entries)

        handles = []
        try:
            swap_in(self._eager)
            for module, entries in self._lazy:
                handles.append(module.register_forward_pre_hook(partial(pre_hook, entries)))
                handles.append(module.register_forward_hook(partial(post_hook, entries), always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for param, original in originals.values():
                param.data = original
            originals.clear()

    @contextlib.contextmanager
    def _passes(self, step: int) -> Iterator[Callable[[float], None]]:
        """The context of a step's forward passes; it yields `set_scale(scale)`, after which every trainable tensor
        reads as `θ + scale · z`.

        Eager mode: the parameters point at the perturbation buffers for the whole context (swapped once per step, not
        per pass), and `set_scale` refills them with two multi-tensor operations. Lazy mode: `set_scale` (re)registers
        the per-layer hooks of `_perturbed`. Either way θ itself is never written and is restored on exit."""
        if self.mode != "eager":
            with contextlib.ExitStack() as stack:

                def set_lazy_scale(scale: float) -> None:
                    stack.close()
                    stack.enter_context(self._perturbed(step, scale))

                yield set_lazy_scale
            return
        directions = self._directions_of_step(step)
        params = list(self._param_index)
        originals = [p.data for p in params]
        # the same buffers in every pass of every step: the perturbed model reads fixed addresses (a CUDA graph can)
        buffers = [_buffer_like(self._perturbed_buffers, index, p) for p, index in self._param_index.items()]
        zs = [directions[index] for index in self._param_index.values()]

        def set_scale(scale: float) -> None:
            torch._foreach_copy_(buffers, originals)
            torch._foreach_add_(buffers, zs, alpha=scale)

        try:
            for param, buffer in zip(params, buffers, strict=True):
                param.data = buffer
            yield set_scale
        finally:
            for param, original in zip(params, originals, strict=True):
                param.data = original

    # ----------------------------------------------------------------------------------------------------------------
    # the step
    # ----------------------------------------------------------------------------------------------------------------
    def _check_groups(self) -> None:
        for group in self.param_groups:
            _check_hyperparameters(group["lr"], group["weight_decay"], group["momentum"], where="ZOSGD param group")

    @staticmethod
    def _mean_losses(values: list[torch.Tensor]) -> torch.Tensor:
        """(T,) float64 mean over micro-batches of per-micro-batch (T,) losses (on the first one's device)."""
        num_tasks = values[0].numel()
        if any(v.numel() != num_tasks for v in values):
            raise ValueError(
                "The closures passed to ZOSGD.step returned different numbers of task losses "
                f"({sorted({v.numel() for v in values})}); every call must return the same T losses."
            )
        device = values[0].device
        return torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).mean(dim=0)

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
        closures = _as_closures(closure)
        self._check_groups()
        zo = self.state["zo"]
        step, eps = int(zo["step"]), float(zo["eps"])

        with self._passes(step) as set_scale:
            set_scale(eps)
            plus = [_loss_vector(_call(c)) for c in closures]
            set_scale(-eps)
            minus = [_loss_vector(_call(c)) for c in closures]
        losses_plus, losses_minus = self._mean_losses(plus), self._mean_losses(minus)
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
        directions = self._directions_of_step(step) if eager else None
        for group in self.param_groups:
            if group["lr"] == 0.0 and group["momentum"] == 0.0:
                continue  # nothing can change: skip (lr = 0 leaves θ bit-for-bit as it was)
            params = group["params"]
            if eager and group["momentum"] == 0.0 and type(self)._update_param is _PLAIN_UPDATE:
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
                zs = [directions[self._param_index[p]] for p in params]
                torch._foreach_add_(params, zs, alpha=-group["lr"] * projected_grad)
                continue
            for param in params:
                index = self._param_index[param]
                direction = directions[index].clone() if eager else self._direction(step, index, param)
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
        lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
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
        self._directions_key = None


_PLAIN_UPDATE = ZOSGD._update_param  # the multi-tensor update applies only while this rule is the one in use


def _buffer_like(store: dict[int, torch.Tensor], index: int, param: torch.Tensor) -> torch.Tensor:
    """`store[index]`, (re)allocated like `param` (contiguous) when missing or of another shape, dtype or device; kept
    from step to step (eager mode's z and perturbation buffers)."""
    buffer = store.get(index)
    if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (param.shape, param.dtype, param.device):
        buffer = store[index] = torch.empty_like(param, memory_format=torch.contiguous_format)
    return buffer


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
