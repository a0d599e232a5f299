"""Model-side scoring of encoded batches: log-likelihoods, losses, predictions, greedy generation, task objectives.

Every function runs the model as a plain causal LM, `model(input_ids=..., attention_mask=..., use_cache=False)`
returning `.logits` of shape `(N, L, V)` (any `transformers` causal LM, or a `PeftModel` around one), in whatever
grad mode and train / eval mode the caller set (except `multitask_losses`, which runs under `torch.no_grad()` by
default). Zeroth-order training needs a deterministic forward: keep dropout off (`model.eval()`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .encoding import EncodedBatch, encode_batch, encode_contexts, pad_sequences, pad_token_id
from .example import Example
from .metrics import squad_f1
from .packing import PackedBatch, pack_batches, packed_losses, supports_packing


Objective = Literal["loss", "error"]
MAX_NEW_TOKENS = 50


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embeddings (where input ids must go), else of its first parameter."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def continuation_log_probs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Log-probability of every continuation token given the tokens before it, in one forward.

    Args:
        input_ids (`torch.LongTensor` of shape `(N, L)`): right-padded sequences.
        attention_mask (`torch.LongTensor` of shape `(N, L)`).
        target_mask (`torch.BoolTensor` of shape `(N, L)`): the tokens to score (never position 0).

    Returns:
        `torch.FloatTensor` of shape `(N, L)`: float32 log p(token | prefix) on `target_mask`, 0 elsewhere. Only the
        scored positions go through the float32 log-softmax, so memory stays at the model's own logits.
    """
    if target_mask[:, 0].any():
        raise ValueError("target_mask marks position 0, which has no preceding token to predict it from.")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    scored = target_mask[:, 1:]  # logits at t predict token t + 1
    selected = logits[:, :-1][scored].float()  # (K, V)
    token_log_probs = selected.log_softmax(dim=-1).gather(-1, input_ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=token_log_probs.device)
    out[:, 1:][scored] = token_log_probs
    return out


