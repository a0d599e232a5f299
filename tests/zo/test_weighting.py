"""Multi-task loss weightings for the ZO step: FAMO and CoBa (MAZO_SPEC §6)."""

import pytest
import torch

from peft_mazo.zo import CoBaWeighting, EqualWeighting, FAMOWeighting, make_weighting


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_make_weighting_by_name_and_error():
    assert isinstance(make_weighting("equal", 3), EqualWeighting)
    assert isinstance(make_weighting("famo", 3), FAMOWeighting)
    assert isinstance(make_weighting("coba", 3), CoBaWeighting)
    with pytest.raises(ValueError, match="known: equal, famo, coba"):
        make_weighting("gradnorm", 3)


def test_famo_weights_are_inverse_loss_at_equal_logits():
    famo = FAMOWeighting(2, epsilon=0.0)
    weights = famo.weights(0, t(1.0, 3.0), t(1.0, 3.0))
    torch.testing.assert_close(weights, t(0.75, 0.25))


def test_famo_moves_weight_towards_the_task_that_did_not_improve():
    famo = FAMOWeighting(2)
    losses = [t(2.0, 2.0), t(1.0, 2.0), t(0.5, 2.0), t(0.25, 2.0)]
    for step, loss in enumerate(losses):
        w = famo.weights(step, loss, loss)
        famo.update(step, loss, loss, t(0.0, 0.0), w)
    z = torch.softmax(famo.logits.detach(), dim=0)
    assert z[1] > z[0]  # task 1 is stuck: FAMO raises its share
    state = famo.state_dict()
    again = FAMOWeighting(2)
    again.load_state_dict(state)
    probe = t(0.3, 1.9)
    torch.testing.assert_close(again.weights(9, probe, probe), famo.weights(9, probe, probe))


def test_coba_is_equal_during_warmup_then_favours_the_slower_task():
    coba = CoBaWeighting(2, window=6, warmup=3)
    fast = [1.0, 0.8, 0.6, 0.45, 0.35, 0.3]
    slow = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]
    for step, (a, b) in enumerate(zip(fast, slow, strict=True)):
        coba.observe_validation(step, [a, b])
        w = coba.weights(step, t(0, 0), t(0, 0))
        assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        if step + 1 < 3:
            torch.testing.assert_close(w, t(0.5, 0.5))
    assert w[1] > w[0]


def test_coba_rejects_wrong_number_of_losses():
    with pytest.raises(ValueError, match="expects 2 finite validation losses"):
        CoBaWeighting(2).observe_validation(0, [1.0, 2.0, 3.0])


def test_famo_weights_and_logit_update_match_a_hand_computation():
    """Two tasks, three steps, computed by hand: w ∝ softmax(ξ) / L; after step 1, d = log L(0) − log L(1) = [ln 2, 0],
    Jᵀ d = [ln 2 / 4, −ln 2 / 4], and Adam's first step moves ξ by −lr · sign: ξ = [−0.025, 0.025]."""
    import math

    from peft_mazo.zo.weighting import FAMOWeighting

    famo = FAMOWeighting(2, lr=0.025, weight_decay=0.01, epsilon=0.0)
    steps = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0])]
    expected_weights = [[2 / 3, 1 / 3], [0.8, 0.2]]
    z0 = 1 / (1 + math.exp(0.05))  # softmax([-0.025, 0.025])[0]
    expected_weights.append([z0, 1 - z0])
    for step, losses in enumerate(steps):
        weights = famo.weights(step, losses.double(), losses.double())
        torch.testing.assert_close(
            weights, torch.tensor(expected_weights[step], dtype=torch.float64), atol=1e-6, rtol=0
        )
        famo.update(step, losses.double(), losses.double(), torch.zeros(2), weights)
        if step == 1:  # the first logit update (step 0 only records the losses)
            expected_logits = torch.tensor([-0.025, 0.025], dtype=torch.float64)
            torch.testing.assert_close(famo.logits.detach(), expected_logits, atol=1e-6, rtol=0)


