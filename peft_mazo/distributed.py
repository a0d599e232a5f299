"""Small `torch.distributed` helpers for data-parallel zeroth-order training (issue 8; see docs/distributed.md).

ZO needs almost no communication: every rank draws the same z from the same seed stream, evaluates L⁺ and L⁻ on its
own shard of the batch, and the ranks average the (T,) loss pair(s) with one all-reduce per step (`ZOSGD` does it when
a process group is initialised). No gradient or parameter crosses the wire, and every rank applies the identical
update. The helpers here are what the optimizer, `compute_importance`, `MaZOTrainer` and a launcher script need:

- `init_from_env()`: initialise the process group from `torchrun` / `accelerate launch` environment variables (NCCL on
  CUDA, gloo on CPU) when `WORLD_SIZE > 1`; `is_distributed()`, `world()`, `shard()`.
- `all_reduce_mean_()`, `all_reduce_sum_()`, `broadcast_object()`, `broadcast_tensors_()`: collectives that are
  no-ops in a single process and move a tensor to the backend's device and back when needed.
- `parameter_checksum()` and `check_in_sync()`: a cheap debug check that every rank holds bit-identical trainable
  state (it raises `DistributedSyncError` naming the rank and the first tensor that diverged).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Optional, TypeVar, Union

import torch
import torch.distributed as dist
from torch import nn

from ._checks import is_int


logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound=Sequence)
TensorsArg = Union[nn.Module, torch.optim.Optimizer, Mapping[str, torch.Tensor], Iterable[torch.Tensor]]

_HASH_MASK = (1 << 52) - 1  # the bit hash is kept below 2**52 so that it is exact in a float64
_HASH_CHUNK = 1 << 22  # elements per chunk of the int64 bit-pattern copy
_HASH_PRIME = 65521  # position weights 1 .. 65521
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # check_in_sync's call counters per target


class DistributedSyncError(RuntimeError):
    """Raised by `check_in_sync` (or `assert_same_on_all_ranks`) when ranks hold different state."""


# ----------------------------------------------------------------------------------------------------------------------
# the process group
# ----------------------------------------------------------------------------------------------------------------------
def is_distributed(group: Optional[Any] = None) -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world(group: Optional[Any] = None) -> tuple[int, int]:
    """`(rank, world_size)` of this process: `(0, 1)` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files, logs and checkpoints."""
    return world()[0] == 0


def init_from_env(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> bool:
    """Initialise the default process group from the launcher's environment, if there is more than one process.

    `torchrun` and `accelerate launch` set `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. With
    `WORLD_SIZE > 1` this selects the local GPU (`LOCAL_RANK`) when CUDA is available and initialises the group with
    NCCL (CUDA) or gloo (CPU). Idempotent: an already initialised group is kept as it is.

    Args:
        backend (`str`, *optional*): force a backend ("nccl", "gloo"); default: NCCL when CUDA is available, else gloo.
        timeout (`timedelta`, *optional*): collective timeout (torch's default when None).

    Returns:
        `bool`: `is_distributed()` after the call (False in a single process).
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return is_distributed()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set: launch with `torchrun --nproc_per_node N` "
            "or `accelerate launch`, which set the rendezvous variables."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)
    rank, size = world()
    logger.info("torch.distributed initialised: rank %d of %d, backend %s", rank, size, backend)
    return is_distributed()


def collective_device(group: Optional[Any] = None) -> torch.device:
    """The device collectives of `group` run on: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: S, rank: Optional[int] = None, world_size: Optional[int] = None) -> S:
    """This rank's contiguous share of `items` (a list, a tuple, a tensor along dim 0...): `len(items) // world_size`
    items each, as a slice of the same type. The remainder is dropped so that every rank holds the same number (the
    mean of per-rank mean losses is the full-batch mean only for equal shards). `ValueError` if a rank would get
    nothing. Defaults: this process's rank and world size."""
    default_rank, default_size = world()
    rank = default_rank if rank is None else rank
    world_size = default_size if world_size is None else world_size
    per_rank = len(items) // world_size
    if per_rank == 0:
        raise ValueError(
            f"Cannot shard {len(items)} item(s) over {world_size} ranks: every rank needs at least one. Use a batch "
            "size that is a multiple of the number of processes."
        )
    dropped = len(items) - per_rank * world_size
    if dropped and rank == 0:
        logger.warning(
            "shard: %d of %d item(s) dropped to give %d ranks equal shares.", dropped, len(items), world_size
        )
    return items[rank * per_rank : (rank + 1) * per_rank]


