"""The MaZO tuner on full-precision bases: masked deltas, forward, merge, adapters, masks, backprop, errors."""

import math

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from peft_mazo import Linear, MaZOConfig
from peft_mazo.mask import kept_per_row
from tests.helpers import make_mlp, make_tiny_llama


DENSE = dict(sparsity=0.8, r=0)
LORA = dict(sparsity=0.8, r=8, lora_alpha=16)


def mazo_layers(model):
    return {name: module for name, module in model.base_model.model.named_modules() if isinstance(module, Linear)}


def explicit_delta(layer, adapter="default"):
    """ΔW ⊙ M computed from the layer's tensors without the layer's own delta code."""
    mask = layer.get_mask(adapter).float()
    if adapter in layer.mazo_values:
        full = torch.zeros(layer.out_features, layer.in_features)
        values = layer.mazo_values[adapter].detach()
        columns = layer.mazo_columns[adapter].long()
        for row in range(layer.out_features):
            full[row, columns[row]] = values[row]
        return full * mask
    scale = layer.mazo_scaling[adapter]
    return scale * (layer.mazo_B[adapter].detach() @ layer.mazo_A[adapter].detach()) * mask


@pytest.mark.parametrize("mode", [DENSE, LORA], ids=["dense", "lora"])
def test_new_adapter_is_identity(mode, input_ids):
    base = make_tiny_llama()
    expected = base(input_ids=input_ids).logits
    model = get_peft_model(base, MaZOConfig(**mode))
    assert torch.equal(model(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("mode", [DENSE, LORA], ids=["dense", "lora"])
def test_every_targeted_linear_but_the_head_is_adapted_with_k_per_row(mode):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(**mode))
    layers = mazo_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per decoder layer
    assert not any("lm_head" in name for name in layers)
    for name, mask in model.get_masks().items():
        k = kept_per_row(layers[name].in_features, 0.8)
        assert mask.dtype == torch.bool
        assert mask.sum(dim=1).tolist() == [k] * mask.shape[0], name


def test_data_free_mask_is_row_wise_top_k_of_weight_magnitude():
    base = make_tiny_llama()
    weight = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = get_peft_model(base, MaZOConfig(**DENSE))
    mask = model.get_masks()["model.layers.0.mlp.down_proj"]
    k = kept_per_row(weight.shape[1], 0.8)
    kept_min = torch.where(mask, weight.abs(), torch.inf).min(dim=1).values
    dropped_max = torch.where(mask, -torch.inf, weight.abs()).max(dim=1).values
    assert (kept_min >= dropped_max).all()
    assert mask.sum() == weight.shape[0] * k


def test_compact_storage_dtypes_and_shapes():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(**DENSE))
    layer = mazo_layers(model)["model.layers.0.mlp.down_proj"]  # in = 128
    assert layer.mazo_columns["default"].dtype == torch.int16
    assert layer.mazo_columns["default"].shape == (64, kept_per_row(128, 0.8))
    assert layer.mazo_values["default"].shape == (64, kept_per_row(128, 0.8))
    assert layer.mazo_values["default"].dtype == torch.float32
    lora = get_peft_model(make_tiny_llama(), MaZOConfig(**LORA))
    layer = mazo_layers(lora)["model.layers.0.mlp.down_proj"]
    assert layer.mazo_bits["default"].dtype == torch.uint8
    assert layer.mazo_bits["default"].shape == (64, 128 // 8)
    assert not any(buf.dtype == torch.bool for buf in lora.buffers())


@pytest.mark.parametrize("mode", [DENSE, LORA], ids=["dense", "lora"])
def test_delta_equals_explicit_masked_delta_and_forward_uses_it(mode):
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_llama(), MaZOConfig(init_weights=False, **mode))
    x = torch.randn(3, 5, 64)
    for name, layer in mazo_layers(model).items():
        delta = layer.get_delta_weight("default")
        expected = explicit_delta(layer)
        assert delta.abs().sum() > 0, name
        torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-7)
        assert (delta[~layer.get_mask("default")] == 0).all()
        assert layer.base_backend.name == "dense"
        if layer.in_features == 64:
            base = layer.get_base_layer()
            torch.testing.assert_close(layer(x), base(x) + x @ expected.T, rtol=1e-5, atol=1e-5)


