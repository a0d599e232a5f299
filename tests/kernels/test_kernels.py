"""`peft_mazo.kernels`: the references against explicit definitions, the Triton kernels against the references.

The Triton kernels run under Triton's CPU interpreter here (skipped when Triton is not installed) and on the GPU in
the CUDA tests (skipped on CPU). The interpreter rounds fp32 -> bf16 by truncation where the GPU rounds to nearest
even, so on half-precision weights the interpreted kernels are checked to within one unit in the last place (and by
relative error); on fp32 weights, where nothing is rounded, exactly (dense) or to fp32 accuracy (LoRA).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import pytest
import torch

from peft_mazo import kernels
from peft_mazo import mask as mask_ops
from peft_mazo.kernels import (
    compose_dense_weight,
    compose_dense_weight_reference,
    compose_full_weight_reference,
    compose_lora_weight,
    compose_lora_weight_reference,
)


HAS_TRITON = importlib.util.find_spec("triton") is not None and kernels.triton_available()


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


# Triton's CPU interpreter runs these kernels from 3.9 on (3.6 fails with NumPy 2, whatever the kernel). With such a
# Triton installed (the test extra asks for it), an interpreter failure is a test failure, never a skip.
INTERPRETER_WORKS = HAS_TRITON and _triton_version() >= (3, 9)
needs_triton = pytest.mark.skipif(
    not INTERPRETER_WORKS,
    reason="needs triton >= 3.9, whose CPU interpreter runs the kernels (pip install -e .[test])",
)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def random_columns(out_features: int, in_features: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(out, k) distinct ascending random columns of every row (int64)."""
    return mask_ops.topk_columns(torch.rand(out_features, in_features, generator=generator), k)


