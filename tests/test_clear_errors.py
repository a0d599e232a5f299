"""Inputs that used to end in a traceback from deep inside torch/safetensors, or to be silently wrong, now get an
error (or a warning) that names the problem and the fix, before anything is changed."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_mazo import ZOSGD, MaZOConfig
from peft_mazo import layer as mazo_layer
from peft_mazo.runner import RunConfig, RunError, run
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def saved_adapter(tmp_path):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=8, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_an_adapter_file_missing_a_layer_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = {k: v for k, v in tensors.items() if ".layers.1.mlp.down_proj." not in k}
    assert len(dropped) < len(tensors)
    save_file(dropped, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no weights for 1 layer\(s\) .* 'model.layers.1.mlp.down_proj'"):
        PeftModel.from_pretrained(make_tiny_llama(), path)


def test_an_adapter_file_missing_one_tensor_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith("layers.0.self_attn.q_proj.mazo_B")},
        path / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match=r"lacks mazo_B of '.*layers.0.self_attn.q_proj'"):
        PeftModel.from_pretrained(make_tiny_llama(), path)


def test_a_truncated_adapter_file_is_named(tmp_path):
    path = saved_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Cannot read .*adapter_model\.safetensors.* damaged or incomplete"):
        PeftModel.from_pretrained(make_tiny_llama(), path)


def test_a_closure_that_calls_backward_gets_told_why_and_nothing_changes():
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=0, init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def closure():
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="never call backward"):
        ZOSGD(model, lr=1e-2).step(closure)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_rank_beyond_the_layers_is_warned_once(monkeypatch):
    monkeypatch.setattr(mazo_layer, "_WARNED_RANKS", set())
    with pytest.warns(UserWarning, match=r"r = 1000 exceeds the rank of layer .* rank at most 64") as record:
        get_peft_model(make_tiny_llama(), MaZOConfig(r=1000, sparsity=0.5))
    assert sum("exceeds the rank" in str(w.message) for w in record) == 1
    with warnings.catch_warnings(record=True) as fitting:
        warnings.simplefilter("always")
        get_peft_model(make_tiny_llama(), MaZOConfig(r=16, sparsity=0.5))  # fits every layer: no warning
    assert not [w for w in fitting if "exceeds the rank" in str(w.message)]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_empty_task_file_and_zero_test_examples_are_refused_before_any_work(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_llama(max_position_embeddings=256).save_pretrained(model_dir)
    make_tiny_tokenizer(pad=True).save_pretrained(model_dir)
    data = tmp_path / "data"
    for task in ("sst2", "copa"):
        shutil.copytree(SHARED_DATA / task, data / task)
    (data / "copa" / "train.jsonl").write_text("\n")
    values = dict(model=str(model_dir), tasks=["sst2", "copa"], out=str(tmp_path / "run"), data_dir=str(data), steps=1)
    with pytest.raises(RunError, match=r"copa/train\.jsonl holds no examples"):
        run(RunConfig(**values))
    shutil.copy(SHARED_DATA / "copa" / "train.jsonl", data / "copa" / "train.jsonl")
    with pytest.raises(RunError, match=r"--n-test 0 leaves nothing to evaluate"):
        run(RunConfig(**values, n_test=0))
    assert not (tmp_path / "run").exists()


def pending_mask_warnings(model) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ZOSGD(model, lr=1e-3)
    return [str(w.message) for w in caught if "has not been computed" in str(w.message)]


def test_training_without_the_configured_data_driven_mask_is_pointed_out(tmp_path):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=4, scorer="mazo"))
    assert pending_mask_warnings(model) and "compute_importance" in pending_mask_warnings(model)[0]
    loader = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]
    model.compute_importance({"a": loader, "b": loader}, progress=False)
    assert not pending_mask_warnings(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter", is_trainable=True)
    assert not pending_mask_warnings(reloaded)  # the computed mask was loaded with the adapter
    magnitude = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=4, scorer="magnitude"))
    assert not pending_mask_warnings(magnitude)  # |W| is that scorer's mask: nothing to point out


def test_an_adapter_loaded_for_inference_gets_the_is_trainable_hint(tmp_path):
    path = saved_adapter(tmp_path)
    frozen = PeftModel.from_pretrained(make_tiny_llama(), path)
    with pytest.raises(ValueError, match=r"loaded for inference .* is_trainable=True"):
        ZOSGD(frozen, lr=1e-3)
    ZOSGD(PeftModel.from_pretrained(make_tiny_llama(), path, is_trainable=True), lr=1e-3)


# ------------------------------------------------------------------------------------- issue #16 §5: a new user's path
@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Offline mode as huggingface_hub and datasets read it (their constants are set at import), an empty cache, and a
    guard: any metadata request to the hub fails the test."""
    import datasets
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    requests = []
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, *args, **kwargs: requests.append(args))
    yield requests
    assert not requests, "offline mode made a request to the hub"


