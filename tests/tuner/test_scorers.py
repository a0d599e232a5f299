"""The scorer registry (`peft_mazo.scorers`): every scorer by name, one interface, and the policy read from it."""

import ast
import typing

import pytest
import torch
from peft import get_peft_model

from peft_mazo import MaZOConfig
from peft_mazo.mask import kept_per_row
from peft_mazo.scorers import SCORERS, get_scorer
from tests.helpers import ROOT, make_mlp


PACKAGE = ROOT / "peft_mazo"
SPARSITY = 0.75


def mlp_model(name):
    sparsity = SPARSITY if get_scorer(name).masked else 0.0  # "none" would warn that a sparsity is ignored
    return get_peft_model(make_mlp(), MaZOConfig(sparsity=sparsity, target_modules=["lin0", "lin1"], scorer=name))


def calibration_batches(n_batches=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(4, 8, 64, generator=gen) + 0.5} for _ in range(n_batches)]


@pytest.mark.parametrize("name", list(SCORERS))
def test_every_scorer_builds_a_mask_of_the_right_shape(name):
    scorer = get_scorer(name)
    assert scorer is SCORERS[name] and scorer.name == name
    model = mlp_model(name)
    config = model.peft_config["default"]
    layers = model.base_model._mazo_layers()
    for module_key, layer in layers.items():
        base = layer.get_base_layer()
        shape = (base.out_features, base.in_features)
        assert layer.is_masked("default") == scorer.masked
        assert ("default" in layer.mazo_mask_pending) == scorer.needs_data
        if not scorer.masked:  # "none": no mask, the delta covers every entry
            assert scorer.initial_scores is None and layer.mazo_k["default"] == base.in_features
            assert layer.get_mask("default").all()
            continue
        assert scorer.initial_scores(base, config, module_key).shape == shape
        mask = layer.get_mask("default")
        assert mask.shape == shape and mask.sum(dim=1).eq(kept_per_row(base.in_features, SPARSITY)).all()

    report = model.compute_importance(calibration_batches() if scorer.needs_data else None, progress=False)
    assert report.scorer == name
    for layer in layers.values():
        base = layer.get_base_layer()
        mask = layer.get_mask("default")
        assert mask.shape == (base.out_features, base.in_features)
        assert "default" not in layer.mazo_mask_pending
        if scorer.masked:
            assert mask.sum(dim=1).eq(kept_per_row(base.in_features, SPARSITY)).all()


def test_data_driven_and_data_free_scorers_have_the_parts_they_need():
    for scorer in SCORERS.values():
        if scorer.needs_data:
            assert scorer.masked and scorer.statistics in ("moments", "squares")
            assert callable(scorer.task_vectors) and callable(scorer.task_scores)
        else:
            assert scorer.task_vectors is None and scorer.task_scores is None
    assert [name for name, scorer in SCORERS.items() if scorer.needs_data] == ["mazo", "wanda"]
    assert [name for name, scorer in SCORERS.items() if not scorer.masked] == ["none"]


def test_unknown_scorer_is_refused_naming_the_known_ones():
    for bad in ("fisher", None, ["mazo"]):
        with pytest.raises(ValueError, match="known scorers are") as error:
            get_scorer(bad)
        assert all(repr(name) in str(error.value) for name in SCORERS)
    with pytest.raises(ValueError, match=r"scorer must be one of \('mazo', 'wanda', 'magnitude', 'random', 'none'\)"):
        MaZOConfig(scorer="fisher")


def test_config_names_the_registered_scorers():
    assert typing.get_args(typing.get_type_hints(MaZOConfig)["scorer"]) == tuple(SCORERS)


def package_imports(module: str) -> set[str]:
    """The peft_mazo modules that the top-level module `module` imports anywhere in it (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "peft_mazo"):
            from_package = node.module is None or node.module == "peft_mazo"
            names |= {alias.name for alias in node.names} if from_package else {node.module}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peft_mazo."):
            names.add(node.module.removeprefix("peft_mazo."))
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("peft_mazo.") for a in node.names if a.name.startswith("peft_mazo.")}
    return names


def test_registry_sits_below_config_and_layer():
    """config and layer consult the registry, so it (and the formulas it uses) must not reach back into them or
    into the mask search, even lazily; and config and layer never import the mask search."""
    assert package_imports("scorers") == {"quantized", "scores"}
    assert package_imports("scores") == set()
    assert "scorers" in package_imports("config") and "scorers" in package_imports("layer")
    for module in ("config", "layer"):
        assert not any(name.split(".")[0] == "importance" for name in package_imports(module)), module
