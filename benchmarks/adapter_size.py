"""Saved adapter size of MaZO for the linear layers of one Llama-2-7B decoder layer (and the whole 32-layer model).

Builds the seven projections of one Llama-2-7B decoder layer (q, k, v, o: 4096 × 4096; gate, up: 11008 × 4096;
down: 4096 × 11008) with random bf16 weights, wraps them with MaZO (dense ρ = 0.9 and LoRA r = 64, ρ = 0.8),
saves each adapter with `save_pretrained` and reports the size of `adapter_model.safetensors`.

    python benchmarks/adapter_size.py [--out benchmarks/results/adapter_size.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import results_header  # benchmarks/common.py
from peft import get_peft_model
from safetensors import safe_open
from torch import nn

import peft_mazo


HIDDEN, INTERMEDIATE, LAYERS = 4096, 11008, 32
SHAPES = {  # name: (out, in)
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTERMEDIATE, HIDDEN),
    "up_proj": (INTERMEDIATE, HIDDEN),
    "down_proj": (HIDDEN, INTERMEDIATE),
}
CONFIGS = {
    "dense rho=0.9": dict(sparsity=0.9, r=0),
    "LoRA r=64 rho=0.8": dict(sparsity=0.8, r=64),
}


class DecoderLinears(nn.Module):
    """The seven linear layers of one Llama-2-7B decoder layer, random bf16 weights."""

    def __init__(self) -> None:
        super().__init__()
        for name, (out_features, in_features) in SHAPES.items():
            setattr(self, name, nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16))


def measure(config_kwargs: dict) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(DecoderLinears(), peft_mazo.MaZOConfig(target_modules=list(SHAPES), **config_kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        path = Path(tmp) / "adapter_model.safetensors"
        file_bytes = path.stat().st_size
        by_kind: dict[str, int] = {}
        with safe_open(path, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                kind = key.split(".")[-1]
                by_kind[kind] = by_kind.get(kind, 0) + tensor.numel() * tensor.element_size()
    base_bytes_bf16 = sum(o * i for o, i in SHAPES.values()) * 2
    return {
        "file_bytes_one_layer": file_bytes,
        "tensor_bytes_by_kind": by_kind,
        "file_bytes_32_layers_estimate": file_bytes * LAYERS,
        "ratio_to_bf16_base_weights": file_bytes / base_bytes_bf16,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/adapter_size.json")
    args = parser.parse_args()
    results = {name: measure(kwargs) for name, kwargs in CONFIGS.items()}
    print("| adapter | one decoder layer | 32 layers | vs bf16 base weights | tensors (MB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(r["tensor_bytes_by_kind"].items()))
        print(
            f"| {name} | {r['file_bytes_one_layer'] / 2**20:.1f} MiB | {r['file_bytes_32_layers_estimate'] / 2**30:.2f} GiB "
            f"| {100 * r['ratio_to_bf16_base_weights']:.1f} % | {kinds} |"
        )
    record = {
        **results_header("adapter_size", torch.device("cpu")),
        "what": "saved MaZO adapter size, Llama-2-7B layer shapes (computed from the saved files; no timing)",
        "shapes": SHAPES,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
