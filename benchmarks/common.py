"""Shared pieces of the benchmark scripts: a random-weight Llama of given shapes and a timing/memory meter.

The scripts run as `python benchmarks/<name>.py`, so this module is importable as `common`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def random_llama(
    device: torch.device,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    seq_len: int,
    dtype: str = "bfloat16",
    seed: int = 0,
    use_cache: bool = True,
) -> torch.nn.Module:
    """A `LlamaForCausalLM` with random weights, built directly on `device` in `dtype`, frozen and in eval mode.

    The same seed gives the same weights (on every rank of a distributed run, too).
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max(4096, seq_len),
        tie_word_embeddings=False,
        use_cache=use_cache,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


class Meter:
    """Medians of CUDA-event timings (perf_counter on CPU) and peak memory on one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_ms(
        self, fn: Callable[[int], Any], warmup: int, repeats: int, inner: int = 1
    ) -> tuple[float, list[float]]:
        """Median over `repeats` of the time of `inner` calls `fn(i)` (i counts calls), divided by `inner`."""
        calls = 0
        for _ in range(warmup * inner):
            fn(calls)
            calls += 1
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                begin = time.perf_counter()
            for _ in range(inner):
                fn(calls)
                calls += 1
            if self.cuda:
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / inner)
            else:
                times.append((time.perf_counter() - begin) * 1e3 / inner)
        return statistics.median(times), times

    def peak_bytes(self, fn: Callable[[], Any]) -> Optional[int]:
        """Peak allocated bytes during one call of `fn` (everything already allocated included); None on CPU."""
        if not self.cuda:
            fn()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return int(torch.cuda.max_memory_allocated(self.device))

    def allocated(self) -> Optional[int]:
        return int(torch.cuda.memory_allocated(self.device)) if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def quantize_linears_nf4(model: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every `nn.Linear` of the decoder layers by a bitsandbytes nf4 `Linear4bit` (on the layer's device),
    as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` would; the LM head stays as it is.

    Returns the number of layers quantized."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
            quant_type="nf4", device="meta",
        )  # fmt: skip
        weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        quantized.weight = weight.to(module.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantized.requires_grad_(False))
        count += 1
    return count


def provenance() -> dict[str, Any]:
    """The code a result was measured with: `git_commit` (`MAZO_GIT_COMMIT` when set, else `git rev-parse HEAD`) and
    `git_dirty` (tracked files differ from that commit). A copy of the tree on another machine may carry a stale
    `.git`: there `git_dirty` is true, and the caller should pass `MAZO_GIT_COMMIT`."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": os.environ.get("MAZO_GIT_COMMIT") or git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def add_model_shape_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: bool = True,
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32"),
) -> None:
    """The arguments every Llama-2-7B-shaped benchmark takes: device, `--tiny`, the model's shapes (Llama-2-7B by
    default), batch and sequence length, dtype, and the two MaZO adapters (dense ρ, LoRA ρ and r)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes for a smoke test (CPU friendly)")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--intermediate-size", type=int, default=11008)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=32000)
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=list(dtypes))
    parser.add_argument("--dense-sparsity", type=float, default=0.9)
    parser.add_argument("--lora-sparsity", type=float, default=0.8)
    parser.add_argument("--lora-r", type=int, default=64)


def use_tiny_shapes(args: argparse.Namespace) -> None:
    """`--tiny`: shapes small enough for a CPU smoke run (2 layers of width 128, 32 tokens, batch 2)."""
    args.hidden_size, args.intermediate_size, args.num_layers = 128, 256, 2
    args.num_heads, args.vocab_size, args.seq_len = 4, 256, 32
    if hasattr(args, "batch_size"):
        args.batch_size = 2


def library_versions(**extra: Any) -> dict[str, Any]:
    """Python, torch (and its CUDA), transformers, peft and peft_mazo versions, plus `extra` (e.g. triton=...)."""
    import platform

    import peft
    import transformers

    import peft_mazo

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_mazo": peft_mazo.__version__,
        **extra,
    }


def results_header(benchmark: str, device: torch.device, argv: Optional[list[str]] = None) -> dict[str, Any]:
    """The first fields of a results file: the benchmark, the device, CPU threads, versions, git provenance and the
    command line that made it."""
    import platform
    import sys
    from pathlib import Path

    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "versions": library_versions(),
        **provenance(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
