"""Weight importance and the multi-task mask (MAZO_SPEC §3): pure scores, statistics, driver, report."""

import json
import logging
from functools import partial

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_mazo.scores
from peft_mazo import ImportanceReport, MaZOConfig, compute_importance
from peft_mazo import importance as imp
from peft_mazo.mask import kept_per_row, topk_columns
from peft_mazo.quantized import dense_weight
from peft_mazo.scorers import get_scorer
from tests.helpers import make_mlp, make_tiny_llama


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def no_bar():
    """A switched-off progress bar, for calling `collect_task_vectors` directly."""
    return imp.passes.progress_bar(False, "stats")


def random_spd(n, seed, rank=None, dtype=torch.float64):
    """`XᵀX / N` of random inputs (rank-deficient when `rank < n`), damped as in the spec."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 3 * n, n, generator=gen, dtype=dtype) + 0.3
    g, second = imp.input_moments(x.shape[0], x.sum(0), x.T @ x)
    return g, imp.damped_hessian(second)


def quadratic_min(g, hessian, free):
    """min over δ (zero outside `free`) of gᵀδ + ½ δᵀHδ, by a direct solve on the free coordinates."""
    g_f, h_f = g[free], hessian[free][:, free]
    delta = torch.linalg.solve(h_f, -g_f)
    return float(g_f @ delta + 0.5 * delta @ h_f @ delta)


def token_batches(lo, hi, n_batches=3, batch=2, seq=12, seed=0, pad_from=None):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(lo, hi, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        if pad_from is not None:
            mask[-1, pad_from:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def subspace_batches(active, n_batches=3, seed=0):
    """TinyMLP inputs (4, 8, 64) that are non-zero (uniform in [0.5, 1.5)) only on the features `active`."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.zeros(4, 8, 64)
        x[..., active] = torch.rand(4, 8, 32, generator=gen) + 0.5
        batches.append({"x": x})
    return batches


def mlp_model(sparsity=0.75, **kwargs):
    return get_peft_model(
        make_mlp(), MaZOConfig(sparsity=sparsity, target_modules=["lin0", "lin1"], **{"r": 0, **kwargs})
    )


def llama_model(seed=0, **kwargs):
    kwargs.setdefault("sparsity", 0.75)
    kwargs.setdefault("r", 0)
    return get_peft_model(make_tiny_llama(seed=seed), MaZOConfig(**kwargs))


def mlp_layer_inputs(model, batches):
    """float64 inputs of lin0 and lin1 of the (base) TinyMLP over all tokens of `batches`: {name: (N, n)}."""
    mlp = model.base_model.model
    w0, b0 = mlp.lin0.get_base_layer().weight.double(), mlp.lin0.get_base_layer().bias.double()
    x = torch.cat([b["x"].reshape(-1, 64) for b in batches]).double()
    return {"lin0": x, "lin1": torch.relu(x @ w0.T + b0)}


