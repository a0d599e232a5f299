"""peft's generic tuner tests, run on MaZO's dense mode (r = 0) and LoRA mode (r = 8).

Mirrors the `_test_*` checks of peft's `tests/testing_common.py` that apply to a custom tuner, and the per-method
checks of `tests/test_custom_models.py` / `tests/test_decoder_models.py` built on them:

- attributes and names: `_test_model_attr`, `_test_adapter_name`, `test_in_features_out_features_exposed`,
  `test_active_adapter`;
- saving and loading: `_test_save_pretrained` (safetensors and `safe_serialization=False`),
  `_test_save_pretrained_selected_adapters`, `_test_save_pretrained_adapter_name_substring`,
  `_test_from_pretrained_config_construction`, `_test_load_multiple_adapters`, `_test_load_model_low_cpu_mem_usage`,
  `_test_peft_model_device_map`, `test_parameters_after_loading_model`, `test_save_load_roundtrip`,
  `test_loading_model_requires_grad_set_correctly` (and its `modules_to_save` variant);
- merging: `_test_merge_layers`, `_test_safe_merge`, `_test_merge_layers_is_idempotent`, `_test_merge_layers_nan`,
  `_test_merge_layers_multi`, `test_multiple_active_adapters_forward` / `_merge_and_unmerge`,
  `test_sequential_merge_matches_batch_merge`, `test_unmerge_after_sequential_merge_restores_base`,
  `test_delete_merged_adapter_raises_without_mutation` / `_only_rejects_the_merged_one`;
- half precision: `test_forward_float16` / `_bfloat16` (with and without adapter autocast), `_test_merge_layers_fp16`,
  `_test_generate_half_prec` (the dtype matrix of `test_adapter_dtype_autocast` is in `test_adapter_dtype.py`);
- disabling, deleting, unloading: `_test_disable_adapter`, `test_disable_adapters`,
  `test_disable_adapters_with_merging`, `test_disable_adapters_exiting_context_restores_previous_state` /
  `_irregular_state`, `_test_delete_adapter`, `_test_delete_inactive_adapter`,
  `test_delete_adapter_properly_cleans_up_after_itself`, `_test_delete_unknown_adapter_raises`,
  `_test_unload_adapter`, `_test_get_base_model_state_dict`;
- training: `_test_training`, `test_only_params_are_updated`, `_test_training_layer_indexing`,
  `_test_training_gradient_checkpointing`, `_test_prepare_for_training` (`prepare_model_for_kbit_training`),
  `test_set_requires_grad`, `test_requires_grad_modules_to_save_*`, plus `inference_mode`,
  `get_nb_trainable_parameters` and `_mark_only_adapters_as_trainable`;
- forward variants: `_test_generate`, `_test_generate_pos_args`, `_test_passing_input_embeds_works`,
  `_test_lora_conversion`;
- refused, with the reason: `_test_mixed_adapter_batches` and
  `_test_generate_with_mixed_adapter_batches_and_beam_search` (`adapter_names=`),
  `_test_weighted_combination_of_adapters` (`add_weighted_adapter`).

Not applicable: prompt-learning tests, `_test_adding_multiple_adapters_with_bias_raises` (MaZOConfig refuses
`bias` other than "none", see `test_config.py`), trainable tokens.

A new MaZO adapter is the identity (dense values and LoRA B start at zero); tests that need an adapter that changes
the output create it with `init_weights=False` (a random non-zero delta), as peft's tests do with `init_lora_weights`.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.lora.conversion import convert_to_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.save_and_load import get_base_model_state_dict, set_base_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from peft_mazo import MaZOConfig, MaZOLayer
from tests.helpers import bitwise_equal, make_tiny_llama


MODES = {"dense": dict(sparsity=0.5, r=0), "lora": dict(sparsity=0.5, r=8)}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 3 layers per decoder layer, 6 in all
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
ADAPTER_TENSORS = {
    "dense": ("mazo_values", "mazo_columns", "mazo_shape"),
    "lora": ("mazo_A", "mazo_B", "mazo_bits", "mazo_shape"),
}


@pytest.fixture(params=list(MODES))
def mode(request) -> str:
    return request.param


def config(mode: str, **kwargs) -> MaZOConfig:
    return MaZOConfig(**{"target_modules": TARGETS, **MODES[mode], **kwargs})


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def tuner_layers(model) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_params(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "mazo_" in n and n.endswith(f".{adapter}")}


def sgd_steps(model, steps: int = 3, lr: float = 0.5) -> None:
    """Backprop training of whatever requires grad, on the language-model loss of IDS."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------------------------
