"""Registration with peft and save/load, across processes, with the mask included; the saved layout pinned."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_mazo import Linear, MaZOConfig
from tests.helpers import ROOT, make_tiny_llama


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (the repository root on sys.path: `tests.helpers` imports) and return its stdout; fail with its stderr."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_registration_in_a_fresh_process_is_idempotent():
    out = run_python(
        """
        import importlib
        from peft.utils import PeftType
        assert "MAZO" not in PeftType.__members__
        import peft_mazo
        importlib.reload(peft_mazo)
        import peft_mazo._peft_type as pt
        importlib.reload(pt)
        pt.ensure_mazo_peft_type()
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        assert PeftType("MAZO") is PeftType.MAZO is PeftType["MAZO"]
        assert list(PeftType).count(PeftType.MAZO) == 1
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MAZO].__name__ == "MaZOModel"
        print(PEFT_TYPE_TO_CONFIG_MAPPING["MAZO"].__name__)
        """
    )
    assert out.strip() == "MaZOConfig"


@pytest.mark.parametrize("mode", [dict(sparsity=0.8, r=0), dict(sparsity=0.8, r=8)], ids=["dense", "lora"])
def test_save_in_one_process_load_in_another(tmp_path, mode):
    adapter_dir, ref_file = tmp_path / "adapter", tmp_path / "reference.safetensors"
    run_python(
        f"""
        import torch, peft_mazo
        from peft import get_peft_model
        from safetensors.torch import save_file
        from tests.helpers import make_tiny_llama
        model = get_peft_model(make_tiny_llama(seed=3), peft_mazo.MaZOConfig(init_weights=False, **{mode!r}))
        # a non-default mask, so that loading must really read it from disk
        masks = {{name: mask.flip(dims=[1]) for name, mask in model.get_masks().items()}}
        model.set_masks(masks, reset=True)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        ids = torch.arange(24).reshape(2, 12) % 128
        ref = {{"logits": model(input_ids=ids).logits.contiguous()}}
        ref.update({{"mask::" + n: m.contiguous() for n, m in model.get_masks().items()}})
        save_file(ref, {str(ref_file)!r})
        model.save_pretrained({str(adapter_dir)!r})
        """
    )
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MAZO"
    assert saved["sparsity"] == 0.8 and saved["r"] == mode["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(".mazo_columns" in k or ".mazo_bits" in k for k in tensors), list(tensors)[:5]
    assert not any(t.dtype == torch.bool for t in tensors.values())

    out = run_python(
        f"""
        import torch, peft_mazo
        from peft import PeftConfig, PeftModel
        from safetensors.torch import load_file
        from tests.helpers import make_tiny_llama
        assert type(PeftConfig.from_pretrained({str(adapter_dir)!r})).__name__ == "MaZOConfig"
        model = PeftModel.from_pretrained(make_tiny_llama(seed=3), {str(adapter_dir)!r})
        ref = load_file({str(ref_file)!r})
        ids = torch.arange(24).reshape(2, 12) % 128
        assert torch.equal(model(input_ids=ids).logits, ref["logits"])
        masks = model.get_masks()
        assert len(masks) == len([k for k in ref if k.startswith("mask::")])
        assert all(torch.equal(m, ref["mask::" + n]) for n, m in masks.items())
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_saved_dense_adapter_size_matches_the_compact_layout(tmp_path):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.9, r=0))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    values = sum(t.numel() * t.element_size() for k, t in tensors.items() if "mazo_values" in k)
    columns = sum(t.numel() * t.element_size() for k, t in tensors.items() if "mazo_columns" in k)
    assert columns * 2 == values  # int16 index per fp32 value


@pytest.fixture
def saved_dense_adapter(tmp_path):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.8, r=0, init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_loading_onto_a_base_of_other_shapes_names_module_and_shapes(saved_dense_adapter):
    other = make_tiny_llama(intermediate_size=192)
    with pytest.raises(
        ValueError, match=r"'.*mlp\.gate_proj' was saved for a weight of shape.*\(128, 64\).*\(192, 64\)"
    ):
        PeftModel.from_pretrained(other, saved_dense_adapter)


def test_config_with_another_sparsity_than_the_weights_is_refused(saved_dense_adapter):
    config_file = saved_dense_adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["sparsity"] = 0.5
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kept entries per row"):
        PeftModel.from_pretrained(make_tiny_llama(), saved_dense_adapter)