def llama_layer_inputs(model, batches):
    """float64 inputs of every MaZO layer over the non-padding tokens of `batches`: {name: (N, n)}."""
    layers = model.base_model._mazo_layers()
    captured = {name: [] for name in layers}
    keep = None

    def record(module, args, name):
        captured[name].append(args[0][keep].double())

    handles = [layer.register_forward_pre_hook(partial(record, name=name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                keep = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in captured.items()}


def reference_mazo_scores(weight, x, alpha=10.0, beta=1.0, eta=imp.DEFAULT_ETA):
    """S^t of one task from its (N, n) float64 inputs, with the pure functions only."""
    g, second = imp.input_moments(x.shape[0], x.sum(0), x.T @ x)
    hessian = imp.damped_hessian(second)
    return imp.mazo_scores(
        weight.abs().double(), imp.global_scores(g, hessian), imp.greedy_scores(g, hessian, eta), alpha, beta
    )


def assert_row_topk(mask, scores, tol=1e-4):
    """Every kept entry scores at least as high as every dropped one of its row (up to `tol`)."""
    kept_min = torch.where(mask, scores, torch.inf).min(dim=1).values
    dropped_max = torch.where(mask, -torch.inf, scores).max(dim=1).values
    assert (kept_min >= dropped_max - tol).all(), float((dropped_max - kept_min).max())


def masks_of(model, adapter="default"):
    return {name: mask.clone() for name, mask in model.get_masks(adapter).items()}


# ----------------------------------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, rank", [(8, None), (12, None), (16, None), (16, 5)])
def test_global_score_is_constrained_minus_unconstrained_minimum(n, rank):
    g, hessian = random_spd(n, seed=n, rank=rank)
    scores = imp.global_scores(g, hessian)
    everything = list(range(n))
    unconstrained = quadratic_min(g, hessian, everything)
    for j in range(n):
        constrained = quadratic_min(g, hessian, [i for i in everything if i != j])
        assert scores[j].item() == pytest.approx(constrained - unconstrained, rel=1e-8, abs=1e-12)


def test_global_score_closed_form_without_explicit_inverse_matches_inverse():
    g, hessian = random_spd(64, seed=3)  # > one block of the inverse diagonal when the block is small
    inverse = torch.linalg.inv(hessian)
    expected = (inverse @ g) ** 2 / (2 * inverse.diagonal())
    torch.testing.assert_close(imp.global_scores(g, hessian), expected, rtol=1e-9, atol=1e-14)


def test_inverse_diagonal_in_blocks(monkeypatch):
    monkeypatch.setattr(peft_mazo.scores, "BLOCK_ELEMENTS", 40)  # blocks of 2 columns for n = 20
    _, hessian = random_spd(20, seed=4)
    factor = torch.linalg.cholesky(hessian)
    torch.testing.assert_close(peft_mazo.scores._inverse_diagonal(factor), torch.linalg.inv(hessian).diagonal())


def test_global_score_retries_cholesky_with_more_damping(caplog):
    hessian = torch.diag(torch.tensor([1.0, 2.0, -1e-3], dtype=torch.float64))  # not positive definite
    with caplog.at_level(logging.WARNING, logger="peft_mazo.importance"):
        scores = imp.global_scores(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), hessian)
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    assert "retrying with the damping raised" in caplog.text


def test_greedy_score_term_by_term():
    g, hessian = random_spd(10, seed=7)
    for eta in (1e-7, 1e-3, 0.5):
        scores = imp.greedy_scores(g, hessian, eta)
        for j in range(10):
            h_g = sum(hessian[j, m].item() * g[m].item() for m in range(10))
            gj = g[j].item()
            expected = eta * gj**2 + eta**2 * hessian[j, j].item() * gj**2 - 4 * eta**2 * gj * h_g
            assert scores[j].item() == pytest.approx(expected, rel=1e-10, abs=1e-300)


def test_damped_hessian_and_moments():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    g, second = imp.input_moments(2, x.sum(0), x.T @ x)
    torch.testing.assert_close(g, torch.tensor([2.0, 1.0], dtype=torch.float64))
    hessian = imp.damped_hessian(second, damping=0.1)
    lam = 0.1 * second.diagonal().mean()
    torch.testing.assert_close(hessian, second + lam * torch.eye(2, dtype=torch.float64))
    # all-zero inputs: λ = damping, so H stays positive definite and the scores are 0, not NaN
    zero = imp.damped_hessian(torch.zeros(3, 3), damping=0.01)
    torch.testing.assert_close(zero, 0.01 * torch.eye(3))
    assert torch.equal(imp.global_scores(torch.zeros(3), zero), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one token"):
        imp.input_moments(0, torch.zeros(2), torch.zeros(2, 2))


def test_row_minmax_edge_cases():
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [-1.0, 0.0, -1.0]])
    normalised = imp.row_minmax(scores)
    torch.testing.assert_close(normalised, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert not torch.isnan(imp.row_minmax(torch.zeros(4, 6))).any()
    torch.testing.assert_close(imp.row_minmax(torch.tensor([2.0, 4.0])), torch.tensor([0.0, 1.0]))
    # constant score vectors contribute nothing: only the |W| part is left
    weight_abs = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    combined = imp.mazo_scores(weight_abs, torch.ones(5), torch.full((5,), 7.0), alpha=10, beta=2)
    torch.testing.assert_close(combined, 2 * imp.row_minmax(weight_abs))


def test_mazo_scores_and_aggregation_follow_the_spec():
    gen = torch.Generator().manual_seed(1)
    weight_abs, s_global, s_greedy = torch.rand(4, 6, generator=gen), torch.rand(6, generator=gen), torch.randn(6)
    expected = (
        (s_global - s_global.min()) / (s_global.max() - s_global.min())
        + 10 * (s_greedy - s_greedy.min()) / (s_greedy.max() - s_greedy.min())
        + (weight_abs - weight_abs.min(1, keepdim=True).values)
        / (weight_abs.max(1, keepdim=True).values - weight_abs.min(1, keepdim=True).values)
    )
    torch.testing.assert_close(imp.mazo_scores(weight_abs, s_global, s_greedy), expected)
    second = torch.rand(4, 6, generator=gen) * 100
    torch.testing.assert_close(
        imp.aggregate_scores([expected, second]), imp.row_minmax(expected) + imp.row_minmax(second)
    )
    torch.testing.assert_close(imp.wanda_scores(weight_abs, torch.full((6,), 4.0)), 2 * weight_abs)


# ----------------------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------------------
def test_layers_reading_the_same_input_share_statistics():
    model = llama_model()
    tuner = model.base_model
    with imp.passes._calibration_mode(tuner), imp.statistics.Recorder(tuner._mazo_layers()) as recorder:
        with recorder.probing():
            tuner.model(input_ids=torch.arange(10).reshape(1, 10))
    groups = sorted(
        sorted(name.rsplit(".", 1)[1] for name in group.members) for group in recorder.groups if ".0." in group.leader
    )
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert len(recorder.groups) == 8


def test_statistics_match_brute_force_on_mlp():
    model = mlp_model()
    batches = subspace_batches(slice(0, 32))
    tasks = [("a", batches)]
    layers = model.base_model._mazo_layers()
    vectors, tokens, *_ = imp.passes.collect_task_vectors(
        model.base_model, layers, tasks, get_scorer("mazo"), imp.DEFAULT_ETA, 0.01, None, no_bar(), {}
    )
    inputs = mlp_layer_inputs(model, batches)
    for index, name in enumerate(["lin0", "lin1"]):
        x = inputs[name]
        g, second = imp.input_moments(x.shape[0], x.sum(0), x.T @ x)
        hessian = imp.damped_hessian(second)
        s_global, s_greedy = vectors["a"][index]
        # float32 statistics and solve (cond(H) ≈ 1e4 for lin1) against float64: ~3e-4 on the normalised scores
        torch.testing.assert_close(s_global.double(), imp.row_minmax(imp.global_scores(g, hessian)), atol=1e-3, rtol=0)
        torch.testing.assert_close(
            s_greedy.double(), imp.row_minmax(imp.greedy_scores(g, hessian, imp.DEFAULT_ETA)), atol=1e-5, rtol=0
        )
        assert tokens["a"][index] == 3 * 4 * 8


def test_padding_positions_do_not_change_any_score():
    model = llama_model()
    tuner = model.base_model
    layers = tuner._mazo_layers()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    padded_ids = torch.cat([ids, torch.randint(0, 128, (2, 6), generator=gen)], dim=1)
    padded_ids = torch.cat([padded_ids, torch.randint(0, 128, (1, 16), generator=gen)])  # a fully padded row
    padded_mask = torch.zeros_like(padded_ids)
    padded_mask[:2, :10] = 1
    padded = [{"input_ids": padded_ids, "attention_mask": padded_mask}]

    def collect(batches):
        return imp.passes.collect_task_vectors(
            tuner, layers, [("t", batches)], get_scorer("mazo"), 1e-3, 0.01, None, no_bar(), {}
        )

    vectors_plain, tokens_plain, *_ = collect(plain)
    vectors_padded, tokens_padded, *_ = collect(padded)
    assert tokens_plain == tokens_padded == {"t": dict.fromkeys(range(8), 20)}
    for group, (s_global, s_greedy) in vectors_plain["t"].items():
        # equal up to float32 rounding: the sums run over other shapes, and S_global amplifies it by cond(H) ≈ 1e4
        torch.testing.assert_close(vectors_padded["t"][group][0], s_global, atol=2e-3, rtol=0)
        torch.testing.assert_close(vectors_padded["t"][group][1], s_greedy, atol=5e-5, rtol=0)
    first, second = llama_model(), llama_model()
    first.compute_importance(plain, progress=False)
    second.compute_importance(padded, progress=False)
    agreement = [(first.get_masks()[n] & second.get_masks()[n]).sum() / second.get_masks()[n].sum() for n in layers]
    assert min(agreement) > 0.99


# ----------------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------------
def test_tasks_in_different_subspaces_select_different_columns():
    task_a, task_b = subspace_batches(slice(0, 32), seed=1), subspace_batches(slice(32, 64), seed=2)
    alone = {}
    for name, batches in (("a", task_a), ("b", task_b)):
        model = mlp_model()
        model.compute_importance({name: batches}, progress=False)
        alone[name] = model.get_masks()["lin0"]
    assert alone["a"][:, :32].sum() >= 0.9 * alone["a"].sum()
    assert alone["b"][:, 32:].sum() >= 0.9 * alone["b"].sum()
    assert (alone["a"] & alone["b"]).sum() <= 0.1 * alone["a"].sum()

    model = mlp_model()
    report = model.compute_importance({"a": task_a, "b": task_b}, progress=False)
    masks = model.get_masks()
    k = kept_per_row(64, 0.75)
    assert masks["lin0"].sum(dim=1).tolist() == [k] * 128
    # every task sees only part of its own choice in the shared mask; each task's overlap is its own top-k set's
    assert report.overlap("a", "lin0") < 0.9 and report.overlap("b", "lin0") < 0.9
    for task, mask in alone.items():
        assert report.overlap(task, "lin0") == pytest.approx(float((mask & masks["lin0"]).sum()) / (128 * k))
    # the aggregate mask is the row-wise top-k of Σ_t norm(S^t)
    inputs = {t: mlp_layer_inputs(model, b) for t, b in (("a", task_a), ("b", task_b))}
    for name in ("lin0", "lin1"):
        weight = model.base_model.model.get_submodule(name).get_base_layer().weight
        total = imp.aggregate_scores(reference_mazo_scores(weight, inputs[t][name]) for t in ("a", "b"))
        assert_row_topk(masks[name], total)


def test_masks_are_deterministic_and_keep_k_per_row():
    data = {"x": token_batches(0, 64, seed=3), "y": token_batches(64, 128, seed=4, pad_from=7)}
    first, second = llama_model(), llama_model()
    first.compute_importance(data, progress=False)
    second.compute_importance(data, progress=False)
    masks = first.get_masks()
    for name, mask in masks.items():
        assert torch.equal(mask, second.get_masks()[name])
        assert mask.sum(dim=1).eq(kept_per_row(mask.shape[1], 0.75)).all()


def test_windowed_statistics_give_the_same_masks_and_stop_early():
    data = {"x": token_batches(0, 64, seed=5), "y": token_batches(64, 128, seed=6, pad_from=4)}
    whole, windowed = llama_model(), llama_model()
    whole_report = whole.compute_importance(data, progress=False)
    head_calls = []
    windowed.base_model.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    report = windowed.compute_importance(data, progress=False, max_stats_bytes=1)
    assert whole_report.settings["windows"] == 1
    assert report.settings["windows"] == 8  # one group per window
    assert report.settings["forward_passes"] == 8 * 2 * 3
    assert len(head_calls) == 1  # only the probe pass ran to the end; every window stopped after its last layer
    for name, mask in whole.get_masks().items():
        assert torch.equal(mask, windowed.get_masks()[name])


def test_lora_mode_gets_the_same_mask_as_dense_mode():
    data = token_batches(0, 128, seed=8, pad_from=5)
    dense, lora = llama_model(), llama_model(r=4)
    dense.compute_importance(data, progress=False)
    lora.compute_importance(data, progress=False)
    for name, mask in dense.get_masks().items():
        assert torch.equal(mask, lora.get_masks()[name])


def test_wanda_is_row_topk_of_weight_times_input_norm():
    task_a, task_b = subspace_batches(slice(0, 32), seed=1), subspace_batches(slice(32, 64), seed=2)
    model = mlp_model(scorer="wanda")
    report = model.compute_importance(task_a, progress=False)
    assert report.tasks == ["task"]
    inputs = mlp_layer_inputs(model, task_a)
    for name, mask in model.get_masks().items():
        weight = model.base_model.model.get_submodule(name).get_base_layer().weight.double()
        expected = imp.wanda_scores(weight.abs(), inputs[name].square().sum(0))
        assert_row_topk(mask, expected, tol=1e-5)
    # several tasks: the per-task Wanda scores are row-normalised and summed, as for MaZO
    model = mlp_model(scorer="wanda")
    model.compute_importance({"a": task_a, "b": task_b}, progress=False)
    both = {t: mlp_layer_inputs(model, b) for t, b in (("a", task_a), ("b", task_b))}
    for name, mask in model.get_masks().items():
        weight = model.base_model.model.get_submodule(name).get_base_layer().weight.double()
        total = imp.aggregate_scores(imp.wanda_scores(weight.abs(), both[t][name].square().sum(0)) for t in both)
        assert_row_topk(mask, total, tol=1e-5)


def test_magnitude_scorer_restores_the_row_topk_of_weight_magnitude():
    model = llama_model(scorer="magnitude")
    initial = masks_of(model)
    model.set_masks({name: torch.flip(mask, dims=[1]) for name, mask in initial.items()})
    report = model.compute_importance(None, progress=False)
    assert report.records == [] and "data-free" in report.table()
    for name, mask in model.get_masks().items():
        assert torch.equal(mask, initial[name])
        weight = model.base_model.model.get_submodule(name).get_base_layer().weight
        expected = topk_columns(weight.abs(), kept_per_row(weight.shape[1], 0.75))
        assert torch.equal(mask, torch.zeros_like(mask).scatter(1, expected, True))


def test_random_scorer_is_reproducible_with_its_seed():
    def run(seed):
        model = llama_model(scorer="random", mask_seed=seed)
        initial = masks_of(model)
        model.set_masks({name: torch.flip(mask, dims=[1]) for name, mask in initial.items()})
        model.compute_importance(token_batches(0, 10), progress=False)  # loaders are accepted and ignored
        masks = model.get_masks()
        assert all(torch.equal(masks[name], initial[name]) for name in masks)
        return masks

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_scorer_none_has_nothing_to_do(caplog):
    with pytest.warns(UserWarning, match="sparsity"):
        model = llama_model(scorer="none")
    with caplog.at_level(logging.WARNING, logger="peft_mazo.importance"):
        report = model.compute_importance(token_batches(0, 10), progress=False)
    assert report.records == [] and report.scorer == "none"
    assert "nothing to do" in caplog.text


def test_non_zero_delta_is_refused_unless_reset():
    data = token_batches(0, 128, seed=9)
    trained = llama_model(init_weights=False)
    before = masks_of(trained)
    with pytest.raises(ValueError, match="reset=True"):
        trained.compute_importance(data, progress=False)
    assert all(torch.equal(trained.get_masks()[n], m) for n, m in before.items())
    trained.compute_importance(data, progress=False, reset=True)
    fresh = llama_model()
    fresh.compute_importance(data, progress=False)
    layers = trained.base_model._mazo_layers()
    assert not any(layer.delta_is_nonzero("default") for layer in layers.values())
    # the statistics are those of the base model, whatever the delta was
    assert all(torch.equal(trained.get_masks()[n], m) for n, m in fresh.get_masks().items())


def test_modes_and_flags_are_restored_after_success_and_failure():
    model = llama_model()
    model.train()
    model.compute_importance(token_batches(0, 128), progress=False)
    assert all(module.training for module in model.modules())
    assert not any(layer.disable_adapters for layer in model.base_model._mazo_layers().values())
    bad = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4)}]
    with pytest.raises(ValueError, match="no non-padding token"):
        model.compute_importance({"empty": bad}, progress=False)
    assert all(module.training for module in model.modules())
    assert not any(layer.disable_adapters for layer in model.base_model._mazo_layers().values())


