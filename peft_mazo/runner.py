"""The multi-task fine-tuning run behind `mazo train` / `mazo eval`: validate, build, train, checkpoint, evaluate.

Outputs in the run directory:

- `losses.jsonl`: one JSON line per step: step, loss, per-task losses and projected gradients, lr, seconds;
- `checkpoint-<step>/` (adapter + `state.pt` with optimizer, sampler and log position + `run_config.json`) every
  `save_every` steps, written under a temporary name, fsynced (files and directory) and renamed, with `latest` naming
  the newest complete one;
- `results.json`: each task's metric before (zero-shot) and after training, and the averages;
- `loss_curves.png`: the per-task training-loss curves.

Failure modes, all with a message that names the problem and the fix: bad input raises `RunError` before any model
is loaded or any file written (including too little free disk space for the checkpoints and an unwritable output
directory); a failure during training (a checkpoint that cannot be written, only non-finite losses for
`max_skipped_steps` steps in a row) raises `RunFailed` and leaves the last complete checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_CONFIG_NAME = "run_config.json"
FREE_SPACE_MARGIN = 32 * 2**20
# Settings a resumed run must share with its checkpoint (anything else would silently train another model).
ZERO_SHOT_NAME = "zero_shot.json"
RESUME_FIELDS = (
    "model",
    "dtype",
    "load_in_4bit",
    "tasks",
    "method",
    "seed",
    "lr",
    "eps",
    "batch_size",
    "sparsity",
    "r",
    "n_train",
    "n_val",
    "max_length",
    "calib_batches",
    "calib_batch_size",
    "coba_every",
)
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


@dataclass
class RunConfig:
    """Everything one run needs; `mazo train` fills it from the command line.

    `max_skipped_steps`: stop with `RunFailed` after this many consecutive steps with a non-finite loss (0: never).
    """

    model: str
    tasks: list[str]
    method: str = "mazo-lora"
    out: str = "runs/mazo"
    data_dir: Optional[str] = None
    steps: int = 1000
    lr: Optional[float] = None
    eps: float = 1e-3
    batch_size: int = 4
    eval_batch_size: int = 16
    n_train: Optional[int] = 500
    n_val: int = 250
    n_test: Optional[int] = 500
    seed: int = 0
    save_every: int = 100
    sparsity: Optional[float] = None
    r: Optional[int] = None
    calib_batches: int = 8
    calib_batch_size: int = 8
    max_length: int = 512
    load_in_4bit: bool = False
    dtype: str = "auto"
    device: str = "auto"
    resume: bool = False
    evaluate_before: bool = True
    coba_every: int = 4
    max_skipped_steps: int = 10
    cuda_graphs: bool = True
    overwrite: bool = False


class RunError(ValueError):
    """A run cannot start: the message names the problem and the fix. Raised before any work."""


class RunFailed(RuntimeError):
    """A run stopped after it started (a checkpoint could not be written, only non-finite losses, ...).

    The message names the problem, the fix and the last complete checkpoint, which is left intact.
    """


class CheckpointError(RunFailed):
    """Writing a checkpoint (or the final adapter) failed with an `OSError`; the previous checkpoint is intact."""


# ----------------------------------------------------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config: RunConfig) -> None:
    """Raise `RunError` for bad input, before any model weights or data are loaded and before anything is written.

    Checks the method, tasks, numbers, adapter settings (`--sparsity`, `--r`), dtype and device, the data files, the
    model directory, that `--out` is writable (without creating it), that `--resume` finds a checkpoint made with the
    same settings, and that the disk has room for the checkpoints (an estimate from the model's config).
    """
    from .config import MaZOConfig
    from .methods import get_method
    from .tasks import canonical_task_name
    from .tasks.data import check_data_files

    try:
        method = get_method(config.method)
        config.tasks = [canonical_task_name(t) for t in config.tasks]
    except ValueError as error:
        raise RunError(str(error)) from None
    if not config.tasks:
        raise RunError("No tasks given: pass --tasks, e.g. --tasks sst2,boolq,copa.")
    if len(set(config.tasks)) != len(config.tasks):
        raise RunError(f"--tasks names a task twice: {config.tasks}. Give every task once.")
    if method.trains:
        if not _is_int(config.steps) or config.steps < 1:
            raise RunError(
                f"--steps must be a positive integer for method '{method.name}', got {config.steps}; e.g. --steps "
                "1000 (use --method zero-shot to only evaluate)."
            )
        if not _is_int(config.save_every) or config.save_every < 1:
            raise RunError(
                f"--save-every must be a positive integer, got {config.save_every!r}; e.g. --save-every 100."
            )
        if config.n_train is not None and (not _is_int(config.n_train) or config.n_train < 1):
            raise RunError(
                f"--n-train must be a positive integer or 'all' for method '{method.name}', got {config.n_train!r}."
            )
    for name in ("batch_size", "eval_batch_size", "calib_batches", "calib_batch_size", "max_length", "coba_every"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
    for name in ("n_val", "n_train", "n_test"):
        value = getattr(config, name)
        if not (value is None and name != "n_val") and (not _is_int(value) or value < 0):
            raise RunError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}.")
    if config.n_test == 0:
        raise RunError(
            "--n-test 0 leaves nothing to evaluate; pass at least 1 (or 'all' for the whole validation file)."
        )
    if not _is_int(config.seed):
        raise RunError(f"--seed must be an integer, got {config.seed!r}.")
    if not _is_int(config.max_skipped_steps) or config.max_skipped_steps < 0:
        raise RunError(
            f"--max-skipped-steps must be an integer >= 0 (0 = never stop on non-finite losses), got "
            f"{config.max_skipped_steps!r}."
        )
    if config.lr is not None and not (config.lr >= 0 and math.isfinite(config.lr)):
        raise RunError(f"--lr must be a finite number >= 0, got {config.lr}; e.g. --lr 3e-4 for LoRA, 1e-6 dense.")
    if not (config.eps > 0 and math.isfinite(config.eps)):
        raise RunError(f"--eps must be a finite number > 0, got {config.eps}; the paper uses --eps 1e-3.")
    if config.sparsity is not None and (
        isinstance(config.sparsity, bool)
        or not isinstance(config.sparsity, (int, float))
        or not 0.0 <= config.sparsity < 1.0
    ):
        raise RunError(
            f"--sparsity must be in [0, 1) (the fraction of each weight row that stays frozen), got {config.sparsity}; "
            "e.g. --sparsity 0.9 for a dense delta or 0.8 with LoRA."
        )
    if config.r is not None and (not _is_int(config.r) or config.r < 0):
        raise RunError(f"--r must be an integer >= 0 (0 = dense masked delta, > 0 = LoRA rank), got {config.r!r}.")
    if config.sparsity is not None and method.trains and method.adapter.get("scorer") == "none":
        raise RunError(
            f"--sparsity {config.sparsity}: method '{method.name}' trains every weight (no mask), so a sparsity would "
            "be ignored. Drop --sparsity, or choose a masked method (mazo, mazo-lora, mask-random, ...)."
        )
    if method.trains:
        try:
            MaZOConfig(**method.adapter_config(sparsity=config.sparsity, r=config.r))
        except ValueError as error:
            raise RunError(f"method '{method.name}' with --sparsity/--r: {error}") from None
    if config.dtype not in DTYPES:
        raise RunError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}.")
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
    _check_model_name(config.model)
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
            _check_resume_settings(config, checkpoint)
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
    from .models import SMOLLM2_ALIASES

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

    from .config import MaZOConfig
    from .methods import get_method
    from .models import resolve_model

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


def _check_adapter_fits(config: RunConfig, adapter: str) -> None:
    """`RunError` when a saved MaZO adapter does not fit `--model` (checked on a meta-device copy: no weights)."""
    from peft import PeftConfig
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import MaZOConfig
    from .model import _check_saved_adapter
    from .models import resolve_model

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
        _check_saved_adapter(adapter_config, skeleton)
    except ValueError as error:
        raise RunError(f"--adapter {adapter} does not fit --model {config.model}: {error}") from None


def load_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's `state.pt` (optimizer, sampler, step), loaded without unpickling arbitrary objects."""
    return torch.load(Path(checkpoint) / "state.pt", weights_only=True, map_location="cpu")


def _read_safetensors_header(path: Path) -> None:
    """Open a safetensors file and read every tensor's header (raises for a truncated or corrupted file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            handle.get_slice(key).get_shape()


def _resume_settings(config: RunConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in RESUME_FIELDS}


def _check_resume_settings(config: RunConfig, checkpoint: Path) -> None:
    path = checkpoint / RUN_CONFIG_NAME
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(_resume_settings(config)))
    differ = [name for name in RESUME_FIELDS if name in saved and saved[name] != current[name]]
    if differ:
        changes = ", ".join(f"{name}: {saved[name]!r} -> {current[name]!r}" for name in differ)
        raise RunError(
            f"--resume: {checkpoint} was made with other settings ({changes}). Resume with the settings of that run "
            "(the model, its dtype and quantization included; only --steps, --save-every, --n-test, the evaluation "
            "and output flags may change), or pass another --out for a new run."
        )


# ----------------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------------
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
    quantization = getattr(model_config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if str(method).lower().endswith("gguf"):
        del model_config.quantization_config
    return model_config


def keep_bnb_cpu_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel; returns the layers changed.

    bitsandbytes (0.50) repacks a `Linear4bit` weight at its first CPU inference forward, and its inverse conversion
    (used when the dequantized weight is read: the mask's |W|, merging, saving) does not restore the block scales of a
    non-nested quant state, which corrupts the layer afterwards (SmolLM2-135M's loss goes from 1.9 to 17). Keeping the
    standard layout avoids both; it only costs the faster CPU kernel. GPUs are not affected.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def load_model_and_tokenizer(config: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The base causal LM (optionally 4-bit through `BitsAndBytesConfig`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .models import resolve_model

    path = resolve_model(config.model)
    device = resolve_device(config.device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "config": dequantized_config(path)}
    if config.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.load_in_4bit and device.type == "cpu":
        keep_bnb_cpu_layout(model)
    if not config.load_in_4bit:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint named by `out/latest`, or None."""
    pointer = Path(out) / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    path = Path(out) / name
    return path if (path / "state.pt").is_file() else None


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (deepest first)."""
    directories = [path]
    for item in path.rglob("*"):
        if item.is_dir():
            directories.append(item)
        elif item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(directory)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _save_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(staging)` on a fresh hidden directory next to `target`, fsync it, and rename it to `target`."""
    staging: Optional[Path] = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    aside: Optional[Path] = None
    try:
        write(staging)
        _fsync_tree(staging)
        if target.exists():  # never the checkpoint `latest` names while it is rewritten: move it aside first
            aside = target.with_name(f".{target.name}-replaced-{os.getpid()}")
            os.replace(target, aside)
        os.replace(staging, target)
        staging = None
        _fsync_dir(target.parent)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _checkpoint_error(error: OSError, what: str, out: Path) -> CheckpointError:
    latest = latest_checkpoint(out)
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    reason = f"{error.strerror or error}" + (f" [{code}]" if code else "")
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "Free disk space (or choose another --out) and rerun with --resume."
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"Make {out} writable and rerun with --resume."
    else:
        fix = "Fix the cause and rerun with --resume."
    kept = f"the last complete checkpoint, {latest}, is intact" if latest else "no checkpoint was completed yet"
    return CheckpointError(f"Could not write {what} in {out}: {reason}. Nothing was half-written: {kept}. {fix}")


def save_checkpoint(
    out: Path, step: int, model: torch.nn.Module, state: dict[str, Any], run_config: Optional[dict[str, Any]] = None
) -> Path:
    """Write `checkpoint-<step>` atomically and point `latest` at it; drop older checkpoints.

    The adapter, `state.pt` (and `run_config.json`) are written into a hidden temporary directory, every file and the
    directory are fsynced, the directory is renamed to `checkpoint-<step>`, the run directory is fsynced, and `latest`
    is replaced atomically. A crash at any point leaves `latest` naming a complete checkpoint.

    Raises:
        CheckpointError: an `OSError` (disk full, permissions) while writing; the previous checkpoint is intact.
    """
    out = Path(out)
    final = out / f"{CHECKPOINT_PREFIX}{step}"

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        torch.save(state, staging / "state.pt")
        if run_config is not None:
            (staging / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2))

    try:
        _save_dir_atomically(final, write)
        _write_text_atomically(out / "latest", final.name)
    except OSError as error:
        raise _checkpoint_error(error, f"checkpoint {final.name}", out) from error
    for old in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_files(out: Path) -> list[Path]:
    """Remove what an interrupted run can leave behind: hidden staging directories and temporary files, and
    checkpoints other than the one `latest` names (older ones whose removal was interrupted). Returns the paths."""
    out = Path(out)
    if not out.is_dir():
        return []
    keep = latest_checkpoint(out)
    removed = []
    for path in out.iterdir():
        stale_hidden = path.name.startswith(".") and (
            path.name.startswith((f".{CHECKPOINT_PREFIX}", ".adapter-", ".mazo-write-test-"))
            or path.name.endswith(".tmp")
        )
        stale_checkpoint = path.name.startswith(CHECKPOINT_PREFIX) and path.is_dir() and path != keep
        if stale_hidden or stale_checkpoint:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("Removed %d file(s) left by an interrupted run in %s.", len(removed), out)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------
