"""Tokenization of examples into padded tensors, with any Hugging Face tokenizer (slow or fast).

The rule (one, used everywhere: training losses, scoring, calibration and generation prompts):

1. Trailing spaces of the prompt are moved to the front of the continuation (COPA's `... because ` + `the sun`
   becomes `... because` + ` the sun`); the concatenated text is unchanged. Tokenizers attach a space to the word
   after it, so this gives the natural tokens; the space is then scored with the candidate (inside its first token
   for BPE and SentencePiece tokenizers).
2. The prompt and prompt + continuation are tokenized without special tokens. When the prompt's tokens are a
   prefix of the joint tokens, the continuation's tokens are the rest of the joint tokens (exactly the tokens of the
   continuation in context). Otherwise (a token merged across the boundary) the continuation is tokenized on its
   own and concatenated, as MeZO does; the split between prompt and continuation is exact in both cases.
3. The tokenizer's leading special tokens (e.g. Llama's BOS, found by tokenizing a probe with and without special
   tokens) are put in front of the prompt; trailing ones (EOS) are not added.
4. With `max_length`, the prompt is truncated from the left (after the leading special tokens, which are kept) and
   the continuation is kept whole; only a continuation longer than `max_length - 1` is cut, from the right.

Padding uses `tokenizer.pad_token_id`, or the EOS token when the tokenizer has no pad token (the tokenizer is not
modified). Scoring batches are right-padded; generation prompts are left-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .example import Example


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (e.g. `[bos_token_id]` for Llama, `[]` for GPT-2)."""
    probe = "x"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("The tokenizer has neither a pad token nor an EOS token; set `tokenizer.pad_token` first.")


def _left_truncate(context: list[int], budget: int, n_prefix: int) -> list[int]:
    """Keeps at most `budget` context tokens: the first `n_prefix` (when they fit) and the last of the rest."""
    if len(context) <= budget:
        return context
    prefix, body = context[:n_prefix], context[n_prefix:]
    if len(prefix) >= budget or not body:
        return context[-budget:]
    return prefix + body[len(body) - (budget - len(prefix)) :]


def truncate(
    context: list[int], continuation: list[int], max_length: int | None, n_prefix: int = 0
) -> tuple[list[int], list[int]]:
    """Fits `context + continuation` into `max_length` tokens (pure function).

    The first `n_prefix` context tokens (special tokens) are kept when there is room, the rest of the context is cut
    from the left, and the continuation is kept whole unless it alone exceeds `max_length - 1` (then cut from the
    right, so that at least one context token remains to predict its first token).
    """
    if max_length is None or len(context) + len(continuation) <= max_length:
        return context, continuation
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 to hold a prompt token and a continuation, got {max_length}.")
    continuation = continuation[: max_length - 1]
    return _left_truncate(context, max_length - len(continuation), n_prefix), continuation


def _context_text(prompt: str) -> str:
    return prompt.rstrip(" ")


def encode_continuations(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], max_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) for each prompt / continuation pair, by the rule of the module docstring.

    Returns:
        `list[tuple[list[int], list[int]]]`: per pair, the context ids (leading special tokens + prompt) and the
        continuation ids; `len(context) + len(continuation) <= max_length` when it is given.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations.")
    if not prompts:
        return []
    prefix = special_prefix(tokenizer)
    contexts = [_context_text(p) for p in prompts]
    moved = [p[len(c) :] + cont for p, c, cont in zip(prompts, contexts, continuations, strict=True)]
    unique = list(dict.fromkeys(contexts))
    unique_ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    joint = tokenizer([c + m for c, m in zip(contexts, moved, strict=True)], add_special_tokens=False)["input_ids"]
    pairs: list[tuple[list[int], list[int]] | None] = []
    separate = []
    for i, (ctx, full) in enumerate(zip(contexts, joint, strict=True)):
        ctx_ids = list(unique_ids[ctx])
        if len(full) > len(ctx_ids) and list(full[: len(ctx_ids)]) == ctx_ids:
            pairs.append((ctx_ids, list(full[len(ctx_ids) :])))
        else:
            pairs.append(None)
            separate.append(i)
    if separate:
        alone = tokenizer([moved[i] for i in separate], add_special_tokens=False)["input_ids"]
        for i, ids in zip(separate, alone, strict=True):
            pairs[i] = (list(unique_ids[contexts[i]]), list(ids))
    out = []
    for i, pair in enumerate(pairs):
        assert pair is not None
        ctx_ids, cont_ids = prefix + pair[0], pair[1]
        if not cont_ids:
            raise ValueError(f"The continuation {continuations[i]!r} tokenizes to no tokens.")
        if not ctx_ids:
            raise ValueError(f"The prompt {prompts[i][:40]!r} is empty and the tokenizer adds no BOS token.")
        out.append(truncate(ctx_ids, cont_ids, max_length, len(prefix)))
    return out


