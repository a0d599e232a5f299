"""benchmarks/mechanisms.py measures what it says: the ZO estimate over many of ZOSGD's directions points along the
backprop gradient, one direction in a large space does not, and Lanczos on HVPs gives the explicit Hessian's top
eigenvalues."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from peft_mazo import ZOSGD
from tests.helpers import ROOT, SHARED_DATA


sys.path.insert(0, str(ROOT / "benchmarks"))
import mechanisms as mech  # noqa: E402


def _problem(width: int, seed: int = 0) -> tuple[nn.Module, callable]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    return model, lambda: ((model(x) - y) ** 2).mean()


def test_the_directions_are_the_ones_a_zosgd_step_moves_along():
    model, loss_fn = _problem(2)
    params = list(model.parameters())
    before = mech.flat(params).detach().clone()
    ZOSGD(model, lr=0.1, eps=1e-3, seed=5).step(loss_fn)
    moved = mech.flat(params).detach() - before
    z = mech.flat(mech.zosgd_directions(model, seed=5)(0))
    assert abs(mech.cosine(moved, z)) > 1 - 1e-9


def test_many_directions_align_with_the_gradient_in_a_small_space_one_direction_does_not_in_a_large_one():
    model, loss_fn = _problem(2)  # d = 3*2 + 2 + 2 + 1 = 11
    params = list(model.parameters())
    g = mech.backprop_gradient(loss_fn, params)
    cos = mech.zo_cosines(loss_fn, params, g, mech.zosgd_directions(model, seed=0), [1, 256], eps=1e-4)
    assert cos[256] > 0.9, cos  # E[cos²] ≈ n / (n + d + 1) for Gaussian z
    big, big_loss = _problem(400)  # d = 2001: E|cos| at n = 1 is about sqrt(2 / (π d)) ≈ 0.018
    big_params = list(big.parameters())
    g_big = mech.backprop_gradient(big_loss, big_params)
    ones = [
        abs(mech.zo_cosines(big_loss, big_params, g_big, mech.zosgd_directions(big, seed=s), [1], eps=1e-4)[1])
        for s in range(8)
    ]
    assert sum(ones) / len(ones) < 0.1, ones


def test_lanczos_on_hvps_gives_the_explicit_hessians_top_eigenvalues():
    model, loss_fn = _problem(4)  # d = 21
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def of_flat(theta: torch.Tensor) -> torch.Tensor:
        chunks, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            chunks[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return (functional_call(model, chunks, (x,)) ** 3).mean()

    def loss() -> torch.Tensor:
        return (model(x) ** 3).mean()

    theta = mech.flat(params).detach()
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(of_flat, theta)).flip(0)
    top = mech.lanczos(mech.hvp_fn(loss, params), theta.numel(), k=3, iters=theta.numel(), seed=0)
    assert torch.allclose(torch.tensor(top, dtype=torch.float64), exact[:3], atol=1e-6), (top, exact[:3])
    assert abs(top[0] - exact[0]) < 1e-6


def test_the_dense_mode_compares_the_kept_values_with_the_whole_delta_at_the_pretrained_weights(tmp_path):
    if not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    result = mech.main(["--tiny", "--r", "0", "--sparsity", "0.5", "--data-dir", str(SHARED_DATA), "--out",
                        str(tmp_path / "m.json")])  # fmt: skip
    masked, unmasked = result["cosine"]["masked"], result["cosine"]["unmasked"]
    assert masked["d"] * 2 == unmasked["d"]  # ρ = 0.5 keeps half of every row
    assert masked["loss"] == unmasked["loss"]  # both deltas are zero: the same (pretrained) point
    assert "hessian" not in result and result["settings"]["init_weights"] is True
