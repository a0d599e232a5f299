"""The MaZO adapter forward against the base forward, with the composition kernels on and off, and the kernels alone.

Default: a Llama-2-7B-shaped `LlamaForCausalLM` with random bf16 weights on one GPU, batch 16 × 512 tokens. One run
measures, in this order (partial JSON is written after every section, so a timeout keeps what was done):

1. ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate;
2. correctness of each kernel against its PyTorch reference on random inputs at the model's layer shapes: relative
   error (norm), largest error in units in the last place, fraction of elements that differ, and for LoRA the error of
   kernel and reference against a float64 truth;
3. the compose kernels alone, per call, for every layer shape: reference vs Triton (a few launch configurations and,
   for LoRA, the three `tl.dot` precisions), achieved GB/s against the bytes floor and the measured copy bandwidth;
4. model forwards: base, dense MaZO (ρ = 0.9) and LoRA MaZO (r = 64, ρ = 0.8), kernels on and off (LoRA also with
   tf32), and one ZO step (`ZOSGD`) of each, kernels on and off.

Adapters use `init_weights=False` (random non-zero deltas: never time on zeros) and the "magnitude" scorer. Timings: CUDA
events, median of `--repeats` after `--warmup` (kernels: medians of `--kernel-repeats` batches of 10 calls, rotating
among 3 input sets so that no input stays in L2). Prints a table; writes JSON to `--out`
(default `benchmarks/results/forward_<device>.json`).

    python benchmarks/forward.py                      # H100, 7B shape (the numbers of docs/performance.md)
    python benchmarks/forward.py --device cpu --tiny  # smoke test (kernels under Triton's CPU interpreter)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import Meter, add_model_shape_arguments, library_versions, random_llama, use_tiny_shapes  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_mazo  # noqa: E402
from peft_mazo import ZOSGD, MaZOConfig, kernels  # noqa: E402
from peft_mazo import mask as mask_ops  # noqa: E402
from peft_mazo.kernels import compose_dense_weight_reference, compose_lora_weight_reference  # noqa: E402


GB = 1e9
GIB = 2**30
ROTATE = 3  # input sets the kernel timings rotate among
INNER = 10  # kernel calls per timed batch
TARGETS = {"dense_forward_vs_base": 1.05, "lora_forward_vs_base": 1.08, "dense_step_vs_two": 1.05, "lora_step": 1.10}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape_arguments(parser, dtypes=("bfloat16", "float16"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--kernel-repeats", type=int, default=15)
    parser.add_argument("--skip-kernels", action="store_true", help="skip sections 2-3 (kernels alone)")
    parser.add_argument("--skip-model", action="store_true", help="skip section 4 (model forwards and steps)")
    parser.add_argument("--skip-steps", action="store_true", help="model forwards only, no ZO steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/forward_<device>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        use_tiny_shapes(args)
        args.lora_r = 8
        args.repeats, args.warmup, args.step_repeats, args.kernel_repeats = 2, 1, 1, 2
    return args


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------
def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(results: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`, store its result (or the error) under `results[key]`; never raise."""
    try:
        results[key] = fn()
    except Exception as error:  # noqa: BLE001 - one failing variant must not stop the run
        traceback.print_exc()
        results[key] = {"error": f"{type(error).__name__}: {error}"}
    return results[key]


