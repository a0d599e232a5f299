"""MaZO on bitsandbytes 4-bit (nf4) and 8-bit bases, on the CPU."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_mazo import Linear, MaZOConfig
from peft_mazo.quantized import dense_weight, quantization_kind
from tests.helpers import make_tiny_llama


bnb = pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(seed=5).save_pretrained(path)
    return path


def load_quantized(path, kind):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATIONS[kind], device_map="cpu")


def mazo_layers(model):
    return {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("r", [0, 8], ids=["dense", "lora"])
def test_forward_adds_masked_delta_to_quantized_base(saved_base, kind, r):
    model = get_peft_model(load_quantized(saved_base, kind), MaZOConfig(sparsity=0.8, r=r, init_weights=False))
    layer = mazo_layers(model)["model.layers.0.self_attn.q_proj"]
    base = layer.get_base_layer()
    assert quantization_kind(base) == ("4bit" if kind == "nf4" else "8bit")
    assert layer.base_backend.name == ("bnb-4bit" if kind == "nf4" else "bnb-8bit")  # chosen once, at wrapping
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    x = torch.randn(2, 3, 64)
    delta = layer.get_delta_weight("default")
    expected = base(x) + x @ delta.T
    torch.testing.assert_close(layer(x), expected.to(layer(x).dtype), rtol=1e-3, atol=1e-3)
    # the data-free mask is the row-wise top-k of the dequantized weight's magnitude
    mask = layer.get_mask("default")
    magnitude = dense_weight(base).abs().float()
    kept_min = torch.where(mask, magnitude, torch.inf).min(dim=1).values
    dropped_max = torch.where(mask, -torch.inf, magnitude).max(dim=1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_save_load_on_quantized_base(saved_base, kind, tmp_path):
    ids = torch.arange(20).reshape(2, 10)
    model = get_peft_model(load_quantized(saved_base, kind), MaZOConfig(sparsity=0.8, r=8, init_weights=False))
    with torch.no_grad():  # bitsandbytes picks its CPU kernel by grad mode: compare like with like
        expected_logits = model(input_ids=ids).logits
    expected_masks = model.get_masks()
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(load_quantized(saved_base, kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected_logits)
    assert all(torch.equal(m, expected_masks[n]) for n, m in again.get_masks().items())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_into_quantized_base_warns_and_stays_close(saved_base, kind):
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        base_logits = load_quantized(saved_base, kind)(input_ids=ids).logits
    model = get_peft_model(load_quantized(saved_base, kind), MaZOConfig(sparsity=0.5, r=4, init_weights=False))
    adapted = model(input_ids=ids).logits
    packed_before = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.data.clone()
    with pytest.warns(UserWarning, match="requantizes"):
        merged = model.merge_and_unload()
    packed_after = merged.model.layers[0].self_attn.q_proj.weight.data
    assert not torch.equal(packed_before, packed_after)
    merged_logits = merged(input_ids=ids).logits
    # lossy: the requantization error (measured: nf4 0.24, int8 0.02 of the adapter's effect on the logits) stays well
    # below the adapter's own effect, i.e. the merged model is far closer to the adapted model than the base is
    error = (merged_logits - adapted).abs().mean()
    adapter_effect = (adapted - base_logits).abs().mean()
    assert adapter_effect > 0.05 and error < 0.5 * adapter_effect


def test_cpu_4bit_weights_are_not_corrupted_by_bitsandbytes_repacking(saved_base):
    """bitsandbytes repacks 4-bit weights at the first CPU inference forward (AVX-512 BF16 CPUs) and cannot undo it
    exactly: MaZO layers keep the standard layout, and a weight repacked before wrapping is read through the forward."""
    ids = torch.arange(20).reshape(2, 10)
    reference_model = load_quantized(saved_base, "nf4")
    q_proj = reference_model.model.layers[0].self_attn.q_proj
    true_weight = dense_weight(q_proj).clone()

    model = get_peft_model(load_quantized(saved_base, "nf4"), MaZOConfig(sparsity=0.8, r=8))
    layer = mazo_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(dense_weight(layer.get_base_layer()), true_weight)
    assert torch.equal(first, again)

    repacked = load_quantized(saved_base, "nf4")
    with torch.no_grad():
        before = repacked(input_ids=ids).logits  # may repack (depends on the CPU)
    was_repacked = getattr(
        repacked.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False
    )
    if not was_repacked:
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes does not repack")
    with pytest.warns(UserWarning, match="repacked"):
        wrapped = get_peft_model(repacked, MaZOConfig(sparsity=0.8, r=8))
    with torch.no_grad():
        after = wrapped(input_ids=ids).logits
    torch.testing.assert_close(after, before)  # the identity adapter left the repacked base intact
    read = dense_weight(mazo_layers(wrapped)["model.layers.0.self_attn.q_proj"].get_base_layer())
    torch.testing.assert_close(read, true_weight, rtol=1e-2, atol=1e-2)