def test_offline_without_data_dir_names_the_files_and_where_to_put_them(offline_hub, tmp_path, monkeypatch):
    from peft_mazo.tasks import HubUnavailableError, sample_tasks

    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("the data was loaded"))
    model_dir = tmp_path / "model"
    make_tiny_llama(max_position_embeddings=256).save_pretrained(model_dir)
    make_tiny_tokenizer(pad=True).save_pretrained(model_dir)
    with pytest.raises(RunError) as error:
        run(RunConfig(model=str(model_dir), tasks=["sst2", "copa"], out=str(tmp_path / "run"), steps=1))
    message = str(error.value)
    for needed in ("HF_HUB_OFFLINE=1", "--data-dir DIR", "DIR/<task>/train.jsonl", "sst2/validation.jsonl"):
        assert needed in message
    assert "copa/train.jsonl" in message
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(HubUnavailableError, match=r"data_dir=DIR"):  # the library says the same
        sample_tasks(["copa"])


def test_offline_with_a_cached_hub_copy_goes_ahead(offline_hub, monkeypatch):
    from peft_mazo.tasks import data

    monkeypatch.setattr(data, "_hub_dataset_cached", lambda path, config: True)
    data.check_hub_available(["sst2", "copa"])


def test_an_unreachable_hub_is_one_failed_request_not_five_retries(monkeypatch):
    import datasets
    from huggingface_hub import HfApi, constants

    from peft_mazo.tasks import HubUnavailableError, data

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(self, repo_id, timeout=None):
        calls.append((repo_id, timeout))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    with pytest.raises(HubUnavailableError, match=r"cannot be reached \(OSError: .*--data-dir DIR"):
        data.check_hub_available(["rte", "boolq"])
    assert calls == [("aps/super_glue", 10)]


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_a_max_length_that_cannot_hold_a_task_is_refused_before_any_work(tmp_path):
    from peft_mazo.tasks.encoding import minimum_length

    model_dir = tmp_path / "model"
    make_tiny_llama(max_position_embeddings=256).save_pretrained(model_dir)
    tokenizer = make_tiny_tokenizer(pad=True)
    tokenizer.save_pretrained(model_dir)
    rte = minimum_length("rte", tokenizer)
    assert minimum_length("sst2", tokenizer) < rte  # the character-level tokenizer: one token per character
    values = dict(model=str(model_dir), tasks=["sst2", "rte"], out=str(tmp_path / "run"), data_dir=str(SHARED_DATA))
    with pytest.raises(RunError, match=rf"--max-length 4 cannot hold task 'rte'.* {rte} tokens.*--max-length {rte}"):
        run(RunConfig(**values, max_length=4, steps=1))
    with pytest.raises(RunError, match=r"cannot hold task 'rte'"):
        run(RunConfig(**values, max_length=rte - 1, steps=1))
    assert not (tmp_path / "run").exists()


def test_minimum_length_is_the_template_and_the_longest_answer():
    from peft_mazo.tasks.encoding import encode_continuations, minimum_length

    tokenizer = make_tiny_tokenizer(pad=True)
    # sst2: "<s>" + "x It was" + " terrible" (the longer candidate), one token per character
    assert minimum_length("sst2", tokenizer) == 1 + len("x It was") + len(" terrible")
    (context, answer), *_ = encode_continuations(tokenizer, ["Title: x\nContext: x\nQuestion: x\nAnswer:"], [" x\n"])
    assert minimum_length("squad", tokenizer) == len(context) + len(answer)