def explicit_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack an (out, in) bool mask by hand: bit j % 8 of byte j // 8 (independent of `mask.pack_bits`)."""
    out_features, in_features = mask.shape
    packed = torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8)
    for j in range(in_features):
        packed[:, j // 8] |= mask[:, j].to(torch.uint8) << (j % 8)
    return packed


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of every element of `x` (in `x.dtype`'s format), as fp32."""
    _, exponent = torch.frexp(x.float())
    return torch.finfo(x.dtype).eps * torch.exp2(exponent.float() - 1)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    return float((out64 - ref64).norm() / ref64.norm())


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    assert bool(((out.float() - ref.float()).abs() <= ulp(ref)).all())


def lora_inputs(
    out_features: int,
    in_features: int,
    r: int,
    dtype: torch.dtype,
    masked: bool,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Random W (dtype), B, A (fp32), packed bits (or None) and the dense bool mask (all ones without a mask)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    lora_B = torch.randn(out_features, r, generator=g)
    lora_A = torch.randn(r, in_features, generator=g) / r**0.5
    if masked:
        k = max(1, in_features // 5)
        mask = mask_ops.indices_to_dense(random_columns(out_features, in_features, k, g), in_features)
        bits = explicit_bits(mask)
    else:
        mask, bits = torch.ones(out_features, in_features, dtype=torch.bool), None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(weight), to(lora_B), to(lora_A), to(bits), to(mask)


def dense_inputs(
    out_features: int,
    in_features: int,
    k: int,
    dtype: torch.dtype,
    index_dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    columns = random_columns(out_features, in_features, k, g).to(index_dtype)
    values = torch.randn(out_features, k, generator=g)
    return weight.to(device), columns.to(device), values.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# references against explicit definitions
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [True, False])
def test_lora_reference_is_the_definition(dtype: torch.dtype, masked: bool) -> None:
    weight, lora_B, lora_A, bits, mask = lora_inputs(24, 37, 5, dtype, masked, seed=1)
    scale = 0.75
    explicit = (weight.float() + (scale * (lora_B @ lora_A)) * mask.float()).to(dtype)
    out = compose_lora_weight_reference(weight, lora_B, lora_A, bits, scale)
    assert out.dtype == dtype and torch.equal(out, explicit)
    # the bits follow mask.py's layout (and the padding bits of the last byte are ignored)
    if masked:
        assert torch.equal(mask_ops.pack_bits(mask), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_dense_reference_is_the_definition(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    weight, columns, values = dense_inputs(9, 23, 4, dtype, index_dtype, seed=2)
    explicit = weight.clone()
    for i in range(weight.shape[0]):
        for j in range(columns.shape[1]):
            c = int(columns[i, j])
            explicit[i, c] = (weight[i, c].float() + values[i, j]).to(dtype)
    out = compose_dense_weight_reference(weight, columns, values)
    assert out.dtype == dtype and torch.equal(out, explicit)
    kept = mask_ops.indices_to_dense(columns, weight.shape[1])
    assert torch.equal(out[~kept], weight[~kept])  # nothing outside the mask moves


def test_full_reference_is_the_definition() -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 11, generator=g).bfloat16()
    values = torch.randn(7, 11, generator=g)
    assert torch.equal(compose_full_weight_reference(weight, values), (weight.float() + values).bfloat16())


def test_reference_gradients() -> None:
    weight, lora_B, lora_A, bits, mask = lora_inputs(12, 20, 3, torch.float32, True, seed=4)
    lora_B.requires_grad_(True)
    lora_A.requires_grad_(True)
    grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(5))
    (compose_lora_weight_reference(weight, lora_B, lora_A, bits, 0.5) * grad).sum().backward()
    masked_grad = 0.5 * grad * mask.float()
    torch.testing.assert_close(lora_B.grad, masked_grad @ lora_A.detach().T)
    torch.testing.assert_close(lora_A.grad, lora_B.detach().T @ masked_grad)


def test_dispatch_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    weight, lora_B, lora_A, bits, _ = lora_inputs(8, 16, 2, torch.bfloat16, True, seed=6)
    before = dict(kernels.dispatch_counts)
    out = compose_lora_weight(weight, lora_B, lora_A, bits, 2.0)
    assert torch.equal(out, compose_lora_weight_reference(weight, lora_B, lora_A, bits, 2.0))
    assert kernels.dispatch_counts["lora_reference"] == before["lora_reference"] + 1
    w, c, v = dense_inputs(8, 16, 3, torch.bfloat16, torch.int16, seed=7)
    assert torch.equal(compose_dense_weight(w, c, v), compose_dense_weight_reference(w, c, v))
    assert kernels.dispatch_counts["dense_reference"] == before["dense_reference"] + 1
    monkeypatch.setenv(kernels.ENV_DISABLE, "1")
    assert not kernels.kernels_enabled()


def test_lora_precision_follows_torch() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels.lora_precision() == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert kernels.lora_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels under the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------------
LORA_CASES = [  # (out, in, r, masked): odd sizes and in % 8 != 0 exercise the tile and byte tails
    (33, 77, 5, True),
    (64, 64, 16, True),
    (48, 100, 40, False),
    (17, 128, 1, True),
    (40, 72, 128, True),
]


@needs_triton
@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("bits_reshape", [False, True])
def test_lora_kernel_interpreted(case: tuple, bits_reshape: bool) -> None:
    from peft_mazo.kernels import _triton

    out_features, in_features, r, masked = case
    config = _triton.LoRAKernelConfig(block_m=16, block_n=32, programs_per_sm=1, bits_reshape=bits_reshape)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight, lora_B, lora_A, bits, _ = lora_inputs(out_features, in_features, r, dtype, masked, seed=r + 10)
        poisoned = torch.full_like(weight, float("nan"))
        out = _triton.compose_lora(weight, lora_B, lora_A, bits, 0.5, "ieee", config, out=poisoned, interpret=True)
        ref = compose_lora_weight_reference(weight, lora_B, lora_A, bits, 0.5)
        assert out.data_ptr() == poisoned.data_ptr()
        assert torch.isfinite(out).all()
        if dtype == torch.float32:
            assert rel_error(out, ref) < 1e-6
        else:
            assert_within_one_ulp(out, ref)
            assert rel_error(out, ref) < 1e-2


DENSE_CASES = [(33, 77, 9), (64, 64, 1), (20, 300, 60), (5, 40, 40)]  # (out, in, k); k = in: every entry kept


@needs_triton
@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("copy", [True, False])
def test_dense_kernel_interpreted(case: tuple, copy: bool) -> None:
    from peft_mazo.kernels import _triton

    out_features, in_features, k = case
    config = _triton.DenseKernelConfig(block_rows=4, block_n=32, block_k=16, copy=copy)
    for dtype in (torch.float32, torch.bfloat16):
        for index_dtype in (torch.int16, torch.int32):
            weight, columns, values = dense_inputs(out_features, in_features, k, dtype, index_dtype, seed=k)
            poisoned = torch.full_like(weight, float("nan"))
            out = _triton.compose_dense(weight, columns, values, config, out=poisoned, interpret=True)
            ref = compose_dense_weight_reference(weight, columns, values)
            assert torch.isfinite(out).all()
            if dtype == torch.float32:
                assert torch.equal(out, ref)
            else:
                assert_within_one_ulp(out, ref)
            kept = mask_ops.indices_to_dense(columns, in_features)
            assert torch.equal(out[~kept], weight[~kept])


@needs_triton
def test_kernel_autograd_matches_reference() -> None:
    """The autograd Functions around the kernels give the reference's gradients (interpreter, fp32 weights)."""
    weight, lora_B, lora_A, bits, _ = lora_inputs(24, 40, 4, torch.float32, True, seed=20)
    grad = torch.randn(24, 40, generator=torch.Generator().manual_seed(21))
    grads = []
    for fast in (False, True):
        w, b, a = (t.detach().clone().requires_grad_(True) for t in (weight, lora_B, lora_A))
        if fast:
            out = kernels._ComposeLoRA.apply(w, b, a, bits, 0.5, "ieee", True)
        else:
            out = compose_lora_weight_reference(w, b, a, bits, 0.5)
        (out * grad).sum().backward()
        grads.append((w.grad, b.grad, a.grad))
    for fast_grad, ref_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fast_grad, ref_grad)

    weight, columns, values = dense_inputs(24, 40, 6, torch.float32, torch.int16, seed=22)
    grads = []
    for fast in (False, True):
        w, v = weight.clone().requires_grad_(True), values.clone().requires_grad_(True)
        out = (
            kernels._ComposeDense.apply(w, columns, v, True) if fast else compose_dense_weight_reference(w, columns, v)
        )
        (out * grad).sum().backward()
        grads.append((w.grad, v.grad))
    for fast_grad, ref_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fast_grad, ref_grad)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA (skipped on CPU)
# ---------------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_kernel_cuda(masked: bool, dtype: torch.dtype) -> None:
    weight, lora_B, lora_A, bits, _ = lora_inputs(300, 520, 64, dtype, masked, seed=30, device="cuda")
    before = kernels.dispatch_counts["lora_triton"]
    for precision in ("ieee", "tf32x3", "tf32"):
        out = compose_lora_weight(weight, lora_B, lora_A, bits, 0.5, precision=precision)
        ref = compose_lora_weight_reference(weight, lora_B, lora_A, bits, 0.5)
        assert torch.isfinite(out).all()
        # measured on an H100 (docs/performance.md): ieee 0, tf32x3 1.4e-5, tf32 8.9e-4 relative to the reference
        assert rel_error(out, ref) < {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 3e-3}[precision]
    assert kernels.dispatch_counts["lora_triton"] == before + 3


@needs_cuda
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_dense_kernel_cuda(index_dtype: torch.dtype) -> None:
    weight, columns, values = dense_inputs(300, 520, 52, torch.bfloat16, index_dtype, seed=31, device="cuda")
    before = kernels.dispatch_counts["dense_triton"]
    out = compose_dense_weight(weight, columns, values)
    assert torch.equal(out, compose_dense_weight_reference(weight, columns, values))  # same rounding: bit-exact
    assert kernels.dispatch_counts["dense_triton"] == before + 1


@needs_cuda
def test_cuda_autograd_through_the_kernels() -> None:
    weight, lora_B, lora_A, bits, _ = lora_inputs(64, 96, 8, torch.bfloat16, True, seed=32, device="cuda")
    probe = torch.randn(weight.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(33))
    b, a = lora_B.clone().requires_grad_(True), lora_A.clone().requires_grad_(True)
    (compose_lora_weight(weight, b, a, bits, 0.5).float() * probe).sum().backward()  # a loss that depends on W_eff
    b_ref, a_ref = lora_B.clone().requires_grad_(True), lora_A.clone().requires_grad_(True)
    (compose_lora_weight_reference(weight, b_ref, a_ref, bits, 0.5).float() * probe).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad)
    torch.testing.assert_close(a.grad, a_ref.grad)


def test_a_kernel_that_raises_warns_once_and_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "_FAILED", set())
    calls = []

    def broken() -> torch.Tensor:
        calls.append("fast")
        raise RuntimeError("cannot compile for this GPU")

    with pytest.warns(RuntimeWarning, match=r"Triton 'lora' kernel failed \(RuntimeError: cannot compile"):
        out = kernels._run_or_fall_back("lora", broken, lambda: torch.ones(2))
    assert torch.equal(out, torch.ones(2)) and calls == ["fast"] and "lora" in kernels._FAILED
    # and it is not tried again: the dispatcher checks `_FAILED` before anything else
    monkeypatch.setattr(kernels, "kernels_enabled", lambda: pytest.fail("a failed kernel must not be tried again"))
    weight, lora_B, lora_A, bits, _ = lora_inputs(8, 16, 2, torch.float32, True, seed=3)
    assert not kernels._lora_kernel_applies(weight, lora_B, lora_A, bits)
