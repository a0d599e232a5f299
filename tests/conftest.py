"""Shared fixtures: tiny models built in code (never downloaded), sized in multiples of 64 for bitsandbytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_mazo  # noqa: F401  (registers the MAZO method)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist runs one worker per core: one thread per worker avoids oversubscription (tiny models slow ~50x).
torch.set_num_threads(1)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama config: hidden 64, MLP 128, vocab 128 (every linear width a multiple of 64)."""
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny `LlamaForCausalLM`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


class TinyMLP(nn.Module):
    """Two linear layers with biases and a non-linear module in between (for non-transformers models)."""

    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.lin0 = nn.Linear(width, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin1(self.act(self.lin0(x))))


def make_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