# attributes and names
# ---------------------------------------------------------------------------------------------------------------------
def test_model_attributes_adapter_name_and_layer_features(mode):
    model = get_peft_model(make_tiny_llama(), config(mode), adapter_name="test-adapter")
    for attribute in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(model, attribute)
    names = [n for n, _ in model.named_parameters() if "test-adapter" in n]
    assert len(names) == 6 * (1 if mode == "dense" else 2)
    layers = tuner_layers(model)
    assert len(layers) == 6
    for layer in layers:
        base = layer.get_base_layer()
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)


def test_active_adapter(mode):
    model = get_peft_model(make_tiny_llama(), config(mode))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.add_adapter("other", config(mode))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    assert model.active_adapters == ["other"] and model.active_adapter == "other"
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    assert model.base_model.active_adapter == ["default", "other"]
    assert all(layer.active_adapters == ["default", "other"] for layer in tuner_layers(model))


# ---------------------------------------------------------------------------------------------------------------------
# saving and loading
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_pretrained_and_from_pretrained_round_trip(mode, safe_serialization, tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # a real name_or_path, as from the hub
    model = get_peft_model(base, config(mode, base_model_name_or_path=str(tiny_model_dir)))
    sgd_steps(model)  # a trained adapter, not its initial values
    expected = logits(model)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)

    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    files = {p.name for p in tmp_path.iterdir()}
    assert weights in files and "adapter_config.json" in files
    assert not {"model.safetensors", "config.json", "pytorch_model.bin"} & files
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^library_name: peft$", readme, re.MULTILINE)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == model.config.to_dict()["_name_or_path"] == str(tiny_model_dir)

    torch.manual_seed(54321)  # another seed than at creation: nothing may come from the initialisation
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert not any("missing adapter keys" in str(r.message) for r in records)
    assert bitwise_equal(model.state_dict(), loaded.state_dict())
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
def test_save_pretrained_selected_adapters(mode, safe_serialization, tmp_path):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False))
    model.add_adapter("new_adapter", config(mode, init_weights=False, sparsity=0.25))
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    for folder in (tmp_path, tmp_path / "new_adapter"):
        assert (folder / weights).is_file() and (folder / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()

    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    result = loaded.load_adapter(tmp_path / "new_adapter", "new_adapter")
    assert not result.missing_keys and not result.unexpected_keys
    assert bitwise_equal(model.state_dict(), loaded.state_dict())
    assert loaded.peft_config["new_adapter"].sparsity == 0.25

    only_default = tmp_path / "only_default"
    model.save_pretrained(only_default, selected_adapters=["default"])
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), only_default)
    assert set(reloaded.peft_config) == {"default"}
    assert not (only_default / "new_adapter").exists()


def test_save_selected_adapter_whose_name_is_a_substring_of_others(mode, tmp_path):
    model = get_peft_model(make_tiny_llama(), config(mode))
    expected = len(get_peft_model_state_dict(model))
    assert expected == 6 * len(ADAPTER_TENSORS[mode])
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        model.add_adapter(name, config(mode))
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == expected


def test_from_pretrained_with_a_config_object(mode, tmp_path):
    get_peft_model(make_tiny_llama(), config(mode)).save_pretrained(tmp_path)
    given = config(mode)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, is_trainable=False, config=given)
    assert loaded.peft_config["default"] is given
    assert given.inference_mode


def test_load_several_adapters_low_cpu_mem_usage_and_device_map(mode, tmp_path):
    source = get_peft_model(make_tiny_llama(), config(mode, init_weights=False))
    expected = logits(source)
    source.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    first = loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    second = loaded.load_adapter(tmp_path, adapter_name="yet-another")
    assert first.missing_keys == [] and second.missing_keys == []
    devices = {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]}
    assert devices == {"cpu"}  # nothing left on the meta device
    assert torch.equal(logits(loaded), expected)
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded), expected)
    loaded.set_adapter("yet-another")
    assert torch.equal(logits(loaded), expected)

    mapped = PeftModel.from_pretrained(make_tiny_llama(), tmp_path, device_map={"": "cpu"})
    assert torch.equal(logits(mapped), expected)

    injected = make_tiny_llama()
    inject_adapter_in_model(config(mode), injected, low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}


