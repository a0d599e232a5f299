"""Time and memory of the MaZO mask search (`compute_importance`) on a Llama-2-7B-shaped model.

Builds a `LlamaForCausalLM` with the Llama-2-7B shapes (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000) and
random bf16 weights on the GPU, wraps it with a dense MaZO adapter (ρ = 0.9), and runs `compute_importance` on
4 synthetic tasks × 32 sequences × 512 tokens (each task draws its tokens from its own slice of the vocabulary, with
some right padding). Reports the total search time and the peak GPU memory above the inference peak (one forward of
one calibration batch, no KV cache, adapters disabled: the smaller of the two inference baselines). Targets: ≤ 5 min,
≤ 2 GiB above inference.

    python benchmarks/importance.py                       # the 7B shape on cuda, JSON to benchmarks/results/
    python benchmarks/importance.py --out $OUT/importance.json
    python benchmarks/importance.py --tiny                # a CPU smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from common import library_versions, random_llama  # noqa: E402  (benchmarks/common.py)
from peft import get_peft_model

import peft_mazo


GIB = 1 << 30
TARGET_SECONDS = 300.0
TARGET_OVER_INFERENCE_GIB = 2.0
TINY = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=4, vocab=512, seqs=4, seq_len=64, batch_size=2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=32, help="calibration sequences per task")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pad-fraction", type=float, default=0.25, help="fraction of sequences right-padded")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--r", type=int, default=0, help="0 = dense masked delta, > 0 = LoRA rank")
    parser.add_argument("--scorer", default="mazo", choices=["mazo", "wanda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--max-stats-bytes", type=int, default=None, help="statistics budget (default: 1 GiB on cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show tqdm bars")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke test")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Random-weight Llama of the requested shapes, built directly on the device in the requested dtype."""
    model = random_llama(
        args.device, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, seq_len=args.seq_len,
        dtype=args.dtype, seed=args.seed,
    )  # fmt: skip
    return get_peft_model(model, peft_mazo.MaZOConfig(sparsity=args.sparsity, r=args.r, scorer=args.scorer))


def synthetic_tasks(args: argparse.Namespace) -> dict[str, list[dict[str, torch.Tensor]]]:
    """`args.tasks` tasks; task t draws tokens from its own slice of the vocabulary. Batches stay on the CPU."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    width = args.vocab // args.tasks
    tasks = {}
    for t in range(args.tasks):
        ids = torch.randint(t * width, (t + 1) * width, (args.seqs, args.seq_len), generator=gen)
        mask = torch.ones_like(ids)
        padded = torch.rand(args.seqs, generator=gen) < args.pad_fraction
        lengths = torch.randint(args.seq_len // 2, args.seq_len, (args.seqs,), generator=gen)
        for row in padded.nonzero().flatten().tolist():
            mask[row, lengths[row] :] = 0
        tasks[f"task{t}"] = [
            {"input_ids": ids[i : i + args.batch_size], "attention_mask": mask[i : i + args.batch_size]}
            for i in range(0, args.seqs, args.batch_size)
        ]
    return tasks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def inference_peaks(model, batch: dict, device: torch.device) -> dict[str, int | float | None]:
    """Peak memory and time of one forward of `batch` (no KV cache), with the adapter enabled and disabled."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    result = {}
    for name, context in (("adapter", nullcontext()), ("base", model.disable_adapter())):
        with torch.no_grad(), context:
            model(**inputs, use_cache=False)  # warm-up
            reset_peak(device)
            begin = time.perf_counter()
            model(**inputs, use_cache=False)
            synchronize(device)
            result[f"{name}_forward_seconds"] = time.perf_counter() - begin
            result[f"{name}_peak_bytes"] = peak_bytes(device)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = args.device
    begin = time.perf_counter()
    model = build_model(args)
    synchronize(device)
    build_seconds = time.perf_counter() - begin
    tasks = synthetic_tasks(args)
    first_batch = next(iter(tasks.values()))[0]
    inference = inference_peaks(model, first_batch, device)

    reset_peak(device)
    begin = time.perf_counter()
    report = model.compute_importance(tasks, progress=args.progress, max_stats_bytes=args.max_stats_bytes)
    synchronize(device)
    search_seconds = time.perf_counter() - begin
    search_peak = peak_bytes(device)

    print(report.table(per_layer=False))
    result = {
        "benchmark": "importance",
        "device": device_name(device),
        "versions": library_versions(),
        "shapes": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "tasks": args.tasks,
            "seqs_per_task": args.seqs,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "pad_fraction": args.pad_fraction,
            "sparsity": args.sparsity,
            "r": args.r,
            "scorer": args.scorer,
            "adapted_layers": len(report.layers),
        },
        "build_seconds": build_seconds,
        "search_seconds": search_seconds,
        "inference": inference,
        "search_peak_bytes": search_peak,
        "report": report.to_dict(),
    }
    if search_peak is not None:
        baseline = min(inference["base_peak_bytes"], inference["adapter_peak_bytes"])
        over = (search_peak - baseline) / GIB
        result["over_inference_gib"] = over
        result["targets"] = {
            "seconds": TARGET_SECONDS,
            "over_inference_gib": TARGET_OVER_INFERENCE_GIB,
            "met": search_seconds <= TARGET_SECONDS and over <= TARGET_OVER_INFERENCE_GIB,
        }
    summary = (
        f"\n{result['device']}: search {search_seconds:.1f} s over {len(tasks)} task(s) × {args.seqs} × {args.seq_len}"
        f" tokens ({report.settings['forward_passes']} forward passes, {report.settings['windows']} window(s))"
    )
    if search_peak is not None:
        summary += (
            f"; peak {search_peak / GIB:.2f} GiB, inference peak {baseline / GIB:.2f} GiB (base) / "
            f"{inference['adapter_peak_bytes'] / GIB:.2f} GiB (adapter): +{over:.2f} GiB over inference "
            f"(targets ≤ {TARGET_SECONDS:.0f} s, ≤ {TARGET_OVER_INFERENCE_GIB} GiB: "
            f"{'met' if result['targets']['met'] else 'NOT met'})"
        )
    print(summary)
    slug = re.sub(r"[^a-z0-9]+", "_", result["device"].lower()).strip("_")
    out = args.out or Path(__file__).parent / "results" / f"importance_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
