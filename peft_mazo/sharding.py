"""A frozen base larger than one GPU: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the base, the MaZO adapter
stays replicated (issue 14; see docs/distributed.md).

ZO training never computes a gradient, so the only per-GPU state that grows with the model is the frozen base. It is
sharded with torch's own FSDP2: one `fully_shard` unit per decoder layer (the model's `_no_split_modules` classes), one
for the input embeddings, one for the output head (unless the two are tied), then the root. Each rank stores
1/world_size of the base (dim-0 shards, `DTensor`s) and FSDP all-gathers one unit at a time in the forward and frees
it again after (`reshard_after_forward=True`).

The MaZO adapter is left out of FSDP (`ignored_params`): its tensors (dense masked values, or LoRA A and B, and any
other trainable parameter) stay plain full tensors, and its masks are buffers, which FSDP never shards. `shard_base`
broadcasts them from rank 0 first, so every rank holds bit-identical adapter state. `ZOSGD` then works unchanged:
every rank draws the same z from the same seed stream for the full (unsharded) adapter tensors, perturbs θ ± εz and
applies the update on them locally, and averages the (T,) loss pair with its one all-reduce. What a step exchanges:
that all-reduce (16·T bytes) plus FSDP's all-gathers of the base, once per unit and forward (two forwards per step).
No gradient exists (nothing in the base requires grad), so FSDP never reduce-scatters.

- `shard_base(model, mesh=None)`: shard the base of a MaZO PEFT model in place (a collective: every rank calls it).
- `load_from_rank0(model, state_dict)`: a base too large for every rank's host memory: only rank 0 loads the weights,
  the other ranks build the model without them (`accelerate.init_empty_weights(include_buffers=False)`); after
  `shard_base(model, sync_adapter=False)` this allocates the missing tensors and fills every rank's shards and adapter
  from rank 0's full state dict (torch's `set_model_state_dict(..., broadcast_from_rank0=True)`).
- `replicated_state(model)`: the adapter's tensors and mask buffers by name (what `check_in_sync` should compare).
- `local_base_bytes(model)`: the bytes of this rank's shards of the base (what `peft_mazo.memory` predicts).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as _dist
from .layer import MaZOLayer, mazo_layers, mazo_tuner
from .quantized import quantization_kind


MASK_BUFFERS = ("mazo_columns", "mazo_bits", "mazo_shape")


def _dtensor_type() -> Optional[type]:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` (a parameter sharded by FSDP2 or another torch.distributed parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters `shard_base` keeps replicated, by name: every MaZO adapter tensor (trainable or not: values,
    LoRA A and B of every adapter) and every other parameter with `requires_grad` (e.g. `modules_to_save`)."""
    adapter_ids = {
        id(p)
        for layer in model.modules()
        if isinstance(layer, MaZOLayer)
        for container in layer.adapter_layer_names
        for p in getattr(layer, container).values()
    }
    return {
        name: p for name, p in model.named_parameters(remove_duplicate=True) if id(p) in adapter_ids or p.requires_grad
    }


