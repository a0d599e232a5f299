"""ZOSGD: exactness, frozen bases, seeds and RNG, resume, per-task losses, accumulation, objectives, bad inputs."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_mazo
from peft_mazo import ZOSGD, EqualWeighting, MaZOConfig, MaZOLayer, StaticWeighting, TaskWeighting
from peft_mazo.quantized import quantization_kind
from peft_mazo.zo import perturbation as zo_perturbation
from tests.helpers import as_bytes, bitwise_equal, make_mlp, make_tiny_llama, trainable


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------
def tiny_lm(r: int = 0, sparsity: float = 0.5, dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    base = make_tiny_llama()
    if dtype != torch.float32:
        base = base.to(dtype)
    return get_peft_model(base, MaZOConfig(sparsity=sparsity, r=r, **config))


def token_batch(seed: int = 1, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_closure(model: nn.Module, ids: torch.Tensor):
    return lambda: model(input_ids=ids, labels=ids).loss


def frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-trainable parameter and buffer (base weights, masks), cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def quantize_linears_4bit(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (but the head) by a bitsandbytes NF4 `Linear4bit` holding the same weights (on CPU)."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or any(s in full for s in skip):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, q.to("cpu"))  # .to() quantizes
    return model


# --------------------------------------------------------------------------------------------------------------------
# frozen base weights and exactness
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
def test_frozen_base_is_bitwise_unchanged(dtype, r):
    model = tiny_lm(r=r, dtype=dtype)
    before_frozen, before_trainable = frozen(model), trainable(model)
    assert all(t.dtype == torch.float32 for t in before_trainable.values())  # the delta stays fp32 on a bf16 base
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)
    ids = token_batch()
    for _ in range(3):
        opt.step(lm_closure(model, ids))
    assert bitwise_equal(before_frozen, frozen(model))
    after = trainable(model)
    changed = [n for n in after if not torch.equal(after[n], before_trainable[n])]
    assert len(changed) == len(after)  # every trainable tensor moved (LoRA: A and B)
    assert all(p.grad is None for p in model.parameters())  # no backward ever ran


@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
def test_4bit_base_packed_weights_unchanged(r):
    model = get_peft_model(quantize_linears_4bit(make_tiny_llama()), MaZOConfig(sparsity=0.5, r=r))
    layers = [m for m in model.modules() if isinstance(m, MaZOLayer)]
    assert layers and all(quantization_kind(m.get_base_layer()) == "4bit" for m in layers)
    packed = {
        i: (as_bytes(m.get_base_layer().weight.data).clone(), m.get_base_layer().weight.quant_state.absmax.clone())
        for i, m in enumerate(layers)
    }
    before_frozen, before_trainable = frozen(model), trainable(model)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)
    ids = token_batch(batch=2, length=8)
    for _ in range(2):
        loss = opt.step(lm_closure(model, ids))
    assert math.isfinite(float(loss))
    for i, m in enumerate(layers):
        weight = m.get_base_layer().weight
        assert torch.equal(as_bytes(weight.data), packed[i][0])
        assert torch.equal(weight.quant_state.absmax, packed[i][1])
    assert bitwise_equal(before_frozen, frozen(model))
    after = trainable(model)
    assert all(not torch.equal(after[n], before_trainable[n]) for n in after)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
def test_lr_zero_leaves_trainable_state_bitwise_unchanged(r, dtype, momentum):
    model = tiny_lm(r=r, dtype=dtype, init_weights=False)  # a non-zero delta, so rounding would show
    before = trainable(model)
    opt = ZOSGD(model, lr=0.0, eps=1e-3, weight_decay=0.1, momentum=momentum, seed=0)
    ids = token_batch()
    for _ in range(3):
        opt.step(lm_closure(model, ids))
        # the perturbation really reached the forward: L+ and L- differ
        assert not torch.equal(opt.last_step.losses_plus, opt.last_step.losses_minus)
    assert bitwise_equal(before, trainable(model))


def test_inplace_perturbation_would_not_be_exact():
    """Why the design never writes θ during a step: +εz, -2εz, +εz in place does not round-trip in float32."""
    theta = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    inplace = theta.clone().add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    assert not torch.equal(inplace, theta)


def test_exception_in_closure_restores_everything():
    model = tiny_lm(r=8, init_weights=False)
    before = trainable(model)
    opt = ZOSGD(model, lr=1e-2, seed=0)
    ids, calls = token_batch(), []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # in the - pass
            raise RuntimeError("boom")
        return model(input_ids=ids, labels=ids).loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert bitwise_equal(before, trainable(model))
    assert opt.state["zo"]["step"] == 0
    for layer in (m for m in model.modules() if isinstance(m, MaZOLayer)):
        assert not layer._forward_pre_hooks and not layer._forward_hooks
    opt.step(lm_closure(model, ids))  # a later step works
    assert opt.state["zo"]["step"] == 1


# --------------------------------------------------------------------------------------------------------------------
# randomness and resume
# --------------------------------------------------------------------------------------------------------------------
def test_global_rng_untouched():
    model = tiny_lm(r=8)
    opt = ZOSGD(model, lr=1e-2, seed=0)
    ids = token_batch()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for _ in range(2):
        opt.step(lm_closure(model, ids))
    assert torch.equal(state, torch.get_rng_state())
    drawn = torch.rand(5)
    torch.manual_seed(1234)
    assert torch.equal(drawn, torch.rand(5))


def test_directions_depend_only_on_seed_and_step():
    model = tiny_lm(r=0)
    opt = ZOSGD(model, lr=1e-2, seed=7)
    torch.manual_seed(0)
    first = opt.perturbation_direction(0)
    torch.manual_seed(99)
    again = opt.perturbation_direction(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(first, opt.perturbation_direction(1), strict=True))
    other = ZOSGD(tiny_lm(r=0), lr=1e-2, seed=8).perturbation_direction(0)
    assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert [z.shape for z in first] == [p.shape for g in opt.param_groups for p in g["params"]]
    # z ~ N(0, 1)
    flat = torch.cat([z.flatten() for z in first])
    assert abs(float(flat.mean())) < 0.05 and abs(float(flat.std()) - 1.0) < 0.05


def test_update_matches_formula_with_momentum_and_weight_decay():
    model = tiny_lm(r=4, init_weights=False)
    lr, wd, mu = 1e-2, 0.1, 0.9
    opt = ZOSGD(model, lr=lr, weight_decay=wd, momentum=mu, seed=3)
    params = [p for g in opt.param_groups for p in g["params"]]
    theta = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(2):
        opt.step(lm_closure(model, token_batch(seed=step)))
        g = opt.last_step.projected_grad
        for i, z in enumerate(opt.perturbation_direction(step)):
            update = g * z + wd * theta[i]
            buffers[i] = update if step == 0 else mu * buffers[i] + update
            theta[i] = theta[i] - lr * buffers[i]
    for p, expected, buf in zip(params, theta, buffers, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=1e-5, atol=1e-6)


def test_projected_gradient_matches_independent_forwards():
    model = tiny_lm(r=0, init_weights=False)
    opt = ZOSGD(model, lr=0.0, eps=1e-3, seed=0)
    ids = token_batch()
    opt.step(lm_closure(model, ids))
    params = [p for g in opt.param_groups for p in g["params"]]
    directions = opt.perturbation_direction(0)
    losses = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            originals = [p.detach().clone() for p in params]
            for p, z in zip(params, directions, strict=True):
                p.add_(z, alpha=sign * 1e-3)
            losses.append(model(input_ids=ids, labels=ids).loss.double())
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
    expected = (losses[0] - losses[1]) / 2e-3
    torch.testing.assert_close(opt.last_projected_grads, expected.reshape(1), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(opt.last_step.losses_plus, losses[0].reshape(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("r", [0, 4], ids=["dense", "lora"])
def test_state_dict_resume_is_bitwise(r):
    batches = [token_batch(seed=s) for s in range(6)]
    config = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, momentum=0.9)

    reference = tiny_lm(r=r, init_weights=False)
    opt = ZOSGD(reference, seed=5, **config)
    for ids in batches:
        opt.step(lm_closure(reference, ids))

    first = tiny_lm(r=r, init_weights=False)
    opt_first = ZOSGD(first, seed=5, **config)
    for ids in batches[:3]:
        opt_first.step(lm_closure(first, ids))
    buffer = io.BytesIO()
    torch.save({"model": trainable(first), "optimizer": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # as the HF Trainer loads optimizer.pt

    resumed = tiny_lm(r=r, init_weights=False)
    resumed.load_state_dict(checkpoint["model"], strict=False)
    opt_resumed = ZOSGD(resumed, seed=123, lr=0.5)  # the checkpoint's seed, step, lr and momentum win
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    assert opt_resumed.state["zo"]["step"] == 3 and opt_resumed.state["zo"]["seed"] == 5
    for ids in batches[3:]:
        opt_resumed.step(lm_closure(resumed, ids))
    assert bitwise_equal(trainable(reference), trainable(resumed))
    assert opt_resumed.state_dict()["state"]["zo"] == opt.state_dict()["state"]["zo"]

    # control: the same resume without the optimizer state (seed stream, momentum) ends elsewhere
    control = tiny_lm(r=r, init_weights=False)
    control.load_state_dict(checkpoint["model"], strict=False)
    opt_control = ZOSGD(control, seed=5, **config)
    for ids in batches[3:]:
        opt_control.step(lm_closure(control, ids))
    assert not bitwise_equal(trainable(reference), trainable(control))


def test_load_state_dict_rejects_foreign_state():
    model = tiny_lm(r=0)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd_state = torch.optim.SGD(params, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not a ZOSGD state dict"):
        ZOSGD(model, lr=0.1).load_state_dict(sgd_state)


def test_lr_scheduler_drives_the_step():
    model = tiny_lm(r=0)
    opt = ZOSGD(model, lr=1e-2, seed=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    ids = token_batch()
    snapshots = []
    for _ in range(4):
        opt.step(lm_closure(model, ids))
        scheduler.step()
        snapshots.append(trainable(model))
    assert not bitwise_equal(snapshots[0], snapshots[1])  # lr 1e-2: moves
    assert opt.param_groups[0]["lr"] == 0.0
    assert bitwise_equal(snapshots[1], snapshots[2]) and bitwise_equal(snapshots[2], snapshots[3])  # lr 0: frozen


# --------------------------------------------------------------------------------------------------------------------
# perturbation placement
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lazy_and_eager_perturbation_agree_bitwise(momentum, monkeypatch):
    """'lazy' perturbs MaZO layers inside their forward (z regenerated) and other trainable tensors (a modules_to_save
    head) for the whole pass; 'eager' perturbs everything for the whole pass with z drawn once per step and
    multi-tensor updates. Same seed -> the same z and identical steps; 'auto' picks eager for a small adapter and lazy
    above `EAGER_MAX_BYTES`."""
    config = MaZOConfig(sparsity=0.5, r=0, target_modules=["lin0", "lin1"], modules_to_save=["norm"])
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    target = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("lazy", "eager", "auto"):
        model = get_peft_model(make_mlp(), config)
        opt = ZOSGD(model, lr=1e-2, seed=0, perturbation=mode, momentum=momentum, weight_decay=0.1)
        if mode == "lazy":
            assert (
                opt.mode == "lazy" and len(opt.perturbation_plan.lazy) == 2 and len(opt.perturbation_plan.eager) == 2
            )  # lin0, lin1 | norm w, b
        else:
            assert opt.mode == "eager" and not opt.perturbation_plan.lazy
        closure = lambda model=model: ((model(x) - target) ** 2).mean()  # noqa: E731
        losses = [float(opt.step(closure)) for _ in range(3)]
        if opt.mode == "eager":  # the kept z of the last step is the regenerated one
            index = opt.perturbation_plan.param_index
            kept = [opt.directions.kept[index[p]] for g in opt.param_groups for p in g["params"]]
            assert all(torch.equal(a, b) for a, b in zip(kept, opt.perturbation_direction(2), strict=True))
        results.append((losses, trainable(model)))
    assert results[0][0] == results[1][0] == results[2][0]
    assert bitwise_equal(results[0][1], results[1][1]) and bitwise_equal(results[0][1], results[2][1])
    assert any("norm" in n for n in results[0][1])
    monkeypatch.setattr(zo_perturbation, "EAGER_MAX_BYTES", 0)
    assert ZOSGD(get_peft_model(make_mlp(), config), perturbation="auto").mode == "lazy"


def test_save_pretrained_after_steps_roundtrips(tmp_path):
    model = tiny_lm(r=0)
    opt = ZOSGD(model, lr=5e-2, seed=0)
    ids = token_batch()
    for _ in range(3):
        opt.step(lm_closure(model, ids))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    saved = {n.replace(".default", ""): t for n, t in trainable(model).items()}
    loaded = {n.replace(".default", ""): p.detach() for n, p in reloaded.named_parameters() if "mazo_" in n}
    assert bitwise_equal(saved, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------------
# objectives: learning, masked variance, non-differentiable
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,lr,sparsity", [(0, 0.1, 0.5), (8, 0.1, 0.8)], ids=["dense", "lora"])
def test_loss_goes_down_on_tiny_task(r, lr, sparsity):
    start = torch.randint(0, 128, (8, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + torch.arange(16)) % 128  # counting sequences
    model = tiny_lm(r=r, sparsity=sparsity)
    with torch.no_grad():
        initial = float(model(input_ids=ids, labels=ids).loss)
    opt = ZOSGD(model, lr=lr, eps=1e-3, seed=0)
    for _ in range(100):
        opt.step(lm_closure(model, ids))
    with torch.no_grad():
        final = float(model(input_ids=ids, labels=ids).loss)
    assert final < initial - 0.03, (initial, final)


def _quadratic_model(masked: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(64, 64, bias=False))
    config = (
        MaZOConfig(sparsity=0.9, r=0, target_modules=["lin"], scorer="random", init_weights=False)
        if masked
        else MaZOConfig(sparsity=0.0, r=0, target_modules=["lin"], scorer="none", init_weights=False)
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=generator)
    y = torch.randn(256, 64, generator=generator)
    return model, x, y


@pytest.mark.parametrize("num_samples", [300])
def test_masked_zo_has_lower_gradient_estimate_variance_on_a_quadratic(num_samples):
    """E‖ĝz - ∇‖² = (d + 1)‖∇‖² for Gaussian z: masking shrinks d (here 64·7 vs 64·64) and with it the variance."""
    stats = {}
    for masked in (True, False):
        model, x, y = _quadratic_model(masked)
        loss_fn = lambda model=model, x=x, y=y: 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()  # noqa: E731
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn().backward()
        grad = torch.cat([p.grad.flatten() for p in params]).double()
        for p in params:
            p.grad = None
        opt = ZOSGD(model, lr=0.0, eps=1e-3, seed=0)
        errors = []
        for step in range(num_samples):
            opt.step(loss_fn)
            z = torch.cat([d.flatten() for d in opt.perturbation_direction(step)]).double()
            errors.append(float(((opt.last_step.projected_grad * z - grad) ** 2).sum()))
        mean_error = sum(errors) / len(errors)
        dim = grad.numel()
        stats[masked] = dict(dim=dim, relative=mean_error / float(grad.pow(2).sum()), absolute=mean_error)
    assert stats[True]["dim"] == 64 * 7 and stats[False]["dim"] == 64 * 64
    for s in stats.values():  # the SPSA theory holds in both cases (Monte-Carlo tolerance)
        assert 0.6 * (s["dim"] + 1) < s["relative"] < 1.6 * (s["dim"] + 1), s
    assert stats[True]["relative"] < 0.25 * stats[False]["relative"]
    assert stats[True]["absolute"] < 0.25 * stats[False]["absolute"]


def test_non_differentiable_objective_accuracy():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=generator)
    labels = (x @ torch.randn(64, generator=generator) > 0).long()
    model = get_peft_model(make_mlp(), MaZOConfig(sparsity=0.5, r=0, target_modules=["lin0", "lin1"]))

    def accuracy() -> float:  # piecewise constant in θ: no useful gradient exists
        out = model(x)
        return ((out[:, 0] > out[:, 1]).long() == labels).float().mean().item()

    initial = accuracy()
    opt = ZOSGD(model, lr=0.05, eps=0.05, seed=0)
    for _ in range(150):
        opt.step(lambda: -accuracy())  # a Python float
    assert accuracy() > initial + 0.15, (initial, accuracy())


# --------------------------------------------------------------------------------------------------------------------
# per-task losses, weighting, accumulation
# --------------------------------------------------------------------------------------------------------------------
def _two_task_closure(model, ids_a, ids_b):
    return lambda: torch.stack([model(input_ids=ids_a, labels=ids_a).loss, model(input_ids=ids_b, labels=ids_b).loss])


def test_per_task_losses_and_projected_grads():
    ids_a, ids_b = token_batch(seed=1), token_batch(seed=2)
    model = tiny_lm(r=0, init_weights=False)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)
    loss = opt.step(_two_task_closure(model, ids_a, ids_b))
    step = opt.last_step
    assert step.losses_plus.shape == (2,) and opt.last_projected_grads.shape == (2,)
    torch.testing.assert_close(step.projected_grads, (step.losses_plus - step.losses_minus) / 2e-3)
    torch.testing.assert_close(step.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert step.projected_grad == pytest.approx(float(step.projected_grads.mean()), rel=1e-12)
    assert float(loss) == pytest.approx(float((step.losses_plus + step.losses_minus).mean() / 2), rel=1e-6)
    # the two tasks see the same z: each task's L+ equals a single-task step's L+
    single = tiny_lm(r=0, init_weights=False)
    opt_single = ZOSGD(single, lr=1e-2, eps=1e-3, seed=0)
    opt_single.step(lm_closure(single, ids_b))
    assert opt_single.last_step.losses_plus[0] == step.losses_plus[1]
    assert opt_single.last_projected_grads[0] == step.projected_grads[1]


def test_static_weighting_one_hot_equals_single_task_step():
    ids_a, ids_b = token_batch(seed=1), token_batch(seed=2)
    multi = tiny_lm(r=4, init_weights=False)
    opt_multi = ZOSGD(multi, lr=1e-2, seed=0, weighting=StaticWeighting([1.0, 0.0]))
    single = tiny_lm(r=4, init_weights=False)
    opt_single = ZOSGD(single, lr=1e-2, seed=0)
    for _ in range(2):
        opt_multi.step(_two_task_closure(multi, ids_a, ids_b))
        opt_single.step(lm_closure(single, ids_a))
        assert opt_multi.last_step.losses_plus[0] == opt_single.last_step.losses_plus[0]
        assert opt_multi.last_step.projected_grad == opt_single.last_step.projected_grad
    assert bitwise_equal(trainable(multi), trainable(single))
    with pytest.raises(ValueError, match="2 task losses"):
        ZOSGD(tiny_lm(r=0), lr=1e-2, weighting=StaticWeighting([1.0, 0.0, 0.0])).step(
            _two_task_closure(multi, ids_a, ids_b)
        )


class RecordingWeighting(TaskWeighting):
    """A stateful weighting (a stand-in for FAMO/CoBa) that records what the optimizer hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.seen = 0

    def weights(self, step, losses_plus, losses_minus):
        self.calls.append(("weights", step))
        assert losses_plus.dtype == torch.float64 and losses_plus.shape == losses_minus.shape
        return torch.tensor([0.25, 0.75], dtype=torch.float64)

    def update(self, step, losses_plus, losses_minus, projected_grads, weights):
        self.calls.append(("update", step))
        assert projected_grads.shape == (2,) and torch.equal(weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state_dict):
        self.seen = state_dict["seen"]