ADAPTER_SLOT = re.compile(r"^(?P<module>.*)\.(?:mazo_\w+|lora_[AB]|modules_to_save)\.(?P<adapter>[^.]+)(?:\.weight)?$")


def trainable_slots(model) -> set[tuple[str, str]]:
    """(module, adapter) of every parameter that requires grad, whatever the method calls its tensors
    (("lm_head", "default") for a modules_to_save copy, (name, "<base>") for a base parameter)."""
    slots = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            match = ADAPTER_SLOT.match(name)
            slots.add((match["module"], match["adapter"]) if match else (name, "<base>"))
    return slots


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_sets_requires_grad_as_peft_lora_does(mode, is_trainable, tmp_path):
    # the same requires_grad pattern as peft's own LoRA on the same model (what load_adapter makes trainable has
    # changed between peft versions), and never a base parameter
    def loaded(peft_config, folder):
        get_peft_model(make_tiny_llama(), peft_config).save_pretrained(folder)
        model = PeftModel.from_pretrained(make_tiny_llama(), folder, is_trainable=is_trainable)
        first = trainable_slots(model)
        model.load_adapter(folder, adapter_name="other", is_trainable=is_trainable)  # not activated
        return first, trainable_slots(model)

    mazo = loaded(config(mode, modules_to_save=["lm_head"]), tmp_path / "mazo")
    lora = loaded(LoraConfig(r=8, target_modules=TARGETS, modules_to_save=["lm_head"]), tmp_path / "lora")
    assert mazo == lora
    first, second = mazo
    if is_trainable:
        assert ("base_model.model.lm_head", "default") in first and len(first) == 7
        assert first <= second
    else:
        assert first == second == set()
    assert not any(adapter == "<base>" for _, adapter in second)


def test_peft_model_state_dict_keys_and_set_round_trip(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False))
    state = get_peft_model_state_dict(model)
    layers = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MaZOLayer)}
    expected = {f"base_model.model.{layer}.{kind}" for layer in layers for kind in ADAPTER_TENSORS[mode]}
    assert set(state) == expected  # no adapter name in the keys, no base weight

    other = get_peft_model(make_tiny_llama(), config(mode))
    assert not torch.equal(logits(other), logits(model))
    result = set_peft_model_state_dict(other, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "mazo_" in k]
    assert torch.equal(logits(other), logits(model))


# ---------------------------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------------------------
def test_merge_unmerge_merge_and_unload_and_the_merged_model_saves(mode, tmp_path):
    base = make_tiny_llama()
    base_logits = logits(base)
    original = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, config(mode, init_weights=False)).eval()
    adapted = logits(model)
    assert not close(adapted, base_logits, 1e-4)

    model.merge_adapter()
    assert all(layer.merged for layer in tuner_layers(model))
    assert close(logits(model), adapted)
    model.unmerge_adapter()
    assert not any(layer.merged for layer in tuner_layers(model))
    assert close(logits(model), adapted)
    restored = get_base_model_state_dict(model)
    assert all(torch.allclose(restored[k], original[k], rtol=0, atol=1e-6) for k in original)

    merged = model.merge_and_unload(safe_merge=True)
    assert isinstance(merged, LlamaForCausalLM)
    assert not tuner_layers(merged) and not hasattr(merged, "peft_config")
    assert close(logits(merged), adapted)
    assert not close(logits(merged), base_logits, 1e-4)

    save_file(merged.state_dict(), tmp_path / "state.safetensors")  # contiguous tensors
    merged.save_pretrained(tmp_path / "merged")
    assert close(logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged")), adapted)


def test_merging_twice_warns_and_changes_nothing(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False)).eval()
    model.merge_adapter()
    once = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    assert torch.equal(logits(model), once)
    assert bitwise_equal(weights, {n: p.detach() for n, p in model.named_parameters()})


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_refuses_non_finite_adapter_and_leaves_the_base_as_it_was(mode, value):
    base = make_tiny_llama()
    original = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, config(mode, init_weights=False))
    with torch.no_grad():
        for param in adapter_params(model).values():
            param[0] = value
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_and_unload(safe_merge=True)
    assert all(layer.merged_adapters == [] for layer in tuner_layers(model))
    assert bitwise_equal(get_base_model_state_dict(model), original)


