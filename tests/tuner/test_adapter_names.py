"""Adapter names: a second adapter under an existing name is refused before anything changes; `load_adapter` under an
existing name fills that adapter (as the Trainer's resume does) only with weights that fit it."""

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from peft_mazo import MaZOConfig
from tests.helpers import make_tiny_llama


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def model():
    return get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.8, r=4, init_weights=False))


def test_add_adapter_under_an_existing_name_is_refused(model):
    before, config = snapshot(model), model.peft_config["default"]
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", MaZOConfig(sparsity=0.5))
    assert_unchanged(model, before)
    assert model.peft_config["default"] is config


def test_injecting_an_existing_name_through_the_tuner_is_refused(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'default' already exists: 14 MaZO layer\(s\).*choose another adapter_name"):
        model.base_model.inject_adapter(model.base_model.model, "default")
    assert_unchanged(model, before)


def test_inject_adapter_in_model_twice_under_one_name_is_refused():
    base = inject_adapter_in_model(MaZOConfig(sparsity=0.8, init_weights=False), make_tiny_llama())
    before, config = snapshot(base), base.peft_config["default"]
    with pytest.raises(ValueError, match="'default' already exists"):
        inject_adapter_in_model(MaZOConfig(sparsity=0.5), base)
    assert_unchanged(base, before)
    assert base.peft_config["default"] is config  # the new config was not recorded either


def test_a_second_name_is_added(model):
    model.add_adapter("second", MaZOConfig(sparsity=0.5))
    assert set(model.peft_config) == {"default", "second"}


@pytest.mark.parametrize(
    "saved, match",
    [
        (dict(sparsity=0.5, r=4), r"saved with 64 kept entries per row in '.*down_proj', but adapter .* gives k = 26"),
        (dict(sparsity=0.8, r=8), r"LoRA rank r = 8 .* adapter 'default' of this model says r = 4"),
        (dict(sparsity=0.8, r=0), r"dense delta \(mazo_values\) .* says r = 4 \(LoRA\)"),
        (dict(sparsity=0.8, r=4, scorer="none"), r"lacks mazo_bits of"),
        (dict(sparsity=0.8, r=4, target_modules=["q_proj"]), r"holds nothing for 12 of its 14 layer\(s\)"),
    ],
    ids=["sparsity", "rank", "dense", "unmasked", "targets"],
)
def test_load_adapter_into_an_existing_name_it_does_not_fit_is_refused(model, tmp_path, saved, match):
    get_peft_model(make_tiny_llama(), MaZOConfig(init_weights=False, **saved)).save_pretrained(tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as error:
        model.load_adapter(tmp_path, adapter_name="default")
    assert "pass a new adapter_name" in str(error.value)
    assert_unchanged(model, before)


def test_load_adapter_into_an_existing_name_it_fits_replaces_its_weights(model, tmp_path):
    """What `Trainer(resume_from_checkpoint=...)` does: the saved delta and mask replace the adapter's."""
    trained = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.8, r=4, init_weights=False))
    trained.set_masks({n: m.flip(dims=[1]) for n, m in trained.get_masks().items()}, reset=True)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.01)
    trained.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="default")
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items() if ".mazo_" in k)


def test_the_same_adapter_loads_under_a_new_name_next_to_an_existing_one(model, tmp_path):
    get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=0, init_weights=False)).save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="other")
    assert set(model.peft_config) == {"default", "other"}
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    other = model.get_masks("other")
    assert all(torch.equal(m, other[n]) for n, m in loaded.get_masks().items())