def test_lora_delta_uses_alpha_over_r_scale():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(init_weights=False, sparsity=0.5, r=4, lora_alpha=12))
    layer = next(iter(mazo_layers(model).values()))
    assert layer.mazo_scaling["default"] == 3.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_delta_and_matches_reference(dtype, input_ids):
    model = get_peft_model(make_tiny_llama().to(dtype), MaZOConfig(init_weights=False, **DENSE))
    layer = mazo_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.mazo_values["default"].dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == dtype
    x = torch.randn(4, 64).to(dtype)
    # reference: effective weight rounded once from the fp32 sum
    weight = layer.get_base_layer().weight
    effective = (weight.float() + layer.get_delta_weight("default")).to(dtype)
    torch.testing.assert_close(layer(x), x @ effective.T)
    assert torch.isfinite(model(input_ids=input_ids).logits).all()


@pytest.mark.parametrize("mode", [DENSE, LORA], ids=["dense", "lora"])
def test_merge_unmerge_round_trip_and_merge_and_unload(mode, input_ids):
    base = make_tiny_llama()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, MaZOConfig(init_weights=False, **mode))
    adapted = model(input_ids=input_ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=input_ids).logits, adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(input_ids=input_ids).logits, adapted, rtol=1e-5, atol=1e-5)
    layer = mazo_layers(model)["model.layers.1.mlp.up_proj"]
    torch.testing.assert_close(
        layer.get_base_layer().weight, original["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=1e-6
    )
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, Linear) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite_delta():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(init_weights=False, **DENSE))
    layer = mazo_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.mazo_values["default"][0, 0] = float("nan")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_unload_restores_base_outputs(input_ids):
    base = make_tiny_llama()
    expected = base(input_ids=input_ids).logits
    model = get_peft_model(base, MaZOConfig(init_weights=False, **LORA))
    assert not torch.allclose(model(input_ids=input_ids).logits, expected)
    assert torch.equal(model.unload()(input_ids=input_ids).logits, expected)


def test_disable_adapter_gives_base_outputs(input_ids):
    base = make_tiny_llama()
    expected = base(input_ids=input_ids).logits
    model = get_peft_model(base, MaZOConfig(init_weights=False, **DENSE))
    adapted = model(input_ids=input_ids).logits
    with model.disable_adapter():
        assert torch.equal(model(input_ids=input_ids).logits, expected)
    assert torch.equal(model(input_ids=input_ids).logits, adapted)


def test_two_adapters_set_and_delete(input_ids):
    base = make_tiny_llama()
    model = get_peft_model(base, MaZOConfig(init_weights=False, **DENSE))
    out_first = model(input_ids=input_ids).logits
    model.add_adapter("second", MaZOConfig(init_weights=False, sparsity=0.5, r=4))
    assert torch.equal(model(input_ids=input_ids).logits, out_first)  # "default" still active
    model.set_adapter("second")
    out_second = model(input_ids=input_ids).logits
    assert not torch.allclose(out_first, out_second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    assert model.get_masks("second")["model.layers.0.mlp.up_proj"].sum(1)[0] == kept_per_row(64, 0.5)
    model.set_adapter("default")
    assert torch.equal(model(input_ids=input_ids).logits, out_first)
    model.delete_adapter("second")
    assert all("second" not in n for n, _ in model.named_parameters())
    assert torch.equal(model(input_ids=input_ids).logits, out_first)


@pytest.mark.parametrize("mode", [DENSE, LORA], ids=["dense", "lora"])
def test_backprop_trains_only_adapter_tensors(mode, input_ids):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(**mode))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(
        n.split(".")[-2] in ("mazo_values", "mazo_A", "mazo_B") for n, p in model.named_parameters() if p.requires_grad
    )
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            assert torch.equal(param, frozen[name]), name
    layer = mazo_layers(model)["model.layers.0.self_attn.o_proj"]
    assert layer.delta_is_nonzero("default")
    assert (layer.get_delta_weight("default")[~layer.get_mask("default")] == 0).all()