def test_two_adapters_merge_separately_together_and_in_sequence(mode):
    base = make_tiny_llama()
    base_logits = logits(base)
    torch.manual_seed(0)
    model = get_peft_model(base, config(mode, init_weights=False)).eval()
    first = logits(model)
    torch.manual_seed(1)
    model.add_adapter("adapter-2", config(mode, init_weights=False, target_modules=["k_proj", "v_proj"]))
    counted = [m for m in model.modules() if isinstance(m, (torch.nn.ParameterDict, torch.nn.ModuleDict))]
    assert sum("adapter-2" in m for m in counted) == 2 * 2 * (1 if mode == "dense" else 2)  # v_proj, k_proj
    model.set_adapter("adapter-2")
    second = logits(model)
    model.base_model.set_adapter(["default", "adapter-2"])
    both = logits(model)
    for a, b in ((first, second), (first, both), (second, both), (base_logits, first)):
        assert not close(a, b, 1e-3)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)

    assert close(logits(copy.deepcopy(model).merge_and_unload(adapter_names=["adapter-2"])), second)
    assert close(logits(copy.deepcopy(model).merge_and_unload(adapter_names=["default"])), first)
    assert close(logits(copy.deepcopy(model).merge_and_unload(adapter_names=["adapter-2", "default"])), both)

    model.base_model.set_adapter(["default", "adapter-2"])
    sequential = copy.deepcopy(model)
    model.merge_adapter()  # both active adapters at once
    assert close(logits(model), both)
    sequential.merge_adapter(["default"])
    with pytest.warns(UserWarning, match="You are now additionally merging adapter-2"):
        sequential.merge_adapter(["adapter-2"])
    assert close(logits(sequential), logits(model))
    sequential.unmerge_adapter()
    with sequential.disable_adapter():
        assert close(logits(sequential), base_logits)


def test_a_merged_adapter_cannot_be_deleted_and_nothing_changes(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False), adapter_name="adapter0")
    model.add_adapter("adapter1", config(mode, init_weights=False))
    model.set_adapter("adapter1")
    model.merge_adapter()
    layers = tuner_layers(model)
    merged = [layer.merged_adapters[:] for layer in layers]
    available = [layer._all_available_adapter_names() for layer in layers]
    message = "Cannot delete adapter(s) ['adapter1'] while they are merged. Please unmerge them first."
    with pytest.raises(ValueError, match=re.escape(message)):
        model.delete_adapter("adapter1")
    assert set(model.peft_config) == {"adapter0", "adapter1"}
    assert [layer.merged_adapters for layer in layers] == merged
    assert [layer._all_available_adapter_names() for layer in layers] == available
    model.delete_adapter("adapter0")  # the unmerged one can go
    assert [layer.merged_adapters for layer in layers] == merged
    model.unmerge_adapter()
    model.delete_adapter("adapter1")
    assert not model.peft_config


# ---------------------------------------------------------------------------------------------------------------------
# half precision
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward_merge_unmerge_and_generate(mode, dtype, autocast_adapter_dtype):
    model = get_peft_model(
        make_tiny_llama().to(dtype), config(mode, init_weights=False), autocast_adapter_dtype=autocast_adapter_dtype
    ).eval()
    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype
    assert {p.dtype for p in adapter_params(model).values()} == {adapter_dtype}
    adapted = logits(model)
    assert adapted.dtype == dtype and torch.isfinite(adapted).all()
    with model.disable_adapter():
        assert not close(logits(model), adapted, 1e-2)

    outputs = []
    for safe_merge in (False, True):
        model.merge_adapter(safe_merge=safe_merge)
        outputs.append(logits(model))
        model.unmerge_adapter()
        outputs.append(logits(model))
    merged = model.merge_and_unload()
    outputs.append(logits(merged))
    if autocast_adapter_dtype:  # merging rounds W + ΔW once, as the forward does
        assert torch.equal(outputs[0], adapted)
    for output in outputs:  # unmerging rounds once more in the half type
        assert output.dtype == dtype and torch.isfinite(output).all()
        assert close(output, adapted, 2e-2)

    ids = torch.LongTensor([[1, 1, 1], [2, 1, 2]])
    mask = torch.LongTensor([[1, 1, 1], [1, 0, 1]])
    generated = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 6)