@pytest.mark.parametrize("mode", [dict(sparsity=0.8, r=0), dict(sparsity=0.8, r=8)], ids=["dense", "lora"])
def test_hand_edited_mask_with_wrong_row_count_is_refused(tmp_path, mode):
    get_peft_model(make_tiny_llama(), MaZOConfig(**mode)).save_pretrained(tmp_path)
    weights_file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    key = next(k for k in tensors if "mazo_columns" in k or "mazo_bits" in k)
    edited = tensors[key].clone()
    if "mazo_columns" in key:
        edited[2, 1] = edited[2, 0]  # a repeated column: the row keeps one entry fewer
    else:
        edited[2, 0] = 255 if edited[2, 0] != 255 else 0  # flips several bits of row 2
    tensors[key] = edited
    save_file(tensors, weights_file)
    with pytest.raises(ValueError, match="mask of '.*'"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_peft_config_from_pretrained_round_trips_fields(saved_dense_adapter):
    config = PeftConfig.from_pretrained(saved_dense_adapter)
    assert isinstance(config, MaZOConfig)
    assert (config.sparsity, config.r, config.scorer, config.delta_dtype) == (0.8, 0, "mazo", "float32")


# ----------------------------------------------------------------------------------------------------------------------
# the saved layout (peft_mazo/checkpoint.py), written here key by key without peft-mazo's code
# ----------------------------------------------------------------------------------------------------------------------
LAYOUT_TARGETS = ["q_proj", "down_proj"]
LAYOUT_SPARSITY = 0.75


def layout_config(r: int) -> dict:
    """adapter_config.json as peft-mazo 0.1 writes it (every field, peft 0.21)."""
    return {
        "alpha": 10.0,
        "alpha_pattern": None,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "beta": 1.0,
        "bias": "none",
        "delta_dtype": "float32",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": None,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(2 * r) if r else None,
        "lora_dropout": 0.0,
        "mask_seed": 0,
        "modules_to_save": None,
        "peft_type": "MAZO",
        "peft_version": "0.21.2",
        "r": r,
        "rank_pattern": None,
        "revision": None,
        "scorer": "magnitude",
        "sparsity": LAYOUT_SPARSITY,
        "target_modules": LAYOUT_TARGETS,
        "task_type": None,
    }


def write_adapter_in_saved_layout(path, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write an adapter in the layout every peft-mazo version so far saves (keys `base_model.model.<module>.<kind>`,
    int16 kept columns, little-endian packed bits, an int64 shape record) and return {module: (mask, delta)}."""
    generator = torch.Generator().manual_seed(7)
    tensors, expected = {}, {}
    for name, module in make_tiny_llama().named_modules():
        if not name.endswith(tuple(LAYOUT_TARGETS)):
            continue
        out_features, in_features = module.weight.shape
        k = math.ceil((1 - LAYOUT_SPARSITY) * in_features)
        columns = torch.rand(out_features, in_features, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values
        mask = torch.zeros(out_features, in_features, dtype=torch.bool).scatter(1, columns, True)
        key = f"base_model.model.{name}."
        tensors[key + "mazo_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64)
        if r == 0:
            values = torch.randn(out_features, k, generator=generator)
            tensors[key + "mazo_values"] = values
            tensors[key + "mazo_columns"] = columns.to(torch.int16)
            delta = torch.zeros(out_features, in_features).scatter(1, columns, values)
        else:
            lora_a = torch.randn(r, in_features, generator=generator)
            lora_b = torch.randn(out_features, r, generator=generator)
            tensors[key + "mazo_A"], tensors[key + "mazo_B"] = lora_a, lora_b
            packed = np.packbits(mask.numpy(), axis=1, bitorder="little")
            tensors[key + "mazo_bits"] = torch.from_numpy(packed)
            delta = 2.0 * (lora_b @ lora_a) * mask  # lora_alpha / r = 2
        expected[name] = (mask, delta)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(layout_config(r)))
    return expected


@pytest.mark.parametrize("r", [0, 4], ids=["dense", "lora"])
def test_an_adapter_in_the_saved_layout_loads(tmp_path, r):
    expected = write_adapter_in_saved_layout(tmp_path / "adapter", r)
    model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    masks = model.get_masks()
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, Linear)}
    assert sorted(masks) == sorted(layers) == sorted(expected) and len(expected) == 4
    for name, (mask, delta) in expected.items():
        assert torch.equal(masks[name], mask)
        torch.testing.assert_close(layers[name].get_delta_weight("default"), delta)
        assert "default" not in layers[name].mazo_mask_pending


@pytest.mark.parametrize("r", [0, 4], ids=["dense", "lora"])
def test_saving_writes_the_saved_layout(tmp_path, r):
    """What is saved is exactly what the layout test above writes: the same keys, dtypes and shapes."""
    write_adapter_in_saved_layout(tmp_path / "hand", r)
    written = load_file(tmp_path / "hand" / "adapter_model.safetensors")
    config = MaZOConfig(sparsity=LAYOUT_SPARSITY, r=r, lora_alpha=2 * r or None, target_modules=LAYOUT_TARGETS)
    get_peft_model(make_tiny_llama(), config).save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert {k: (t.dtype, t.shape) for k, t in saved.items()} == {k: (t.dtype, t.shape) for k, t in written.items()}


def test_a_state_dict_without_buffers_still_saves_the_mask():
    """peft's save hook takes the mask from the layers when the state dict passed in holds only parameters (as an
    accelerator's gathered state dict may): the saved adapter loads with the same mask and delta."""
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.8, r=4, init_weights=False))
    model.set_masks({n: m.flip(dims=[1]) for n, m in model.get_masks().items()}, reset=True)
    saved = get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()))
    assert sum(k.endswith(".mazo_bits") for k in saved) == 14
    assert sum(k.endswith(".mazo_shape") for k in saved) == 14
    again = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.8, r=4))
    set_peft_model_state_dict(again, saved)
    masks = model.get_masks()
    assert all(torch.equal(m, masks[n]) for n, m in again.get_masks().items())


def test_a_base_module_named_like_the_adapter_is_neither_trained_nor_saved():
    """Trainable parameters and saved tensors are found by visiting the MaZO layers (peft's hooks), not by the
    "mazo_" prefix of their names."""
    base = make_tiny_llama()
    base.model.mazo_probe = torch.nn.Linear(64, 4)  # a base module whose name starts with the method's prefix
    model = get_peft_model(base, MaZOConfig(sparsity=0.8, r=0, target_modules=["q_proj"]))  # the dense delta
    assert not model.base_model.model.model.mazo_probe.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mazo_values.default" in n for n in trainable)
    assert not any("mazo_probe" in k for k in get_peft_model_state_dict(model))
