"""Checks of a causal LM's token inputs, so that a bad batch gets an error naming the problem and the fix instead of
a failure deep inside torch (an embedding lookup with float indices, an index beyond the vocabulary, or a CUDA
device-side assert that poisons the process).

Used as a forward pre-hook on the base model of every MaZO adapter (`install_input_check`, from
`MaZOModel.inject_adapter`; removed again by `unload` / `merge_and_unload`), so that every forward is checked, whichever
wrapper calls it (a `PeftModel`, a ZO closure, evaluation, the runner), with the cheap checks only: presence and dtype,
and the vocabulary range only for CPU tensors, where it costs no device sync. `compute_importance` runs all three
checks on the calibration batches it takes up front, before any forward pass.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


TOKENIZER_HINT = "tokenizer(texts, return_tensors='pt', padding=True)"


_HOOKS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()
_IDS_POSITION: dict[type, Optional[int]] = {}


def _ids_position(model: nn.Module) -> Optional[int]:
    """Position of `input_ids` among the parameters of the class's forward (cached per class; an instance's forward
    may be wrapped, e.g. by accelerate's hooks, into `*args, **kwargs`); None when it has none."""
    kind = type(model)
    if kind not in _IDS_POSITION:
        try:
            names = list(inspect.signature(kind.forward).parameters)[1:]  # without self
        except (TypeError, ValueError):
            names = []
        _IDS_POSITION[kind] = names.index("input_ids") if "input_ids" in names else None
    return _IDS_POSITION[kind]


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (`get_input_embeddings()`), or None for a model without one."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        embedding = getter()
    except (AttributeError, NotImplementedError):
        return None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def check_token_inputs(
    model: nn.Module, args: tuple, kwargs: Mapping[str, Any], where: str, check_range: Optional[bool] = None
) -> None:
    """Raise `ValueError` when a forward of a model with token embeddings gets no token ids, non-integer ids, or ids
    outside its vocabulary.

    Args:
        model (`nn.Module`): the model the inputs are for; nothing is checked unless it has an `nn.Embedding` input
            embedding and its forward an `input_ids` parameter.
        args (`tuple`), kwargs (`Mapping`): the forward's arguments (`input_ids` may be the first positional one).
        where (`str`): what the inputs are, for the message (e.g. "Task 'sst2': calibration batch 2").
        check_range (`bool`, *optional*): check the ids against the vocabulary; None = only for CPU tensors (no
            device sync during training).
    """
    vocab = vocabulary_size(model)
    position = _ids_position(model)
    if vocab is None or position is None:
        return
    ids = kwargs.get("input_ids")
    if ids is None and len(args) > position:
        ids = args[position]
    if ids is None:
        if kwargs.get("inputs_embeds") is not None:
            return
        keys = ", ".join(sorted(str(key) for key in kwargs if kwargs[key] is not None)) or "none"
        raise ValueError(
            f"{where} has no 'input_ids' (it has: {keys}). A causal LM reads token ids: pass the tokenizer's output, "
            f"e.g. {TOKENIZER_HINT}, which holds 'input_ids' and 'attention_mask' (add 'labels' for a loss)."
        )
    if not isinstance(ids, torch.Tensor):
        raise ValueError(
            f"{where}: 'input_ids' is a {type(ids).__name__}, not a tensor. Pass the tokenizer's output with "
            f"return_tensors='pt', e.g. {TOKENIZER_HINT}."
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{where}: 'input_ids' is a {ids.dtype} tensor; token ids must be integers (torch.long). Pass the "
            "tokenizer's output unchanged (a collate function that stacks ids as floats, e.g. through "
            "torch.tensor(..., dtype=torch.float), is the usual cause), or convert with input_ids.long()."
        )
    if check_range is None:
        check_range = ids.device.type == "cpu"
    if check_range and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"{where}: 'input_ids' holds token id {bad}, outside the model's vocabulary [0, {vocab}). "
                + (
                    "Negative ids are usually labels' -100 or a padding value; mask padding with 'attention_mask' "
                    "instead. "
                    if low < 0
                    else "The batch was probably made with another model's tokenizer; "
                )
                + "Tokenize with the model's own tokenizer (AutoTokenizer.from_pretrained of the same model)."
            )


def _input_check_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    check_token_inputs(module, args, kwargs, "The model's input")


def install_input_check(model: nn.Module) -> None:
    """Check the token inputs of every forward of `model` (a forward pre-hook, installed once per model)."""
    if model not in _HOOKS and vocabulary_size(model) is not None and _ids_position(model) is not None:
        _HOOKS[model] = model.register_forward_pre_hook(_input_check_hook, with_kwargs=True)


def remove_input_check(model: nn.Module) -> None:
    """Remove the hook of `install_input_check` (no-op when there is none)."""
    handle = _HOOKS.pop(model, None)
    if handle is not None:
        handle.remove()