def test_custom_weighting_is_called_and_saved():
    ids_a, ids_b = token_batch(seed=1), token_batch(seed=2)
    model = tiny_lm(r=0)
    weighting = RecordingWeighting()
    opt = ZOSGD(model, lr=1e-2, seed=0, weighting=weighting)
    for _ in range(2):
        opt.step(_two_task_closure(model, ids_a, ids_b))
    assert weighting.calls == [("weights", 0), ("update", 0), ("weights", 1), ("update", 1)]
    step = opt.last_step
    assert step.projected_grad == pytest.approx(float(0.25 * step.projected_grads[0] + 0.75 * step.projected_grads[1]))
    state = opt.state_dict()
    assert state["state"]["zo"]["weighting"] == {"seen": 2}
    other = RecordingWeighting()
    ZOSGD(tiny_lm(r=0), lr=1e-2, weighting=other).load_state_dict(state)
    assert other.seen == 2
    assert isinstance(ZOSGD(model, lr=1e-2).weighting, EqualWeighting)

    class Broken(TaskWeighting):
        def weights(self, step, losses_plus, losses_minus):
            return torch.tensor([float("nan"), 1.0])

    before = trainable(model)
    with pytest.raises(ValueError, match="finite task weights"):
        ZOSGD(model, lr=1e-2, weighting=Broken()).step(_two_task_closure(model, ids_a, ids_b))
    assert bitwise_equal(before, trainable(model))


