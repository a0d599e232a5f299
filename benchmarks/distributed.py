"""Data-parallel ZO step (issue 8): throughput of `ZOSGD` at a fixed global batch on 1 vs N GPUs, and what crosses the wire.

Every rank holds the whole (7B-shaped, random bf16) model and the MaZO adapter, draws the same z, runs the + and -
forwards on its shard of the global batch (global batch / world size rows), and the ranks all-reduce the (2, T) losses
once per step. The driver (default) launches one `torchrun` per world size and merges the results:

    python benchmarks/distributed.py                                   # 1 and 2 GPUs, Llama-2-7B shape, H200 × 2
    python benchmarks/distributed.py --nprocs 1,2 --global-batch-sizes 16,64 --configs mazo_dense,mazo_lora
    python benchmarks/distributed.py --device cpu --tiny               # smoke test: gloo, tiny shapes, 2 processes

Per (config, global batch, world size), measured on every rank and reported from rank 0:

- `step_ms`: median wall time of one ZO step (all ranks start it together after a barrier; CUDA-synchronised);
- `two_forwards_ms`: median of two plain adapter forwards on the rank's shard (the part that data parallelism divides);
  `step_ms - two_forwards_ms` is the batch-independent part every rank repeats (z generation for the whole trainable
  state, the masked-delta products, the update), which bounds the speed-up (Amdahl);
- `samples_per_s`, `tokens_per_s` at the global batch; `comm_bytes_per_step` (payload of the one all-reduce, from
  `ZOStepResult.comm_bytes`), `allreduce_us` (median latency of that all-reduce alone), `peak_bytes` per rank;
- `in_sync`: `check_in_sync` over the trainable state after the timed steps (bit-identical on every rank).

The merged JSON (`--out`, default `benchmarks/results/distributed_<device>.json`) adds, per config and global batch,
`speedup` = step time on 1 rank / step time on N ranks (target ≥ 1.85 for N = 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import add_model_shape_arguments, library_versions, random_llama, use_tiny_shapes  # noqa: E402


ALL_CONFIGS = ("mazo_dense", "mazo_lora")
TARGET_SPEEDUP_2 = 1.85
GIB = 2**30


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="internal: run as one torchrun rank")
    parser.add_argument("--nprocs", default="1,2", help="world sizes to compare (driver)")
    add_model_shape_arguments(parser, batch_size=False)
    parser.add_argument("--global-batch-sizes", default="16,64,128", help="rows per step over all ranks (comma list)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"comma-separated subset of {ALL_CONFIGS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (driver) or the rank-0 part (worker)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun (driver)")
    args = parser.parse_args(argv)
    if args.tiny:
        use_tiny_shapes(args)
        args.dtype = "float32" if args.device == "cpu" else args.dtype  # bf16 CPU kernels: slow and noisy
        args.global_batch_sizes = "4,8"
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(ALL_CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {ALL_CONFIGS}")
    args.global_batch_sizes = [int(b) for b in str(args.global_batch_sizes).split(",") if b.strip()]
    args.nprocs = [int(n) for n in str(args.nprocs).split(",") if n.strip()]
    return args


# --------------------------------------------------------------------------------------------------------------------
# worker (one rank)
# --------------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall ms of `fn`, every call started together on all ranks (barrier) and CUDA-synchronised."""
    import torch.distributed as dist

    from peft_mazo import distributed as zo_dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        if zo_dist.is_distributed():
            dist.barrier()
        begin = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), times


def _allreduce_us(num_tasks: int, device: torch.device, repeats: int = 50) -> Optional[float]:
    """Median latency (µs) of the step's all-reduce alone: (2, T) float64."""
    from peft_mazo import distributed as zo_dist

    if not zo_dist.is_distributed():
        return None
    payload = torch.zeros(2, num_tasks, dtype=torch.float64, device=zo_dist.collective_device())
    median, _ = _timed(lambda: zo_dist.all_reduce_mean_(payload), device, warmup=5, repeats=repeats)
    return median * 1e3