def test_only_the_chosen_adapter_changes():
    model = llama_model()
    model.add_adapter("other", MaZOConfig(sparsity=0.5, r=0))
    before = masks_of(model)
    model.compute_importance(token_batches(0, 128), progress=False, adapter_name="other")
    assert all(torch.equal(model.get_masks()[n], m) for n, m in before.items())
    assert not all(torch.equal(model.get_masks("other")[n], model.get_masks("default")[n]) for n in before)


def test_num_batches_and_one_shot_iterables():
    batches = token_batches(0, 128, n_batches=5, seq=6)
    consumed = []

    def generator():
        for batch in batches:
            consumed.append(1)
            yield batch

    report = llama_model().compute_importance(generator(), num_batches=2, progress=False)
    assert len(consumed) == 2
    assert report.tasks == ["task"] and report.tokens("task") == 2 * 2 * 6
    report = llama_model().compute_importance([("a", batches)], progress=False)
    assert report.tokens("a") == 5 * 2 * 6


def test_bad_inputs_fail_before_any_forward_pass():
    model = llama_model()
    calls = []
    model.base_model.model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    good = token_batches(0, 128)
    with pytest.raises(ValueError, match="task 'copa' is empty"):
        model.compute_importance({"sst2": good, "copa": []}, progress=False)
    with pytest.raises(TypeError, match="Task 'boolq': batch 1 is a list"):
        model.compute_importance({"boolq": [good[0], [1, 2, 3]]}, progress=False)
    with pytest.raises(TypeError, match="task 'rte' is a int"):
        model.compute_importance({"rte": 3}, progress=False)
    with pytest.raises(TypeError, match="single batch"):
        model.compute_importance(good[0], progress=False)
    with pytest.raises(ValueError, match="'sst2' appears more than once"):
        model.compute_importance([("sst2", good), ("sst2", good)], progress=False)
    with pytest.raises(ValueError, match="calibration data"):
        model.compute_importance(None, progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        model.compute_importance(good, num_batches=0, progress=False)
    with pytest.raises(ValueError, match="eta"):
        model.compute_importance(good, eta=-1.0, progress=False)
    with pytest.raises(ValueError, match="No MaZO adapter named 'nope'"):
        model.compute_importance(good, adapter_name="nope", progress=False)
    assert calls == []


def test_model_without_mazo_adapter_is_refused():
    with pytest.raises(TypeError, match="get_peft_model"):
        compute_importance(make_tiny_llama(), token_batches(0, 128))
    lora = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="MaZO adapter"):
        compute_importance(lora, token_batches(0, 128))