def test_gradient_accumulation_shares_one_z():
    model = tiny_lm(r=0, init_weights=False)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=0)
    micro = [token_batch(seed=1), token_batch(seed=2)]
    calls: list[tuple[int, float]] = []

    def closure(i):
        def run():
            loss = model(input_ids=micro[i], labels=micro[i]).loss
            calls.append((i, float(loss)))
            return loss

        return run

    loss = opt.step([closure(0), closure(1)])
    assert [i for i, _ in calls] == [0, 1, 0, 1]  # all + forwards, then all - forwards
    plus = [v for _, v in calls[:2]]
    minus = [v for _, v in calls[2:]]
    assert opt.last_step.losses_plus.item() == pytest.approx(sum(plus) / 2, rel=1e-12)
    assert opt.last_step.losses_minus.item() == pytest.approx(sum(minus) / 2, rel=1e-12)
    assert float(loss) == pytest.approx((sum(plus) + sum(minus)) / 4, rel=1e-6)

    # each micro-batch saw the same θ ± εz: compare with single-micro-batch steps of the same seed and step
    for i in range(2):
        single = tiny_lm(r=0, init_weights=False)
        opt_single = ZOSGD(single, lr=1e-2, eps=1e-3, seed=0)
        opt_single.step(lm_closure(single, micro[i]))
        assert opt_single.last_step.losses_plus.item() == plus[i]
        assert opt_single.last_step.losses_minus.item() == minus[i]


