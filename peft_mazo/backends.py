"""How a MaZO layer uses its base layer, one entry per kind of base (chosen once, when the layer is built).

A backend says how to read the base weight as a dense (out, in) tensor (the mask's |W|, merging), how to run the
forward with the active adapters' deltas, and how to write a merged weight back. `dispatch_backend(base_layer)` picks
the entry, as peft's `dispatch_*` functions pick a layer class; a new quantization backend is a new entry here, not a
new branch in `layer.Linear`.

- "dense" (`torch.nn.Linear`): `y = x (W + ΔW)ᵀ + b`, the effective weight composed (one layer's worth, transiently)
  and applied in one matmul; merging writes the weight in its own dtype.
- "bnb-4bit" (bitsandbytes `Linear4bit`): the weight dequantized, the deltas added, one matmul in the layer's compute
  dtype (as bitsandbytes' own forward does); merging requantizes (lossy, warns).
- "bnb-8bit" (`Linear8bitLt`), and a 4-bit weight that bitsandbytes repacked for its CPU kernel before MaZO wrapped it:
  the base layer's own output plus `x ΔWᵀ`; merging requantizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantized import dense_weight, quantization_kind, replace_quantized_weight


Forward = Callable[..., torch.Tensor]  # (mazo_layer, x, adapter_names, *args, **kwargs) -> y


@dataclass(frozen=True)
class BaseBackend:
    """One kind of base layer.

    Attributes:
        name (`str`): "dense", "bnb-4bit", "bnb-8bit" or "bnb-4bit-repacked".
        forward (`Callable`): `forward(layer, x, adapter_names, *args, **kwargs)`: x (..., in) -> y (..., out).
        read_weight (`Callable`): `read_weight(base_layer)`: the dense (out, in) weight.
        write_weight (`Callable`): `write_weight(base_layer, weight)`: store a merged (out, in) weight.
        quantized (`bool`): the weight is stored quantized (merging rounds it).
    """

    name: str
    forward: Forward
    read_weight: Callable[[nn.Module], torch.Tensor]
    write_weight: Callable[[nn.Module, torch.Tensor], None]
    quantized: bool


def _composed_forward(
    layer: Any, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    base = layer.get_base_layer()
    weight = base.weight
    for name in adapter_names:
        weight = layer._add_delta(weight, name)
    return F.linear(x, weight, base.bias)


def _dequantized_composed_forward(
    layer: Any, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    base = layer.get_base_layer()
    compute_dtype = getattr(base, "compute_dtype", None) or x.dtype
    weight = dense_weight(base).to(compute_dtype)
    for name in adapter_names:
        weight = layer._add_delta(weight, name)
    bias = None if base.bias is None else base.bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), weight, bias).to(x.dtype)


def _additive_forward(
    layer: Any, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    for name in adapter_names:
        delta = layer.get_delta_weight(name)
        result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
    return result


def _plain_weight(base_layer: nn.Module) -> torch.Tensor:
    return base_layer.weight.detach()


def _assign_weight(base_layer: nn.Module, weight: torch.Tensor) -> None:
    base_layer.weight.data = weight


BACKENDS = {
    "dense": BaseBackend("dense", _composed_forward, _plain_weight, _assign_weight, quantized=False),
    "bnb-4bit": BaseBackend(
        "bnb-4bit", _dequantized_composed_forward, dense_weight, replace_quantized_weight, quantized=True
    ),
    "bnb-4bit-repacked": BaseBackend(
        "bnb-4bit-repacked", _additive_forward, dense_weight, replace_quantized_weight, quantized=True
    ),
    "bnb-8bit": BaseBackend("bnb-8bit", _additive_forward, dense_weight, replace_quantized_weight, quantized=True),
}


def dispatch_backend(base_layer: nn.Module) -> BaseBackend:
    """The backend of `base_layer`: bitsandbytes 4-bit (standard or CPU-repacked layout) or 8-bit, else dense."""
    kind = quantization_kind(base_layer)
    if kind == "4bit":
        repacked = getattr(getattr(base_layer.weight, "quant_state", None), "packing_format_for_cpu", False)
        return BACKENDS["bnb-4bit-repacked" if repacked else "bnb-4bit"]
    if kind == "8bit":
        return BACKENDS["bnb-8bit"]
    return BACKENDS["dense"]