def test_report_table_and_logging(caplog):
    model = llama_model()
    data = {"sst2": token_batches(0, 64, seed=1, pad_from=3), "copa": token_batches(64, 128, seed=2)}
    with caplog.at_level(logging.INFO, logger="peft_mazo.importance"):
        report = model.compute_importance(data, progress=True)
    assert isinstance(report, ImportanceReport)
    assert "MaZO mask search (scorer=mazo): 2 task(s), 14 layer(s)" in caplog.text
    assert len(report.records) == 2 * 14
    assert all(0.0 <= r.overlap <= 1.0 and r.seconds >= 0 and r.tokens > 0 for r in report.records)
    assert report.tokens("sst2") == 3 * 24 - 3 * 9 and report.tokens("copa") == 3 * 24
    text = str(report)
    assert "sst2" in text and "copa" in text and "model.layers.1.mlp.down_proj" in text
    markdown = report.table(markdown=True).splitlines()
    assert "| task | tokens | stats s | scoring s | overlap |" in markdown
    assert sum(line.startswith("| sst2 |") for line in markdown) == 1
    assert json.loads(json.dumps(report.to_dict()))["overlap"].keys() == {"sst2", "copa"}
    assert 0 < report.overlap() < 1


def assert_llama_masks_match_reference(model, data):
    """Run compute_importance and check every mask against the spec computed from captured float64 inputs."""
    inputs = {task: llama_layer_inputs(model, batches) for task, batches in data.items()}
    model.compute_importance(data, progress=False)
    for name, mask in model.get_masks().items():
        weight = dense_weight(model.base_model.model.get_submodule(name).get_base_layer())
        total = imp.aggregate_scores(reference_mazo_scores(weight, inputs[t][name]) for t in data)
        assert_row_topk(mask, total, tol=2e-3)


