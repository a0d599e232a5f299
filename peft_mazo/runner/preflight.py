"""Checks before any work: bad input, an unusable model name or `--out`, disk space, and `--resume` onto a checkpoint
made with other settings all raise `RunError` before a model is loaded or a file written."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..models import resolve_device
from .checkpoint import RUN_CONFIG_NAME, latest_checkpoint, load_checkpoint_state, resume_settings
from .config import RESUME_FIELDS, RunConfig, RunError


logger = logging.getLogger(__name__)


FREE_SPACE_MARGIN = 32 * 2**20


def validate(config: RunConfig) -> None:
    """Raise `RunError` for bad input, before any model weights or data are loaded and before anything is written.

    Checks the method, tasks, numbers, adapter settings (`--sparsity`, `--r`), dtype and device, the data files (or,
    without `--data-dir`, that the hub datasets can be loaded: `check_hub_available`), the model directory, that
    `--max-length` holds every task's template and answer (`check_max_length`), that `--out` is writable (without
    creating it), that `--resume` finds a checkpoint made with the same settings, and that the disk has room for the
    checkpoints (an estimate from the model's config).
    """
    from ..methods import get_method
    from ..tasks import canonical_task_name
    from ..tasks.data import HubUnavailableError, check_data_files, check_hub_available

    config.check()  # the values on their own (they may have changed since the config was built)
    method = get_method(config.method)
    try:
        config.tasks = [canonical_task_name(t) for t in config.tasks]
    except ValueError as error:
        raise RunError(str(error)) from None
    if len(set(config.tasks)) != len(config.tasks):
        raise RunError(f"--tasks names a task twice: {config.tasks}. Give every task once.")
    try:
        device = resolve_device(config.device)
    except RuntimeError as error:
        raise RunError(
            f"--device {config.device!r} is not a device ({error}); use auto, cpu, cuda or cuda:1."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {config.device}: CUDA is not available here; use --device cpu (or auto).")
    if config.data_dir is not None:
        try:
            check_data_files(config.tasks, config.data_dir)
        except (ValueError, FileNotFoundError) as error:
            raise RunError(str(error)) from None
    else:
        try:
            check_hub_available(config.tasks)
        except HubUnavailableError as error:
            raise RunError(str(error)) from None
    _check_model_name(config.model)
    check_max_length(config)
    out = Path(config.out)
    _check_writable(out)
    groups = [out / t for t in config.tasks] if method.per_task else [out]
    if not config.resume and not config.overwrite:
        used = [g for g in groups if (g / "results.json").exists() or latest_checkpoint(g) is not None]
        if used:
            raise RunError(
                f"--out {config.out} already holds a run ({used[0]} has results or a checkpoint); starting again would "
                "replace its adapter, checkpoints, loss log and results. Pass --resume to continue it, --overwrite to "
                "replace it, or another --out."
            )
    if config.resume:
        checkpoints = [c for c in (latest_checkpoint(g) for g in groups) if c is not None]
        if not checkpoints:
            raise RunError(
                f"--resume: no complete checkpoint in {config.out}. Drop --resume to start a new run, or pass the "
                "--out of the run to continue."
            )
        for checkpoint in checkpoints:
            _checkresume_settings(config, checkpoint)
            try:
                load_checkpoint_state(checkpoint)
                _read_safetensors_header(checkpoint / "adapter_model.safetensors")
            except Exception as error:  # noqa: BLE001 - any unreadable file: say which, before any work
                raise RunError(
                    f"--resume: checkpoint {checkpoint} is damaged ({type(error).__name__}: {error}); it cannot be "
                    "resumed (older checkpoints are not kept). Start the run again with --overwrite, or restore that "
                    "directory from a copy."
                ) from None
    if method.trains:
        adapter_bytes = estimate_adapter_bytes(config)
        if adapter_bytes is not None:
            check_free_space(out, len(groups) * 2 * adapter_bytes + FREE_SPACE_MARGIN, adapter_bytes)


def _check_model_name(model: str) -> None:
    from ..models import SMOLLM2_ALIASES

    if not isinstance(model, str) or not model:
        raise RunError(f"--model must be a model directory, a hub id or smollm2-135m, got {model!r}.")
    if model.lower() in SMOLLM2_ALIASES:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RunError(
                f"--model {model} holds no config.json: pass a directory written by save_pretrained (config.json, "
                "weights, tokenizer), a hub id, or smollm2-135m (installed offline)."
            )
        return
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise RunError(
            f"--model {model}: no such directory. Pass an existing model directory, a hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct, or smollm2-135m (installed offline)."
        )


def check_max_length(config: RunConfig) -> None:
    """`RunError` when `--max-length` cannot hold some task's prompt template and answer with the model's tokenizer
    (`tasks.encoding.minimum_length`): every example of that task would be cut. Only the tokenizer is loaded; when it
    cannot be, the check is skipped (loading the model reports the problem)."""
    from transformers import AutoTokenizer

    from ..models import resolve_model
    from ..tasks.encoding import minimum_length

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    except Exception as error:  # noqa: BLE001 - the model load reports it with its own message
        logger.info("Could not load the tokenizer to check --max-length (%s); skipping the check.", error)
        return
    needed = {task: minimum_length(task, tokenizer) for task in config.tasks}
    short = [task for task, length in needed.items() if length > config.max_length]
    if short:
        task = max(short, key=needed.__getitem__)
        raise RunError(
            f"--max-length {config.max_length} cannot hold task '{task}': its prompt template and answer alone take "
            f"{needed[task]} tokens with this model's tokenizer, so every example would be cut (the prompt from the "
            f"left, then the answer). Pass --max-length {max(needed.values())} or more to fit every task's template "
            "(the default, 512, also leaves room for the examples' text)."
        )


def _existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest existing parent; `RunError` when that is not a directory."""
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise RunError(f"Output directory: {path} is a file, not a directory; choose another --out.")
    return path


def _check_writable(out: Path) -> None:
    """Check that files can be created in `out` (or, when it does not exist yet, where it will be created)."""
    target = _existing_ancestor(out)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".mazo-write-test-"):
            pass
    except OSError as error:
        raise RunError(
            f"Output directory {out} is not writable ({error.strerror or error}); choose another --out or fix the "
            f"permissions of {target}."
        ) from None


