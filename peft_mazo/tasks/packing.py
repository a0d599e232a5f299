"""Padding-free packing of a multi-task step: every sequence of every task in one forward, per-task losses after it.

A step of `MultiTaskSampler` holds one right-padded `EncodedBatch` per task. Run one after another, eight tasks cost
eight forwards, most of their tokens padding. `pack_batches` concatenates the real tokens of all sequences into a few
rows (`position_ids` restart at 0 for every sequence, no attention mask: transformers then keeps the sequences of a row
apart, block-diagonal attention) and records which positions are scored; `packed_losses` runs one forward with
`logits_to_keep` = the scored positions and reduces the log-probabilities to the same per-task losses as `batch_loss`
(candidate cross-entropy for classification, token NLL for generation).

Shapes: S sequences (all candidates of all tasks), K scored tokens, E classification examples, C candidates at most,
R rows of P positions.

`supports_packing(model)` checks once per model that its attention honours packed `position_ids` (the models of
transformers that build their masks with `masking_utils` do); `multitask_losses(..., packed=None)` falls back to one
forward per task where it does not.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .._checks import is_int
from .encoding import EncodedBatch


@dataclass(frozen=True)
class PackedBatch:
    """The sequences of a multi-task step, packed into rows without padding between them.

    Attributes:
        tasks (`tuple[str, ...]`): task names, in the order of the losses.
        input_ids (`torch.LongTensor` of shape `(R, P)`): the sequences' real tokens back to back (rows padded at the
            end with a filler sequence whose outputs are never read).
        position_ids (`torch.LongTensor` of shape `(R, P)`): 0, 1, ... within each sequence.
        logit_positions (`torch.LongTensor` of shape `(U,)`): the positions whose logits are computed in every row
            (`logits_to_keep`): the union over rows of the positions that predict a scored token.
        predictor_index (`torch.LongTensor` of shape `(K,)`): flat index `row · U + u` into the `(R, U)` kept logits
            of the position that predicts each scored token.
        target_ids (`torch.LongTensor` of shape `(K,)`): the scored tokens.
        token_sequence (`torch.LongTensor` of shape `(K,)`): the sequence of each scored token (0..S-1).
        token_task (`torch.LongTensor` of shape `(K,)`): the task of each scored token.
        sequence_tokens (`torch.FloatTensor` of shape `(S,)`): scored tokens per sequence.
        candidate_index (`torch.LongTensor` of shape `(E, C)`): sequence of candidate c of classification example e,
            -1 where it has fewer candidates.
        labels (`torch.LongTensor` of shape `(E,)`): the gold candidate of each classification example.
        example_task (`torch.LongTensor` of shape `(E,)`): the task of each classification example.
        task_examples (`torch.FloatTensor` of shape `(T,)`): classification examples per task (0 for generation).
        generation_tokens (`torch.FloatTensor` of shape `(T,)`): scored tokens of generation tasks (0 otherwise).
        is_generation (`torch.BoolTensor` of shape `(T,)`): whether each task is a generation task.
        num_tokens (`int`): real tokens (without the row padding).
    """

    tasks: tuple[str, ...]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    logit_positions: torch.Tensor
    predictor_index: torch.Tensor
    target_ids: torch.Tensor
    token_sequence: torch.Tensor
    token_task: torch.Tensor
    sequence_tokens: torch.Tensor
    candidate_index: torch.Tensor
    labels: torch.Tensor
    example_task: torch.Tensor
    task_examples: torch.Tensor
    generation_tokens: torch.Tensor
    is_generation: torch.Tensor
    num_tokens: int

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same packing with every tensor on `device` (non-blocking copies from pinned memory where possible)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=True)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def _rows_of(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Sequence indices per row, first-fit decreasing: each sequence, longest first, goes into the first row with
    room; rows hold `max(row_tokens, longest sequence)` tokens (the longest sequence when None)."""
    capacity = max(row_tokens or 0, max(lengths))
    rows: list[list[int]] = []
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, tokens in enumerate(used):
            if tokens + lengths[index] <= capacity:
                rows[row].append(index)
                used[row] += lengths[index]
                break
        else:
            rows.append([index])
            used.append(lengths[index])
    return rows


