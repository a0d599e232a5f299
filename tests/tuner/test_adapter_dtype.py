"""peft's adapter-dtype convention: `autocast_adapter_dtype=False` keeps MaZO's trainable state in the base layer's
dtype, through `get_peft_model`, `from_pretrained` (with and without `low_cpu_mem_usage`) and `load_adapter`."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_mazo import ZOSGD, MaZOConfig
from tests.helpers import make_tiny_llama


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def trainable_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "mazo_" in n}


@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_both_ways(r, dtype):
    config = MaZOConfig(sparsity=0.5, r=r, init_weights=False)
    autocast = get_peft_model(make_tiny_llama().to(dtype), config)
    assert trainable_dtypes(autocast) == {torch.float32}
    kept = get_peft_model(make_tiny_llama().to(dtype), config, autocast_adapter_dtype=False)
    assert trainable_dtypes(kept) == {dtype}
    assert all(p.requires_grad for n, p in kept.named_parameters() if "mazo_" in n)
    with torch.no_grad():
        out = kept(input_ids=IDS).logits
        reference = autocast(input_ids=IDS).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    # the same adapter values rounded to the half type: close to the fp32 adapter's output
    torch.testing.assert_close(out.float(), reference.float(), rtol=0.05, atol=0.05)


def test_fp32_base_keeps_fp32_adapter_either_way():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(r=8), autocast_adapter_dtype=False)
    assert trainable_dtypes(model) == {torch.float32}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_honours_autocast_adapter_dtype(tmp_path, low_cpu_mem_usage):
    source = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=8, init_weights=False))
    source.save_pretrained(tmp_path)
    base = make_tiny_llama().to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(
        base, tmp_path, autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert trainable_dtypes(loaded) == {torch.bfloat16}
    saved = {n.replace(".default", ""): p for n, p in source.named_parameters() if "mazo_" in n}
    got = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "mazo_" in n}
    assert saved.keys() == got.keys()
    for name in saved:  # the values arrive (rounded to bf16 where the adapter is bf16)
        torch.testing.assert_close(got[name].float(), saved[name].to(got[name].dtype).float())
    loaded.load_adapter(
        tmp_path, adapter_name="other", autocast_adapter_dtype=False, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert {p.dtype for n, p in loaded.named_parameters() if "mazo_" in n and ".other" in n} == {torch.bfloat16}


def test_zo_step_on_a_bf16_adapter_is_exact_at_lr_zero_and_moves_it_otherwise():
    model = get_peft_model(
        make_tiny_llama().to(torch.bfloat16), MaZOConfig(sparsity=0.5, r=0), autocast_adapter_dtype=False
    )
    params = [p for n, p in model.named_parameters() if "mazo_" in n]
    before = [p.detach().clone() for p in params]
    opt = ZOSGD(model, lr=0.0, eps=1e-2, seed=0)
    closure = lambda: model(input_ids=IDS, labels=IDS).loss  # noqa: E731
    opt.step(closure)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(before, params, strict=True))
    opt.param_groups[0]["lr"] = 1.0
    opt.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
def test_adapter_dtype_through_add_adapter_save_and_load(tmp_path, r, dtype, autocast_adapter_dtype):
    # peft's test_adapter_dtype_autocast: get_peft_model, add_adapter, from_pretrained and load_adapter, with and
    # without low_cpu_mem_usage
    expected = {torch.float32} if autocast_adapter_dtype else {dtype}
    config = MaZOConfig(sparsity=0.5, r=r, target_modules=["q_proj", "down_proj"], init_weights=False)
    model = get_peft_model(make_tiny_llama().to(dtype), config, autocast_adapter_dtype=autocast_adapter_dtype)
    model.add_adapter("other", config, autocast_adapter_dtype=autocast_adapter_dtype)
    assert trainable_dtypes(model) == expected
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "mazo_" in n} == {"default", "other"}
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        loaded = PeftModel.from_pretrained(
            make_tiny_llama().to(dtype),
            tmp_path,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        loaded.load_adapter(
            tmp_path / "other",
            adapter_name="other",
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        assert trainable_dtypes(loaded) == expected
        assert len([n for n, _ in loaded.named_parameters() if "mazo_" in n]) == len(
            [n for n, _ in model.named_parameters() if "mazo_" in n]
        )