StepCallback = Callable[[int, dict[str, Any]], None]


def _sample_splits(config: RunConfig) -> dict[str, Any]:
    """The seeded train / val / test examples of every task (`TaskSplits` by task name)."""
    from .tasks import sample_tasks

    try:
        return sample_tasks(
            config.tasks,
            data_dir=config.data_dir,
            n_train=config.n_train,
            n_val=config.n_val,
            n_test=config.n_test,
            seed=config.seed,
        )
    except ValueError as error:  # a bad record: the message names the file, the line and the field
        raise RunError(str(error)) from None


def run(config: RunConfig, on_step: Optional[StepCallback] = None) -> dict[str, Any]:
    """Validate, then train (or only evaluate, for "zero-shot") and write the run's outputs. Returns results.json.

    Raises:
        RunError: bad input, before any work (nothing is written).
        RunFailed: the run stopped (a checkpoint could not be written, only non-finite losses); the last complete
            checkpoint is intact and `--resume` continues from it.
    """
    from .methods import get_method

    validate(config)
    method = get_method(config.method)
    out = Path(config.out)
    with _exclusive_run_dir(out):
        return _run_locked(config, method, out, on_step)


@contextlib.contextmanager
def _exclusive_run_dir(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (`flock` on the directory itself: no lock file is left behind,
    and a killed run releases it) so that two runs cannot write into one `--out`. No-op where `fcntl` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"--out {out} is in use by another mazo run (it holds the directory's lock). Wait for that run to "
                "finish, or choose another --out."
            ) from None
        yield
    finally:
        os.close(descriptor)