def _run_config(base, name: str, global_batch: int, args, device: torch.device) -> dict[str, Any]:
    from peft import get_peft_model

    from peft_mazo import ZOSGD, MaZOConfig
    from peft_mazo import distributed as zo_dist

    rank, world = zo_dist.world()
    if global_batch % world:
        return {"error": f"global batch {global_batch} is not a multiple of the world size {world}"}
    r, sparsity = (0, args.dense_sparsity) if name == "mazo_dense" else (args.lora_r, args.lora_sparsity)
    torch.manual_seed(args.seed)  # LoRA A: the same on every rank
    model = get_peft_model(base, MaZOConfig(sparsity=sparsity, r=r))
    try:
        generator = torch.Generator().manual_seed(args.seed + global_batch)
        ids = torch.randint(0, args.vocab_size, (global_batch, args.seq_len), generator=generator)
        ids = zo_dist.shard(ids).to(device)  # this rank's rows of the global batch
        batch = {"input_ids": ids, "labels": ids}
        trainable = [p for p in model.parameters() if p.requires_grad]
        result: dict[str, Any] = {
            "r": r,
            "sparsity": sparsity,
            "rows_per_rank": ids.shape[0],
            "trainable_values": sum(p.numel() for p in trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        }

        def two_forwards() -> None:
            with torch.no_grad():
                model(**batch)
                model(**batch)

        result["two_forwards_ms"], _ = _timed(two_forwards, device, args.warmup, args.repeats)
        opt = ZOSGD(model, lr=1e-7 if r == 0 else 1e-5, eps=args.eps, seed=args.seed)

        def step() -> None:
            opt.step(lambda: model(**batch).loss)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result["step_ms"], result["step_times_ms"] = _timed(step, device, args.warmup, args.repeats)
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        result["samples_per_s"] = global_batch / (result["step_ms"] / 1e3)
        result["tokens_per_s"] = global_batch * args.seq_len / (result["step_ms"] / 1e3)
        result["replicated_ms"] = result["step_ms"] - result["two_forwards_ms"]
        result["comm_bytes_per_step"] = opt.last_step.comm_bytes
        result["allreduce_us"] = _allreduce_us(1, device)
        result["in_sync"] = zo_dist.check_in_sync(opt) if zo_dist.is_distributed() else None
    finally:
        model.unload()
    return result


def _cuda_z_same_on_every_gpu(device: torch.device) -> Optional[bool]:
    """Whether a CUDA generator seeded alike draws the same z on every rank's GPU (ZOSGD's z must not depend on the
    GPU index)."""
    from peft_mazo import distributed as zo_dist

    if device.type != "cuda" or not zo_dist.is_distributed():
        return None
    generator = torch.Generator(device=device).manual_seed(1234)
    z = torch.randn(1 << 20, generator=generator, device=device)
    return zo_dist.check_in_sync([z], step=0, what="CUDA z") is True


def worker(args: argparse.Namespace) -> dict[str, Any]:

    from peft_mazo import distributed as zo_dist

    zo_dist.init_from_env(backend="nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = zo_dist.world()
    if args.device.startswith("cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1 if args.tiny else max(1, (os.cpu_count() or 1) // world))
    base = random_llama(  # the same seed: the same random weights on every rank (checked below)
        device, vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_heads, seq_len=args.seq_len,
        dtype=args.dtype, seed=args.seed, use_cache=False,
    )  # fmt: skip
    zo_dist.check_in_sync(dict(base.named_parameters()), step=0, what="base weights")
    cuda_z_same = _cuda_z_same_on_every_gpu(device)
    results: dict[str, Any] = {}
    for name in args.configs:
        for global_batch in args.global_batch_sizes:
            key = f"{name}@{global_batch}"
            if rank == 0:
                print(f"[distributed] world {world}: {key} ...", flush=True)
            try:
                results[key] = _run_config(base, name, global_batch, args, device)
            except Exception:  # keep going: one failing configuration must not lose the others
                results[key] = {"error": traceback.format_exc()}
                print(results[key]["error"], file=sys.stderr)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    per_rank = zo_dist.all_gather_object(results)
    report = {
        "world_size": world,
        "backend": torch.distributed.get_backend() if zo_dist.is_distributed() else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "versions": library_versions(
            nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None
        ),
        "cuda_z_same_on_every_gpu": cuda_z_same,
        "results": results,
        "per_rank_step_ms": {key: [r.get(key, {}).get("step_ms") for r in per_rank] for key in results},
        "per_rank_peak_bytes": {key: [r.get(key, {}).get("peak_bytes") for r in per_rank] for key in results},
    }
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if zo_dist.is_distributed():
        torch.distributed.destroy_process_group()
    return report


# --------------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------------
def _forwarded_args(argv: list[str]) -> list[str]:
    """The command line minus the driver-only options (given to every worker)."""
    skip_next, out = False, []
    for item in argv:
        if skip_next:
            skip_next = False
            continue
        if item in ("--nprocs", "--out", "--timeout"):
            skip_next = True
            continue
        if item.split("=")[0] in ("--nprocs", "--out", "--timeout"):
            continue
        out.append(item)
    return out


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device_name']} | {report['shape']}")
    print(f"{'config@global batch':<22} {'ranks':>5} {'step ms':>9} {'2 fwd ms':>9} {'samples/s':>10} {'speed-up':>9}")
    for key, row in report["speedup"].items():
        for world, res in sorted(report["runs"].items(), key=lambda item: int(item[0])):
            r = res.get("results", {}).get(key, {})
            if "step_ms" not in r:
                print(f"{key:<22} {world:>5} ERROR {str(r.get('error', res.get('error', '?'))).splitlines()[-1][:80]}")
                continue
            speed = row.get(str(world))
            print(
                f"{key:<22} {world:>5} {r['step_ms']:9.1f} {r['two_forwards_ms']:9.1f} {r['samples_per_s']:10.1f} "
                + (f"{speed:9.3f}" if speed else f"{'-':>9}")
            )
    print(f"target: speed-up >= {TARGET_SPEEDUP_2} on 2 ranks; bytes per step = 2·T float64 = 16·T")


def device_map_check(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One process, a small Llama split over cuda:0 and cuda:1 (device_map): 3 ZO steps against the same model on
    cuda:0 alone. Expected: identical parameters (z is drawn per tensor on its own GPU, same stream on every GPU)."""
    if not args.device.startswith("cuda") or torch.cuda.device_count() < 2:
        return None
    from accelerate import dispatch_model
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_mazo import ZOSGD, MaZOConfig

    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0}
    device_map.update({"model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1})
    ids = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(0)).to("cuda:0")
    results = {}
    for name in ("split", "one_gpu"):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).eval()
        base = dispatch_model(base, device_map=device_map) if name == "split" else base.to("cuda:0")
        torch.manual_seed(0)
        model = get_peft_model(base, MaZOConfig(sparsity=0.8, r=8))
        opt = ZOSGD(model, lr=1e-3, eps=1e-3, seed=0)
        for _ in range(3):
            opt.step(lambda model=model: model(input_ids=ids, labels=ids).loss)
        results[name] = {n: p.detach().to("cpu") for n, p in model.named_parameters() if p.requires_grad}
        results[f"{name}_devices"] = sorted({str(p.device) for p in model.parameters()})
    split, single = results["split"], results["one_gpu"]
    return {
        "devices": results["split_devices"],
        "bitwise_equal": all(torch.equal(split[n], single[n]) for n in split),
        "max_abs_diff": max(float((split[n] - single[n]).abs().max()) for n in split),
    }


def driver(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    forwarded = _forwarded_args(argv)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nprocs in args.nprocs:
            part = Path(tmp) / f"world{nprocs}.json"
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
                str(Path(__file__).resolve()), "--worker", "--out", str(part), *forwarded,
            ]  # fmt: skip
            print("[distributed]", " ".join(command), flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nprocs)))
            begin = time.perf_counter()
            try:
                completed = subprocess.run(command, env=env, timeout=args.timeout, check=False)
                runs[str(nprocs)] = (
                    json.loads(part.read_text())
                    if completed.returncode == 0 and part.exists()
                    else {"error": f"torchrun exited with {completed.returncode}"}
                )
            except subprocess.TimeoutExpired:
                runs[str(nprocs)] = {"error": f"timed out after {args.timeout} s"}
            runs[str(nprocs)]["wall_s"] = time.perf_counter() - begin
    keys = [f"{c}@{b}" for c in args.configs for b in args.global_batch_sizes]
    base_world = str(min(args.nprocs))
    speedup: dict[str, dict[str, Optional[float]]] = {}
    for key in keys:
        reference = runs.get(base_world, {}).get("results", {}).get(key, {}).get("step_ms")
        speedup[key] = {}
        for world, run in runs.items():
            step_ms = run.get("results", {}).get(key, {}).get("step_ms")
            speedup[key][world] = reference / step_ms if reference and step_ms else None
    device_name = next((run["device_name"] for run in runs.values() if "device_name" in run), args.device)
    report = {
        "benchmark": "distributed",
        "device": args.device,
        "device_name": device_name,
        "shape": {
            "hidden_size": args.hidden_size,
            "intermediate_size": args.intermediate_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "vocab_size": args.vocab_size,
            "seq_len": args.seq_len,
            "dtype": args.dtype,
        },
        "settings": {
            "global_batch_sizes": args.global_batch_sizes,
            "nprocs": args.nprocs,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "eps": args.eps,
            "configs": args.configs,
        },
        "target_speedup_2": TARGET_SPEEDUP_2,
        "speedup": speedup,
        "device_map_check": _safe(device_map_check, args),
        "runs": runs,
    }
    out = (
        Path(args.out)
        if args.out
        else ROOT
        / "benchmarks"
        / "results"
        / f"distributed_{device_slug(device_name if args.device.startswith('cuda') else 'cpu')}"
        f"{'_tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwrote {out}")
    return report


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return worker(args) if args.worker else driver(args, argv)


if __name__ == "__main__":
    main()
