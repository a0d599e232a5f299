"""Helpers shared by the task-suite tests: a tiny tokenizer built in memory (never downloaded).

Not a test module of its own; it is named `test_tasks_*.py` only to stay within the task suite's files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
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