def pack_batches(batches: Mapping[str, EncodedBatch], row_tokens: int | None = None) -> PackedBatch:
    """Pack one multi-task step (`{task: EncodedBatch}`, e.g. from `MultiTaskSampler.encoded`) for `packed_losses`.

    Runs on the CPU with a handful of tensor operations per task; move the result with `.to(device)` once per step.

    Args:
        batches (`Mapping[str, EncodedBatch]`): one batch per task.
        row_tokens (`int`, *optional*): the most tokens per row (a longer single sequence gets a row of its own).
            Default: the longest sequence's length. Attention over a row costs P² (masked to the sequences' blocks,
            but computed), so rows as long as the longest sequence cost no more attention than the padded batches
            while the first-fit-decreasing packing leaves little padding.
    """
    if not batches:
        raise ValueError("pack_batches needs at least one task batch.")
    if row_tokens is not None and (not is_int(row_tokens) or row_tokens < 1):
        raise ValueError(f"row_tokens must be a positive integer, got {row_tokens!r}.")
    sequences, positions_in_seq, targets, owners = [], [], [], []
    candidate_rows, labels, example_task, task_examples, generation_tokens, is_generation = [], [], [], [], [], []
    offset = 0
    for task_index, (task, batch) in enumerate(batches.items()):
        if not isinstance(batch, EncodedBatch):
            raise TypeError(
                f"The batch of task '{task}' is a {type(batch).__name__}; tokenize it with encode_batch (or use "
                "MultiTaskSampler.encoded)."
            )
        input_ids, attention, target_mask = (
            t.cpu() for t in (batch.input_ids, batch.attention_mask, batch.target_mask)
        )
        lengths = attention.sum(dim=1).tolist()
        if any(not bool(attention[n, :length].all()) for n, length in enumerate(lengths)):
            raise ValueError(f"The batch of task '{task}' is not right-padded; build it with encode_batch.")
        for n, length in enumerate(lengths):
            sequences.append(input_ids[n, :length])
            target_positions = target_mask[n, :length].nonzero().squeeze(1)
            positions_in_seq.append(target_positions)
            owners.append(task_index)
        is_generation.append(batch.is_generation)
        if batch.is_generation:
            generation_tokens.append(float(target_mask.sum()))
            task_examples.append(0.0)
        else:
            index = batch.candidate_index.cpu()
            candidate_rows.append(torch.where(index >= 0, index + offset, index))
            labels.append(batch.labels.cpu())
            example_task.append(torch.full((len(index),), task_index, dtype=torch.long))
            task_examples.append(float(len(index)))
            generation_tokens.append(0.0)
        offset += len(lengths)
        targets.append(task)

    lengths = [len(s) for s in sequences]
    rows = _rows_of(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    predictor_rows, predictor_positions, target_ids, token_sequence, token_task = [], [], [], [], []
    for row_index, row in enumerate(rows):
        start = 0
        for s in sorted(row):
            length = lengths[s]
            input_ids[row_index, start : start + length] = sequences[s]
            position_ids[row_index, start : start + length] = torch.arange(length)
            scored = positions_in_seq[s]
            predictor_rows.append(torch.full_like(scored, row_index))
            predictor_positions.append(start + scored - 1)  # logits at t - 1 predict token t
            target_ids.append(sequences[s][scored])
            token_sequence.append(torch.full_like(scored, s))
            token_task.append(torch.full_like(scored, owners[s]))
            start += length
        position_ids[row_index, start:] = torch.arange(width - start)  # filler: a sequence of its own
    positions = torch.cat(predictor_positions)
    logit_positions, position_slot = torch.unique(positions, sorted=True, return_inverse=True)
    token_sequence_t = torch.cat(token_sequence)
    if bool((torch.cat(positions_in_seq) < 1).any()):
        raise ValueError("A target token sits at position 0, which has no preceding token to predict it from.")
    num_cands = max((c.shape[1] for c in candidate_rows), default=1)
    candidates = torch.cat(
        [F.pad(c, (0, num_cands - c.shape[1]), value=-1) for c in candidate_rows]
        or [torch.zeros(0, num_cands, dtype=torch.long)]
    )
    return PackedBatch(
        tasks=tuple(targets),
        input_ids=input_ids,
        position_ids=position_ids,
        logit_positions=logit_positions,
        predictor_index=torch.cat(predictor_rows) * len(logit_positions) + position_slot,
        target_ids=torch.cat(target_ids),
        token_sequence=token_sequence_t,
        token_task=torch.cat(token_task),
        sequence_tokens=torch.bincount(token_sequence_t, minlength=len(sequences)).float(),
        candidate_index=candidates,
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        example_task=torch.cat(example_task) if example_task else torch.zeros(0, dtype=torch.long),
        task_examples=torch.tensor(task_examples),
        generation_tokens=torch.tensor(generation_tokens),
        is_generation=torch.tensor(is_generation),
        num_tokens=sum(lengths),
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def bucket_sizes(packed: PackedBatch) -> tuple[int, ...]:
    """Fixed sizes that `packed` pads to for a CUDA graph: (R, P, U, K, S, E, C, T), each rounded up (one spare
    sequence, example and task slot for the padding), so that steps of similar size share one captured graph."""
    rows, width = packed.input_ids.shape
    examples, candidates = packed.candidate_index.shape
    return (
        _round_up(rows, 2),
        _round_up(width, 64),
        _round_up(len(packed.logit_positions), 64),
        _round_up(len(packed.target_ids), 256),
        _round_up(len(packed.sequence_tokens) + 1, 32),
        _round_up(examples + 1, 16),
        max(candidates, 1),
        len(packed.tasks) + 1,
    )


def pad_packed(packed: PackedBatch, sizes: tuple[int, ...]) -> PackedBatch:
    """`packed` padded to `sizes` (from `bucket_sizes`) so that `packed_losses` gives the same first T losses.

    Padding rows are one filler sequence each; padded logit positions point at position 0; padded scored tokens,
    sequences and examples belong to a spare task T (dropped by the caller) and a spare sequence S' - 1."""
    rows_b, width_b, logits_b, tokens_b, sequences_b, examples_b, candidates_b, tasks_b = sizes
    rows, width = packed.input_ids.shape
    num_logits, num_tokens = len(packed.logit_positions), len(packed.target_ids)
    examples, candidates = packed.candidate_index.shape
    spare_task, spare_sequence = tasks_b - 1, sequences_b - 1
    if (
        rows_b < rows or width_b < width or logits_b < num_logits or tokens_b < num_tokens or candidates_b < candidates
        or sequences_b <= len(packed.sequence_tokens) or examples_b <= examples or tasks_b <= len(packed.tasks)
    ):  # fmt: skip
        raise ValueError(f"pad_packed: sizes {sizes} are smaller than the batch's {bucket_sizes(packed)}.")
    input_ids = F.pad(packed.input_ids, (0, width_b - width, 0, rows_b - rows))
    position_ids = torch.arange(width_b).repeat(rows_b, 1)
    position_ids[:rows, :width] = packed.position_ids
    if width_b > width:  # the row ends continue as a filler sequence of their own
        position_ids[:rows, width:] = torch.arange(width_b - width)
    row, slot = packed.predictor_index // num_logits, packed.predictor_index % num_logits

    def extend(tensor: torch.Tensor, size: int, value: float) -> torch.Tensor:
        return torch.cat([tensor, torch.full((size - len(tensor),), value, dtype=tensor.dtype)])

    candidate_index = F.pad(packed.candidate_index, (0, candidates_b - candidates), value=-1)
    spare_examples = torch.full((examples_b - examples, candidates_b), -1, dtype=torch.long)
    spare_examples[:, 0] = spare_sequence
    return replace(
        packed,
        input_ids=input_ids,
        position_ids=position_ids,
        logit_positions=extend(packed.logit_positions, logits_b, 0),
        predictor_index=extend(row * logits_b + slot, tokens_b, 0),
        target_ids=extend(packed.target_ids, tokens_b, 0),
        token_sequence=extend(packed.token_sequence, tokens_b, spare_sequence),
        token_task=extend(packed.token_task, tokens_b, spare_task),
        sequence_tokens=extend(packed.sequence_tokens, sequences_b, 1.0),
        candidate_index=torch.cat([candidate_index, spare_examples]),
        labels=extend(packed.labels, examples_b, 0),
        example_task=extend(packed.example_task, examples_b, spare_task),
        task_examples=extend(packed.task_examples, tasks_b, 1.0),
        generation_tokens=extend(packed.generation_tokens, tasks_b, 1.0),
        is_generation=extend(packed.is_generation, tasks_b, False),
    )


def block_causal_bias(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, P, P) additive attention mask of packed rows: 0 where query q may see key k (same sequence, k <= q),
    the dtype's lowest value elsewhere. Built on the device without a host sync (a CUDA graph can capture it)."""
    sequence = (position_ids == 0).cumsum(dim=-1)  # (R, P): sequence number within the row
    width = position_ids.shape[-1]
    positions = torch.arange(width, device=position_ids.device)
    allowed = (sequence[:, :, None] == sequence[:, None, :]) & (positions[None, :] <= positions[:, None])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def packed_token_log_probs(
    model: torch.nn.Module, packed: PackedBatch, explicit_mask_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(K,) float32 log-probability of every scored token, from one forward of the packed rows.

    `explicit_mask_dtype`: pass the block-diagonal causal mask as a 4D additive mask of this dtype (sdpa and eager
    attention take it as it is) instead of letting transformers detect the packing from `position_ids` (which syncs
    with the host once per forward)."""
    mask = None if explicit_mask_dtype is None else block_causal_bias(packed.position_ids, explicit_mask_dtype)
    logits = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=mask,
        logits_to_keep=packed.logit_positions,
        use_cache=False,
    ).logits  # (R, U, V)
    logits = logits.flatten(0, 1)[packed.predictor_index]  # (K, V)
    return logits.float().log_softmax(dim=-1).gather(1, packed.target_ids[:, None]).squeeze(1)


def packed_losses(
    model: torch.nn.Module, packed: PackedBatch, explicit_mask_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The per-task losses of `batch_loss` for every task of `packed`, from one forward: `(T,)` float32 (one more,
    a spare task, for a batch padded by `pad_packed`).

    Classification: cross-entropy over the candidates' length-normalised log-likelihoods, mean over the task's
    examples. Generation: mean NLL over the task's target tokens.
    """
    token_log_probs = packed_token_log_probs(model, packed, explicit_mask_dtype)
    device = token_log_probs.device
    num_tasks = len(packed.task_examples)
    sequence_sum = torch.zeros(len(packed.sequence_tokens), device=device).index_add_(
        0, packed.token_sequence, token_log_probs
    )
    sequence_mean = sequence_sum / packed.sequence_tokens.clamp(min=1)
    losses = torch.zeros(num_tasks, device=device)
    if packed.candidate_index.numel():
        index = packed.candidate_index
        scores = sequence_mean[index.clamp(min=0)].masked_fill(index < 0, float("-inf"))
        example_loss = F.cross_entropy(scores, packed.labels, reduction="none")
        losses = losses.index_add(0, packed.example_task, example_loss) / packed.task_examples.clamp(min=1)
    # no host sync (`if is_generation.any()`): the forward can be captured in a CUDA graph
    generation_sum = torch.zeros(num_tasks, device=device).index_add_(0, packed.token_task, token_log_probs)
    generation_loss = -generation_sum / packed.generation_tokens.clamp(min=1)
    return torch.where(packed.is_generation, generation_loss, losses)


_PACKING_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def supports_packing(model: torch.nn.Module) -> bool:
    """Whether `model` keeps packed sequences apart (checked once per model, two tiny forwards).

    A short sequence `b` is scored alone and packed behind another sequence `a`. Where packed `position_ids` are
    honoured the two agree up to rounding; where they are ignored, `b` attends to `a` and differs by far more than the
    same `b` scored as the continuation of `a` in one sequence would (the contamination the check compares against).
    """
    cached = _PACKING_SUPPORT.get(model)
    if cached is not None:
        return cached
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        device = embeddings.weight.device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(1, vocab, (7,), generator=generator)
    b = torch.randint(1, vocab, (5,), generator=generator)

    def log_probs(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids[None].to(device), position_ids=positions[None].to(device), use_cache=False).logits
        return logits[0, -len(b) :].float().log_softmax(-1)

    ab = torch.cat([a, b])
    alone = log_probs(b, torch.arange(len(b)))
    packed = log_probs(ab, torch.cat([torch.arange(len(a)), torch.arange(len(b))]))
    continued = log_probs(ab, torch.arange(len(ab)))
    packing_error = (packed - alone).abs().max()
    contamination = (continued - alone).abs().max()
    supported = bool(packing_error <= 0.1 * contamination)
    _PACKING_SUPPORT[model] = supported
    return supported