def test_llama_masks_are_the_row_topk_of_the_summed_task_scores():
    data = {"a": token_batches(0, 64, seed=13, pad_from=6), "b": token_batches(64, 128, seed=14)}
    assert_llama_masks_match_reference(llama_model(), data)


def test_four_bit_base_uses_the_dequantized_weight(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_tiny_llama(seed=5).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    model = get_peft_model(base, MaZOConfig(sparsity=0.75, r=0))
    assert all(
        isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in model.base_model._mazo_layers().values()
    )
    data = {"a": token_batches(0, 64, seed=11, pad_from=6), "b": token_batches(64, 128, seed=12)}
    assert_llama_masks_match_reference(model, data)


# ----------------------------------------------------------------------------------------------------------------------
# cost and progress reporting (issue #16 §5 item 6)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 9, 37])
def test_inverse_diagonal_with_trailing_blocks_matches_inverse(n):
    _, hessian = random_spd(n, seed=n)  # n = 37: blocks of 5 columns, the last one shorter
    factor = torch.linalg.cholesky(hessian)
    torch.testing.assert_close(peft_mazo.scores._inverse_diagonal(factor), torch.linalg.inv(hessian).diagonal())


class _RecordingBar:
    """Stands in for tqdm: records every bar made and what it was told."""

    made: list = []

    def __init__(self, *args, **kwargs):
        self.kwargs, self.total, self.n, self.postfixes = kwargs, kwargs.get("total"), 0, []
        _RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, steps=1):
        self.n += steps

    def refresh(self):
        pass

    def set_postfix_str(self, text):
        self.postfixes.append(text)