# ----------------------------------------------------------------------------------------------------------------------
# collectives (no-ops in a single process)
# ----------------------------------------------------------------------------------------------------------------------
def _reduce_(tensor: torch.Tensor, mean: bool, group: Optional[Any]) -> torch.Tensor:
    if not is_distributed(group):
        return tensor
    device = collective_device(group)
    work = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    if mean:
        work.div_(dist.get_world_size(group))  # SUM then the same division everywhere: identical bits on every rank
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (no-op when not distributed); returns it."""
    return _reduce_(tensor, mean=False, group=group)


def all_reduce_mean_(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """Average `tensor` over the ranks, in place (no-op when not distributed); returns it.

    A sum followed by a division by the world size (so every rank ends with the same bits, on any backend). A tensor
    that is not on the backend's device (a CPU tensor under NCCL) is copied there and back.
    """
    return _reduce_(tensor, mean=True, group=group)


def broadcast_object(obj: T, src: int = 0, group: Optional[Any] = None) -> T:
    """Rank `src`'s picklable `obj` on every rank (`obj` itself when not distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=collective_device(group))
    return box[0]


@torch.no_grad()
def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0, group: Optional[Any] = None) -> None:
    """Overwrite every tensor with rank `src`'s, in place (what DDP does with the parameters at construction).

    The bytes are sent (any dtype, on any backend), so the result is bit-identical to rank `src`'s tensor.
    """
    if not is_distributed(group):
        return
    device = collective_device(group)
    for tensor in tensors:
        data = tensor.detach()
        work = data.to(device).contiguous().reshape(-1).view(torch.uint8)
        dist.broadcast(work, src=src, group=group)
        if work.data_ptr() != data.data_ptr():  # a copy (another device, or not contiguous): write it back
            data.copy_(work.view(data.dtype).reshape(data.shape))


