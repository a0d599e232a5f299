"""bitsandbytes 4-bit / 8-bit base layers: detection, dequantization and requantization after a merge.

The adapter never changes a quantized weight during training; these helpers exist for the mask (|W| of the
dequantized weight, one layer at a time) and for the lossy merge (dequantize, add, requantize).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn


def quantization_kind(base_layer: nn.Module) -> Literal[False, "4bit", "8bit"]:
    """'4bit' / '8bit' for a bitsandbytes `Linear4bit` / `Linear8bitLt` base, else False."""
    weight = getattr(base_layer, "weight", None)
    return get_bnb_param_type(weight) if weight is not None else False


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of `base_layer` as a float tensor: dequantized for bitsandbytes, the parameter otherwise.

    For a quantized base this allocates one layer's dense weight; the caller should drop it after use.
    """
    kind = quantization_kind(base_layer)
    weight = base_layer.weight
    if kind == "4bit":
        _restore_standard_4bit_layout(weight)
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    if kind == "8bit":
        return dequantize_bnb_weight(weight, state=base_layer.state)
    return weight.detach()


def _restore_standard_4bit_layout(weight: torch.nn.Parameter) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, so that `dequantize_4bit` reads it correctly.

    On CPUs with AVX-512 BF16, bitsandbytes repacks a 4-bit weight into a kernel-specific layout on the first
    inference forward. It undoes this itself before saving or moving the weight (same call as here); the next
    forward repacks it.
    """
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def replace_quantized_weight(base_layer: nn.Module, new_weight: torch.Tensor) -> None:
    """Requantize `new_weight` (out, in, float) into `base_layer` in the layer's own format. Lossy: warns."""
    import bitsandbytes as bnb

    kind = quantization_kind(base_layer)
    warnings.warn(
        f"Merging a MaZO adapter into a {kind} bitsandbytes layer requantizes the weight: outputs may differ slightly "
        "from the unmerged adapter (rounding).",
        stacklevel=3,
    )
    weight = base_layer.weight
    if kind == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        base_layer.weight = bnb.nn.Params4bit(new_weight.to("cpu"), **kwargs).to(weight.device)
    elif kind == "8bit":
        base_layer.weight = bnb.nn.Int8Params(
            new_weight.to("cpu").to(torch.float16), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
        base_layer.state.reset_grads()
    else:
        raise TypeError(f"{type(base_layer).__name__} is not a bitsandbytes quantized layer.")
