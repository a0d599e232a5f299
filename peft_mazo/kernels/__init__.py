"""Fast composition of a MaZO layer's effective weight, with a plain-PyTorch reference for every kernel.

`compose_lora_weight` and `compose_dense_weight` compute exactly what `reference.py` defines (see there for the
formulas and shapes). They run a Triton kernel (`_triton.py`) when

- the tensors are on a CUDA device, Triton imports, and `PEFT_MAZO_DISABLE_KERNELS` is not set to a true value
  ("1", "true", "yes", "on"; read at every call, so it can be flipped at run time);
- the inputs are what the kernel handles: fp32 adapter tensors (LoRA rank r <= 128; int16/int32 dense columns) and a
  bf16/fp16/fp32 base weight with contiguous rows.

Otherwise (CPU, float64 adapters, ...) they run the reference. If a kernel ever raises (e.g. it cannot be compiled
for this GPU), a `RuntimeWarning` is issued once and that kernel is not tried again in this process.

Autograd: the kernels are wrapped in `torch.autograd.Function`s whose backward is plain PyTorch, so backprop
optimizers work on the fast path too: `∂W_eff/∂W = I` (the gradient passes through), for LoRA
`G_m = s · (G ⊙ M)`, `∂B = G_m Aᵀ`, `∂A = Bᵀ G_m`, and for dense `∂values = G.gather(1, columns)`. Under `no_grad`
(ZO training) the kernel is called directly.

LoRA precision: the `B A` tile is a `tl.dot` over r with fp32 inputs. With `torch.get_float32_matmul_precision()`
"highest" (PyTorch's default, i.e. what the reference's fp32 matmul does) it runs as "tf32x3" (three TF32 products,
about fp32 accuracy); with "high" or "medium" as plain "tf32" (what PyTorch itself would then use). Either way the
result is rounded to the weight's dtype. Measured on an H100 with `B A` as large as `W` (docs/performance.md): against
the reference, tf32x3 differs by 1.4e-5 relative (0.004 % of bf16 elements one ulp apart), tf32 by 8.9e-4 (3.8 %);
against a float64 truth both sit at the bf16 rounding error itself (9.6e-4; tf32 1.0e-3).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

from ..mask import unpack_bits
from .reference import (
    compose_dense_weight_reference,
    compose_full_weight_reference,
    compose_lora_weight_reference,
    lora_delta_reference,
)


__all__ = [
    "ENV_DISABLE",
    "compose_dense_weight",
    "compose_dense_weight_reference",
    "compose_full_weight_reference",
    "compose_lora_weight",
    "compose_lora_weight_reference",
    "dispatch_counts",
    "kernels_enabled",
    "lora_precision",
    "lora_delta_reference",
    "triton_available",
]

ENV_DISABLE = "PEFT_MAZO_DISABLE_KERNELS"
_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TRITON: Optional[Any] = None  # the `_triton` module once imported, False if it cannot be
_FAILED: set[str] = set()
dispatch_counts: dict[str, int] = {"lora_triton": 0, "lora_reference": 0, "dense_triton": 0, "dense_reference": 0}
"""How often each path ran in this process (for benchmarks and tests to see which path was taken)."""


def _triton_module() -> Optional[Any]:
    """`peft_mazo.kernels._triton`, imported on first use; None when Triton is not installed or fails to import."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import _triton as module
        except Exception:  # ImportError, or a Triton build that cannot load on this machine
            module = False
        _TRITON = module
    return _TRITON or None


def triton_available() -> bool:
    """True when Triton imports (the kernels can be compiled, given a CUDA device)."""
    return _triton_module() is not None


def kernels_enabled() -> bool:
    """False when `PEFT_MAZO_DISABLE_KERNELS` is set to a true value or Triton is missing."""
    if os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return triton_available()


def lora_precision() -> str:
    """The `tl.dot` input precision for the LoRA product: "tf32x3" at PyTorch's "highest" fp32 matmul precision."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run_or_fall_back(name: str, fast, slow) -> torch.Tensor:
    """Run `fast()`; if it raises, warn once, never try kernel `name` again, and run `slow()`."""
    try:
        result = fast()
    except Exception as error:  # noqa: BLE001 - a kernel that cannot run must not stop training
        _FAILED.add(name)
        warnings.warn(
            f"peft_mazo: the Triton '{name}' kernel failed ({type(error).__name__}: {error}); using the PyTorch "
            f"reference from now on (set {ENV_DISABLE}=1 to silence this).",
            RuntimeWarning,
            stacklevel=3,
        )
        dispatch_counts[f"{name}_reference"] += 1
        return slow()
    dispatch_counts[f"{name}_triton"] += 1
    return result


# ---------------------------------------------------------------------------------------------------------------------
# LoRA mode
# ---------------------------------------------------------------------------------------------------------------------
class _ComposeLoRA(torch.autograd.Function):
    """The Triton LoRA composition with a plain-PyTorch backward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        weight: torch.Tensor,
        lora_B: torch.Tensor,
        lora_A: torch.Tensor,
        bits: Optional[torch.Tensor],
        scale: float,
        precision: str,
        interpret: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(lora_B, lora_A, bits)
        ctx.scale = scale
        module = _triton_module()
        return module.compose_lora(weight, lora_B, lora_A, bits, scale, precision=precision, interpret=interpret)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        lora_B, lora_A, bits = ctx.saved_tensors
        grad_weight = grad_out if ctx.needs_input_grad[0] else None
        grad_B = grad_A = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = grad_out.to(lora_A.dtype) * ctx.scale
            if bits is not None:
                g = g * unpack_bits(bits, lora_A.shape[1])
            if ctx.needs_input_grad[1]:
                grad_B = g @ lora_A.T
            if ctx.needs_input_grad[2]:
                grad_A = lora_B.T @ g
        return grad_weight, grad_B, grad_A, None, None, None, None