# ---------------------------------------------------------------------------------------------------------------------
# disabling, deleting, unloading
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapter_gives_the_base_model_before_and_after_training(mode, merged):
    base = make_tiny_llama()
    before = logits(base)
    model = get_peft_model(base, config(mode))
    assert torch.equal(logits(model), before)  # a new adapter is the identity
    sgd_steps(model)
    after = logits(model)
    assert not close(after, before, 1e-4)
    if merged:
        model.merge_adapter()
        assert close(logits(model), after)
    with model.disable_adapter():
        disabled = logits(model)
        assert not any(layer.merged for layer in tuner_layers(model))  # disabling unmerges
    assert close(disabled, before, 1e-5 if merged else 0)
    assert close(logits(model), after)


def test_disable_adapter_keeps_generation_scores_of_the_base(mode):
    base = make_tiny_llama()
    kwargs = dict(input_ids=IDS[:2, :5], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    expected = base.generate(**kwargs, output_scores=True).scores[0]
    model = get_peft_model(base, config(mode, init_weights=False))
    adapted = model.generate(**kwargs, output_scores=True).scores[0]
    assert not close(adapted, expected, 1e-4)
    with model.disable_adapter():
        assert close(model.generate(**kwargs, output_scores=True).scores[0], expected, 1e-6)
    assert close(model.generate(**kwargs, output_scores=True).scores[0], adapted, 1e-6)


def test_leaving_disable_adapter_restores_the_layers_state(mode):
    model = get_peft_model(make_tiny_llama(), config(mode))
    layers = tuner_layers(model)
    with model.disable_adapter():
        assert all(layer.disable_adapters for layer in layers)
    assert not any(layer.disable_adapters for layer in layers)
    model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert all(layer.disable_adapters for layer in layers)
    model.enable_adapter_layers()
    layers[0].enable_adapters(False)  # an irregular state: some layers on, some off
    msg = "The model contains some adapter layers that are enabled and others that are disabled"
    with pytest.warns(UserWarning, match=msg), model.disable_adapter():
        pass
    assert not any(layer.disable_adapters for layer in layers)


def dict_like_attributes_holding(obj, name: str) -> list[str]:
    """Public attributes of `obj` that are dicts (or sets) and hold `name`, as peft's
    test_delete_adapter_properly_cleans_up_after_itself finds them, sets added (MaZO keeps one)."""
    found = []
    for attribute in dir(obj):
        if attribute.startswith("_"):
            continue
        try:
            value = getattr(obj, attribute)
        except AttributeError:
            continue
        if (callable(getattr(value, "keys", None)) or isinstance(value, (set, frozenset))) and hasattr(
            value, "__contains__"
        ):
            if name in value:
                found.append(attribute)
    return found


@pytest.mark.parametrize("activate", [True, False], ids=["active", "inactive"])
def test_delete_adapter_removes_all_its_state(mode, activate):
    # scorer="mazo" (the default): the data-driven mask is pending until compute_importance runs
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False))
    expected = logits(model)
    model.add_adapter("delete_me", config(mode, init_weights=False))
    if activate:
        model.set_adapter("delete_me")
    layers = tuner_layers(model)
    holding = {id(layer): dict_like_attributes_holding(layer, "delete_me") for layer in layers}
    assert all("mazo_mask_pending" in attrs and "mazo_k" in attrs for attrs in holding.values())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model.delete_adapter("delete_me")
    assert any("Setting active adapter to default" in str(r.message) for r in records) == activate
    assert "delete_me" not in model.peft_config
    assert model.active_adapters == ["default"]
    for layer in layers:
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            assert "delete_me" not in getattr(layer, attribute), attribute
        assert dict_like_attributes_holding(layer, "delete_me") == []
    assert torch.equal(logits(model), expected)

    model.delete_adapter("default")  # the last one
    assert "default" not in model.peft_config and model.active_adapters == []
    assert all(dict_like_attributes_holding(layer, "default") == [] for layer in layers)
    model.base_model(input_ids=IDS)  # the tuner still runs (PeftModel itself needs an adapter)