def replicated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that must be identical on every rank of a sharded run, by name: `adapter_parameters(model)` and the
    MaZO mask buffers (`mazo_columns`, `mazo_bits`, `mazo_shape`). Pass it to
    `peft_mazo.distributed.check_in_sync` to verify the ranks (the masks included)."""
    state: dict[str, torch.Tensor] = dict(adapter_parameters(model))
    for name, buffer in model.named_buffers():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in MASK_BUFFERS:  # <module>.mazo_columns.<adapter>
            state[name] = buffer
    return state


def local_base_bytes(model: nn.Module, padded: bool = True) -> int:
    """Bytes of the base stored on this rank: the local shards of the sharded (`DTensor`) parameters, plus any base
    parameter left unsharded. `padded`: count each shard as FSDP2 allocates it, `ceil(dim0 / world_size)` rows (the
    last ranks' shards are padded up to that when dim 0 does not divide evenly); else the local rows only."""
    adapter = {id(p) for p in adapter_parameters(model).values()}
    total = 0
    for p in model.parameters():
        if id(p) in adapter:
            continue
        if not is_sharded(p):
            total += p.numel() * p.element_size()
            continue
        local = p.to_local()
        if padded and p.dim() > 0:
            world_size = p.device_mesh.size()
            rows = -(-p.shape[0] // world_size)
            total += rows * (p.numel() // max(p.shape[0], 1)) * p.element_size()
        else:
            total += local.numel() * local.element_size()
    return total


def _units(base: nn.Module) -> list[nn.Module]:
    """The modules that get their own `fully_shard` call, deepest first (FSDP2 is applied bottom-up): the model's
    `_no_split_modules` blocks (the decoder layers), and the input and output embeddings unless they share a weight."""
    classes = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in classes and m is not base]
    if not blocks:  # not a transformers model: the children of the longest ModuleList
        lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    units = list(blocks)
    get_in, get_out = getattr(base, "get_input_embeddings", None), getattr(base, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    tied = (
        embed is not None
        and head is not None
        and getattr(embed, "weight", None) is not None
        and embed.weight is getattr(head, "weight", None)
    )
    if not tied:
        units += [m for m in (embed, head) if isinstance(m, nn.Module)]
    # drop a unit nested in another one (FSDP would still work, but one all-gather per block is the point)
    inside = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    units = [u for u in dict.fromkeys(units) if id(u) not in inside]
    depth = {id(m): name.count(".") + 1 for name, m in base.named_modules() if name}
    return sorted(units, key=lambda m: -depth.get(id(m), 0))


def _refusal(model: nn.Module, base: nn.Module) -> Optional[str]:
    """Why FSDP2 cannot shard this model, or why it would silently break after sharding; None when it can."""
    if any(is_sharded(p) for p in model.parameters()):
        return (
            "shard_base: the model already has sharded (DTensor) parameters; call shard_base once, on a model that "
            "fully_shard has not been applied to."
        )
    if getattr(base, "hf_device_map", None) or any(hasattr(m, "_hf_hook") for m in base.modules()):
        return (
            "shard_base: the model was dispatched with device_map / accelerate hooks. FSDP places the shards itself: "
            "load the base without device_map (on the CPU, or on this rank's GPU), then call shard_base."
        )
    layers = mazo_layers(mazo_tuner(model, "shard_base"))
    quantized = sorted(name for name, layer in layers.items() if quantization_kind(layer.get_base_layer()))
    if quantized:
        return (
            f"shard_base: {len(quantized)} adapted layer(s) have a bitsandbytes 4-/8-bit base (e.g. '{quantized[0]}'); "
            "FSDP2 cannot shard bitsandbytes parameters. Shard a bf16/fp16/fp32 base, or use one GPU per 4-bit model."
        )
    merged = sorted(name for name, layer in layers.items() if layer.merged)
    if merged:
        return (
            f"shard_base: the adapter is merged into {len(merged)} base layer(s) (e.g. '{merged[0]}'); unmerge it "
            "first (model.unmerge_adapter()): a merged delta cannot be trained or unmerged once the base is sharded."
        )
    pending = sorted(
        {
            name
            for layer in layers.values()
            if layer.get_base_layer().weight.device.type != "meta"  # no weights yet: load_from_rank0 brings the mask
            for name in layer.mazo_mask_pending
        }
    )
    if pending:
        return (
            f"shard_base: the data-driven mask of adapter(s) {pending} has not been computed, and compute_importance "
            "needs the full base weights of every layer, which a sharded model no longer holds. Compute the mask "
            "first (model.compute_importance(...) before shard_base, e.g. with device_map='auto' in one process, then "
            "save_pretrained and load that adapter under torchrun), or use scorer='magnitude'."
        )
    return None


def _device_of(mesh: Any) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def shard_base(
    model: nn.Module,
    mesh: Optional[Any] = None,
    *,
    reshard_after_forward: bool = True,
    sync_adapter: bool = True,
    units: Optional[Iterable[nn.Module]] = None,
) -> nn.Module:
    """Shard the frozen base of a MaZO PEFT model with FSDP2, keeping the adapter replicated; in place.

    Call it on every rank (it is a collective) after `get_peft_model` (or `PeftModel.from_pretrained(...,
    is_trainable=True)`) and the mask, and before building `ZOSGD`. Every rank must hold the same base (loaded from the
    same checkpoint): each keeps its own 1/world_size slice of it.

    Steps: (1) with `sync_adapter`, broadcast the adapter's tensors and mask buffers from rank 0 (as DDP does with
    parameters at construction); (2) `fully_shard(unit, mesh=mesh, reshard_after_forward=..., ignored_params=adapter)`
    for every unit (see `units`), then for the root, the base model inside the `PeftModel`; (3) move the adapter tensors
    to the mesh's device (FSDP moves the base and all buffers, but not the parameters it ignores).

    Args:
        model (`torch.nn.Module`): a `PeftModel` (or `MaZOModel`) with a MaZO adapter, its base not quantized, not
            dispatched with `device_map`, the adapter not merged and its mask computed (or loaded).
        mesh (`DeviceMesh`, *optional*): a 1-D mesh over the ranks that share the model. Default: the whole default
            process group, on "cuda" for NCCL and "cpu" for gloo.
        reshard_after_forward (`bool`): free each unit's all-gathered weights after its forward (default: a ZO step
            holds one or two units unsharded at a time, and all-gathers each unit once per forward). False keeps
            the whole base unsharded after the first forward: no memory saving, only use it to compare.
        sync_adapter (`bool`): broadcast the adapter state from rank 0 first (default True).
        units (iterable of modules, *optional*): the submodules to shard as units, instead of the default (the
            model's `_no_split_modules` blocks, the input embeddings and, if not tied to them, the output head).

    Returns:
        The same `model`, its base parameters now `DTensor`s sharded on dim 0 and its adapter plain tensors.

    Raises:
        `ValueError`: no process group, a quantized or dispatched base, a merged adapter, a pending data-driven mask,
            or a model that is already sharded. `TypeError`: no MaZO adapter.
    """
    tuner = mazo_tuner(model, "shard_base")
    base = tuner.model
    refusal = _refusal(model, base)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            refusal
            or "shard_base needs an initialised torch.distributed process group: launch with `torchrun "
            "--nproc_per_node N` and call peft_mazo.distributed.init_from_env() first."
        )
    # every rank refuses together: a rank that stopped alone would leave the others waiting in FSDP's collectives
    refusals = _dist.all_gather_object(refusal)
    refused = [(rank, message) for rank, message in enumerate(refusals) if message]
    if refused:
        raise ValueError(f"{refused[0][1]} (rank {refused[0][0]}; {len(refused)} of {len(refusals)} rank(s) refuse)")
    from torch.distributed.fsdp import fully_shard

    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(
            f"shard_base needs torch.distributed.fsdp.fully_shard with ignored_params (torch >= 2.7), this is torch "
            f"{torch.__version__}: upgrade torch."
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(_dist.collective_device().type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_base takes a 1-D DeviceMesh (the ranks that share the base), got {mesh.ndim}-D.")

    adapter = adapter_parameters(model)
    if sync_adapter:
        on_meta = _dist.all_gather_object(any(t.device.type == "meta" for t in replicated_state(model).values()))
        if any(on_meta):
            raise ValueError(
                f"shard_base: the adapter of rank(s) {[r for r, m in enumerate(on_meta) if m]} is on the meta device "
                "(a model built without weights), so there is nothing to broadcast. Pass sync_adapter=False, then "
                "materialise and load every rank with model.to_empty(device=...) and torch.distributed.checkpoint."
                "state_dict.set_model_state_dict(model, full_state_dict, options=StateDictOptions("
                "full_state_dict=True, broadcast_from_rank0=True)) (docs/distributed.md)."
            )
        _dist.broadcast_tensors_(replicated_state(model).values(), src=0)
    ignored = set(adapter.values())
    chosen = _units(base) if units is None else list(units)
    for unit in chosen:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(base, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)

    device = _device_of(mesh)  # meta tensors stay on meta (deferred initialisation, as FSDP does)
    with torch.no_grad():
        for param in adapter.values():
            if param.device not in (device, torch.device("meta")):
                param.data = param.data.to(device)
    for layer in mazo_layers(tuner).values():  # the masks, in case a buffer was not under a managed module
        for container in MASK_BUFFERS:
            buffers = getattr(layer, container)
            for key in list(buffers.keys()):
                if buffers[key].device not in (device, torch.device("meta")):
                    buffers[key] = buffers[key].to(device)
    return model


def load_from_rank0(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]]) -> None:
    """Fill a sharded model from rank 0's full state dict; every rank calls it (a collective), after `shard_base`.

    For a base that every rank cannot hold in host memory: rank 0 loads the model (base and adapter) and keeps
    `state_dict = model.state_dict()` from before `shard_base`; the other ranks build the same model without weights
    (`with accelerate.init_empty_weights(include_buffers=False):`, so that non-persistent buffers such as the rotary
    frequencies are computed as usual) and pass `state_dict=None`. Every rank then calls `shard_base(model,
    sync_adapter=False)` and this function, which allocates the tensors still on the meta device (on the mesh's
    device) and broadcasts rank 0's values with `torch.distributed.checkpoint.state_dict.set_model_state_dict(...,
    StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))`: each rank keeps its shards of the base and a
    full copy of the adapter and masks.

    Args:
        model: the model after `shard_base(model, sync_adapter=False)`.
        state_dict: on rank 0, the full state dict (names as in `model.state_dict()` before sharding, tensors on the
            CPU or rank 0's device); ignored on the other ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sharded = [p for p in model.parameters() if is_sharded(p)]
    if not sharded:
        raise ValueError(
            "load_from_rank0: the model is not sharded; call shard_base(model, sync_adapter=False) first."
        )
    device = _device_of(sharded[0].device_mesh)
    rank = dist.get_rank()
    if rank == 0 and not state_dict:
        raise ValueError("load_from_rank0: rank 0 must pass the full state dict of the model (model.state_dict()).")
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state_dict if rank == 0 else {}, options=options)
