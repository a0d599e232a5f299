"""Every `mazo methods` entry trains the adapter and the task weighting it names: the runner is run for one step per
method and the optimizer it builds is inspected (so a method that silently fell back to equal weights, no mask, or
another rank would fail here). The expected values are written out from docs/cli.md's table, not read from METHODS."""

from __future__ import annotations

import pytest

from peft_mazo import runner
from peft_mazo.runner import RunConfig, run
from peft_mazo.zo import ZOSGD
from peft_mazo.zo.weighting import CoBaWeighting, EqualWeighting, FAMOWeighting
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")

EXPECTED = {  # method: (scorer, r, sparsity, weighting, default lr)
    "mtl-zo": ("none", 0, 0.0, EqualWeighting, 1e-6),
    "mtl-zo-lora": ("none", 64, 0.0, EqualWeighting, 3e-4),
    "mazo": ("mazo", 0, 0.9, EqualWeighting, 1e-6),
    "mazo-lora": ("mazo", 64, 0.8, EqualWeighting, 3e-4),
    "stl-zo": ("none", 0, 0.0, EqualWeighting, 1e-6),
    "famo": ("none", 0, 0.0, FAMOWeighting, 1e-6),
    "coba": ("none", 0, 0.0, CoBaWeighting, 1e-6),
    "mask-random": ("random", 0, 0.5, EqualWeighting, 1e-6),
    "mask-magnitude": ("magnitude", 0, 0.5, EqualWeighting, 1e-6),
    "mask-wanda": ("wanda", 0, 0.5, EqualWeighting, 1e-6),
    "mask-mazo": ("mazo", 0, 0.5, EqualWeighting, 1e-6),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_llama(max_position_embeddings=256, hidden_size=128, intermediate_size=128).save_pretrained(path)
    make_tiny_tokenizer(pad=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_trains_the_adapter_and_weighting_it_names(method, model_dir, tmp_path, monkeypatch):
    built = []
    real_init = ZOSGD.__init__

    def spy(self, model, *args, **kwargs):
        real_init(self, model, *args, **kwargs)
        config = model.peft_config["default"]
        built.append((config.scorer, config.r, config.sparsity, type(self.weighting), self.param_groups[0]["lr"]))

    monkeypatch.setattr(ZOSGD, "__init__", spy)
    config = RunConfig(
        model=str(model_dir), tasks=["sst2", "copa"], method=method, out=str(tmp_path / "run"),
        data_dir=str(SHARED_DATA), steps=1, batch_size=2, eval_batch_size=8, n_train=4, n_val=2, n_test=2,
        calib_batches=1, calib_batch_size=2, max_length=96, evaluate_before=False,
    )  # fmt: skip
    run(config)
    assert built, "no ZO optimizer was built"
    expected = EXPECTED[method]
    assert all(b == expected for b in built), (built, expected)
    assert len(built) == (2 if method == "stl-zo" else 1)  # one model per task for STL-ZO
    if expected[0] in ("mazo", "wanda"):  # a data-driven mask was computed from calibration data
        assert (tmp_path / "run" / "importance.txt").is_file()


def test_zero_shot_trains_nothing(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.job, "train_group", lambda *a, **k: pytest.fail("zero-shot must not train"))
    config = RunConfig(
        model=str(model_dir), tasks=["sst2"], method="zero-shot", out=str(tmp_path / "run"),
        data_dir=str(SHARED_DATA), n_test=2, eval_batch_size=8, max_length=96,
    )  # fmt: skip
    results = run(config)
    assert results["before"] == results["after"] and set(results["after"]) == {"sst2"}