def token_batch(**overrides):
    batch = {"input_ids": IDS.clone(), "attention_mask": torch.ones_like(IDS)}
    batch.update(overrides)
    return {k: v for k, v in batch.items() if v is not None}


BAD_BATCHES = [
    (token_batch(input_ids=None), r"has no 'input_ids' \(it has: attention_mask\).*tokenizer\(texts"),
    (token_batch(input_ids=IDS.float()), r"'input_ids' is a torch.float32 tensor; token ids must be integers"),
    (token_batch(input_ids=IDS + 128), r"token id 2\d\d, outside the model's vocabulary \[0, 128\).*own tokenizer"),
    (token_batch(input_ids=IDS.masked_fill(IDS > 100, -100)), r"token id -100, .* labels' -100"),
]


@pytest.mark.parametrize("batch, match", BAD_BATCHES, ids=["no_ids", "float_ids", "beyond_vocab", "negative_ids"])
def test_bad_token_batches_get_clear_errors_in_the_zo_step_and_nothing_changes(batch, match):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=4, scorer="magnitude", init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZOSGD(model, lr=1e-3)
    with pytest.raises(ValueError, match="The model's input.*" + match):
        optimizer.step(lambda: model(**batch).loss)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=match):  # a plain forward says the same
        model(**batch)


@pytest.mark.parametrize("batch, match", BAD_BATCHES, ids=["no_ids", "float_ids", "beyond_vocab", "negative_ids"])
def test_bad_calibration_batches_are_named_before_any_forward(batch, match, monkeypatch):
    model = get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5))
    masks = model.get_masks()
    monkeypatch.setattr(type(model.base_model.model), "forward", lambda *a, **k: pytest.fail("a forward ran"))
    good = token_batch()
    with pytest.raises(ValueError, match=r"Task 'b': calibration batch 1.*" + match):
        model.compute_importance({"a": [good], "b": [good, batch]}, progress=False)
    assert all(torch.equal(masks[n], m) for n, m in model.get_masks().items())


def test_models_without_token_embeddings_are_not_checked():
    from tests.helpers import make_mlp

    model = get_peft_model(make_mlp(), MaZOConfig(sparsity=0.5, target_modules=["lin0", "lin1"]))
    model(torch.randn(2, 64))  # a float input is right for this model
    model.compute_importance({"a": [{"x": torch.randn(2, 3, 64)}]}, progress=False)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_the_input_check_covers_every_wrapper_and_leaves_with_the_adapter(task_type):
    base = make_tiny_llama()
    hooks = len(base._forward_pre_hooks)
    model = get_peft_model(base, MaZOConfig(sparsity=0.5, task_type=task_type))
    with pytest.raises(ValueError, match=r"token ids must be integers"):
        model(input_ids=IDS.float())
    with pytest.raises(ValueError, match=r"token ids must be integers"):
        model.get_base_model()(IDS.float())  # positional input_ids, on the base model itself
    model.add_adapter("second", MaZOConfig(sparsity=0.5))
    assert len(base._forward_pre_hooks) == hooks + 1  # one check, however many adapters
    unloaded = model.unload()
    assert len(unloaded._forward_pre_hooks) == hooks  # the plain model is handed back as it was


def test_training_examples_longer_than_max_length_are_named_in_a_warning():
    from peft_mazo.runner.job import warn_truncated
    from peft_mazo.tasks.example import Example

    tokenizer = make_tiny_tokenizer(pad=True)  # one token per character, "<s>" in front
    short = Example(task="sst2", prompt="ok It was", candidates=(" terrible", " great"), label=1)
    long = Example(task="sst2", prompt="a rather long review. It was", candidates=(" terrible", " great"), label=0)
    longest = 1 + len(long.prompt) + len(" terrible")
    with pytest.warns(UserWarning, match=rf"'sst2': 1 of 2 training examples .*--max-length {longest - 1} .*"
                      rf"needs {longest}\)\. Pass --max-length {longest}"):  # fmt: skip
        assert warn_truncated(tokenizer, {"sst2": [short, long]}, longest - 1) == {"sst2": (1, longest)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_truncated(tokenizer, {"sst2": [short, long]}, longest) == {}