def _run_locked(config: RunConfig, method, out: Path, on_step: Optional[StepCallback]) -> dict[str, Any]:
    started = time.time()
    splits = _sample_splits(config)
    groups = [[t] for t in config.tasks] if method.per_task else [list(config.tasks)]
    results: dict[str, Any] = {
        "method": method.name,
        "description": method.description,
        "model": config.model,
        "tasks": config.tasks,
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        "sizes": {t: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for t, s in splits.items()},
        "before": {},
        "after": {},
        "skipped_steps": 0,
    }
    for group in groups:
        group_out = out / group[0] if method.per_task else out
        group_results = _run_group(config, method, group, splits, group_out, on_step)
        results["before"].update(group_results["before"])
        results["after"].update(group_results["after"])
        results["skipped_steps"] += group_results.get("skipped_steps", 0)
        if group_results.get("cuda_graphs"):
            results.setdefault("cuda_graphs", {})[group[0] if method.per_task else "all"] = group_results[
                "cuda_graphs"
            ]
    for key in ("before", "after"):
        scores = [r["score"] for r in results[key].values()]
        results[f"average_{key}"] = sum(scores) / len(scores) if scores else None
    results["wall_seconds"] = time.time() - started
    try:
        _write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    except OSError as error:
        raise _checkpoint_error(error, "results.json", out) from error
    return results