def test_coba_weights_match_a_hand_computation_of_the_paper_formulas():
    """Three tasks, six validation observations, window N = 3, warm-up W = 2, computed step by step in plain Python
    from CoBa's definitions (CoBaWeighting's docstring, MAZO_SPEC §6), without the implementation's code:

    r_t(j) = L_t(j) / L_t(0); α_t = least-squares slope of the last N ratios against their index;
    RCS = softmax(T α / Σ_t |α_t|); ACS = softmax(−N' α / Σ_{last N slopes} |α_t|), N' the slopes in that window;
    DF = min(n · softmax_j(j α_max(j) / Σ_{k ≤ j} α_max(k))[n], 1) over the n slopes so far;
    w = DF · RCS + (1 − DF) · ACS, and 1/T each before W observations.

    Task 0 converges fast, tasks 1 and 2 slowly; convergence slows down (DF falls below 1), and at the last observation
    task 1's loss rises: CoBa must then hand the weight to ACS (DF near 0), which cuts the diverging task."""
    import math

    history = [
        [2.0, 1.0, 4.0],
        [1.6, 0.95, 3.8],
        [1.3, 0.92, 3.7],
        [1.1, 0.9, 3.65],
        [1.0, 0.91, 3.66],
        [0.95, 1.0, 3.7],
    ]
    window, warmup, num_tasks = 3, 2, 3

    def softmax(values):
        exps = [math.exp(v - max(values)) for v in values]
        return [e / sum(exps) for e in exps]

    def least_squares_slope(ys):
        xs = list(range(len(ys)))
        x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - x_mean) ** 2 for x in xs
        )

    ratios, slopes, factors = [], [], []
    coba = CoBaWeighting(num_tasks, window=window, warmup=warmup)
    for step, losses in enumerate(history):
        ratios.append([loss / first for loss, first in zip(losses, history[0], strict=True)])
        if len(ratios) >= 2:
            recent = ratios[-window:]
            slopes.append([least_squares_slope([r[t] for r in recent]) for t in range(num_tasks)])
        if len(ratios) < warmup:
            expected = [1 / num_tasks] * num_tasks
        else:
            alpha = slopes[-1]
            rcs = softmax([num_tasks * a / sum(abs(b) for b in alpha) for a in alpha])
            last = slopes[-window:]
            acs = softmax([-len(last) * alpha[t] / sum(abs(s[t]) for s in last) for t in range(num_tasks)])
            alpha_max = [max(s) for s in slopes]
            trend = [(j + 1) * alpha_max[j] / sum(alpha_max[: j + 1]) for j in range(len(alpha_max))]
            factor = min(len(alpha_max) * softmax(trend)[-1], 1.0)
            factors.append(factor)
            expected = [factor * r + (1 - factor) * a for r, a in zip(rcs, acs, strict=True)]
        coba.observe_validation(step, losses)
        got = coba.weights(step, t(0, 0, 0), t(0, 0, 0))
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)

    assert factors[0] == 1.0 and factors[1] < 1.0 and factors[-1] < 0.05  # RCS while converging, ACS at divergence
    assert all(a > b for a, b in zip(factors[:-1], factors[1:], strict=True))
    assert got.argmin() == 1  # the diverging task gets the least weight


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["equal", "famo", "coba"])
def test_weightings_take_losses_on_the_model_device(name, device):
    """The runner passes per-task losses where the model lives (a GPU): every weighting must accept them there.

    CoBa's validation history once mixed a CUDA tensor with a CPU one and stopped every `--method coba` run on a GPU.
    """
    weighting = make_weighting(name, 3, **({"window": 4, "warmup": 2} if name == "coba" else {}))
    for step in range(5):
        losses = torch.tensor([1.0, 0.9, 0.8], device=device) * (1.0 - 0.05 * step)
        weighting.observe_validation(step, losses.float())
        weights = torch.as_tensor(weighting.weights(step, losses.clone(), losses.clone()))
        assert weights.numel() == 3 and bool(torch.isfinite(weights).all())
        weighting.update(step, losses, losses, torch.zeros(1, device=device), weights.to(device))
    if name == "coba":
        assert len(weighting.slopes) == 4  # the history was recorded, not skipped
