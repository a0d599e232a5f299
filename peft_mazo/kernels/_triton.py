"""Triton kernels that compose a MaZO layer's effective weight in one pass over `W`.

Imported lazily (only when a kernel is first needed), so that importing `peft_mazo` never needs Triton. The kernel
bodies are plain functions, compiled by `triton.jit` or, with `interpret=True`, run by Triton's CPU interpreter on CPU
tensors (tests).

- `compose_lora`: `out = round(W.float() + (s · B A) ⊙ M)`. The grid is (row blocks, column chunks); a program holds
  its (BLOCK_M, r) slice of `B` in registers, walks its column chunk in (BLOCK_M, BLOCK_N) tiles, computes the `B A`
  tile with `tl.dot` (fp32 accumulate), reads the packed mask bits of the tile, adds to `W` in fp32, rounds once and
  writes `out`. DRAM traffic: `W` (2 B/weight for bf16) + bits (1/8 B) + `out` (2 B); `A`/`B` come from L2.
- `compose_dense`: `out = W` with `out[i, c] = round(W[i, c] + v)` at the (out, k) kept columns. A program owns
  BLOCK_ROWS whole rows: it copies them, then (after a CTA barrier, so that its scattered stores land after its own
  copy stores) gathers `W` at the kept columns (L2-resident, just read), adds the fp32 values and scatters into
  `out`. Indices are loaded as stored (int16/int32), never widened to int64 in memory. DRAM traffic: `W` + `out`
  (4 B/weight for bf16) + columns and values (6 B per kept entry).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------------------------------
# kernel bodies (compiled on demand by `_kernel`)
# ---------------------------------------------------------------------------------------------------------------------
def _compose_lora_body(
    w_ptr,
    b_ptr,
    a_ptr,
    bits_ptr,
    out_ptr,
    M,
    N,
    R,
    stride_w,
    stride_b,
    stride_a,
    stride_bits,
    stride_out,
    scale,
    tiles_per_program,
    HAS_MASK: tl.constexpr,
    BITS_RESHAPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    rows64 = rows.to(tl.int64)
    # (BLOCK_M, BLOCK_R) slice of B, loaded once per program; padded ranks are zero
    b = tl.load(
        b_ptr + rows64[:, None] * stride_b + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0
    )
    # this program's columns: tiles_per_program tiles from pid_n * tiles_per_program * BLOCK_N (the last may overrun N)
    for t in range(0, tiles_per_program):
        n0 = (pid_n * tiles_per_program + t) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        a = tl.load(
            a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0
        )
        delta = tl.dot(b, a, input_precision=PRECISION) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows64[:, None] * stride_w + cols[None, :], mask=ok, other=0.0)
        if HAS_MASK:
            if BITS_RESHAPE:
                # one load per byte, expanded to its 8 bits in registers: bit b of byte j is column 8 j + b
                nbytes = (N + 7) // 8
                byte_idx = n0 // 8 + tl.arange(0, BLOCK_N // 8)
                byte_ok = row_ok[:, None] & (byte_idx < nbytes)[None, :]
                packed = tl.load(bits_ptr + rows64[:, None] * stride_bits + byte_idx[None, :], mask=byte_ok, other=0)
                expanded = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
                keep = tl.reshape(expanded, (BLOCK_M, BLOCK_N)) != 0
            else:
                # one (cached) byte load per element
                packed = tl.load(bits_ptr + rows64[:, None] * stride_bits + (cols // 8)[None, :], mask=ok, other=0)
                keep = ((packed.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0
            delta = tl.where(keep, delta, 0.0)
        result = (w.to(tl.float32) + delta).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], result, mask=ok)


def _compose_dense_body(
    w_ptr,
    cols_ptr,
    vals_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_w,
    stride_cols,
    stride_vals,
    stride_out,
    COPY: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if COPY:
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (cols < N)[None, :]
            w = tl.load(w_ptr + rows64[:, None] * stride_w + cols[None, :], mask=ok)
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], w, mask=ok)
        # the scattered stores below overwrite this program's own copy stores: order them after every thread's copy
        tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks < K)[None, :]
        cols = tl.load(cols_ptr + rows64[:, None] * stride_cols + ks[None, :], mask=ok, other=0).to(tl.int32)
        values = tl.load(vals_ptr + rows64[:, None] * stride_vals + ks[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + rows64[:, None] * stride_w + cols, mask=ok, other=0.0)
        result = (w.to(values.dtype) + values).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows64[:, None] * stride_out + cols, result, mask=ok)


_BODIES = {"lora": _compose_lora_body, "dense": _compose_dense_body}
_COMPILED: dict[tuple[str, bool], Any] = {}


def _kernel(name: str, interpret: bool) -> Any:
    """The kernel `name`, compiled by `triton.jit` or wrapped for Triton's CPU interpreter (cached)."""
    key = (name, interpret)
    if key not in _COMPILED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _COMPILED[key] = InterpretedFunction(_BODIES[name])
        else:
            # tiles_per_program varies with the shape: not specializing it avoids a recompilation per shape
            no_spec = ["tiles_per_program"] if name == "lora" else []
            _COMPILED[key] = triton.jit(_BODIES[name], do_not_specialize=no_spec)
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRAKernelConfig:
    """Launch parameters of `compose_lora` (see the module docstring).

    Args:
        block_m (`int`): rows per tile (and per program).
        block_n (`int`): columns per tile (a multiple of 8).
        programs_per_sm (`int`): the column chunks are sized so that about this many programs run per SM.
        num_warps (`int`): warps per program.
        num_stages (`int`): software-pipelining depth of the column loop.
        bits_reshape (`bool`): expand one loaded byte to 8 mask bits in registers (else: one cached byte load per
            element).
    """

    block_m: int = 32
    block_n: int = 64
    programs_per_sm: int = 4
    num_warps: int = 4
    num_stages: int = 2
    bits_reshape: bool = True