def sequence_log_likelihoods(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Length-normalised log-likelihood (mean log-probability of the continuation's tokens) of each sequence.

    Returns:
        `torch.FloatTensor` of shape `(N,)`.
    """
    token_log_probs = continuation_log_probs(model, batch.input_ids, batch.attention_mask, batch.target_mask)
    return token_log_probs.sum(dim=1) / batch.target_mask.sum(dim=1).clamp(min=1)


def candidate_scores(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Length-normalised log-likelihood of every candidate of every example, from one padded forward.

    Returns:
        `torch.FloatTensor` of shape `(B, C)`: `-inf` where an example has fewer than C candidates.
    """
    per_sequence = sequence_log_likelihoods(model, batch)
    index = batch.candidate_index
    scores = per_sequence[index.clamp(min=0)]
    return scores.masked_fill(index < 0, float("-inf"))


def score_candidates(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], max_length: int | None = None
) -> torch.Tensor:
    """`candidate_scores` of examples given as `Example`s (tokenizes them with `encode_batch`); shape `(B, C)`."""
    batch = encode_batch(tokenizer, examples, max_length).to(model_device(model))
    return candidate_scores(model, batch)


def batch_loss(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """The training loss of a batch (0-dim float32 tensor).

    Classification / multiple choice: cross-entropy over the candidates' length-normalised log-likelihoods, mean over
    examples. Generation (SQuAD): teacher forcing, the mean negative log-likelihood over all target tokens of the
    batch (` {first gold answer}\\n`).
    """
    if batch.is_generation:
        token_log_probs = continuation_log_probs(model, batch.input_ids, batch.attention_mask, batch.target_mask)
        return -token_log_probs.sum() / batch.target_mask.sum().clamp(min=1)
    return F.cross_entropy(candidate_scores(model, batch), batch.labels)


def predict(model: torch.nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """The highest-scoring candidate of each example, `(B,)` long (classification and multiple choice only)."""
    if batch.is_generation:
        raise ValueError(f"Task '{batch.task}' is scored by generation; use generate_answers.")
    return candidate_scores(model, batch).argmax(dim=-1)


class _StopAtNewline(StoppingCriteria):
    """Stopping criterion: a row is done once its generated text holds a newline."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in text for text in texts], dtype=torch.bool, device=input_ids.device)


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_length: int | None = None,
) -> list[str]:
    """Greedy answers to the examples' prompts: at most `max_new_tokens` new tokens, cut at the first newline.

    The prompts are tokenized as in training (leading special tokens + prompt, see `encoding`), left-padded and
    truncated from the left to `max_length - max_new_tokens` when `max_length` is given.

    Returns:
        `list[str]`: the generated text before the first newline, stripped of surrounding whitespace.
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no `generate`; generation tasks need a transformers causal LM.")
    if not examples:
        return []
    limit = None if max_length is None else max(max_length - max_new_tokens, 1)
    contexts = encode_contexts(tokenizer, [e.prompt for e in examples], limit)
    input_ids, attention_mask = pad_sequences(contexts, pad_token_id(tokenizer), side="left")
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    stop = _StopAtNewline(tokenizer, input_ids.shape[1])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([stop]),
    )
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [text.split("\n", 1)[0].strip() for text in texts]


def batch_error(model: torch.nn.Module, batch: EncodedBatch, max_new_tokens: int = MAX_NEW_TOKENS) -> torch.Tensor:
    """A non-differentiable objective: 1 − accuracy (classification) or 1 − mean SQuAD F1 (generation), in [0, 1].

    Returns:
        0-dim float32 tensor on the model's device.
    """
    device = model_device(model)
    if batch.is_generation:
        if batch.tokenizer is None:
            raise ValueError("The batch carries no tokenizer to decode generations; build it with encode_batch.")
        answers = generate_answers(
            model, batch.tokenizer, batch.examples, max_new_tokens=max_new_tokens, max_length=batch.max_length
        )
        score = sum(squad_f1(a, e.answers) for a, e in zip(answers, batch.examples, strict=True)) / len(answers)
    else:
        score = (predict(model, batch) == batch.labels).float().mean().item()
    return torch.tensor(1.0 - score, dtype=torch.float32, device=device)


_last_packing: list = []  # one entry: (the step's batch objects, device, PackedBatch), reused by the - pass


def _packed_step(batches: Mapping[str, EncodedBatch], device: torch.device) -> PackedBatch:
    """`pack_batches(batches)` on `device`, packed once per step: a ZO step's + and - closures reuse it."""
    key = tuple(batches.values())
    if _last_packing and _last_packing[0][1] == device and len(_last_packing[0][0]) == len(key):
        if all(a is b for a, b in zip(_last_packing[0][0], key, strict=True)):
            return _last_packing[0][2]
    packed = pack_batches(batches).to(device)
    _last_packing[:] = [(key, device, packed)]  # holds the batches, so their ids cannot be reused while cached
    return packed


def multitask_losses(
    model: torch.nn.Module,
    batches: Mapping[str, EncodedBatch] | PackedBatch,
    objective: Objective = "loss",
    *,
    with_grad: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    packed: bool | None = None,
) -> torch.Tensor:
    """One loss per task, for a zeroth-order closure: `return multitask_losses(model, batches)`.

    With the training loss, all tasks run in ONE padding-free forward (`packing.packed_losses`) when the model keeps
    packed sequences apart (`supports_packing`, checked once per model); otherwise one padded forward per task. Both
    give the same losses up to floating-point rounding.

    Args:
        model (`torch.nn.Module`): the causal LM (batches are moved to its device).
        batches (`Mapping[str, EncodedBatch]` or `PackedBatch`): one batch per task, e.g. a step of
            `MultiTaskSampler.encoded`, or such a step already packed with `pack_batches`.
        objective (`"loss"` or `"error"`): the training loss of `batch_loss`, or the non-differentiable
            `batch_error` (1 − accuracy / 1 − F1 with greedy generation; never packed).
        with_grad (`bool`): `False` (default) runs under `torch.no_grad()`, as a ZO step needs; `True` keeps the
            caller's grad mode (first-order baselines).
        packed (`bool`, *optional*): force (True) or forbid (False) the packed forward; None (default) packs when
            the model supports it.

    Returns:
        `torch.FloatTensor` of shape `(T,)`: the tasks' values in the order of `batches`.
    """
    if objective not in ("loss", "error"):
        raise ValueError(f"objective must be 'loss' or 'error', got {objective!r}.")
    if not isinstance(batches, PackedBatch) and not batches:
        raise ValueError("multitask_losses needs at least one task batch.")
    if isinstance(batches, PackedBatch) and (objective != "loss" or packed is False):
        raise ValueError("A PackedBatch gives the training loss only; pass the task batches for objective='error'.")
    device = model_device(model)
    with nullcontext() if with_grad else torch.no_grad():
        if isinstance(batches, PackedBatch):
            return packed_losses(model, batches.to(device))
        if objective == "loss" and packed is not False and (packed or supports_packing(model)):
            return packed_losses(model, _packed_step(batches, device))
        values = []
        for task, batch in batches.items():
            if not isinstance(batch, EncodedBatch):
                raise TypeError(
                    f"The batch of task '{task}' is a {type(batch).__name__}; tokenize it with encode_batch (or use "
                    "MultiTaskSampler.encoded)."
                )
            batch = batch.to(device)
            value = batch_loss(model, batch) if objective == "loss" else batch_error(model, batch, max_new_tokens)
            values.append(value.float().reshape(()))
    return torch.stack(values)