def all_gather_object(obj: Any, group: Optional[Any] = None) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` when not distributed)."""
    if not is_distributed(group):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def assert_same_on_all_ranks(value: Any, what: str, group: Optional[Any] = None) -> None:
    """Raise `DistributedSyncError` on every rank unless all ranks pass an equal (picklable) `value`."""
    gathered = all_gather_object(value, group)
    diverged = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
    if diverged:
        raise DistributedSyncError(
            f"{what} differs across ranks: rank 0 has {gathered[0]!r}, rank {diverged[0]} has "
            f"{gathered[diverged[0]]!r} ({len(diverged)} rank(s) differ from rank 0)."
        )


# ----------------------------------------------------------------------------------------------------------------------
# the synchronisation check
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _bit_hash(tensor: torch.Tensor) -> int:
    """A position-weighted sum of the tensor's bit patterns, folded below 2**52 (any single flipped bit of a value of
    up to 4 bytes changes it)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    view = _INT_VIEW.get(flat.element_size())
    if view is None:  # complex and other wide types: hash the raw bytes
        flat, view = flat.view(torch.uint8), torch.uint8
    bits = flat.view(view) if flat.dtype != view else flat
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _HASH_CHUNK):
        chunk = bits[start : start + _HASH_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device)
        weights.remainder_(_HASH_PRIME).add_(1)
        total += (chunk * weights).sum()  # int64 arithmetic wraps: exact and order-independent
    value = int(total) & ((1 << 64) - 1)
    return (value ^ (value >> 52)) & _HASH_MASK


@torch.no_grad()
def parameter_checksum(tensors: Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Per-tensor checksums of `tensors`: a (n, 2) float64 CPU tensor of `[sum of the values, bit hash]`.

    Column 0 is the float64 sum (readable, but blind to some rounding-level differences); column 1 is a position-
    weighted hash of the bit patterns (an integer below 2**52, exact in float64) that changes when any single value
    changes in any bit (for 1-, 2- and 4-byte dtypes; with overwhelming probability otherwise). NaNs are hashed by
    their bits, so equal NaN tensors have equal checksums. Costs one pass over the tensors.

    Args:
        tensors: tensors, or a `{name: tensor}` mapping.

    Returns:
        `torch.Tensor` of shape (n, 2), dtype float64, on the CPU.
    """
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    rows = []
    for tensor in values:
        total = tensor.detach().double().sum() if tensor.is_floating_point() else tensor.detach().sum().double()
        rows.append((float(total), float(_bit_hash(tensor))))
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 2)


def _named_state(target: TensorsArg) -> tuple[list[str], list[torch.Tensor], dict[str, Any]]:
    """Names, tensors and non-tensor state (a ZO optimizer's seed and step) of a `check_in_sync` target."""
    if isinstance(target, nn.Module):
        named = [(name, p) for name, p in target.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named], {}
    if isinstance(target, torch.optim.Optimizer):
        inner = getattr(target, "optimizer", target)  # accelerate's AcceleratedOptimizer
        extra: dict[str, Any] = {}
        zo = inner.state.get("zo") if isinstance(inner.state, Mapping) else None
        if isinstance(zo, Mapping):
            extra = {key: zo.get(key) for key in ("seed", "step", "eps", "skipped_steps")}
        model = getattr(inner, "model", None)
        model_names = {id(p): n for n, p in model.named_parameters()} if isinstance(model, nn.Module) else {}
        names, tensors = [], []
        for g, group in enumerate(inner.param_groups):
            for i, param in enumerate(group["params"]):
                name = model_names.get(id(param), f"param_groups[{g}]['params'][{i}]")
                names.append(name)
                tensors.append(param)
                buffer = inner.state[param].get("momentum_buffer") if param in inner.state else None
                if isinstance(buffer, torch.Tensor):
                    names.append(f"momentum buffer of {name}")
                    tensors.append(buffer)
        return names, tensors, extra
    if isinstance(target, Mapping):
        return list(target), list(target.values()), {}
    tensors = list(target)
    return [f"tensor {i}" for i in range(len(tensors))], tensors, {}


def check_in_sync(
    target: TensorsArg,
    every: int = 1,
    step: Optional[int] = None,
    group: Optional[Any] = None,
    what: str = "trainable state",
) -> bool:
    """Debug check that every rank holds bit-identical trainable state; raises `DistributedSyncError` otherwise.

    Gathers `parameter_checksum` of the target from every rank (one small all-gather) and compares each rank's with
    rank 0's. Call it every step with `every=N` to check every N-th step only. A no-op (returns False) in a single
    process. Every rank must call it at the same steps (it is a collective).

    Args:
        target: a model (its `requires_grad` parameters), an optimizer (its parameters and momentum buffers; for
            `ZOSGD` also the seed, step, eps and skip count), a `{name: tensor}` mapping or an iterable of tensors.
        every (`int`): check only when `step % every == 0`.
        step (`int`, *optional*): the step to test against `every`. Default: a `ZOSGD`'s `state["zo"]["step"]`, else a
            per-target call counter (0, 1, 2, ... for successive calls).
        group: the process group (default: the world).
        what (`str`): what the error message calls the target.

    Returns:
        `bool`: True when the check ran (and passed).

    Raises:
        `DistributedSyncError`: on every rank, naming the first rank (and tensor) that differs from rank 0.
    """
    if not is_int(every) or every < 1:
        raise ValueError(f"check_in_sync: every must be an integer >= 1, got {every!r}.")
    names, tensors, extra = _named_state(target)
    if step is None:
        inner = getattr(target, "optimizer", target)
        zo = getattr(inner, "state", {}).get("zo") if isinstance(getattr(inner, "state", None), Mapping) else None
        if isinstance(zo, Mapping) and "step" in zo:
            step = int(zo["step"])
        else:
            try:
                step = _CALLS.get(target, 0)
                _CALLS[target] = step + 1
            except TypeError:  # not weak-referenceable (a list): check every call
                step = 0
    if step % every != 0 or not is_distributed(group):
        return False
    checksums = parameter_checksum(tensors).tolist()
    local = {"extra": extra, "count": len(tensors), "hashes": [int(h) for _, h in checksums], "sums": checksums}
    gathered = all_gather_object(local, group)
    reference = gathered[0]
    keys = ("extra", "count", "hashes")
    for rank, other in enumerate(gathered[1:], start=1):
        if all(other[key] == reference[key] for key in keys):
            continue
        if other["extra"] != reference["extra"]:
            detail = f"optimizer state {other['extra']} vs rank 0's {reference['extra']}"
        elif other["count"] != reference["count"]:
            detail = f"{other['count']} tensors vs rank 0's {reference['count']}"
        else:
            index = next(
                i for i, (a, b) in enumerate(zip(other["hashes"], reference["hashes"], strict=True)) if a != b
            )
            detail = (
                f"first difference in '{names[index]}': sum {other['sums'][index][0]!r} vs rank 0's "
                f"{reference['sums'][index][0]!r}"
            )
        raise DistributedSyncError(
            f"Rank {rank} diverged from rank 0 at step {step}: its {what} is not bit-identical ({detail}). Every rank "
            "must start from the same parameters and seed and apply the same all-reduced ZO update; check that the "
            "model was not modified on one rank and that ZOSGD runs with distributed=True on every rank."
        )
    return True