@dataclass(frozen=True)
class DenseKernelConfig:
    """Launch parameters of `compose_dense`.

    Args:
        block_rows (`int`): whole rows per program.
        block_n (`int`): columns per step of the copy loop.
        block_k (`int`): kept entries per step of the scatter loop.
        num_warps (`int`): warps per program.
        copy (`bool`): the kernel copies `W` itself (else the launcher clones it first and the kernel only scatters).
    """

    block_rows: int = 1
    block_n: int = 1024
    block_k: int = 256
    num_warps: int = 4
    copy: bool = True


# The defaults are the fastest correct variants of benchmarks/forward.py on an H100 (benchmarks/results/
# forward_h100.json, weighted by a Llama block's layer shapes); see benchmarks/NOTES_performance.md.
LORA_DEFAULT = LoRAKernelConfig()
DENSE_DEFAULT = DenseKernelConfig()
MAX_RANK = 128
PRECISIONS = ("tf32", "tf32x3", "ieee")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on_device(device: torch.device) -> Any:
    """Launch on the tensors' GPU (Triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"weight must be a 2-D tensor with contiguous rows, got shape {tuple(weight.shape)}.")


# ---------------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------------
def compose_lora(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    bits: Optional[torch.Tensor],
    scale: float,
    precision: str = "tf32x3",
    config: Optional[LoRAKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
    interpret: bool = False,
) -> torch.Tensor:
    """`round(W.float() + (s · B A) ⊙ M)` in one kernel (see `reference.compose_lora_weight_reference`).

    Args:
        weight (`torch.Tensor`): (out, in) bf16/fp16/fp32, rows contiguous.
        lora_B (`torch.Tensor`): (out, r) fp32, r <= 128.
        lora_A (`torch.Tensor`): (r, in) fp32.
        bits (`torch.Tensor`, *optional*): (out, ceil(in / 8)) uint8 packed mask, or None (no mask).
        scale (`float`): the LoRA scale.
        precision (`str`): `tl.dot`'s fp32 input precision: "tf32", "tf32x3" or "ieee".
        config (`LoRAKernelConfig`, *optional*): launch parameters; default: the module's `LORA_DEFAULT` at call time.
        out (`torch.Tensor`, *optional*): (out, in) tensor of `weight.dtype` to write into (rows contiguous).
        interpret (`bool`): run under Triton's CPU interpreter (CPU tensors).

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype`.
    """
    _check_weight(weight)
    config = config if config is not None else LORA_DEFAULT
    m, n = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape != (r, n) or lora_B.shape != (m, r):
        raise ValueError(f"lora_B {tuple(lora_B.shape)} @ lora_A {tuple(lora_A.shape)} does not match W {(m, n)}.")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"the Triton kernel supports 1 <= r <= {MAX_RANK}, got r = {r}.")
    if lora_A.dtype != torch.float32 or lora_B.dtype != torch.float32:
        raise ValueError("the Triton kernel needs fp32 lora_A and lora_B.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if config.block_n % 8:
        raise ValueError("block_n must be a multiple of 8.")
    lora_A = lora_A if lora_A.stride(1) == 1 else lora_A.contiguous()
    lora_B = lora_B if lora_B.stride(1) == 1 else lora_B.contiguous()
    if bits is not None:
        if bits.dtype != torch.uint8 or bits.shape != (m, (n + 7) // 8):
            raise ValueError(f"bits must be (out, ceil(in / 8)) uint8, got {bits.dtype} {tuple(bits.shape)}.")
        bits = bits if bits.stride(1) == 1 else bits.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=weight.dtype, device=weight.device)
    if m == 0 or n == 0:
        return out
    row_blocks = triton.cdiv(m, config.block_m)
    col_tiles = triton.cdiv(n, config.block_n)
    splits = max(1, min(col_tiles, triton.cdiv(config.programs_per_sm * _sm_count(weight.device), row_blocks)))
    tiles_per_program = triton.cdiv(col_tiles, splits)
    splits = triton.cdiv(col_tiles, tiles_per_program)
    kernel = _kernel("lora", interpret)
    extra = {} if interpret else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    with _on_device(weight.device):
        kernel[(row_blocks, splits)](
            weight,
            lora_B,
            lora_A,
            bits if bits is not None else weight,  # unused pointer when HAS_MASK is False
            out,
            m,
            n,
            r,
            weight.stride(0),
            lora_B.stride(0),
            lora_A.stride(0),
            bits.stride(0) if bits is not None else 0,
            out.stride(0),
            float(scale),
            tiles_per_program,
            HAS_MASK=bits is not None,
            BITS_RESHAPE=config.bits_reshape,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_R=max(16, _next_pow2(r)),
            PRECISION=precision,
            **extra,
        )
    return out


def compose_dense(
    weight: torch.Tensor,
    columns: torch.Tensor,
    values: torch.Tensor,
    config: Optional[DenseKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
    interpret: bool = False,
) -> torch.Tensor:
    """A copy of `W` with `round(W + values)` at the kept `columns` (see `reference.compose_dense_weight_reference`).

    Args:
        weight (`torch.Tensor`): (out, in) bf16/fp16/fp32, rows contiguous.
        columns (`torch.Tensor`): (out, k) int16/int32 kept columns, distinct within each row.
        values (`torch.Tensor`): (out, k) fp32.
        config (`DenseKernelConfig`, *optional*): launch parameters; default: the module's `DENSE_DEFAULT` at call time.
        out (`torch.Tensor`, *optional*): (out, in) tensor of `weight.dtype` to write into (rows contiguous).
        interpret (`bool`): run under Triton's CPU interpreter (CPU tensors).

    Returns:
        `torch.Tensor` of shape (out, in) and dtype `weight.dtype`.
    """
    _check_weight(weight)
    config = config if config is not None else DENSE_DEFAULT
    m, n = weight.shape
    if columns.dim() != 2 or columns.shape[0] != m or values.shape != columns.shape:
        raise ValueError(
            f"columns {tuple(columns.shape)} and values {tuple(values.shape)} must both be (out, k) for W {(m, n)}."
        )
    if columns.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"the Triton kernel needs int16 or int32 columns, got {columns.dtype}.")
    if values.dtype != torch.float32:
        raise ValueError(f"the Triton kernel needs fp32 values, got {values.dtype}.")
    k = columns.shape[1]
    columns = columns if columns.stride(1) == 1 else columns.contiguous()
    values = values if values.stride(1) == 1 else values.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=weight.dtype, device=weight.device)
    if not config.copy:
        out.copy_(weight)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(weight)
    kernel = _kernel("dense", interpret)
    extra = {} if interpret else {"num_warps": config.num_warps}
    block_rows = config.block_rows
    with _on_device(weight.device):
        kernel[(triton.cdiv(m, block_rows),)](
            weight,
            columns,
            values,
            out,
            m,
            n,
            k,
            weight.stride(0),
            columns.stride(0),
            values.stride(0),
            out.stride(0),
            COPY=config.copy,
            BLOCK_ROWS=block_rows,
            BLOCK_N=min(config.block_n, max(16, _next_pow2(n))),
            BLOCK_K=min(config.block_k, max(16, _next_pow2(k))),
            **extra,
        )
    return out
