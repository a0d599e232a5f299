"""One multi-task ZO step on a small model, the landed path against the fast path, side by side in one run.

The workload of the step-throughput issue: SmolLM2-135M shapes (config and tokenizer from `--model-dir`, random bf16
weights, which run at the real model's speed), the eight tasks of `--data-dir`, `--batch-size` real examples per task
from `MultiTaskSampler`, `--max-length 512`. For each method (MaZO-LoRA r = 64 ρ = 0.8, MaZO dense ρ = 0.9, MTL-ZO
dense without mask) it measures

- `forward`: one closure of the fast path alone (all tasks in one packed forward, `multitask_losses`);
- `step_landed`: `ZOSGD(perturbation="lazy")` with one padded forward per task (`multitask_losses(packed=False)`),
  i.e. the path before this benchmark's issue;
- `step_fast`: `ZOSGD()` (auto: eager perturbation for these adapter sizes) with the packed closure;

plus the base model's packed forward, a `torch.profiler` summary of one fast MaZO-LoRA step, and (`--cli-steps N`) the
rate of a whole `mazo train` run (`runner.run`, sampling, tokenizing, logging and checkpoints included) over N steps.

Times are medians over `--steps` distinct sampler steps of each step's median over `--repeats` calls (CUDA events on
a GPU, wall time on CPU). Writes JSON (device, versions, shapes, medians) and prints a table.

    python benchmarks/multitask_step.py --model-dir ../shared/models/smollm2-135m-shape --data-dir ../shared/data
    python benchmarks/multitask_step.py --tiny   # CPU smoke run on a tiny Llama
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from common import Meter, results_header  # noqa: E402  (benchmarks/common.py)
from peft import get_peft_model  # noqa: E402

from peft_mazo import ZOSGD, MaZOConfig  # noqa: E402
from peft_mazo.tasks import (  # noqa: E402
    TASK_NAMES,
    CUDAGraphLosses,
    MultiTaskSampler,
    multitask_losses,
    pack_batches,
    sample_tasks,
)


METHODS = {
    "mazo-lora": dict(r=64, sparsity=0.8, scorer="magnitude"),
    "mazo-dense": dict(r=0, sparsity=0.9, scorer="magnitude"),
    "mtl-zo": dict(r=0, sparsity=0.0, scorer="none"),
}
TARGET_STEP_MS = 40.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT.parent / "shared" / "models" / "smollm2-135m-shape"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="distinct sampler steps measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-landed", action="store_true", help="do not time the landed path")
    parser.add_argument("--profile", action="store_true", help="profile one fast MaZO-LoRA step")
    parser.add_argument("--cli-steps", type=int, default=0, help="also time a whole `mazo train` run of N steps")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama and tokenizer built in code (CPU smoke run)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/multitask_step_<dev>.json)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.repeats, args.dtype, args.max_length = 2, 2, "float32", 128
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, description): random weights with the config of `--model-dir`, or a tiny Llama."""
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.helpers import make_tiny_llama, make_tiny_tokenizer

        return make_tiny_llama(max_position_embeddings=2048).to(device), make_tiny_tokenizer(pad=True), "tiny-llama"
    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa"
        )
    return model.eval().requires_grad_(False), tokenizer, Path(args.model_dir).name


def timed_steps(meter: Meter, steps: list[dict], fn, repeats: int) -> float:
    """Median over the sampler steps of the median time of `fn(step)` (ms)."""
    return statistics.median(meter.median_ms(lambda _i, s=s: fn(s), warmup=1, repeats=repeats)[0] for s in steps)


def measure_method(args, meter: Meter, model, steps: list[dict], packed: list, device, profile: bool) -> dict:
    """The rows of one adapter: packed forward, fast step (direct and CUDA-graphed), landed step, profile."""
    row: dict[str, Any] = {}
    with torch.no_grad():
        row["forward_packed_ms"] = timed_steps(
            meter, steps, lambda s: multitask_losses(model, s).sum().item(), args.repeats
        )
    fast = ZOSGD(model, lr=0.0, eps=1e-3, seed=0)
    row["fast_perturbation"] = fast.mode
    row["step_fast_ms"] = timed_steps(
        meter, steps, lambda s: fast.step(lambda: multitask_losses(model, s)), args.repeats
    )
    row["step_fast_peak_gib"] = _gib(meter.peak_bytes(lambda: fast.step(lambda: multitask_losses(model, steps[0]))))
    if device.type == "cuda":
        graphed = CUDAGraphLosses(model)
        row["step_graphed_ms"] = timed_steps(meter, packed, lambda p: fast.step(lambda: graphed(p)), args.repeats)
        row["step_graphed_peak_gib"] = _gib(meter.peak_bytes(lambda: fast.step(lambda: graphed(packed[0]))))
        row["graphs"] = {"captures": graphed.captures, "replays": graphed.replays, "direct": graphed.direct_calls}
        if profile:
            row["profile_graphed_step"] = profile_step(fast, lambda: graphed(packed[0]), device)
    if not args.skip_landed:
        landed = ZOSGD(model, lr=0.0, eps=1e-3, seed=0, perturbation="lazy")
        row["step_landed_ms"] = timed_steps(
            meter, steps, lambda s: landed.step(lambda: multitask_losses(model, s, packed=False)), min(args.repeats, 3)
        )
    if profile:
        row["profile_fast_step"] = profile_step(fast, lambda: multitask_losses(model, steps[0]), device)
    best = min(row.get("step_graphed_ms", float("inf")), row["step_fast_ms"])
    row["speedup_vs_landed"] = row["step_landed_ms"] / best if "step_landed_ms" in row else None
    return row