def test_deleting_an_unknown_adapter_raises(mode):
    model = get_peft_model(make_tiny_llama(), config(mode))
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")


def test_unload_returns_the_base_model(mode):
    base = make_tiny_llama()
    expected = logits(base)
    keys = len(base.state_dict())
    model = get_peft_model(base, config(mode, init_weights=False))
    assert not close(logits(model), expected, 1e-4)
    unloaded = model.unload()
    assert not tuner_layers(unloaded) and not hasattr(unloaded, "peft_config")
    assert len(unloaded.state_dict()) == keys
    assert torch.equal(logits(unloaded), expected)


def test_base_model_state_dict_get_and_set(mode):
    base = make_tiny_llama()
    original = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, config(mode, init_weights=False))
    extracted = get_base_model_state_dict(model)
    assert bitwise_equal(extracted, original)
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            if not param.requires_grad:
                param.add_(0.1)
    assert not bitwise_equal(get_base_model_state_dict(model), original)
    result = set_base_model_state_dict(model, original, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert bitwise_equal(get_base_model_state_dict(model), original)


# ---------------------------------------------------------------------------------------------------------------------
# training and requires_grad
# ---------------------------------------------------------------------------------------------------------------------
def test_backprop_updates_every_adapter_tensor_and_modules_to_save_only(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, modules_to_save=["lm_head"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model)) | {"base_model.model.lm_head.modules_to_save.default.weight"}
    model.zero_grad(set_to_none=True)

    sgd_steps(model)
    for name, param in model.named_parameters():
        if name in trainable:  # LoRA A moves from the second step on, once B is non-zero
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_trainable_parameter_counts_inference_mode_and_mark_only_adapters(mode, capsys):
    base = make_tiny_llama()
    total_base = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, config(mode, modules_to_save=["lm_head"]))
    adapter = sum(p.numel() for p in adapter_params(model).values())
    head = model.base_model.model.lm_head.modules_to_save["default"].weight.numel()
    assert model.get_nb_trainable_parameters() == (adapter + head, total_base + adapter + head)
    model.print_trainable_parameters()
    assert f"trainable params: {adapter + head:,}" in capsys.readouterr().out

    plain = get_peft_model(make_tiny_llama(), config(mode))
    for param in plain.parameters():
        param.requires_grad_(True)
    plain.base_model._mark_only_adapters_as_trainable(plain.base_model.model)
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == set(adapter_params(plain))

    frozen = get_peft_model(make_tiny_llama(), config(mode, inference_mode=True))
    assert not any(p.requires_grad for p in frozen.parameters())


def test_set_requires_grad_per_adapter(mode):
    model = get_peft_model(make_tiny_llama(), config(mode), adapter_name="adapter0")
    model.add_adapter("adapter1", config(mode, modules_to_save=["lm_head"]))

    def grads(adapter):
        params = [p for n, p in model.named_parameters() if n.endswith(f".{adapter}") or f".{adapter}." in n]
        assert params
        return {p.requires_grad for p in params}

    assert grads("adapter0") == {True} and grads("adapter1") == {False}
    model.set_requires_grad(adapter_names="adapter1")
    assert grads("adapter0") == {True} and grads("adapter1") == {True}
    model.set_requires_grad(adapter_names=["adapter0", "adapter1"], requires_grad=False)
    assert grads("adapter0") == {False} and grads("adapter1") == {False}


def test_modules_to_save_trains_a_copy_and_saves_it(mode, tmp_path):
    base = make_tiny_llama()
    head = base.lm_head.weight.detach().clone()
    model = get_peft_model(base, config(mode, modules_to_save=["lm_head"]))
    wrapper = model.base_model.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert not wrapper.original_module.weight.requires_grad
    assert wrapper.modules_to_save["default"].weight.requires_grad
    sgd_steps(model)
    assert torch.equal(wrapper.original_module.weight, head)
    trained = logits(model)
    model.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.modules_to_save.default.weight" not in load_file(
        tmp_path / "adapter_model.safetensors"
    )  # saved under the module's own name
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), trained)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded), logits(make_tiny_llama()))


