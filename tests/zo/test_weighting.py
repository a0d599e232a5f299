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