def _human(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"


def check_free_space(out: Path, needed: int, adapter_bytes: Optional[int] = None) -> None:
    """Raise `RunError` when the file system of `out` has fewer than `needed` bytes free."""
    target = _existing_ancestor(out)
    free = shutil.disk_usage(target).free
    if free < needed:
        detail = (
            f" (adapter {_human(adapter_bytes)}, kept twice while a checkpoint is written)" if adapter_bytes else ""
        )
        raise RunError(
            f"Not enough free disk space for the run's checkpoints in {target}: about {_human(needed)} needed{detail}, "
            f"{_human(free)} free. Free some space or choose another --out."
        )


def estimate_adapter_bytes(config: RunConfig) -> Optional[int]:
    """Size of the run's adapter in bytes, from the model's config alone (the model is built on the meta device).

    Raises `RunError` when the model's config cannot be read; returns None when the estimate itself fails.
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import MaZOConfig
    from ..methods import get_method
    from ..models import resolve_model

    try:
        model_config = AutoConfig.from_pretrained(resolve_model(config.model))
    except (OSError, ValueError) as error:
        raise RunError(
            f"--model {config.model}: cannot read its config ({error}). Pass a model directory written by "
            "save_pretrained, a hub id (online, or cached with HF_HUB_OFFLINE=1), or smollm2-135m."
        ) from None
    method = get_method(config.method)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
        adapter = MaZOConfig(**method.adapter_config(sparsity=config.sparsity, r=config.r))
        state = get_peft_model_state_dict(get_peft_model(skeleton, adapter))
    except Exception as error:  # an estimate only: the run itself reports real problems
        logger.info("Could not estimate the adapter size (%s); skipping the free-space check.", error)
        return None
    return sum(t.numel() * t.element_size() for t in state.values())


def check_adapter_fits(config: RunConfig, adapter: str) -> None:
    """`RunError` when a saved MaZO adapter does not fit `--model` (checked on a meta-device copy: no weights)."""
    from peft import PeftConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..checkpoint import check_saved_adapter
    from ..config import MaZOConfig
    from ..models import resolve_model

    try:
        adapter_config = PeftConfig.from_pretrained(adapter)
        if not isinstance(adapter_config, MaZOConfig):
            return
        adapter_config = MaZOConfig.from_pretrained(adapter)
    except ValueError as error:
        raise RunError(
            f"--adapter {adapter}: bad adapter_config.json ({error}). Use the file saved with it."
        ) from None
    try:
        model_config = AutoConfig.from_pretrained(resolve_model(config.model))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:  # the real load reports it
        logger.info("Could not check the adapter against the model before loading (%s).", error)
        return
    try:
        check_saved_adapter(adapter_config, skeleton)
    except ValueError as error:
        raise RunError(f"--adapter {adapter} does not fit --model {config.model}: {error}") from None


def _read_safetensors_header(path: Path) -> None:
    """Open a safetensors file and read every tensor's header (raises for a truncated or corrupted file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            handle.get_slice(key).get_shape()


def _checkresume_settings(config: RunConfig, checkpoint: Path) -> None:
    path = checkpoint / RUN_CONFIG_NAME
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(resume_settings(config)))
    differ = [name for name in RESUME_FIELDS if name in saved and saved[name] != current[name]]
    if differ:
        changes = ", ".join(f"{name}: {saved[name]!r} -> {current[name]!r}" for name in differ)
        raise RunError(
            f"--resume: {checkpoint} was made with other settings ({changes}). Resume with the settings of that run "
            "(the model, its dtype and quantization included; only --steps, --save-every, --n-test, the evaluation "
            "and output flags may change), or pass another --out for a new run."
        )
