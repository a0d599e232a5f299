"""A MaZO adapter's saved form: the tensors it holds, their keys, and the checks that saved tensors fit a model.

peft saves an adapter with `get_peft_model_state_dict` and loads one with `set_peft_model_state_dict`; both hand the
method-specific part to the tuner's hooks (`MaZOModel._get_adapter_state_dict` and
`MaZOModel._remap_adapter_state_dict_for_load`), which use this module. For every adapted module `<name>` of the base
model, a saved adapter (`adapter_model.safetensors`) holds, under `base_model.model.<name>.` and without the adapter
name:

- `mazo_shape`: int64 [out, in], the shape of the weight it was trained on;
- the delta: `mazo_values` (dense, r = 0) or `mazo_A` and `mazo_B` (LoRA);
- the mask, unless `scorer="none"`: `mazo_columns` (dense: the kept columns) or `mazo_bits` (LoRA: the packed bits).

Every adapter saved by peft-mazo so far has this layout (`tests/tuner/test_save_load.py` pins it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from . import mask as mask_ops
from .config import MaZOConfig
from .scorers import get_scorer


DELTA_KINDS = ("mazo_values", "mazo_A", "mazo_B")
MASK_KINDS = ("mazo_columns", "mazo_bits")
SHAPE_KIND = "mazo_shape"
BUFFER_KINDS = MASK_KINDS + (SHAPE_KIND,)
SAVED_KINDS = DELTA_KINDS + BUFFER_KINDS
SAVED_PREFIX = "base_model.model."  # peft's prefix of every saved key (a `PeftModel`'s base model)
FIX_MASK = (
    "The mask file was edited or damaged: restore the adapter from its original save, or recompute the mask "
    "(compute_importance) and save it again."
)


@dataclass(frozen=True)
class LayerSpec:
    """What the saved tensors of one adapted layer must look like.

    Args:
        shape (`tuple[int, int]`): the weight's (out, in).
        k (`int`): kept entries per row.
        r (`int`): the LoRA rank; 0 for a dense delta.
        masked (`bool`): whether the adapter has a mask (every scorer but "none").
    """

    shape: tuple[int, int]
    k: int
    r: int
    masked: bool

    @classmethod
    def from_config(cls, config: MaZOConfig, shape: tuple[int, int]) -> LayerSpec:
        """The spec that `config` gives a linear layer of weight shape (out, in)."""
        return cls(shape, config.kept_per_row(shape[1]), config.r, get_scorer(config.scorer).masked)

    @property
    def needed(self) -> tuple[str, ...]:
        """The kinds a saved layer must hold (the shape record is optional)."""
        delta = ("mazo_values",) if self.r == 0 else ("mazo_A", "mazo_B")
        return delta + ((("mazo_columns",) if self.r == 0 else ("mazo_bits",)) if self.masked else ())


def split_key(key: str, adapter_name: Optional[str] = None) -> Optional[tuple[str, str]]:
    """`(module, kind)` of a MaZO state-dict key, `None` for any other key.

    Checkpoint keys end in `.<kind>`; with `adapter_name`, model keys ending in `.<kind>.<adapter_name>` are
    recognised as well.
    """
    for kind in SAVED_KINDS:
        for suffix in ((f".{kind}.{adapter_name}",) if adapter_name is not None else ()) + (f".{kind}",):
            if key.endswith(suffix):
                return key[: -len(suffix)], kind
    return None


# ----------------------------------------------------------------------------------------------------------------------
# one layer
# ----------------------------------------------------------------------------------------------------------------------
def check_saved_layer(
    where: str,
    name: str,
    shapes: Mapping[str, tuple[int, ...]],
    tensor_of: Callable[[str], torch.Tensor],
    weight_shape: tuple[int, int],
    k: int,
    fixes: tuple[str, str, str],
    mask_name: str,
    against: str = "its adapter_config.json",
) -> None:
    """Raise `ValueError` when one layer's saved adapter tensors do not fit the layer: the saved weight shape, the
    kept entries per row against `k`, the packed mask's shape, and the mask's k-per-row invariant. Used on a state
    dict being loaded (`MaZOLayer._check_loaded_adapter`) and by `check_saved_module`.

    Args:
        where (`str`), name (`str`): the adapter and the module checked, for the messages.
        shapes (`Mapping`): the saved tensors' shapes by kind ("mazo_shape", "mazo_values", "mazo_columns", ...).
        tensor_of (`Callable`): the saved tensor of a kind (read only for the shape record and the masks).
        weight_shape (`tuple`): the layer's (out, in).
        k (`int`): the kept entries per row that the adapter's config gives.
        fixes (`tuple`): the fix to name for a layer of other sizes, for a config that does not match the weights,
            and for a broken mask ("" adds nothing to the mask check's own message).
        mask_name (`str`): how the mask is named in its errors.
        against (`str`): where `k` comes from, for the messages.
    """
    fix_base, fix_config, fix_mask = fixes
    out_features, in_features = weight_shape
    if SHAPE_KIND in shapes:
        saved = tuple(int(v) for v in tensor_of(SHAPE_KIND).tolist())
        if saved != weight_shape:
            raise ValueError(
                f"{where}: '{name}' was saved for a weight of shape (out, in) = {saved}, but this base model's layer "
                f"has shape {weight_shape}: a model of other sizes. {fix_base}"
            )
    for kind in ("mazo_values", "mazo_columns"):
        if kind in shapes and shapes[kind] != (out_features, k):
            raise ValueError(
                f"{where} was saved with {shapes[kind][-1]} kept entries per row in '{name}', but {against} (its "
                f"sparsity and scorer) gives k = {k}. {fix_config}"
            )
    packed = (out_features, math.ceil(in_features / 8))
    if "mazo_bits" in shapes and shapes["mazo_bits"] != packed:
        raise ValueError(
            f"{where} holds a packed mask of shape {shapes['mazo_bits']} for '{name}', but the layer's shape "
            f"{weight_shape} needs {packed}. {fix_base}"
        )
    dense = mask_ops.unpack_bits(tensor_of("mazo_bits"), in_features) if "mazo_bits" in shapes else None
    counts = dense.sum(dim=1) if dense is not None else None
    if counts is not None and counts.numel() and bool((counts == counts[0]).all()) and int(counts[0]) != k:
        raise ValueError(  # the same count in every row: a mask of another sparsity, not a damaged one
            f"{where} was saved with {int(counts[0])} kept entries per row in '{name}', but {against} (its "
            f"sparsity and scorer) gives k = {k}. {fix_config}"
        )
    try:
        if "mazo_columns" in shapes:
            mask_ops.check_columns(tensor_of("mazo_columns"), in_features, name=mask_name)
        if dense is not None:
            mask_ops.check_row_counts(dense, k, name=mask_name)
    except ValueError as error:
        if not fix_mask:
            raise
        raise ValueError(f"{error} {fix_mask}") from None


def check_saved_module(
    where: str,
    name: str,
    shapes: Mapping[str, tuple[int, ...]],
    tensor_of: Callable[[str], torch.Tensor],
    spec: LayerSpec,
    against: str,
    fixes: tuple[str, str, str],
    mask_name: str,
) -> None:
    """Raise `ValueError` unless one module's saved tensors fit `spec`: dense or LoRA, a mask only where there is
    one, then `check_saved_layer` (shape record, k, the mask), the LoRA rank, and every needed tensor present.

    `spec` replaces `check_saved_layer`'s `weight_shape` and `k`; `against` names where `spec` comes from, as the
    subject of "says r = 4" (e.g. "its adapter_config.json"); the other arguments are `check_saved_layer`'s.
    """
    fix_config = fixes[1]
    out_features, in_features = spec.shape
    if spec.r == 0 and ("mazo_A" in shapes or "mazo_B" in shapes):
        raise ValueError(
            f"{where} holds LoRA weights (mazo_A, mazo_B) for '{name}', but {against} says r = 0 (dense). {fix_config}"
        )
    if spec.r > 0 and "mazo_values" in shapes:
        raise ValueError(
            f"{where} holds a dense delta (mazo_values) for '{name}', but {against} says r = {spec.r} (LoRA). "
            f"{fix_config}"
        )
    if not spec.masked and any(kind in shapes for kind in MASK_KINDS):
        raise ValueError(
            f"{where} holds a mask for '{name}', but {against} says scorer='none' (no mask). {fix_config}"
        )
    check_saved_layer(where, name, shapes, tensor_of, spec.shape, spec.k, fixes, mask_name, against=against)
    if "mazo_A" in shapes and shapes["mazo_A"] != (spec.r, in_features):
        raise ValueError(
            f"{where} was saved with LoRA rank r = {shapes['mazo_A'][0]} ('{name}'.mazo_A has shape "
            f"{shapes['mazo_A']}), but {against} says r = {spec.r}. {fix_config}"
        )
    if "mazo_B" in shapes and shapes["mazo_B"] != (out_features, spec.r):
        raise ValueError(
            f"{where} was saved with '{name}'.mazo_B of shape {shapes['mazo_B']}, but r = {spec.r} and the "
            f"layer's out_features = {out_features} need {(out_features, spec.r)}. {fix_config}"
        )
    absent = [kind for kind in spec.needed if kind not in shapes]
    if absent:
        raise ValueError(
            f"{where} lacks {', '.join(absent)} of '{name}': loading it would leave that layer's delta or mask "
            f"undefined. The file is incomplete (save the adapter again), or it and {against} come from different "
            f"configs. {fix_config}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# a saved adapter against a model, before anything is loaded
# ----------------------------------------------------------------------------------------------------------------------
def check_saved_adapter(config: MaZOConfig, model: nn.Module) -> None:
    """Raise `ValueError` when the adapter being loaded (`config._mazo_source_dir`, set by
    `MaZOConfig.from_pretrained`) does not fit `model` or its own `adapter_config.json`.

    Checked from the safetensors file before any layer is replaced: module names (another architecture), weight shapes
    (a model of other sizes), the rank and the kept entries per row against the config (an edited config), and the
    mask's k-entries-per-row invariant (an edited mask). Only tensor headers are read, plus the masks one at a time.
    """
    source = getattr(config, "_mazo_source_dir", None)
    path = Path(source) / "adapter_model.safetensors" if source else None
    if path is None or not path.is_file():
        return
    from safetensors import safe_open

    where = f"The MaZO adapter in {source}"
    fix_base = "Load it onto the base model it was trained on"
    if config.base_model_name_or_path:
        fix_base += f" ({config.base_model_name_or_path})"
    fix_config = "Use the adapter_config.json saved with these weights (or save the adapter again)."
    modules = dict(model.named_modules())
    try:
        handle_context = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors' SafetensorError: a truncated or corrupted file
        raise ValueError(
            f"Cannot read {path}: {error}. The adapter file is damaged or incomplete (an interrupted copy or save?): "
            "copy it again or save the adapter again."
        ) from None
    with handle_context as handle:
        saved: dict[str, dict[str, str]] = {}
        for key in handle.keys():
            located = split_key(key)
            if located:
                saved.setdefault(located[0].removeprefix(SAVED_PREFIX), {})[located[1]] = key
        missing = sorted(name for name in saved if name not in modules)
        if missing:
            raise ValueError(
                f"{where} has weights for {len(missing)} module(s) that this {type(model).__name__} does not have "
                f"(e.g. '{missing[0]}'): it was saved for a model of another architecture or depth. {fix_base}."
            )
        targeted = [
            n
            for n, m in modules.items()
            if isinstance(m, (nn.Linear, BaseTunerLayer)) and n not in saved and check_target_module_exists(config, n)
        ]
        if targeted and saved:
            raise ValueError(
                f"{where} has no weights for {len(targeted)} layer(s) that its adapter_config.json targets (e.g. "
                f"'{targeted[0]}'): loading it would leave their delta at zero. The file is incomplete; save the "
                "adapter again."
            )
        for name in [n for n in modules if n in saved]:  # in the model's order
            kinds = saved[name]
            module = modules[name]
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"{where} adapts '{name}' as a linear layer, but this model's '{name}' is a "
                    f"{type(base).__name__}: the adapter was saved for another architecture. {fix_base}."
                )
            check_saved_module(
                where,
                name,
                {kind: tuple(handle.get_slice(key).get_shape()) for kind, key in kinds.items()},
                lambda kind, kinds=kinds: handle.get_tensor(kinds[kind]),
                LayerSpec.from_config(config, (base.out_features, base.in_features)),
                against="its adapter_config.json",
                fixes=(f"{fix_base}.", fix_config, FIX_MASK),
                mask_name=f"mask of '{name}' in {path}",
            )


def check_adapter_state(
    state_dict: Mapping[str, torch.Tensor], adapter_name: str, specs: Mapping[str, LayerSpec]
) -> None:
    """Raise `ValueError` unless `state_dict` (peft's, remapped to the model's keys) fills adapter `adapter_name`
    whole: every layer of `specs` gets its delta and mask, of the right kind and shapes, with a valid mask, and no
    MaZO entry is left without a layer. Nothing has been loaded yet when it raises.

    Args:
        state_dict (`Mapping`): keys `<module>.<kind>.<adapter_name>` where they matched the model, checkpoint keys
            (`<module>.<kind>`) where they did not.
        adapter_name (`str`): the adapter being filled.
        specs (`Mapping`): the adapter's layers by module name (as in the model's state dict) and what they hold.
    """
    where = f"The checkpoint loaded into MaZO adapter '{adapter_name}'"
    fix_config = (
        f"load_adapter(path, adapter_name='{adapter_name}') loads into the existing adapter '{adapter_name}': to add "
        "the saved adapter next to it, pass a new adapter_name (or delete_adapter first)."
    )
    against = f"adapter '{adapter_name}' of this model"
    present: dict[str, dict[str, torch.Tensor]] = {}
    strays: list[str] = []
    for key, tensor in state_dict.items():
        located = split_key(key, adapter_name)
        if located is None:
            continue
        module, kind = located
        module = module if module in specs else module.removeprefix(SAVED_PREFIX)
        if module in specs:
            present.setdefault(module, {})[kind] = tensor
        else:
            strays.append(module)
    if strays:
        raise ValueError(
            f"{where} holds tensors for {len(set(strays))} module(s) that {against} does not adapt (e.g. "
            f"'{strays[0]}'): they were saved for another model or with other target_modules. {fix_config}"
        )
    empty = [name for name in specs if name not in present]
    if empty:
        raise ValueError(
            f"{where} holds nothing for {len(empty)} of its {len(specs)} layer(s) (e.g. '{empty[0]}'): loading it "
            "would leave those layers as they are. The adapter file is incomplete, or was saved with other "
            f"target_modules. {fix_config}"
        )
    for name, tensors in present.items():
        check_saved_module(
            where,
            name,
            {kind: tuple(tensor.shape) for kind, tensor in tensors.items()},
            tensors.__getitem__,
            specs[name],
            against=against,
            fixes=("Load the adapter onto the base model it was trained on.", fix_config, FIX_MASK),
            mask_name=f"mask of '{name}' (adapter '{adapter_name}')",
        )