def test_small_mlp_with_biases():
    mlp = make_mlp()
    x = torch.randn(3, 64)
    model = get_peft_model(mlp, MaZOConfig(target_modules=["lin0", "lin1"], init_weights=False, **DENSE))
    layers = mazo_layers(model)

    def adapted(name, inputs):
        base = layers[name].get_base_layer()
        return inputs @ (base.weight + explicit_delta(layers[name])).T + base.bias

    expected = mlp.norm(adapted("lin1", torch.relu(adapted("lin0", x))))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_set_masks_validates_and_refuses_trained_delta():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(**DENSE))
    masks = model.get_masks()
    name = "model.layers.0.self_attn.q_proj"
    flipped = {name: masks[name].flip(dims=[1])}
    model.set_masks(flipped)
    assert torch.equal(model.get_masks()[name], flipped[name])

    bad = masks[name].clone()
    bad[3, ~bad[3]] = True  # row 3 keeps everything
    with pytest.raises(ValueError, match="row 3 keeps 64"):
        model.set_masks({name: bad})
    with pytest.raises(ValueError, match="must have shape"):
        model.set_masks({name: masks[name][:, :32]})
    with pytest.raises(ValueError, match="without a MaZO adapter"):
        model.set_masks({"lm_head": masks[name]})

    layer = mazo_layers(model)[name]
    with torch.no_grad():
        layer.mazo_values["default"].add_(1.0)
    with pytest.raises(ValueError, match="reset=True"):
        model.set_masks({name: masks[name]})
    assert torch.equal(model.get_masks()[name], flipped[name])  # nothing changed
    model.set_masks({name: masks[name]}, reset=True)
    assert torch.equal(model.get_masks()[name], masks[name])
    assert not layer.delta_is_nonzero("default")


def test_scorer_none_trains_every_entry():
    with pytest.warns(UserWarning, match="ignored"):
        config = MaZOConfig(scorer="none", sparsity=0.8, r=0, init_weights=False)
    model = get_peft_model(make_tiny_llama(), config)
    layer = mazo_layers(model)["model.layers.0.mlp.down_proj"]
    assert layer.mazo_values["default"].shape == (64, 128)
    assert not layer.is_masked("default")
    assert model.get_masks()["model.layers.0.mlp.down_proj"].all()
    torch.testing.assert_close(layer.get_delta_weight("default"), layer.mazo_values["default"])
    with pytest.raises(ValueError, match="no mask"):
        model.set_masks({"model.layers.0.mlp.down_proj": torch.ones(64, 128, dtype=torch.bool)})


def test_random_scorer_is_seeded_and_differs_between_layers():
    def masks(seed):
        return get_peft_model(make_tiny_llama(), MaZOConfig(scorer="random", mask_seed=seed, **DENSE)).get_masks()

    first, again, other = masks(0), masks(0), masks(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], other["model.layers.0.self_attn.q_proj"])
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], first["model.layers.0.self_attn.o_proj"])


def test_layers_to_transform():
    model = get_peft_model(
        make_tiny_llama(), MaZOConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    )
    assert list(mazo_layers(model)) == ["model.layers.1.self_attn.q_proj"]


def test_target_matching_nothing_names_target_modules():
    with pytest.raises(ValueError, match="[Tt]arget modules"):
        get_peft_model(make_tiny_llama(), MaZOConfig(target_modules=["does_not_exist"]))


def test_target_matching_non_linear_layer_fails_before_changing_the_model():
    base = make_tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules matched 'model.embed_tokens' of type Embedding"):
        get_peft_model(base, MaZOConfig(target_modules=["q_proj", "embed_tokens"]))
    assert not any(isinstance(m, Linear) for m in base.modules())


def test_conv1d_is_refused_with_a_clear_error():
    base = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="Conv1D"):
        get_peft_model(base, MaZOConfig(target_modules=["c_attn"]))


def test_adapter_parameter_count_matches_k_per_row():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.9, r=0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = 0
    for layer in mazo_layers(model).values():
        expected += layer.out_features * math.ceil(0.1 * layer.in_features)
    assert trainable == expected
