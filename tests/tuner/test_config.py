"""MaZOConfig validation: every bad value names the field and what is allowed."""

import pytest
from peft import PeftModel, get_peft_model

from peft_mazo import MaZOConfig, MaZOLayer
from tests.helpers import make_tiny_llama


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": "high"}, "sparsity must be a number"),
        ({"r": -1}, r"r must be an integer >= 0"),
        ({"r": 2.5}, r"r must be an integer >= 0"),
        ({"scorer": "fisher"}, r"scorer must be one of \('mazo', 'wanda', 'magnitude', 'random', 'none'\)"),
        ({"delta_dtype": "bfloat16"}, r"delta_dtype must be one of \('float32', 'float64'\)"),
        ({"r": 0, "lora_alpha": 16}, "lora_alpha is set but r = 0"),
        ({"r": 8, "lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"alpha": -1}, "alpha must be a number >= 0"),
        ({"layers_pattern": "layers"}, "layers_pattern only applies with layers_to_transform"),
    ],
)
def test_bad_config_raises_value_error_naming_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaZOConfig(**kwargs)


def test_defaults_follow_the_paper_and_peft_conventions():
    config = MaZOConfig()  # MaZO LoRA, the paper's best-scoring variant and `mazo train`'s default method
    assert (config.sparsity, config.r, config.lora_alpha, config.alpha, config.beta) == (0.8, 64, 64.0, 10.0, 1.0)
    assert config.target_modules == "all-linear"
    assert config.peft_type == "MAZO"
    from peft_mazo.methods import get_method

    assert get_method("mazo-lora").adapter_config() == {"scorer": "mazo", "r": config.r, "sparsity": config.sparsity}


@pytest.mark.parametrize(
    "kwargs, sparsity", [({}, 0.8), ({"r": 8}, 0.8), ({"r": 0}, 0.9), ({"r": 0, "sparsity": 0.5}, 0.5)]
)
def test_default_sparsity_is_the_papers_for_the_mode(kwargs, sparsity):
    assert MaZOConfig(**kwargs).sparsity == sparsity


def test_scorer_none_by_default_keeps_every_entry_without_a_warning(recwarn):
    assert MaZOConfig(scorer="none").sparsity == 0.0
    assert not [w for w in recwarn if "is ignored" in str(w.message)]


@pytest.mark.parametrize("mode", [{"r": 0}, {"r": 8, "sparsity": 0.5}, {}])
def test_saved_configs_hold_r_and_sparsity_so_defaults_never_change_a_load(mode, tmp_path):
    """A saved adapter_config.json states r, sparsity and lora_alpha: loading passes them back, so a change of the
    defaults (r was 0 before MaZO LoRA became the default) cannot turn a saved adapter into another mode."""
    import json

    get_peft_model(make_tiny_llama(), MaZOConfig(**mode)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    config = MaZOConfig(**mode)
    assert (saved["r"], saved["sparsity"], saved["lora_alpha"]) == (config.r, config.sparsity, config.lora_alpha)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path).peft_config["default"]
    assert (loaded.r, loaded.sparsity, loaded.lora_alpha) == (config.r, config.sparsity, config.lora_alpha)


def test_an_adapter_saved_with_the_old_dense_default_loads_as_dense(tmp_path):
    """What a run saved when r=0 was the default: its file says r = 0 and sparsity = 0.9, and it loads as that."""
    import json

    get_peft_model(make_tiny_llama(), MaZOConfig(r=0)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["sparsity"], saved["lora_alpha"]) == (0, 0.9, None)
    loaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].r == 0
    assert any("mazo_values" in name for name, _ in loaded.named_parameters())  # the dense delta, not LoRA's A, B


def test_scorer_none_warns_that_sparsity_is_ignored():
    with pytest.warns(UserWarning, match="sparsity=0.8 is ignored"):
        config = MaZOConfig(scorer="none", sparsity=0.8)
    assert config.effective_sparsity == 0.0


def test_list_target_modules_become_a_set():
    assert MaZOConfig(target_modules=["q_proj", "v_proj"]).target_modules == {"q_proj", "v_proj"}


def test_peft_lora_options_are_accepted_or_refused_with_the_reason(tmp_path):
    assert MaZOConfig(r=4, init_lora_weights=False).init_weights is False  # alias of init_weights
    for kwargs, match in [
        (dict(lora_dropout=0.1), "dropout would make them differ"),
        (dict(bias="all"), "not biases"),
        (dict(fan_in_fan_out=True), "Conv1D"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern is not supported"),
        (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern is not supported"),
        (dict(init_lora_weights="pissa"), "other initialisations"),
    ]:
        with pytest.raises(ValueError, match=match):
            MaZOConfig(r=4, **kwargs)
    excluded = "model.layers.0.self_attn.q_proj"
    model = get_peft_model(make_tiny_llama(), MaZOConfig(r=4, init_weights=False, exclude_modules=[excluded]))
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, MaZOLayer)}
    assert excluded not in adapted and "model.layers.0.self_attn.k_proj" in adapted
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path)  # the excluded layer is not "missing"
    assert {n.removeprefix("base_model.model.") for n, m in reloaded.named_modules() if isinstance(m, MaZOLayer)} == (
        adapted
    )
