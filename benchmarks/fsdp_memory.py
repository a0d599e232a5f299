"""Predicted memory per GPU of ZO training with the base sharded by FSDP2 (`peft_mazo.sharding.shard_base`), for the
Llama-2-7B and Llama-2-70B shapes on 1, 2, 4 and 8 GPUs (issue 14).

A prediction from the shapes by `peft_mazo.memory.predict_memory_per_gpu` (its docstring gives every formula); nothing
runs on a GPU. Settings: bf16 base, float32 adapter on the seven projections of every layer (MaZO dense ρ = 0.9; MaZO
LoRA r = 64, ρ = 0.8), `ZOSGD` with perturbation="auto" and no momentum, a global batch of 16 × 512 tokens split over
the GPUs (16 / W rows each), logits at every position. W = 1 is one GPU without FSDP.

    python benchmarks/fsdp_memory.py                 # prints the table, writes benchmarks/results/fsdp_memory_prediction.json
    python benchmarks/fsdp_memory.py --tiny --out /tmp/x.json    # smoke test (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch


ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import provenance  # noqa: E402  (benchmarks/common.py)

import peft_mazo  # noqa: E402
from peft_mazo.memory import LLAMA2_7B, LLAMA2_70B, ModelShapes, predict_memory_per_gpu  # noqa: E402


GIB = 2**30
CONFIGS = {  # name: MaZOConfig keywords
    "mazo_dense": dict(r=0, sparsity=0.9),
    "mazo_lora": dict(r=64, sparsity=0.8),
}
TINY = ModelShapes(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2,4,8")
    parser.add_argument("--global-batch", type=int, default=16, help="rows per step over all GPUs")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script)")
    parser.add_argument("--device", default=None, help="ignored: a prediction runs on no device")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp_memory_prediction.json"))
    return parser.parse_args(argv)


def gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    models = {"tiny": TINY} if args.tiny else {"llama-2-7b": LLAMA2_7B, "llama-2-70b": LLAMA2_70B}
    worlds = [int(w) for w in args.world_sizes.split(",")]
    results: dict[str, Any] = {}
    rows = [
        "| model | adapter | GPUs | rows per GPU | base shard | all-gathered | adapter | masks | ZO buffers | "
        "transient | **total** |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, shapes in models.items():
        for config_name, config in CONFIGS.items():
            r = min(config["r"], 4) if args.tiny else config["r"]
            for world in worlds:
                prediction = predict_memory_per_gpu(
                    shapes,
                    world,
                    dtype=args.dtype,
                    r=r,
                    sparsity=config["sparsity"],
                    batch_per_gpu=max(1, args.global_batch // world),
                    seq_len=args.seq_len,
                )
                results.setdefault(model_name, {}).setdefault(config_name, {})[str(world)] = prediction.as_dict()
                p = prediction
                rows.append(
                    f"| {model_name} | {config_name} | {world} | {max(1, args.global_batch // world)} | "
                    f"{gib(p.base_shard)} | {gib(p.base_gathered)} | {gib(p.adapter)} | {gib(p.masks)} | "
                    f"{gib(p.zo_buffers)} ({p.perturbation}) | {gib(p.total - p.persistent)} | **{gib(p.total)}** |"
                )
    print(
        f"Predicted memory per GPU (GiB), {'tiny shapes' if args.tiny else args.dtype + ' base'}; transient = "
        "max(composed weight + one layer's activations, logits stage)"
    )
    print("\n".join(rows))
    report = {
        "what": "predicted memory per GPU (bytes) of ZO training with the base sharded by FSDP2 and the adapter "
        "replicated; W = 1: one GPU without FSDP",
        "device": "none: predicted from the model shapes by peft_mazo.memory.predict_memory_per_gpu, not measured",
        "function": "peft_mazo.memory.predict_memory_per_gpu",
        "command": " ".join(["python", "benchmarks/fsdp_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {
            "dtype": args.dtype,
            "delta_dtype": "float32",
            "global_batch": args.global_batch,
            "batch_per_gpu": "global_batch // world_size",
            "seq_len": args.seq_len,
            "logit_positions": "seq_len",
            "perturbation": "auto",
            "momentum": False,
            "configs": CONFIGS,
        },
        "shapes": {name: vars(shapes) for name, shapes in models.items()},
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "peft_mazo": peft_mazo.__version__},
        **provenance(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
