"""Helpers shared by the distributed tests (`test_distributed.py`, `test_sharding.py`): a float64 tiny Llama, the
global batch of a step and its half per rank, an LM loss in the logits' dtype, and the full-batch tolerance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_mazo import distributed as zo_dist
from tests.helpers import make_tiny_llama


WORLD = 2
# Full batch in one process vs two half batches, float64 end to end (transformers' RMSNorm, which upcasts to float32
# and back, is replaced by a float64 one, see `Float64RMSNorm`): only float64 reassociation between a batch of 4 and
# two of 2 remains, far below these tolerances on every CPU kernel set (avx512, avx2, default) although ĝ divides the
# loss difference by 2ε.
FULL_BATCH_TOLERANCE = dict(rtol=1e-6, atol=1e-9)


class Float64RMSNorm(nn.Module):
    """RMSNorm computed in the input's own dtype. transformers' `LlamaRMSNorm` computes in float32 whatever the input,
    so a "float64" Llama rounds to float32 in every norm; with batch-size-dependent float64 matmuls in front, the full
    batch and the half batches can then round differently, and ĝ = ΔL / 2ε magnifies that (on CPUs without AVX-512)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps))


def float64_llama() -> nn.Module:
    """The tiny Llama in float64 with no float32 island left in the batch-dependent part of its forward (the rotary
    embedding's float32 cos/sin depend on the positions only, identical for every batch size)."""
    model = make_tiny_llama().double()
    norms = [(name, module) for name, module in model.named_modules() if type(module).__name__ == "LlamaRMSNorm"]
    assert norms, "the tiny Llama has no LlamaRMSNorm to replace: update float64_llama"
    for name, norm in norms:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Float64RMSNorm(norm).double())
    return model


def step_batch(step: int, size: int = 4, length: int = 12) -> torch.Tensor:
    """The global batch of `step` (no padding: every row has the same token count, so the mean of the two ranks'
    half-batch losses is the full-batch loss up to rounding)."""
    return torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(100 + step))


def half(batch: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s half of a global batch (of `WORLD` ranks)."""
    return zo_dist.shard(batch, rank, WORLD)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens, in the logits' dtype (the model's own loss upcasts to float32
    only, which would hide float64 precision)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return summed_cross_entropy(model(input_ids=ids).logits, ids) / (ids.shape[0] * (ids.shape[1] - 1))