def minimum_length(task: str, tokenizer: Any) -> int:
    """The fewest tokens that hold a task's prompt template and its longest answer with this tokenizer.

    It is the length of the task's shortest possible example (`templates.SKELETONS`: every text field one character)
    with its longest candidate (or its training target, for generation), leading special tokens included. A
    `max_length` below it cuts the template or the answer of every example.

    Args:
        task (`str`): task name (any spelling `canonical_task_name` accepts).
        tokenizer: the model's tokenizer.
    """
    from .registry import get_task
    from .templates import SKELETONS

    spec = get_task(task)
    (example,) = spec.render(SKELETONS[spec.name], f"{spec.name}/skeleton")
    continuations = list(example.candidates) or [example.target]
    pairs = encode_continuations(tokenizer, [example.prompt] * len(continuations), continuations)
    return max(len(context) + len(continuation) for context, continuation in pairs)


def full_lengths(tokenizer: Any, examples: Sequence[Example]) -> list[int]:
    """Untruncated token length of each example: its prompt with its longest candidate (or its target), special
    tokens included, i.e. the `max_length` that keeps the example whole."""
    lengths = []
    for ex in examples:
        continuations = [ex.target] if ex.is_generation else list(ex.candidates)
        pairs = encode_continuations(tokenizer, [ex.prompt] * len(continuations), continuations, None)
        lengths.append(max(len(ctx) + len(cont) for ctx, cont in pairs))
    return lengths


def encode_contexts(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of the prompts alone (leading special tokens + prompt, truncated from the left to `max_length`)."""
    if not prompts:
        return []
    prefix = special_prefix(tokenizer)
    ids = tokenizer([_context_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
    out = []
    for prompt, body in zip(prompts, ids, strict=True):
        ctx = prefix + list(body)
        if not ctx:
            raise ValueError(f"The prompt {prompt[:40]!r} is empty and the tokenizer adds no BOS token.")
        if max_length is not None:
            ctx = _left_truncate(ctx, max_length, len(prefix))
        out.append(ctx)
    return out


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads id lists into `input_ids` and `attention_mask`, both `(N, L)` long tensors, L = the longest length."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}.")
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        cols = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        input_ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


@dataclass
class EncodedBatch:
    """Examples of one task, tokenized for scoring: all candidates of all examples in one right-padded tensor.

    B = examples, C = most candidates of an example, N = sequences (the sum of candidates; B for generation tasks,
    whose sequence is prompt + training target), L = longest sequence.

    Args:
        task (`str`): canonical task name.
        input_ids (`torch.LongTensor` of shape `(N, L)`): context + continuation ids, right-padded.
        attention_mask (`torch.LongTensor` of shape `(N, L)`): 1 on real tokens.
        target_mask (`torch.BoolTensor` of shape `(N, L)`): True on the continuation's tokens (candidate or target).
        candidate_index (`torch.LongTensor` of shape `(B, C)`): row of `input_ids` of candidate c of example b, -1
            where example b has fewer candidates. Generation tasks: `(B, 1)`, row b.
        labels (`torch.LongTensor` of shape `(B,)`): index of the gold candidate; -100 for generation tasks.
        examples (`tuple[Example, ...]`): the examples, in batch order.
        tokenizer: the tokenizer that built the batch (generation tasks need it to decode under a metric objective).
        max_length (`int`, *optional*): the length limit the batch was built with.
    """

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    candidate_index: torch.Tensor
    labels: torch.Tensor
    examples: tuple[Example, ...]
    tokenizer: Any = field(default=None, repr=False, compare=False)
    max_length: int | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_generation(self) -> bool:
        """Whether the task is scored by generation (SQuAD)."""
        return self.examples[0].is_generation

    def to(self, device: torch.device | str) -> EncodedBatch:
        """The same batch with every tensor on `device` (itself when they already are)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        moved = {
            f.name: getattr(self, f.name).to(device) for f in fields(self) if torch.is_tensor(getattr(self, f.name))
        }
        return replace(self, **moved)


def encode_batch(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None) -> EncodedBatch:
    """Tokenizes examples of one task into an `EncodedBatch` (classification: every candidate; generation: the target).

    Raises:
        ValueError: no examples, or examples of more than one task.
    """
    examples = tuple(examples)
    if not examples:
        raise ValueError("encode_batch needs at least one example.")
    tasks = sorted({e.task for e in examples})
    if len(tasks) > 1:
        raise ValueError(f"A batch holds examples of one task; got {', '.join(tasks)}.")
    rows = []  # (example index, candidate index, prompt, continuation)
    for b, ex in enumerate(examples):
        if ex.is_generation:
            rows.append((b, 0, ex.prompt, ex.target))
        else:
            rows.extend((b, c, ex.prompt, cand) for c, cand in enumerate(ex.candidates))
    pairs = encode_continuations(tokenizer, [r[2] for r in rows], [r[3] for r in rows], max_length)
    input_ids, attention_mask = pad_sequences([ctx + cont for ctx, cont in pairs], pad_token_id(tokenizer))
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    n_cands = max(len(e.candidates) or 1 for e in examples)
    candidate_index = torch.full((len(examples), n_cands), -1, dtype=torch.long)
    for n, ((b, c, _, _), (ctx, cont)) in enumerate(zip(rows, pairs, strict=True)):
        target_mask[n, len(ctx) : len(ctx) + len(cont)] = True
        candidate_index[b, c] = n
    labels = torch.tensor([-100 if e.label is None else e.label for e in examples], dtype=torch.long)
    return EncodedBatch(
        tasks[0], input_ids, attention_mask, target_mask, candidate_index, labels, examples, tokenizer, max_length
    )
