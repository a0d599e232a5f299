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
