"""θ ± εz inside a step's forward passes: the only part of the optimizer that touches the model's layers.

The perturbed forwards never write θ. For the duration of a forward, each trainable tensor points (`param.data = ...`)
at a tensor holding `θ + εz`, and at its untouched original again afterwards. Two ways to do the swap:

- "eager": every trainable tensor for the whole step; z is drawn once into kept buffers and the + and - copies are
  two multi-tensor (`torch._foreach_*`) operations per pass. Costs two copies of the trainable state.
- "lazy": inside every MaZO layer's forward (forward pre-/post-hooks registered for the pass only), so the perturbed
  copy costs one layer's tensors at a time and z is regenerated whenever it is needed. Other trainable tensors (e.g.
  `modules_to_save` heads) are swapped for the whole pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from ..layer import MaZOLayer
from .directions import DirectionStream, buffer_like


PERTURBATION_MODES = ("auto", "eager", "lazy")
EAGER_MAX_BYTES = 2**30
"""`perturbation="auto"` keeps z and the perturbed copy for the whole step (eager) up to this many extra bytes."""

TensorEntries = list[tuple[int, torch.Tensor]]


class Perturbation:
    """The plan (which tensor is perturbed where) and the passes of one optimizer's trainable tensors.

    Args:
        model (`nn.Module`): the model whose MaZO layers get the lazy mode's hooks.
        params (list of `torch.Tensor`): the trainable tensors, in the optimizer's order (their index in the seed
            stream is their position here).
        mode (`str`): "eager", "lazy" or "auto" (eager up to `EAGER_MAX_BYTES` of extra memory).
        directions (`DirectionStream`): where z comes from.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], mode: str, directions: DirectionStream) -> None:
        self.directions = directions
        self.param_index: dict[torch.Tensor, int] = {p: i for i, p in enumerate(params)}
        extra_bytes = 2 * sum(p.numel() * p.element_size() for p in params)
        self.mode = mode if mode != "auto" else ("eager" if extra_bytes <= EAGER_MAX_BYTES else "lazy")
        self._buffers: dict[int, torch.Tensor] = {}  # eager mode: θ ± εz during a pass, by tensor index
        directions.forget()
        self.lazy: list[tuple[nn.Module, TensorEntries]] = []
        assigned: set[int] = set()
        if self.mode == "lazy":
            for module in model.modules():
                if not isinstance(module, MaZOLayer):
                    continue
                entries = []
                for container_name in module.adapter_layer_names:
                    for p in getattr(module, container_name).values():
                        if p in self.param_index and id(p) not in assigned:
                            entries.append((self.param_index[p], p))
                            assigned.add(id(p))
                if entries:
                    self.lazy.append((module, entries))
        self.eager: TensorEntries = [(i, p) for p, i in self.param_index.items() if id(p) not in assigned]

    @contextlib.contextmanager
    def passes(self, seed: int, step: int) -> Iterator[Callable[[float], None]]:
        """The context of a step's forward passes; it yields `set_scale(scale)`, after which every trainable tensor
        reads as `θ + scale · z`.

        Eager mode: the parameters point at the perturbation buffers for the whole context (swapped once per step, not
        per pass), and `set_scale` refills them with two multi-tensor operations. Lazy mode: `set_scale` (re)registers
        the per-layer hooks of `_lazy_pass`. Either way θ itself is never written and is restored on exit."""
        if self.mode != "eager":
            with contextlib.ExitStack() as stack:

                def set_lazy_scale(scale: float) -> None:
                    stack.close()
                    stack.enter_context(self._lazy_pass(seed, step, scale))

                yield set_lazy_scale
            return
        directions = self.directions.of_step(seed, step, self.param_index)
        params = list(self.param_index)
        originals = [p.data for p in params]
        # the same buffers in every pass of every step: the perturbed model reads fixed addresses (a CUDA graph can)
        buffers = [buffer_like(self._buffers, index, p) for p, index in self.param_index.items()]
        zs = [directions[index] for index in self.param_index.values()]

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

    @contextlib.contextmanager
    def _lazy_pass(self, seed: int, step: int, scale: float) -> Iterator[None]:
        """Lazy mode: within the context, every trainable tensor reads as `θ + scale · z` (per MaZO layer inside its
        forward); θ itself is never written, and every tensor points at its original storage again on exit."""
        originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        depth: dict[int, int] = {}

        def swap_in(entries: TensorEntries) -> None:
            for index, param in entries:
                if id(param) in originals:
                    continue
                original = param.data
                direction = self.directions.draw(seed, step, index, param)
                param.data = torch.add(original, direction, alpha=scale, out=direction)
                originals[id(param)] = (param, original)

        def swap_out(entries: TensorEntries) -> None:
            for _, param in entries:
                saved = originals.pop(id(param), None)
                if saved is not None:
                    param.data = saved[1]

        def pre_hook(entries: TensorEntries, module: nn.Module, args: Any) -> None:
            level = depth.get(id(module), 0)
            depth[id(module)] = level + 1
            if level == 0:
                swap_in(entries)

        def post_hook(entries: TensorEntries, module: nn.Module, args: Any, output: Any) -> None:
            level = depth.get(id(module), 1) - 1
            depth[id(module)] = level
            if level == 0:
                swap_out(entries)

        handles = []
        try:
            swap_in(self.eager)
            for module, entries in self.lazy:
                handles.append(module.register_forward_pre_hook(partial(pre_hook, entries)))
                handles.append(module.register_forward_hook(partial(post_hook, entries), always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for param, original in originals.values():
                param.data = original
            originals.clear()