def _lora_kernel_applies(
    weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, bits: Optional[torch.Tensor]
) -> bool:
    if "lora" in _FAILED or not weight.is_cuda or not kernels_enabled():
        return False
    device = weight.device
    if lora_A.device != device or lora_B.device != device or (bits is not None and bits.device != device):
        return False
    return (
        weight.dtype in _WEIGHT_DTYPES
        and weight.dim() == 2
        and weight.stride(1) == 1
        and lora_A.dtype == torch.float32
        and lora_B.dtype == torch.float32
        and 1 <= lora_A.shape[0] <= _triton_module().MAX_RANK
        and (bits is None or bits.dtype == torch.uint8)
    )


def compose_lora_weight(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    bits: Optional[torch.Tensor],
    scale: float,
    precision: Optional[str] = None,
) -> torch.Tensor:
    """`round_to(W.dtype)(W.float() + (s · B A) ⊙ M)`: the LoRA-mode effective weight, on the fastest path.

    Args:
        weight (`torch.Tensor`): (out, in) base weight (bf16, fp16 or fp32).
        lora_B (`torch.Tensor`): (out, r) fp32 (fp64 takes the reference path).
        lora_A (`torch.Tensor`): (r, in), same dtype as `lora_B`.
        bits (`torch.Tensor`, *optional*): (out, ceil(in / 8)) uint8 packed mask (bit `j % 8` of byte `j // 8`), or
            None for an unmasked delta.
        scale (`float`): `lora_alpha / r`.
        precision (`str`, *optional*): the kernel's `tl.dot` input precision ("tf32", "tf32x3", "ieee"); default
            `lora_precision()`.

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype`; differentiable w.r.t. `weight`, `lora_B` and
        `lora_A` on both paths.
    """
    if not _lora_kernel_applies(weight, lora_B, lora_A, bits):
        dispatch_counts["lora_reference"] += 1
        return compose_lora_weight_reference(weight, lora_B, lora_A, bits, scale)
    precision = precision or lora_precision()
    module = _triton_module()
    if _needs_grad(weight, lora_B, lora_A):

        def fast() -> torch.Tensor:
            return _ComposeLoRA.apply(weight, lora_B, lora_A, bits, float(scale), precision, False)

    else:

        def fast() -> torch.Tensor:
            return module.compose_lora(weight, lora_B, lora_A, bits, float(scale), precision=precision)

    return _run_or_fall_back("lora", fast, lambda: compose_lora_weight_reference(weight, lora_B, lora_A, bits, scale))


# ---------------------------------------------------------------------------------------------------------------------
# dense mode
# ---------------------------------------------------------------------------------------------------------------------
class _ComposeDense(torch.autograd.Function):
    """The Triton dense composition with a plain-PyTorch backward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, interpret: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(columns)
        ctx.values_dtype = values.dtype
        return _triton_module().compose_dense(weight, columns, values, interpret=interpret)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (columns,) = ctx.saved_tensors
        grad_weight = grad_out if ctx.needs_input_grad[0] else None
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = grad_out.gather(1, columns.long()).to(ctx.values_dtype)
        return grad_weight, None, grad_values, None


def _dense_kernel_applies(weight: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> bool:
    if "dense" in _FAILED or not weight.is_cuda or not kernels_enabled():
        return False
    if columns.device != weight.device or values.device != weight.device:
        return False
    return (
        weight.dtype in _WEIGHT_DTYPES
        and weight.dim() == 2
        and weight.stride(1) == 1
        and columns.dtype in (torch.int16, torch.int32)
        and values.dtype == torch.float32
    )


def compose_dense_weight(weight: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `W` with `W[i, columns[i, j]] = round_to(W.dtype)(W[i, columns[i, j]] + values[i, j])`.

    Args:
        weight (`torch.Tensor`): (out, in) base weight (bf16, fp16 or fp32).
        columns (`torch.Tensor`): (out, k) kept columns of every row, distinct within a row (int16/int32 on the fast
            path; int64 takes the reference path).
        values (`torch.Tensor`): (out, k) fp32 delta values (fp64 takes the reference path).

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype`; differentiable w.r.t. `weight` and `values` on
        both paths.
    """
    if not _dense_kernel_applies(weight, columns, values):
        dispatch_counts["dense_reference"] += 1
        return compose_dense_weight_reference(weight, columns, values)
    module = _triton_module()
    if _needs_grad(weight, values):

        def fast() -> torch.Tensor:
            return _ComposeDense.apply(weight, columns, values, False)

    else:

        def fast() -> torch.Tensor:
            return module.compose_dense(weight, columns, values)

    return _run_or_fall_back("dense", fast, lambda: compose_dense_weight_reference(weight, columns, values))