# ---------------------------------------------------------------------------------------------------------------------
# 1. ceilings
# ---------------------------------------------------------------------------------------------------------------------
def measure_ceilings(meter: Meter, args: argparse.Namespace) -> dict[str, Any]:
    device = meter.device
    n = (4 if args.tiny else 512) * 2**20  # bf16 elements: 1 GiB per buffer on the GPU
    src = torch.randn(n // 4, device=device).to(torch.bfloat16).repeat(4)
    dst = torch.empty_like(src)
    repeats = 2 if args.tiny else 10
    copy_ms, _ = meter.median_ms(lambda i: dst.copy_(src), 3, repeats)
    copy_bytes = 2 * src.numel() * src.element_size()
    size = 512 if args.tiny else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm_ms, _ = meter.median_ms(lambda i: a @ b, 3, repeats)
    return {
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "copy_GBps": copy_bytes / (copy_ms * 1e-3) / GB,
        "bf16_matmul_size": size,
        "bf16_matmul_ms": mm_ms,
        "bf16_matmul_TFLOPS": 2 * size**3 / (mm_ms * 1e-3) / 1e12,
    }


# ---------------------------------------------------------------------------------------------------------------------
# 2 + 3. the kernels alone
# ---------------------------------------------------------------------------------------------------------------------
def layer_shapes(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    h, i = args.hidden_size, args.intermediate_size
    return [("gate/up (i×h)", i, h), ("down (h×i)", h, i), ("q/k/v/o (h×h)", h, h)]


def lora_set(m: int, n: int, r: int, sparsity: float, dtype: torch.dtype, device: torch.device, g: torch.Generator):
    """W (σ 0.02), B (σ 0.02), A (σ 1/√r, so that B A is about as large as W: a stress test of the rounding) and the
    packed bits with k kept entries per row."""
    weight = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    lora_B = torch.randn(m, r, generator=g) * 0.02
    lora_A = torch.randn(r, n, generator=g) / math.sqrt(r)
    k = mask_ops.kept_per_row(n, sparsity)
    columns = mask_ops.topk_columns(torch.rand(m, n, generator=g), k)
    bits = mask_ops.pack_bits(mask_ops.indices_to_dense(columns, n))
    return tuple(t.to(device) for t in (weight, lora_B, lora_A, bits))


def dense_set(m: int, n: int, sparsity: float, dtype: torch.dtype, device: torch.device, g: torch.Generator):
    weight = (torch.randn(m, n, generator=g) * 0.02).to(dtype)
    k = mask_ops.kept_per_row(n, sparsity)
    columns = mask_ops.topk_columns(torch.rand(m, n, generator=g), k).to(mask_ops.index_dtype(n))
    values = torch.randn(m, k, generator=g) * 0.02
    return tuple(t.to(device) for t in (weight, columns, values))


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Relative error (norm), largest error in ulps of the reference, fraction of differing elements."""
    diff = (out.double() - ref.double()).abs()
    _, exponent = torch.frexp(ref.float())
    ulp = torch.finfo(ref.dtype).eps * torch.exp2(exponent.double() - 1)
    return {
        "rel_error": float(diff.norm() / ref.double().norm()),
        "max_ulps": float((diff / ulp).max()),
        "differ_fraction": float((out != ref).double().mean()),
        "finite": bool(torch.isfinite(out).all()),
    }


def lora_variants(tri: Any) -> dict[str, tuple[Any, str]]:
    """Launch configurations (and dot precisions) of the LoRA kernel to time; "r" = bits expanded in registers."""
    cfg = tri.LoRAKernelConfig
    default = tri.LORA_DEFAULT
    return {
        "default/tf32x3": (default, "tf32x3"),
        "default/tf32": (default, "tf32"),
        "default/ieee": (default, "ieee"),
        "m64n64w8r/tf32x3": (cfg(block_m=64, block_n=64, num_warps=8, bits_reshape=True), "tf32x3"),
        "m32n64w4r/tf32x3": (cfg(block_m=32, block_n=64, num_warps=4, bits_reshape=True), "tf32x3"),
        "m64n64w4r-s3/tf32x3": (cfg(block_m=64, block_n=64, num_warps=4, num_stages=3, bits_reshape=True), "tf32x3"),
        "m64n64w4r-p8/tf32x3": (
            cfg(block_m=64, block_n=64, num_warps=4, programs_per_sm=8, bits_reshape=True),
            "tf32x3",
        ),
        "m64n64w4-bytes/tf32x3": (cfg(block_m=64, block_n=64, num_warps=4, bits_reshape=False), "tf32x3"),
        "m128n64w8r/tf32x3": (cfg(block_m=128, block_n=64, num_warps=8, bits_reshape=True), "tf32x3"),
        "m128n64w8-bytes/tf32x3": (cfg(block_m=128, block_n=64, num_warps=8, bits_reshape=False), "tf32x3"),
        "m128n128w8r/tf32x3": (cfg(block_m=128, block_n=128, num_warps=8, bits_reshape=True), "tf32x3"),
    }


def dense_variants(tri: Any) -> dict[str, Any]:
    cfg = tri.DenseKernelConfig
    return {
        "default": tri.DENSE_DEFAULT,
        "rows1w4": cfg(block_rows=1, num_warps=4),
        "rows2w4": cfg(block_rows=2, num_warps=4),
        "rows8w8": cfg(block_rows=8, num_warps=8),
        "rows4w8k512": cfg(block_rows=4, num_warps=8, block_k=512),
        "clone+scatter": cfg(copy=False),
    }


LAYERS_PER_BLOCK = {"gate/up (i×h)": 2, "down (h×i)": 1, "q/k/v/o (h×h)": 4}


def pick_fastest(kernel_results: dict[str, Any], kind: str, ok: Callable[[dict], bool]) -> Optional[str]:
    """The variant of `kind` with the least time per transformer block (layer counts × per-call medians)."""
    totals: dict[str, float] = {}
    for label, res in kernel_results.items():
        if not isinstance(res, dict) or kind not in res:
            continue
        for name, stats in res[kind].items():
            if name == "reference" or "ms" not in stats or not ok(stats):
                totals[name] = math.inf
                continue
            totals[name] = totals.get(name, 0.0) + LAYERS_PER_BLOCK.get(label, 1) * stats["ms"]
    finite = {name: t for name, t in totals.items() if math.isfinite(t) and "(copy alone)" not in name}
    return min(finite, key=finite.get) if finite else None


def adopt_fastest(tri: Any, report: dict[str, Any]) -> None:
    """Make the fastest correct variant of each kernel (same LoRA precision as the default) the module default for the
    model section; recorded in `report["model_kernel_configs"]`."""
    results = report.get("kernels", {})
    chosen: dict[str, Any] = {}
    lora = pick_fastest(
        results,
        "lora",
        lambda st: (
            st.get("precision") == "tf32x3" and st["vs_reference"]["finite"] and st["vs_reference"]["rel_error"] < 1e-2
        ),
    )
    if lora is not None:
        tri.LORA_DEFAULT = lora_variants(tri)[lora][0]
        chosen["lora"] = {"variant": lora, "config": asdict(tri.LORA_DEFAULT)}
    dense = pick_fastest(results, "dense", lambda st: st.get("bit_exact", False))
    if dense is not None:
        tri.DENSE_DEFAULT = dense_variants(tri)[dense]
        chosen["dense"] = {"variant": dense, "config": asdict(tri.DENSE_DEFAULT)}
    report["model_kernel_configs"] = chosen
    print(f"model section uses: {chosen}", flush=True)


def add_bandwidth(table: dict[str, Any], floor_bytes: int, copy_gbps: Optional[float]) -> None:
    """Achieved GB/s of the floor bytes, and the fraction of the measured copy bandwidth, for every timed variant."""
    for stats in table.values():
        if "ms" in stats:
            stats["GBps_of_floor_bytes"] = floor_bytes / (stats["ms"] * 1e-3) / GB
            if copy_gbps:
                stats["fraction_of_copy_bw"] = stats["GBps_of_floor_bytes"] / copy_gbps
                stats["floor_ms"] = floor_bytes / (copy_gbps * GB) * 1e3


def bench_lora_shape(
    meter: Meter, args: argparse.Namespace, tri: Any, m: int, n: int, g: torch.Generator, res: dict[str, Any]
) -> None:
    """LoRA compose at W (m, n): correctness of every variant, then its time per call."""
    device, dtype, r = meter.device, getattr(torch, args.dtype), args.lora_r
    interpret = device.type != "cuda"
    sets = [lora_set(m, n, r, args.lora_sparsity, dtype, device, g) for _ in range(ROTATE)]
    res["lora_floor_bytes"] = m * n * 2 * dtype.itemsize + m * ((n + 7) // 8) + (m * r + r * n) * 4
    res["lora_flops"] = 2 * m * n * r
    weight, lora_B, lora_A, bits = sets[0]
    ref = compose_lora_weight_reference(weight, lora_B, lora_A, bits, 1.0)
    truth = weight.double() + (lora_B.double() @ lora_A.double()) * mask_ops.unpack_bits(bits, n)
    rounded_truth = truth.to(dtype)
    res["lora_reference_vs_truth"] = {
        "rel_error_unrounded": float((ref.double() - truth).norm() / truth.norm()),
        **error_stats(ref, rounded_truth),
    }
    table: dict[str, Any] = {}
    res["lora"] = table

    def reference(i: int) -> torch.Tensor:
        w, b, a, bt = sets[i % ROTATE]
        return compose_lora_weight_reference(w, b, a, bt, 1.0)

    table["reference"] = {"ms": meter.median_ms(reference, 2, args.kernel_repeats, 1)[0]}

    def variant(config: Any, precision: str) -> dict[str, Any]:
        poisoned = torch.full_like(weight, float("nan"))
        result = tri.compose_lora(weight, lora_B, lora_A, bits, 1.0, precision, config, poisoned, interpret)
        stats = {
            "config": asdict(config),
            "precision": precision,
            "vs_reference": error_stats(result, ref),
            "vs_rounded_truth": error_stats(result, rounded_truth),
            "rel_error_vs_truth": float((result.double() - truth).norm() / truth.norm()),
        }

        def call(i: int) -> torch.Tensor:
            w, b, a, bt = sets[i % ROTATE]
            return tri.compose_lora(w, b, a, bt, 1.0, precision, config, None, interpret)

        if not interpret:
            stats["ms"] = meter.median_ms(call, 2, args.kernel_repeats, INNER)[0]
        return stats

    for name, (config, precision) in lora_variants(tri).items():
        guarded(table, name, lambda c=config, p=precision: variant(c, p))


def bench_dense_shape(
    meter: Meter, args: argparse.Namespace, tri: Any, m: int, n: int, g: torch.Generator, res: dict[str, Any]
) -> None:
    """Dense compose at W (m, n): correctness (bit-exactness) of every variant, then its time per call."""
    device, dtype = meter.device, getattr(torch, args.dtype)
    interpret = device.type != "cuda"
    sets = [dense_set(m, n, args.dense_sparsity, dtype, device, g) for _ in range(ROTATE)]
    weight, columns, values = sets[0]
    k = columns.shape[1]
    res["dense_k"] = k
    res["dense_floor_bytes"] = m * n * 2 * dtype.itemsize + m * k * (columns.element_size() + 4)
    ref = compose_dense_weight_reference(weight, columns, values)
    table: dict[str, Any] = {}
    res["dense"] = table

    def reference(i: int) -> torch.Tensor:
        return compose_dense_weight_reference(*sets[i % ROTATE])

    def clone(i: int) -> torch.Tensor:
        return sets[i % ROTATE][0].clone()

    table["reference"] = {"ms": meter.median_ms(reference, 2, args.kernel_repeats, 1)[0]}
    table["W.clone() (copy alone)"] = {"ms": meter.median_ms(clone, 2, args.kernel_repeats, INNER)[0]}

    def variant(config: Any) -> dict[str, Any]:
        poisoned = torch.full_like(weight, float("nan"))
        result = tri.compose_dense(weight, columns, values, config, poisoned, interpret)
        stats = {
            "config": asdict(config),
            "vs_reference": error_stats(result, ref),
            "bit_exact": bool(torch.equal(result, ref)),
        }

        def call(i: int) -> torch.Tensor:
            w, c, v = sets[i % ROTATE]
            return tri.compose_dense(w, c, v, config, None, interpret)

        if not interpret:
            stats["ms"] = meter.median_ms(call, 2, args.kernel_repeats, INNER)[0]
        return stats

    for name, config in dense_variants(tri).items():
        guarded(table, name, lambda c=config: variant(c))


def bench_kernels(meter: Meter, args: argparse.Namespace, ceilings: dict) -> dict[str, Any]:
    """Sections 2 and 3: correctness and time per call of every compose path, for every layer shape."""
    tri = kernels._triton_module()
    if tri is None:
        return {"error": "triton is not installed: only the references can run"}
    g = torch.Generator().manual_seed(args.seed)
    out: dict[str, Any] = {}
    for label, m, n in layer_shapes(args):
        res: dict[str, Any] = {"out": m, "in": n}
        out[label] = res
        bench_lora_shape(meter, args, tri, m, n, g, res)
        free()
        bench_dense_shape(meter, args, tri, m, n, g, res)
        free()
        add_bandwidth(res["lora"], res["lora_floor_bytes"], ceilings.get("copy_GBps"))
        add_bandwidth(res["dense"], res["dense_floor_bytes"], ceilings.get("copy_GBps"))
        print(f"kernels done: {label}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 4. model forwards and ZO steps
# ---------------------------------------------------------------------------------------------------------------------
class KernelsOff:
    """Context manager: `PEFT_MAZO_DISABLE_KERNELS=1` inside (the dispatch reads it at every call)."""

    def __init__(self, off: bool) -> None:
        self.off = off

    def __enter__(self) -> None:
        self.previous = os.environ.get(kernels.ENV_DISABLE)
        if self.off:
            os.environ[kernels.ENV_DISABLE] = "1"

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            os.environ.pop(kernels.ENV_DISABLE, None)
        else:
            os.environ[kernels.ENV_DISABLE] = self.previous


class Precision:
    """Context manager: `torch.set_float32_matmul_precision(value)` inside (the LoRA kernel's dot precision)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self) -> None:
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc: Any) -> None:
        torch.set_float32_matmul_precision(self.previous)


def counts_during(fn: Callable[[], Any]) -> dict[str, int]:
    before = dict(kernels.dispatch_counts)
    fn()
    return {key: kernels.dispatch_counts[key] - before[key] for key in before}


def forward_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[int], torch.Tensor]:
    def forward(i: int) -> torch.Tensor:
        with torch.no_grad():
            return model(**batch).loss

    return forward


def bench_adapter(
    meter: Meter,
    args: argparse.Namespace,
    base: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    mode: str,
    config: MaZOConfig,
    results: dict[str, Any],
) -> None:
    """Wrap `base` with one MaZO adapter, time its forward (kernels off / on) and ZO step, unwrap it again."""
    model = get_peft_model(base, config)
    try:
        results[f"{mode}_adapted_weights"] = sum(
            module.get_base_layer().weight.numel()
            for module in model.modules()
            if isinstance(module, peft_mazo.layer.MaZOLayer)
        )
        variants = [("kernels_off", True, "highest"), ("kernels_on", False, "highest")]
        if mode == "lora":
            variants.append(("kernels_on_tf32", False, "high"))

        def run(off: bool, precision: str) -> dict[str, Any]:
            with KernelsOff(off), Precision(precision):
                forward = forward_of(model, batch)
                counts = counts_during(lambda: forward(0))
                loss = float(forward(0))
                median, times = meter.median_ms(forward, args.warmup, args.repeats)
            return {"ms": median, "times_ms": times, "loss": loss, "dispatch_per_forward": counts}

        losses = {}
        for name, off, precision in variants:
            key = f"{mode}_forward_{name}"
            stats = guarded(results, key, lambda o=off, p=precision: run(o, p))
            losses[name] = stats.get("loss")
            print(f"{key}: {stats.get('ms', stats.get('error'))}", flush=True)
        if losses.get("kernels_on") is not None and losses.get("kernels_off") is not None:
            results[f"{mode}_loss_kernels_on_minus_off"] = losses["kernels_on"] - losses["kernels_off"]
        if args.skip_steps:
            return

        def run_step(off: bool) -> dict[str, Any]:
            opt = ZOSGD(model, lr=1e-6, eps=1e-3, seed=args.seed)
            closure = forward_of(model, batch)
            with KernelsOff(off):
                median, times = meter.median_ms(lambda i: opt.step(lambda: closure(i)), 1, args.step_repeats)
            return {"ms": median, "times_ms": times}

        for name, off in (("kernels_off", True), ("kernels_on", False)):
            key = f"{mode}_step_{name}"
            stats = guarded(results, key, lambda o=off: run_step(o))
            print(f"{key}: {stats.get('ms', stats.get('error'))}", flush=True)
    finally:
        model.unload()


def bench_model(
    meter: Meter, args: argparse.Namespace, results: dict[str, Any], save: Callable[[], None]
) -> dict[str, Any]:
    """Section 4: base forward, then each adapter's forwards and ZO steps on the same base weights (into `results`,
    calling `save` after each part)."""
    device = meter.device
    base = random_llama(
        device, vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_heads, seq_len=args.seq_len,
        dtype=args.dtype, seed=args.seed,
    )  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    median, times = meter.median_ms(forward_of(base, batch), args.warmup, args.repeats)
    results["base_forward"] = {"ms": median, "times_ms": times, "loss": float(forward_of(base, batch)(0))}
    print(f"base forward: {median:.1f} ms", flush=True)
    save()
    configs = {
        "dense": MaZOConfig(sparsity=args.dense_sparsity, r=0, scorer="magnitude", init_weights=False),
        "lora": MaZOConfig(sparsity=args.lora_sparsity, r=args.lora_r, scorer="magnitude", init_weights=False),
    }
    for mode, config in configs.items():
        bench_adapter(meter, args, base, batch, mode, config, results)
        free()
        save()
    return results


def add_ratios(model: dict[str, Any]) -> dict[str, float]:
    base = model.get("base_forward", {}).get("ms")
    ratios: dict[str, float] = {}
    if not base:
        return ratios
    for key, stats in model.items():
        if isinstance(stats, dict) and "ms" in stats and key != "base_forward":
            divisor = 2 * base if "_step_" in key else base
            ratios[f"{key}_vs_{'two_base_forwards' if '_step_' in key else 'base_forward'}"] = stats["ms"] / divisor
    return ratios


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
def print_table(report: dict[str, Any]) -> None:
    ceilings = report.get("ceilings", {})
    print(
        f"\n== {report['device_name']} | torch {report['versions']['torch']} | triton {report['versions']['triton']}"
    )
    if "copy_GBps" in ceilings:
        print(
            f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s (read + write), "
            f"bf16 matmul {ceilings['bf16_matmul_TFLOPS']:.0f} TFLOPS"
        )
    for label, res in report.get("kernels", {}).items():
        if not isinstance(res, dict) or "lora" not in res:
            continue
        print(f"\n-- compose kernels, {label}: W ({res['out']}, {res['in']})")
        print(f"{'variant':<34}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'rel err':>10}{'max ulps':>9}{'differ':>8}")
        for kind in ("lora", "dense"):
            floor = res[f"{kind}_floor_bytes"]
            for name, stats in res[kind].items():
                if "error" in stats:
                    print(f"{kind + ' ' + name:<34}  ERROR {stats['error'][:80]}")
                    continue
                ms = stats.get("ms")
                err = stats.get("vs_reference", {})
                cells = [
                    f"{ms:.4f}" if ms else "-",
                    f"{floor / (ms * 1e-3) / GB:.0f}" if ms else "-",
                    f"{stats['fraction_of_copy_bw']:.2f}" if "fraction_of_copy_bw" in stats else "-",
                    f"{err['rel_error']:.1e}" if err else "-",
                    f"{err['max_ulps']:.1f}" if err else "-",
                    f"{err['differ_fraction']:.4f}" if err else "-",
                ]
                widths = (9, 8, 9, 10, 9, 8)
                print(f"{kind + ' ' + name:<34}" + "".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
        truth = res.get("lora_reference_vs_truth")
        if truth:
            print(f"(LoRA reference vs rounded fp64 truth: differ {truth['differ_fraction']:.4f})")
    model = report.get("model", {})
    if model:
        print("\n-- model (medians, ms)")
        for key, stats in model.items():
            if isinstance(stats, dict) and ("ms" in stats or "error" in stats):
                ratio = report["ratios"].get(f"{key}_vs_base_forward") or report["ratios"].get(
                    f"{key}_vs_two_base_forwards"
                )
                text = f"{stats['ms']:.1f}" if "ms" in stats else "ERROR " + stats["error"][:80]
                print(f"{key:<34}{text:>10}{(f'{ratio:.3f}x' if ratio else ''):>10}")
        for key in ("dense_loss_kernels_on_minus_off", "lora_loss_kernels_on_minus_off"):
            if model.get(key) is not None:
                print(f"{key}: {model[key]:.3e}")


def device_slug(name: str) -> str:
    lowered = name.lower()
    for slug in ("h100", "h200", "a100", "l40", "a10"):
        if slug in lowered:
            return slug
    return "".join(c if c.isalnum() else "_" for c in lowered)[:24]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    meter = Meter(device)
    if meter.cuda:
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if meter.cuda else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report: dict[str, Any] = {
        "benchmark": "forward",
        "device": str(device),
        "device_name": device_name,
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if meter.cuda else None,
        "versions": library_versions(triton=triton_version),
        "shape": {
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "vocab_size": args.vocab_size,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "dtype": args.dtype,
            "dense_sparsity": args.dense_sparsity,
            "lora_sparsity": args.lora_sparsity,
            "lora_r": args.lora_r,
        },
        "settings": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "step_repeats": args.step_repeats,
            "kernel_repeats": args.kernel_repeats,
            "kernel_calls_per_timing": INNER,
            "rotated_input_sets": ROTATE,
        },
        "targets": TARGETS,
        "lora_default_config": None,
        "dense_default_config": None,
    }
    tri = kernels._triton_module()
    if tri is not None:
        report["lora_default_config"] = asdict(tri.LORA_DEFAULT)
        report["dense_default_config"] = asdict(tri.DENSE_DEFAULT)
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "benchmarks"
        / "results"
        / f"forward_{device_slug(device_name if meter.cuda else 'cpu')}{'_tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    report["ceilings"] = measure_ceilings(meter, args)
    save()
    if not args.skip_kernels:
        guarded(report, "kernels", lambda: bench_kernels(meter, args, report["ceilings"]))
        if tri is not None and meter.cuda:
            guarded(report, "adopt", lambda: adopt_fastest(tri, report))
        save()
    if not args.skip_model:
        report["model"] = {}
        guarded(report, "model", lambda: bench_model(meter, args, report["model"], save))
    report["ratios"] = add_ratios(report.get("model", {}))
    report["dispatch_counts"] = dict(kernels.dispatch_counts)
    report["wall_s"] = time.perf_counter() - started
    save()
    print_table(report)
    print(f"\nwrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