def test_one_progress_bar_for_the_whole_search(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging.tqdm_lib, "tqdm", _RecordingBar)
    monkeypatch.setattr(_RecordingBar, "made", [])
    model = llama_model()
    data = {"a": token_batches(0, 64, n_batches=2), "b": token_batches(64, 128, n_batches=2)}
    report = model.compute_importance(data)
    (bar,) = _RecordingBar.made  # one bar, not one per task and per layer
    assert "disable" not in bar.kwargs  # so that TQDM_DISABLE=1 still applies
    forward_passes, layers = report.settings["forward_passes"], len(report.layers)
    assert bar.total == bar.n == forward_passes + layers
    assert bar.postfixes[:2] == ["a", "b"] and bar.postfixes[-1] == "scores"


@pytest.mark.parametrize("how", ["progress=False", "transformers"])
def test_progress_bar_respects_the_disable_settings(how, capsys):
    """`progress=False`, or transformers' switch (which `HF_HUB_DISABLE_PROGRESS_BARS=1` also sets), silences the bar.
    tqdm's `TQDM_DISABLE=1` is read when tqdm is imported; the bar honours it by never passing `disable=False`
    (`test_one_progress_bar_for_the_whole_search`)."""
    from transformers.utils import logging as hf_logging

    model = llama_model()
    data = {"a": token_batches(0, 64, n_batches=2), "b": token_batches(64, 128, n_batches=2)}
    if how == "transformers":
        hf_logging.disable_progress_bar()
    try:
        model.compute_importance(data, progress=how == "transformers")
    finally:
        hf_logging.enable_progress_bar()
    assert capsys.readouterr().err == ""
    model.compute_importance(data, progress=True, reset=True)  # control: the bar is there when nothing disables it
    assert "MaZO mask search" in capsys.readouterr().err