# --------------------------------------------------------------------------------------------------------------------
# non-finite losses
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_skips_restores_and_warns_once(bad):
    model = tiny_lm(r=8, init_weights=False)
    opt = ZOSGD(model, lr=1e-2, seed=0)
    ids = token_batch()
    calls = []

    def closure():
        calls.append(1)
        loss = model(input_ids=ids, labels=ids).loss
        # steps 1 and 2 (calls 3-6) are bad in their - pass only
        return loss * bad if len(calls) in (4, 6) else loss

    opt.step(closure)
    after_first = trainable(model)
    with pytest.warns(RuntimeWarning, match="not finite"):
        loss = opt.step(closure)
    assert not math.isfinite(float(loss)) and opt.last_step.skipped
    assert bitwise_equal(after_first, trainable(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only: a second skip is silent
        opt.step(closure)
    assert bitwise_equal(after_first, trainable(model))
    zo = opt.state["zo"]
    assert zo["skipped_steps"] == 2 and zo["consecutive_skips"] == 2 and zo["step"] == 3
    assert opt.state_dict()["state"]["zo"]["skipped_steps"] == 2
    opt.step(closure)  # finite again: a real step
    assert not bitwise_equal(after_first, trainable(model))
    assert zo["consecutive_skips"] == 0 and zo["skipped_steps"] == 2


def test_max_consecutive_skips_raises():
    model = tiny_lm(r=0)
    before = trainable(model)
    opt = ZOSGD(model, lr=1e-2, seed=0, max_consecutive_skips=2)
    with pytest.warns(RuntimeWarning):
        opt.step(lambda: torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        opt.step(lambda: torch.tensor(float("nan")))
    assert bitwise_equal(before, trainable(model))


# --------------------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1e-3), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(eps=0.0), "eps must be"),
        (dict(eps=-1e-3), "eps must be"),
        (dict(eps=float("inf")), "eps must be"),
        (dict(momentum=1.0), "momentum must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(perturbation="fused"), "perturbation must be"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips"),
        (dict(weighting="famo"), "TaskWeighting"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOSGD(tiny_lm(r=0), **kwargs)


def test_no_trainable_parameters():
    base = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZOSGD(base, lr=1e-3)
    with pytest.raises(TypeError, match="model first"):
        ZOSGD([nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_frozen_or_foreign_params_rejected():
    model = tiny_lm(r=0)
    frozen_weight = next(p for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="requires_grad=False"):
        ZOSGD(model, lr=1e-3, params=[frozen_weight])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        ZOSGD(model, lr=1e-3, params=[nn.Parameter(torch.zeros(3))])


class _Output:
    loss = torch.tensor(1.0)


@pytest.mark.parametrize(
    "value,match",
    [
        (None, "got NoneType"),
        ("1.0", "got str"),
        (_Output(), r"model\(\*\*batch\)\.loss"),
        (torch.ones(2, 2), "shape"),
        (torch.tensor(1), "floating point"),
        (True, "got bool"),
    ],
    ids=["none", "str", "model-output", "2d", "int-tensor", "bool"],
)
def test_closure_returning_a_non_loss(value, match):
    model = tiny_lm(r=0, init_weights=False)
    before = trainable(model)
    opt = ZOSGD(model, lr=1e-2)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: value)
    assert bitwise_equal(before, trainable(model)) and opt.state["zo"]["step"] == 0


def test_bad_closure_and_group_lr_rejected_before_any_forward():
    model = tiny_lm(r=0)
    opt = ZOSGD(model, lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(1.0)

    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="callable closure"):
        opt.step(42)
    with pytest.raises(ValueError, match="callable closure"):
        opt.step([])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.step(closure)
    assert calls == []


def test_public_api_exported():
    for name in ("ZOSGD", "MaZOTrainer", "MaZOTrainingArguments", "TaskWeighting", "EqualWeighting"):
        assert name in peft_mazo.__all__ and hasattr(peft_mazo, name)
