"""What many test modules share: tiny models and a tokenizer built in code (never downloaded; every linear width a
multiple of 64 for bitsandbytes), the shared data directory, and tensor comparisons. Import it as `tests.helpers`;
fixtures live in `tests/conftest.py`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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


def write_tiny_model_dir(path: Path) -> Path:
    """A tiny Llama (seed 0, 256 positions) and its tokenizer saved in `path`: a model directory `mazo` can load."""
    make_tiny_llama(seed=0, max_position_embeddings=256).save_pretrained(path)
    make_tiny_tokenizer(pad=True).save_pretrained(path)
    return path


SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def make_tiny_tokenizer(
    merges: Sequence[tuple[str, str]] = (), *, pad: bool = False, bos: bool = True
) -> PreTrainedTokenizerFast:
    """A character-level BPE tokenizer over printable ASCII and newline (99 ids + one per merge, all < 128).

    Args:
        merges: BPE merges on top of single characters, e.g. `[("a", "b")]` adds the token "ab" (merges apply
            across spaces: there is no pre-tokenizer).
        pad: whether the tokenizer has a pad token (`<pad>`); without one, callers must fall back to EOS.
        bos: whether the tokenizer puts `<s>` in front of every text (as Llama's does).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) > 128:
        raise ValueError("The tiny models have a vocabulary of 128 ids.")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs
    )


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, cloned."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bits."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(as_bytes(a[k]), as_bytes(b[k]))
        for k in a
    )