def test_layers_to_transform_trains_fewer_tensors_and_round_trips(mode, tmp_path):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False, layers_to_transform=[0]))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_params(model)) and all(".layers.0." in n for n in with_grad)
    everywhere = get_peft_model(make_tiny_llama(), config(mode))
    assert len(with_grad) < len(adapter_params(everywhere))
    model.eval()
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_llama(), tmp_path)), logits(model))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(mode, use_reentrant):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    (model(input_ids=IDS).logits ** 2).sum().backward()
    plain = {n: p.grad.clone() for n, p in params.items()}
    assert all(g.abs().sum() > 0 for g in plain.values())
    model.zero_grad(set_to_none=True)

    model.prepare_model_for_gradient_checkpointing(model)
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    (model(input_ids=IDS).logits ** 2).sum().backward()
    for name, param in model.named_parameters():
        if name in params:
            torch.testing.assert_close(param.grad, plain[name], rtol=1e-4, atol=1e-6)
        else:
            assert param.grad is None, name


def test_prepare_model_for_kbit_training(mode):
    model = get_peft_model(make_tiny_llama(), config(mode))
    assert not model.get_input_embeddings()(IDS).requires_grad

    prepared = prepare_model_for_kbit_training(make_tiny_llama())
    assert not any(p.requires_grad for p in prepared.parameters())
    model = get_peft_model(prepared, config(mode))
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(IDS).requires_grad
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == adapter_params(model).keys()
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in trainable.values())


# ---------------------------------------------------------------------------------------------------------------------
# forward variants, and what MaZO refuses
# ---------------------------------------------------------------------------------------------------------------------
def test_generate_keyword_and_positional_and_inputs_embeds(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False)).eval()
    by_keyword = model.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False)
    by_position = model.generate(IDS[:1], max_new_tokens=3, do_sample=False)
    assert by_keyword.shape == (1, 13) and torch.equal(by_keyword, by_position)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(IDS)).logits
    torch.testing.assert_close(from_embeds, logits(model))


def test_mixed_adapter_batches_are_refused(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False), adapter_name="adapter0").eval()
    model.add_adapter("adapter1", config(mode, init_weights=False))
    expected = logits(model)
    adapter_names = ["__base__", "adapter0", "adapter1"]
    with pytest.raises(ValueError, match="MaZO does not support mixed adapter batches"):
        model(input_ids=IDS, adapter_names=adapter_names)
    with pytest.raises(ValueError, match="MaZO does not support mixed adapter batches"):
        model.generate(input_ids=IDS, adapter_names=adapter_names, max_new_tokens=2, num_beams=2)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="MaZO does not support mixed adapter batches"):
        layer(torch.randn(3, 64), adapter_names=adapter_names)
    with pytest.raises(ValueError, match="aLoRA"):
        model(input_ids=IDS, alora_offsets=[1, 1, 1])
    assert torch.equal(logits(model), expected)  # nothing changed
    assert torch.equal(model(input_ids=IDS, adapter_names=None).logits, expected)


def test_weighted_combination_of_adapters_is_refused(mode):
    model = get_peft_model(make_tiny_llama(), config(mode), adapter_name="adapter1")
    model.add_adapter("adapter_2", config(mode))
    with pytest.raises(NotImplementedError, match="does not combine adapters into a new weighted adapter"):
        model.add_weighted_adapter(["adapter1", "adapter_2"], [0.5, 1.5], "combined")
    assert set(model.peft_config) == {"adapter1", "adapter_2"}


def test_conversion_to_lora(mode):
    model = get_peft_model(make_tiny_llama(), config(mode, init_weights=False)).eval()
    assert model.supports_lora_conversion()
    with torch.no_grad():
        with model.disable_adapter():
            base_hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        adapted_hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    lora_config, state = convert_to_lora(model, rank=1.0)  # every singular value: exact
    converted = get_peft_model(make_tiny_llama(), lora_config).eval()
    result = set_peft_model_state_dict(converted, state)
    assert not result.unexpected_keys
    with torch.no_grad():
        converted_hidden = converted(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(converted_hidden, adapted_hidden, rtol=1e-4, atol=1e-4)
    assert not close(converted_hidden, base_hidden, 1e-3)