def profile_step(opt: ZOSGD, closure, device: torch.device) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    launches = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    by_self_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    by_device = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:15]
    return {
        "kernel_launches": sum(e.count for e in events if e.key in launches),
        "randn_calls": sum(e.count for e in events if e.key in ("aten::randn", "aten::normal_")),
        "device_ms_total": round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3, 2),
        "top_self_cpu_ms": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in by_self_cpu],
        "top_device_ms": [
            (e.key, e.count, round(getattr(e, "self_device_time_total", 0) / 1e3, 2)) for e in by_device
        ],
    }


def cli_rate(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, method: str) -> dict[str, Any]:
    """Steps per second of `runner.run` (what `mazo train` runs) over `--cli-steps` steps, after the first 5."""
    from peft_mazo.runner import RunConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        stamps: list[float] = []
        step_seconds: list[float] = []
        config = RunConfig(
            model=str(Path(tmp) / "model"), tasks=list(args.tasks), method=method, out=str(Path(tmp) / "run"),
            data_dir=args.data_dir, steps=args.cli_steps, batch_size=args.batch_size, n_train=64, n_val=4, n_test=8,
            max_length=args.max_length, calib_batches=1, calib_batch_size=4, evaluate_before=False,
            save_every=max(args.cli_steps // 2, 1), dtype=args.dtype, device=args.device, overwrite=True,
        )  # fmt: skip
        started = time.perf_counter()

        def on_step(step: int, record: dict) -> None:
            stamps.append(time.perf_counter())
            step_seconds.append(record["seconds"])

        results = run(config, on_step=on_step)
        total = time.perf_counter() - started
    skip = min(5, len(stamps) // 2)  # the first steps record CUDA graphs: left out
    measured = stamps[skip:]
    rate = (len(measured) - 1) / (measured[-1] - measured[0]) if len(measured) > 1 else float("nan")
    return {
        "method": method, "steps": args.cli_steps, "save_every": config.save_every, "steps_per_s": rate,
        "ms_per_step": 1e3 / rate, "optimizer_step_median_ms": 1e3 * statistics.median(step_seconds[skip:]),
        "median_step_interval_ms": 1e3 * statistics.median(b - a for a, b in zip(measured, measured[1:], strict=False)),
        "cuda_graphs": results.get("cuda_graphs"),
        "wall_s": total,
        "note": "rate over the steps after the first 5 (fewer for short runs) (sampling, logging, checkpoints included); the median interval "
        "between steps leaves out the checkpoint steps",
    }  # fmt: skip


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    meter = Meter(device)
    base, tokenizer, model_name = build(args, device)
    splits = sample_tasks(args.tasks, data_dir=args.data_dir, seed=0, n_train=64, n_val=4, n_test=4)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=args.batch_size, seed=0)
    encoded = sampler.encoded(tokenizer, max_length=args.max_length)
    steps = [{t: b.to(device) for t, b in next(encoded).items()} for _ in range(args.steps)]
    packed = [pack_batches(s) for s in steps]
    result: dict[str, Any] = {
        **results_header("multitask_step", device, argv),
        "shapes": {
            "model": model_name,
            "dtype": args.dtype,
            "tasks": args.tasks,
            "batch_size_per_task": args.batch_size,
            "max_length": args.max_length,
            "sequences_per_step": statistics.median(len(p.sequence_tokens) for p in packed),
            "real_tokens_per_step": statistics.median(p.num_tokens for p in packed),
            "padded_tokens_per_step": statistics.median(sum(b.input_ids.numel() for b in s.values()) for s in steps),
        },  # fmt: skip
        "timing": f"median over {args.steps} sampler steps of the median of {args.repeats} calls, ms",
        "rows": {},
    }
    with torch.no_grad():
        result["base_forward_packed_ms"] = timed_steps(
            meter, steps, lambda s: multitask_losses(base, s, packed=True).sum().item(), args.repeats
        )
    for method in args.methods:
        model = get_peft_model(base, MaZOConfig(**METHODS[method]))
        row = measure_method(args, meter, model, steps, packed, device, profile=args.profile and method == "mazo-lora")
        row["adapter"] = METHODS[method]
        result["rows"][method] = row
        _print_row(method, row)
        base = model.unload()
    if args.cli_steps:
        result["cli"] = cli_rate(args, base, tokenizer, "mazo-lora")
        print(f"mazo train (runner.run), mazo-lora: {result['cli']['steps_per_s']:.2f} steps/s")
    result["target_step_ms"] = TARGET_STEP_MS
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"multitask_step_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"base model, packed forward: {result['base_forward_packed_ms']:.1f} ms; wrote {out}")
    return result


def _print_row(method: str, row: dict[str, Any]) -> None:
    cells = [f"{method:<11}", f"forward {row['forward_packed_ms']:7.1f} ms", f"step {row['step_fast_ms']:7.1f} ms"]
    if "step_graphed_ms" in row:
        cells.append(f"graphed step {row['step_graphed_ms']:7.1f} ms")
    if "step_landed_ms" in row:
        cells.append(f"landed step {row['step_landed_ms']:7.1f} ms (x{row['speedup_vs_landed']:.1f})")
    print(" | ".join(cells))


def _gib(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2**30


if __name__ == "__main__":
    main()
