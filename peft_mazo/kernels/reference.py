"""Plain-PyTorch definitions of the effective-weight compositions of a MaZO layer.

These are the semantics every fast path must reproduce (the Triton kernels in `_triton.py` are checked against them),
and the path used on CPU, for float64 adapters, and whenever the kernels are unavailable or disabled. Shapes, for a
base weight `W` of shape (out, in):

- LoRA mode: `W_eff = round(W.float() + (s · (B @ A)) ⊙ M)`, with `B` (out, r), `A` (r, in), the bit-packed mask `M`
  (out, ceil(in / 8)) uint8 (bit `j % 8` of byte `j // 8`), `s` the scale; without a mask, `M` is all ones.
- dense mode: `W_eff = W` except `W_eff[i, columns[i, j]] = round(W[i, columns[i, j]] + values[i, j])`, with the
  (out, k) kept `columns` (int16/int32/int64) and fp32 `values`.

`round` is the cast back to `W.dtype` (round to nearest even); the sum is done in the adapter's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..mask import unpack_bits


def lora_delta_reference(
    lora_B: torch.Tensor, lora_A: torch.Tensor, bits: Optional[torch.Tensor], scale: float, in_features: int
) -> torch.Tensor:
    """The masked LoRA delta `(s · (B @ A)) ⊙ M`, in the adapter's dtype (differentiable w.r.t. `B` and `A`).

    Args:
        lora_B (`torch.Tensor`): (out, r).
        lora_A (`torch.Tensor`): (r, in).
        bits (`torch.Tensor`, *optional*): (out, ceil(in / 8)) uint8 packed mask; None for no mask.
        scale (`float`): `lora_alpha / r`.
        in_features (`int`): `in`, the number of columns (the packed mask may carry padding bits).

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `lora_A.dtype`.
    """
    delta = (lora_B @ lora_A) * scale
    if bits is not None:
        delta = delta * unpack_bits(bits, in_features)
    return delta


def compose_lora_weight_reference(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    bits: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """`W + (s · (B @ A)) ⊙ M`, summed in the adapter's dtype and rounded once to `weight.dtype`.

    Args:
        weight (`torch.Tensor`): (out, in) base weight (bf16, fp16 or fp32).
        lora_B (`torch.Tensor`): (out, r), fp32 (or fp64).
        lora_A (`torch.Tensor`): (r, in), same dtype as `lora_B`.
        bits (`torch.Tensor`, *optional*): (out, ceil(in / 8)) uint8 packed mask; None for no mask.
        scale (`float`): `lora_alpha / r`.

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype` (differentiable w.r.t. all float inputs).
    """
    delta = lora_delta_reference(lora_B, lora_A, bits, scale, weight.shape[1])
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def compose_dense_weight_reference(weight: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `W` with `W[i, columns[i, j]] = round(W[i, columns[i, j]] + values[i, j])`.

    Touches only the k kept entries of each row (gather, add in the values' dtype, scatter into a copy).

    Args:
        weight (`torch.Tensor`): (out, in) base weight.
        columns (`torch.Tensor`): (out, k) kept columns of every row (any integer dtype), distinct within a row.
        values (`torch.Tensor`): (out, k) delta values (fp32 or fp64).

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype` (differentiable w.r.t. `weight` and `values`).
    """
    columns = columns.long()
    kept = weight.gather(1, columns).to(values.dtype) + values
    return weight.scatter(1, columns, kept.to(weight.dtype))


def compose_full_weight_reference(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`W + values` for an unmasked dense delta (`scorer="none"`): (out, in) both, rounded once to `weight.dtype`."""
    return (weight.to(values.dtype) + values).to(weight.dtype)
