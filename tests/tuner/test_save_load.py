"""Registration with peft and save/load, across processes, with the mask included."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_mazo import MaZOConfig
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
