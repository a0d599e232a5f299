"""MaZOConfig validation: every bad value names the field and what is allowed."""

import pytest

from peft_mazo import MaZOConfig


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
        ({"lora_alpha": 16}, "lora_alpha is set but r = 0"),
        ({"r": 8, "lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"alpha": -1}, "alpha must be a number >= 0"),
        ({"layers_pattern": "layers"}, "layers_pattern only applies with layers_to_transform"),
    ],
)
def test_bad_config_raises_value_error_naming_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaZOConfig(**kwargs)


def test_defaults_follow_the_paper_and_peft_conventions():
    config = MaZOConfig()
    assert (config.sparsity, config.r, config.alpha, config.beta) == (0.9, 0, 10.0, 1.0)
    assert config.target_modules == "all-linear"
    assert config.peft_type == "MAZO"
    assert MaZOConfig(r=64).lora_alpha == 64.0


def test_scorer_none_warns_that_sparsity_is_ignored():
    with pytest.warns(UserWarning, match="sparsity=0.8 is ignored"):
        config = MaZOConfig(scorer="none", sparsity=0.8)
    assert config.effective_sparsity == 0.0


def test_list_target_modules_become_a_set():
    assert MaZOConfig(target_modules=["q_proj", "v_proj"]).target_modules == {"q_proj", "v_proj"}
