"""The seed stream of ZO directions: z ~ N(0, I) of trainable tensor `index` at step `step` is a function of
`(seed, step, index)` only, drawn from a dedicated `torch.Generator` per device (the global RNG is never used)."""

from __future__ import annotations

from typing import Optional

import torch


_MASK64 = (1 << 64) - 1


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


def buffer_like(store: dict[int, torch.Tensor], index: int, param: torch.Tensor) -> torch.Tensor:
    """`store[index]`, (re)allocated like `param` (contiguous) when missing or of another shape, dtype or device; kept
    from step to step (eager mode's z and perturbation buffers)."""
    buffer = store.get(index)
    if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (param.shape, param.dtype, param.device):
        buffer = store[index] = torch.empty_like(param, memory_format=torch.contiguous_format)
    return buffer


class DirectionStream:
    """Draws the directions of a seed stream: one fresh tensor at a time (`draw`), or every tensor of a step into
    buffers kept from step to step (`of_step`); both give the very same numbers."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}
        self.kept: dict[int, torch.Tensor] = {}  # `of_step`'s buffers: z of one step, by tensor index
        self._kept_key: Optional[tuple[int, int]] = None  # (seed, step) that `kept` holds

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def draw(self, seed: int, step: int, index: int, param: torch.Tensor) -> torch.Tensor:
        """z of tensor `index` at `step`: N(0, 1) of `param`'s shape, dtype and device (a fresh tensor)."""
        generator = self._generator(param.device, tensor_seed(seed, step, index))
        return torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)

    def of_step(self, seed: int, step: int, param_index: dict[torch.Tensor, int]) -> dict[int, torch.Tensor]:
        """z of every tensor of `param_index` at `step`, drawn once into the kept buffers (refilled only when the step
        or the seed changes)."""
        key = (int(seed), step)
        if self._kept_key != key:
            self._kept_key = None  # invalid while being refilled (an exception leaves no half-filled step)
            for param, index in param_index.items():
                buffer = buffer_like(self.kept, index, param)
                buffer.normal_(generator=self._generator(param.device, tensor_seed(key[0], step, index)))
            self._kept_key = key
        return self.kept

    def forget(self) -> None:
        """Drop the kept buffers (the trainable tensors changed)."""
        self.kept, self._kept_key = {}, None

    def invalidate(self) -> None:
        """Refill the kept buffers at the next `of_step` (the seed stream was restored)."""
        self._kept_key = None
