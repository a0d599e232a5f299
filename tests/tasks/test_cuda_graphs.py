"""`CUDAGraphLosses` on a GPU: graphed ZO steps equal direct ones, graphs are reused and never replayed stale.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/tasks/test_cuda_graphs.py`.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_mazo import ZOSGD, MaZOConfig
from peft_mazo.tasks import TASK_NAMES, CUDAGraphLosses, MultiTaskSampler, pack_batches, packed_losses, sample_tasks
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data"),
]


@pytest.fixture(scope="module")
def packed_steps() -> list:
    tok = make_tiny_tokenizer(pad=True)
    splits = sample_tasks(list(TASK_NAMES), data_dir=SHARED_DATA, seed=0, n_train=16, n_val=1, n_test=1)
    sampler = MultiTaskSampler({t: s.train for t, s in splits.items()}, batch_size=2, seed=0)
    encoded = sampler.encoded(tok, max_length=128)
    return [pack_batches(next(encoded)) for _ in range(4)]


def adapted_model(r: int) -> torch.nn.Module:
    base = make_tiny_llama(max_position_embeddings=256, attn_implementation="sdpa").cuda()
    torch.manual_seed(0)
    return get_peft_model(base, MaZOConfig(sparsity=0.5, r=r, init_weights=False))


@pytest.mark.parametrize("r", [0, 8])
def test_graphed_steps_equal_direct_steps(packed_steps, r):
    results = []
    for use_graphs in (False, True):
        model = adapted_model(r)
        opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=3)
        assert opt.mode == "eager"
        graphed = CUDAGraphLosses(model)
        losses_of = graphed if use_graphs else (lambda p, m=model: packed_losses(m, p.to("cuda")))
        for packed in packed_steps:
            opt.step(lambda p=packed, f=losses_of: f(p))
        results.append((opt.last_step.losses_plus, [p.detach().clone() for p in opt.perturbation_plan.param_index]))
        if use_graphs:
            assert graphed.captures >= 1 and graphed.replays >= len(packed_steps) and graphed.direct_calls == 0
    (direct_losses, direct_params), (graph_losses, graph_params) = results
    torch.testing.assert_close(graph_losses, direct_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(graph_params, direct_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # ĝ = ΔL / 2ε magnifies rounding differences


def test_lr_zero_graphed_steps_leave_every_tensor_bit_for_bit(packed_steps):
    model = adapted_model(8)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    opt = ZOSGD(model, lr=0.0, eps=1e-3, seed=0)
    graphed = CUDAGraphLosses(model)
    for packed in packed_steps:
        opt.step(lambda p=packed: graphed(p))
    assert graphed.replays >= 1
    after = model.state_dict()
    assert all(torch.equal(before[n].view(torch.uint8), after[n].view(torch.uint8)) for n in before)


def test_no_stale_replay_outside_a_step_after_a_merge_or_with_lazy_hooks(packed_steps):
    model = adapted_model(8)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)
    graphed = CUDAGraphLosses(model)
    packed = packed_steps[0]
    opt.step(lambda: graphed(packed))
    with torch.no_grad():
        outside = graphed(packed)  # parameters point at θ again, not at the perturbation buffers: a new recording
        torch.testing.assert_close(outside, packed_losses(model, packed.to("cuda")), rtol=1e-4, atol=1e-5)
        model.merge_adapter()
        merged = graphed(packed)
        model.unmerge_adapter()
        torch.testing.assert_close(merged, outside, rtol=1e-3, atol=1e-3)
    lazy = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0, perturbation="lazy")
    direct_before = graphed.direct_calls
    lazy.step(lambda: graphed(packed))
    assert graphed.direct_calls == direct_before + 2  # the lazy mode's hooks draw z inside the forward: no graph
