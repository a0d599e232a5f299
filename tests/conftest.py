"""Fixtures shared by the whole suite; the builders behind them are in `tests/helpers.py`."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaForCausalLM

import peft_mazo  # noqa: F401  (registers the MAZO method)
from tests.helpers import make_tiny_llama, write_tiny_model_dir


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist runs one worker per core: one thread per worker avoids oversubscription (tiny models slow ~50x).
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with its tokenizer (`tests.helpers.write_tiny_model_dir`), one per test module."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