def _run_group(config, method, tasks, splits, out: Path, on_step: Optional[StepCallback]) -> dict[str, Any]:
    from .tasks import evaluate_tasks

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config)
    test_sets = {t: splits[t].test for t in tasks}
    evaluate = lambda m: evaluate_tasks(  # noqa: E731
        m, tokenizer, test_sets, batch_size=config.eval_batch_size, max_length=config.max_length
    )
    before_path = out / ZERO_SHOT_NAME  # kept so that a resumed run reports the zero-shot scores too
    if config.resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    elif (config.evaluate_before or not method.trains) and not config.resume:
        before = evaluate(model)
        if method.trains:
            _write_text_atomically(before_path, json.dumps(before, indent=2))
    else:
        before = {}
    if not method.trains:
        return {"before": before, "after": before}
    model, skipped, graphs = _train(config, method, tasks, splits, out, model, tokenizer, on_step)
    return {"before": before, "after": evaluate(model), "skipped_steps": skipped, "cuda_graphs": graphs}


def _train(config, method, tasks, splits, out: Path, model, tokenizer, on_step):
    """The ZO training loop of one group of tasks; returns the trained model and the number of skipped steps."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from .config import MaZOConfig
    from .tasks import MultiTaskSampler, calibration_loaders, multitask_losses, supports_packing
    from .tasks.graphs import CUDAGraphLosses
    from .zo import ZOSGD
    from .zo.weighting import make_weighting

    remove_stale_files(out)
    adapter_kwargs = method.adapter_config(sparsity=config.sparsity, r=config.r)
    torch.manual_seed(config.seed)  # LoRA's A is drawn from the global generator: same seed, same adapter
    model = get_peft_model(model, MaZOConfig(**adapter_kwargs))
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    elif method.needs_calibration:
        loaders = calibration_loaders(
            tasks,
            tokenizer,
            batch_size=config.calib_batch_size,
            num_batches=config.calib_batches,
            examples_by_task={t: splits[t].train for t in tasks},
            seed=config.seed,
            max_length=config.max_length,
        )
        report = model.compute_importance(loaders, progress=False)
        (out / "importance.txt").write_text(report.table())

    weighting = make_weighting(method.weighting, num_tasks=len(tasks))
    lr = config.lr if config.lr is not None else method.lr
    max_skips = config.max_skipped_steps or None
    optimizer = ZOSGD(
        model, lr=lr, eps=config.eps, seed=config.seed, weighting=weighting, max_consecutive_skips=max_skips
    )
    sampler = MultiTaskSampler({t: splits[t].train for t in tasks}, batch_size=config.batch_size, seed=config.seed)
    val_batches = _validation_batches(splits, tasks, tokenizer, config) if method.weighting == "coba" else None
    run_settings = _resume_settings(config)

    log_path = out / "losses.jsonl"
    divergence = _DivergenceWatch()
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        _truncate_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    on_gpu = model.get_input_embeddings().weight.device.type == "cuda"
    graphed = CUDAGraphLosses(model) if config.cuda_graphs and on_gpu else None
    steps = _StepFeed(sampler, tokenizer, config.max_length, pack=supports_packing(model))
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=method.name)
    with open(log_path, "a") as log:
        for step in progress:
            if val_batches is not None and step % config.coba_every == 0:
                weighting.observe_validation(step, multitask_losses(model, val_batches))
            batches, packed, sampler_state = steps.take()
            started = time.time()
            stopped = False
            try:
                loss = optimizer.step(_step_closure(model, batches, packed, graphed, steps.prepare))
            except RuntimeError:
                if max_skips is None or optimizer.state["zo"]["consecutive_skips"] < max_skips:
                    raise
                stopped, loss = True, float("nan")
            result = optimizer.last_step
            record = {
                "step": step + 1,
                "loss": float(loss),
                "losses": dict(zip(tasks, ((result.losses_plus + result.losses_minus) / 2).tolist(), strict=True)),
                "projected_grads": dict(zip(tasks, result.projected_grads.tolist(), strict=True)),
                "weights": None if result.weights is None else dict(zip(tasks, result.weights.tolist(), strict=True)),
                "skipped": result.skipped,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.time() - started,
            }
            try:
                log.write(json.dumps(record) + "\n")
                log.flush()
            except OSError as error:
                raise _checkpoint_error(error, "losses.jsonl", out) from error
            if stopped:
                raise RunFailed(_nonfinite_message(step + 1, max_skips, out))
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            divergence.observe(step + 1, record["loss"], record["lr"])
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                state = {"optimizer": optimizer.state_dict(), "sampler": sampler_state, "step": step + 1}
                save_checkpoint(out, step + 1, model, state, run_config=run_settings)
            if on_step is not None:
                on_step(step + 1, record)
    plot_losses(log_path, out / "loss_curves.png")
    try:
        _save_dir_atomically(out / "adapter", model.save_pretrained)
    except OSError as error:
        raise _checkpoint_error(error, "the final adapter", out) from error
    graphs = None if graphed is None else {"captures": graphed.captures, "replays": graphed.replays}
    return model, int(optimizer.state["zo"]["skipped_steps"]), graphs


class _DivergenceWatch:
    """Warns once when the training loss grows far above where it started (a learning rate too large, typically):
    the mean of the first `window` finite losses is the reference, and a later loss `factor` times above it warns."""

    def __init__(self, window: int = 10, factor: float = 3.0) -> None:
        self.window, self.factor = window, factor
        self.first: list[float] = []
        self.warned = False

    def observe(self, step: int, loss: float, lr: float) -> None:
        if self.warned or not math.isfinite(loss):
            return
        if len(self.first) < self.window:
            self.first.append(loss)
            return
        reference = sum(self.first) / len(self.first)
        if reference > 0 and loss > self.factor * reference:
            self.warned = True
            warnings.warn(
                f"The training loss diverges: {loss:.4g} at step {step}, {loss / reference:.1f} x its mean over the "
                f"first {self.window} steps ({reference:.4g}). The learning rate ({lr:g}) is probably too large: "
                "stop, and start again with a smaller --lr (losses.jsonl shows the curve).",
                RuntimeWarning,
                stacklevel=2,
            )


class _StepFeed:
    """The sampler's steps as `(batches, packed or None, sampler state after the step)`, one step ahead.

    `prepare()` tokenizes and packs the next step. The step closure calls it right after launching its last forward,
    so on a GPU the next step is prepared while the GPU runs the current one (no thread: nothing competes for the GIL).
    The state saved with a checkpoint is the one after the step it follows, not after the prepared one."""

    def __init__(self, sampler, tokenizer, max_length: int, pack: bool) -> None:
        self._encoded = sampler.encoded(tokenizer, max_length=max_length)
        self._sampler = sampler
        self._pack = pack
        self._ready: Optional[tuple] = None

    def prepare(self) -> None:
        from .tasks import pack_batches

        if self._ready is None:
            batches = next(self._encoded)
            self._ready = (batches, pack_batches(batches) if self._pack else None, self._sampler.state_dict())

    def take(self) -> tuple:
        self.prepare()
        ready, self._ready = self._ready, None
        return ready


def _step_closure(model, batches, packed, graphed, after_last_pass: Callable[[], None]):
    """The step's closure: all tasks in one packed forward (replayed from a CUDA graph where `graphed` can), else
    `multitask_losses` (one forward per task for a model that does not keep packed sequences apart). Its second call
    (the - pass) runs `after_last_pass` once the forward is launched, before the losses are read."""
    from .tasks import multitask_losses

    calls = []

    def closure():
        if packed is not None and graphed is not None:
            losses = graphed(packed)
        else:
            losses = multitask_losses(model, packed if packed is not None else batches)
        calls.append(1)
        if len(calls) == 2:
            after_last_pass()
        return losses

    return closure


def _nonfinite_message(step: int, max_skips: int, out: Path) -> str:
    latest = latest_checkpoint(out)
    kept = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written yet"
    return (
        f"Training stopped at step {step}: the last {max_skips} steps all gave a non-finite loss (NaN or inf) and "
        f"were skipped (--max-skipped-steps {max_skips}). The adapter is unchanged since the last finite step; "
        f"{kept}. Lower --lr or --eps, load the base in float32 (--dtype float32: half precision overflows), check "
        "the data, or raise --max-skipped-steps (0 = never stop)."
    )


def _validation_batches(splits, tasks, tokenizer, config):
    from .tasks import encode_batch

    return {t: encode_batch(tokenizer, list(splits[t].val[: config.batch_size]), config.max_length) for t in tasks}


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps <= `last_step` (those a resumed run must not write twice).

    A line cut short by a crash (not valid JSON) ends the log: it and everything after it are dropped.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] <= last_step:
            kept.append(line)
    _write_text_atomically(path, "".join(line + "\n" for line in kept))


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Per-task training-loss curves from `losses.jsonl` (raw, and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for task in records[0]["losses"]:
        steps = [r["step"] for r in records]
        values = [r["losses"][task] for r in records]
        window = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        (line,) = ax.plot(steps, smooth, label=task)
        ax.plot(steps, values, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def evaluate_adapter(config: RunConfig, adapter: str) -> dict[str, Any]:
    """`mazo eval`: load the base model and an adapter directory, evaluate on the test split, write results.json."""
    from peft import PeftModel

    from .tasks import evaluate_tasks

    if not (Path(adapter) / "adapter_config.json").exists():
        raise RunError(
            f"--adapter {adapter} has no adapter_config.json; pass a directory written by save_pretrained (e.g. the "
            "run's adapter/ or a checkpoint-<step>/)."
        )
    config.method = "zero-shot"
    validate(config)
    _check_adapter_fits(config, adapter)
    splits = _sample_splits(config)
    model, tokenizer = load_model_and_tokenizer(config)
    model = PeftModel.from_pretrained(model, adapter)
    scores = evaluate_tasks(
        model,
        tokenizer,
        {t: s.test for t, s in splits.items()},
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
    )
    results = {
        "adapter": adapter,
        "model": config.model,
        "tasks": config.tasks,
        "after": scores,
        "average_after": sum(r["score"] for r in scores.values()) / len(scores),
    }
    Path(config.out).mkdir(parents=True, exist_ok=True)
    _write_text_atomically(Path(config.out) / "results.json", json.dumps(results, indent=2))
    return results
