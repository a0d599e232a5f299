"""`CUDAGraphLosses`: the packed multi-task losses replayed from CUDA graphs, for ZO steps without launch overhead.

On a small model a forward is bound by Python and kernel launches, not by the GPU: SmolLM2-135M's packed forward of
eight tasks launches ~1,800 kernels. A CUDA graph records them once and replays them as one launch. A graph replays
exactly what it recorded: the same shapes, the same memory and the same Python decisions. So:

- shapes: each packed step is padded (`packing.pad_packed`) to the sizes of the smallest recording (fewest row
  tokens) that holds it; a step that fits none is recorded with its own rows and width (`packing.bucket_sizes`,
  rounded up: they set the compute) and the largest of the cheap sizes (logit positions, scored tokens, sequences,
  examples) seen so far, so that after a few steps the recordings serve nearly every step. The least recently used
  recordings are dropped beyond `max_graphs`; all share one memory pool;
- memory: a graph reads the trainable tensors where they were at capture. `ZOSGD`'s eager perturbation keeps θ ± εz
  in buffers that stay in place from step to step, so one graph serves the + and - passes of every step. The graph of
  a bucket is keyed by the address of every parameter and buffer of the model and by its adapters' state (active,
  merged, disabled, train/eval): any change (another perturbation mode, a merge, a moved model) captures anew instead
  of replaying a stale recording;
- decisions: the attention mask is built on the device from `position_ids` (`packing.block_causal_bias`) rather
  than by transformers' packed-sequence detection, which syncs with the host; and it falls back to the plain
  `packed_losses` (no graph) whenever replaying could be wrong: not on CUDA, gradients enabled, forward hooks on the
  model (e.g. `ZOSGD(perturbation="lazy")`, whose per-layer hooks draw z), attention other than sdpa/eager.

The losses are those of `packed_losses` on the same batch up to floating-point rounding (padding changes the shapes
of the kernels).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._checks import is_int
from .packing import PackedBatch, bucket_sizes, packed_losses, pad_packed, supports_packing


_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: PackedBatch  # the static input tensors the graph reads
    output: torch.Tensor  # (T + 1,) losses the graph writes


def _tensor_fields(packed: PackedBatch) -> list[torch.Tensor]:
    return [getattr(packed, f.name) for f in fields(packed) if isinstance(getattr(packed, f.name), torch.Tensor)]


class CUDAGraphLosses:
    """`packed_losses(model, packed)` from CUDA graphs where that is safe, else computed directly.

    Example:

        ```py
        >>> losses_of = CUDAGraphLosses(model)
        >>> packed = pack_batches(next(steps))
        >>> loss = opt.step(lambda: losses_of(packed))  # ZOSGD(model) on CUDA: both passes replay one graph
        ```

    Args:
        model (`torch.nn.Module`): the causal LM (a `PeftModel` with a MaZO adapter, typically).
        max_graphs (`int`): graphs kept (one per bucket of step sizes).

    Attributes:
        captures, replays, direct_calls (`int`): how often a graph was recorded, replayed, or not used.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 8) -> None:
        if not is_int(max_graphs) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}.")
        self.model = model
        self.max_graphs = max_graphs
        self._recordings: OrderedDict[tuple, _Recording] = OrderedDict()
        self._pool: Any = None
        self._staged: list = []  # one entry: (packed, sizes, padded batch on the device)
        self._modules: list[nn.Module] | None = None
        self._tensors: list[torch.Tensor] = []
        self._tuner_layers: list[BaseTunerLayer] = []
        self.captures = self.replays = self.direct_calls = 0

    # ----------------------------------------------------------------------------------------------------------------
    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        embeddings = self.model.get_input_embeddings().weight
        return embeddings.device, embeddings.dtype

    def _survey(self) -> None:
        """Walk the model once: its modules (for hooks), tensors (for addresses) and tuner layers (for switches)."""
        modules, tensors, seen, stack = [], [], set(), [self.model]
        while stack:  # `modules()` / `parameters()` / `buffers()` in one plain walk: a few ms less per step
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            modules.append(module)
            tensors.extend(t for t in module._parameters.values() if t is not None)
            tensors.extend(t for t in module._buffers.values() if t is not None)
            stack.extend(m for m in module._modules.values() if m is not None)
        self._modules, self._tensors = modules, tensors
        self._tuner_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]

    def graphs_apply(self, survey: bool = True) -> bool:
        """Whether a graph can be replayed for the model as it is now (see the module docstring). `survey=False`
        reuses the last walk over the model (the second pass of a step)."""
        device, _ = self._device_and_dtype()
        if device.type != "cuda" or torch.is_grad_enabled():
            return False
        implementation = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if implementation not in _MASK_IMPLEMENTATIONS:
            return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        if survey or self._modules is None:
            self._survey()
        if any(m._forward_hooks or m._forward_pre_hooks for m in self._modules):
            return False
        return supports_packing(self.model)

    def _state_key(self) -> tuple:
        """Everything a recording depends on besides the shapes: tensor addresses and adapter switches."""
        addresses = tuple(t.data_ptr() for t in self._tensors)
        switches = tuple(
            (tuple(m.merged_adapters), m._disable_adapters, str(m._active_adapter)) for m in self._tuner_layers
        )
        return addresses, switches, self.model.training

    def _stage(self, packed: PackedBatch, sizes: tuple[int, ...], device: torch.device) -> PackedBatch:
        """`packed` padded to `sizes` and on the device; kept for the next call (the - pass of the same step)."""
        if self._staged and self._staged[0][0] is packed and self._staged[0][1] == sizes:
            return self._staged[0][2]
        staged = pad_packed(packed.to("cpu"), sizes).to(device)
        self._staged[:] = [(packed, sizes, staged)]
        return staged

    def _fitting(self, needed: tuple[int, ...], state: tuple) -> tuple | None:
        """The key of the smallest recording for `state` whose sizes hold a batch of sizes `needed`: later steps
        replay an earlier, larger recording rather than record one for every small difference in shape."""
        fits = [
            key
            for key in self._recordings
            if key[1] == state
            and key[0][-1] == needed[-1]
            and all(a >= b for a, b in zip(key[0], needed, strict=True))
        ]
        return min(fits, key=lambda key: (key[0][0] * key[0][1], key[0])) if fits else None

    # ----------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, packed: PackedBatch) -> torch.Tensor:
        """The (T,) float32 losses of `packed` (see `packing.packed_losses`)."""
        if not isinstance(packed, PackedBatch):
            raise TypeError(f"CUDAGraphLosses takes a PackedBatch (pack_batches(...)), got {type(packed).__name__}.")
        device, dtype = self._device_and_dtype()
        num_tasks = len(packed.tasks)
        new_step = not (self._staged and self._staged[0][0] is packed)  # a step's second pass: no new walk
        if not self.graphs_apply(survey=new_step):
            self.direct_calls += 1
            return packed_losses(self.model, packed.to(device))[:num_tasks]
        state = self._state_key()
        sizes = bucket_sizes(packed)
        key = self._fitting(sizes, state)
        if key is None:  # rows and width as needed (they set the compute); the cheap sizes at the largest seen
            for other, _ in (k for k in self._recordings if k[1] == state and k[0][-1] == sizes[-1]):
                sizes = sizes[:2] + tuple(max(a, b) for a, b in zip(sizes[2:], other[2:], strict=True))
            key = (sizes, state)
            recording = self._record(key, self._stage(packed, key[0], device), dtype)
        else:
            recording = self._recordings[key]
            self._recordings.move_to_end(key)
            torch._foreach_copy_(_tensor_fields(recording.inputs), _tensor_fields(self._stage(packed, key[0], device)))
            recording.graph.replay()
            self.replays += 1
        return recording.output[:num_tasks].clone()

    def _record(self, key: tuple, staged: PackedBatch, dtype: torch.dtype) -> _Recording:
        # the graph's static inputs, apart from the staged batch (which the step's second pass copies from)
        inputs = PackedBatch(
            **{
                f.name: getattr(staged, f.name).clone()
                if isinstance(getattr(staged, f.name), torch.Tensor)
                else getattr(staged, f.name)
                for f in fields(staged)
            }
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, creates library handles, outside the recording
            packed_losses(self.model, inputs, explicit_mask_dtype=dtype)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = packed_losses(self.model, inputs, explicit_mask_dtype=dtype)
        self._pool = graph.pool()
        graph.replay()
        self.captures += 1
        recording = self._recordings[key] = _Recording(graph, inputs, output)
        while len(self._recordings) > self.max_graphs:
            self._recordings.popitem(last=False)
        return recording
