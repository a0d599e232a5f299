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
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            warnings.warn(
                "This 4-bit layer ran a CPU inference forward before MaZO wrapped it, and bitsandbytes repacked its "
                "weight; reading the weight through the layer's forward (bf16-rounded). Wrap the model before running "
                "it on the CPU to avoid this.",
                stacklevel=3,
            )
            return _weight_through_forward(base_layer)
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    if kind == "8bit":
        return dequantize_bnb_weight(weight, state=base_layer.state)
    return weight.detach()


def keep_standard_4bit_layout(base_layer: nn.Module) -> bool:
    """Stop bitsandbytes from repacking this 4-bit layer's weight for its AVX-512 BF16 CPU kernel.

    bitsandbytes (0.50) repacks a `Linear4bit` weight into a kernel-specific layout at its first CPU inference forward,
    and its inverse does not restore the block scales exactly, so the dequantized weight (the mask's |W|, merges) would
    be wrong and the layer corrupted afterwards. A MaZO layer keeps the standard layout; it only costs that CPU kernel.
    Returns True when the layer was changed.
    """
    if getattr(base_layer, "support_avx512bf16_for_cpu", False):
        base_layer.support_avx512bf16_for_cpu = False
        return True
    return False


def _weight_through_forward(base_layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of a layer whose packed format cannot be dequantized directly: `base(I) - bias`, transposed.

    Rounded like the layer's own forward (bf16 in bitsandbytes' CPU kernel); used only for a weight that was repacked
    before MaZO wrapped the layer.
    """
    eye = torch.eye(base_layer.in_features, dtype=torch.float32, device=base_layer.weight.device)
    with torch.no_grad():
        out = base_layer(eye).float()
    if getattr(base_layer, "bias", None) is not None:
        out = out - base_layer.bias.float()
    return out.T.contiguous()


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
