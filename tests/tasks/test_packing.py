"""Packed multi-task losses: one padding-free forward of every task gives the per-task losses of the padded path."""

from __future__ import annotations

import pytest
import torch

from peft_mazo.tasks import (
    TASK_NAMES,
    CUDAGraphLosses,
    MultiTaskSampler,
    batch_loss,
    encode_batch,
    multitask_losses,
    pack_batches,
    packed_losses,
    sample_tasks,
    supports_packing,
)
from peft_mazo.tasks.packing import block_causal_bias, bucket_sizes, pad_packed
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(pad=True)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(max_position_embeddings=1024)


@pytest.fixture(scope="module")
def eight_task_step(tok):
    """One sampler step of the eight real tasks, 3 examples each (sequences of very different lengths)."""
    if not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    splits = sample_tasks(list(TASK_NAMES), data_dir=SHARED_DATA, seed=0, n_train=6, n_val=1, n_test=1)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=3, seed=0)
    return next(sampler.encoded(tok, max_length=256))


def padded_losses(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([batch_loss(model, b) for b in batches.values()])


@pytest.mark.parametrize("row_tokens", [None, 300, 100_000])
def test_packed_losses_equal_the_per_task_padded_losses(model, eight_task_step, row_tokens):
    packed = pack_batches(eight_task_step, row_tokens=row_tokens)
    padded_tokens = sum(b.input_ids.numel() for b in eight_task_step.values())
    assert packed.num_tokens == sum(int(b.attention_mask.sum()) for b in eight_task_step.values()) < padded_tokens
    longest = max(int(b.attention_mask.sum(1).max()) for b in eight_task_step.values())
    assert packed.input_ids.shape[1] == max(row_tokens or 0, longest) or packed.input_ids.shape[0] == 1
    assert (packed.input_ids.shape[0] == 1) == (row_tokens == 100_000)
    with torch.no_grad():
        got = packed_losses(model, packed)
    expected = padded_losses(model, eight_task_step)
    assert got.shape == (8,) and packed.tasks == tuple(eight_task_step)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_forward_for_all_tasks_and_the_step_packed_once(model, eight_task_step):
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    try:
        assert supports_packing(model)
        calls.clear()
        first = multitask_losses(model, eight_task_step)
        second = multitask_losses(model, eight_task_step)  # the - pass of a ZO step: same batches
    finally:
        handle.remove()
    assert len(calls) == 2 and calls[0][0] == pack_batches(eight_task_step).input_ids.shape[0]  # the packed rows
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, padded_losses(model, eight_task_step), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(multitask_losses(model, eight_task_step, packed=False), first, rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_the_padded_gradients(eight_task_step):
    model = make_tiny_llama(max_position_embeddings=1024)
    weight = model.model.layers[0].mlp.down_proj.weight
    multitask_losses(model, eight_task_step, with_grad=True, packed=True).sum().backward()
    packed_grad = weight.grad.clone()
    weight.grad = None
    multitask_losses(model, eight_task_step, with_grad=True, packed=False).sum().backward()
    torch.testing.assert_close(packed_grad, weight.grad, rtol=1e-4, atol=1e-6)


class IgnoresPositions(torch.nn.Module):
    """A causal LM that drops `position_ids`: packed sequences would attend to each other."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_model_that_mixes_packed_sequences_falls_back_to_one_forward_per_task(eight_task_step):
    wrapped = IgnoresPositions(make_tiny_llama(max_position_embeddings=1024))
    assert not supports_packing(wrapped)
    torch.testing.assert_close(
        multitask_losses(wrapped, eight_task_step), padded_losses(wrapped, eight_task_step), rtol=1e-6, atol=1e-6
    )
    mixed = packed_losses(wrapped, pack_batches(eight_task_step))  # forced: wrong, which is what the check catches
    assert (mixed - padded_losses(wrapped, eight_task_step)).abs().max() > 1e-3


def test_bad_inputs_are_refused(tok, model):
    batch = encode_batch(tok, [__import__("peft_mazo").tasks.Example("sst2", "a b", (" x", " yyyy"), 0)])
    with pytest.raises(ValueError, match="at least one task"):
        pack_batches({})
    with pytest.raises(ValueError, match="row_tokens"):
        pack_batches({"sst2": batch}, row_tokens=0)
    with pytest.raises(TypeError, match="encode_batch"):
        pack_batches({"sst2": {"input_ids": batch.input_ids}})
    left = type(batch)(**{**batch.__dict__, "attention_mask": batch.attention_mask.flip(1)})
    with pytest.raises(ValueError, match="right-padded"):
        pack_batches({"sst2": left})
    with pytest.raises(ValueError, match="training loss only"):
        multitask_losses(model, pack_batches({"sst2": batch}), objective="error")


def test_padding_to_a_bucket_keeps_the_losses(model, eight_task_step):
    """What a CUDA graph runs: the step padded to bucket sizes, the block-diagonal mask built from `position_ids`."""
    packed = pack_batches(eight_task_step, row_tokens=300)
    sizes = bucket_sizes(packed)
    padded = pad_packed(packed, sizes)
    assert padded.input_ids.shape == sizes[:2] and len(padded.task_examples) == len(packed.tasks) + 1
    with torch.no_grad():
        expected = packed_losses(model, packed)
        implicit = packed_losses(model, padded)[:8]
        explicit = packed_losses(model, padded, explicit_mask_dtype=torch.float32)[:8]
    torch.testing.assert_close(implicit, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-5)
    bigger = tuple(size + 64 for size in sizes)
    with torch.no_grad():
        torch.testing.assert_close(
            packed_losses(model, pad_packed(packed, bigger))[:8], expected, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="smaller than"):
        pad_packed(packed, tuple(size - 1 for size in sizes))


def test_block_causal_bias_allows_exactly_the_earlier_tokens_of_the_same_sequence():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    bias = block_causal_bias(positions, torch.float32)[0, 0]
    allowed = bias == 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for block in ((0, 3), (3, 5), (5, 6)):
        for q in range(*block):
            expected[q, block[0] : q + 1] = True
    assert torch.equal(allowed, expected)
    assert bias[~allowed].eq(torch.finfo(torch.float32).min).all()


def test_cuda_graph_losses_compute_directly_where_a_graph_cannot_be_replayed(model, eight_task_step):
    graphed = CUDAGraphLosses(model)
    packed = pack_batches(eight_task_step)
    with torch.no_grad():
        losses = graphed(packed)  # on the CPU: no graph
        torch.testing.assert_close(losses, packed_losses(model, packed), rtol=0, atol=0)
    assert (graphed.captures, graphed.replays, graphed.direct_calls) == (0, 0, 1)
    assert not graphed.graphs_apply()
    with pytest.raises(TypeError, match="PackedBatch"):
        graphed(eight_task_step)
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphLosses(model, max_graphs=0)
