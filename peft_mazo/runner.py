"""The multi-task fine-tuning run behind `mazo train` / `mazo eval`: validate, build, train, checkpoint, evaluate.

Outputs in the run directory:

- `losses.jsonl`: one JSON line per step: step, loss, per-task losses and projected gradients, lr, seconds;
- `checkpoint-<step>/` (adapter + `state.pt` with optimizer, sampler and log position) every `save_every` steps,
  written under a temporary name, fsynced and renamed, with `latest` naming the newest complete one;
- `results.json`: each task's metric before (zero-shot) and after training, and the averages;
- `loss_curves.png`: the per-task training-loss curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class RunConfig:
    """Everything one run needs; `mazo train` fills it from the command line."""

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
    extra: dict[str, Any] = field(default_factory=dict)


class RunError(ValueError):
    """A run cannot start: the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------------------------------------------------
def validate(config: RunConfig) -> None:
    """Raise `RunError` for bad input, before any model or data is loaded."""
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
        raise RunError(f"--tasks names a task twice: {config.tasks}.")
    if method.trains:
        if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps < 1:
            raise RunError(f"--steps must be a positive integer for method '{method.name}', got {config.steps}.")
        if config.save_every < 1:
            raise RunError(f"--save-every must be >= 1, got {config.save_every}.")
    for name in ("batch_size", "eval_batch_size", "calib_batches", "calib_batch_size", "max_length"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}.")
    if config.lr is not None and not (config.lr >= 0 and math.isfinite(config.lr)):
        raise RunError(f"--lr must be a finite number >= 0, got {config.lr}.")
    if not (config.eps > 0 and math.isfinite(config.eps)):
        raise RunError(f"--eps must be a finite number > 0, got {config.eps}.")
    if config.data_dir is not None:
        try:
            check_data_files(config.tasks, config.data_dir)
        except (ValueError, FileNotFoundError) as error:
            raise RunError(str(error)) from None
    _check_writable(Path(config.out))
    if config.resume and latest_checkpoint(Path(config.out)) is None:
        raise RunError(f"--resume: no complete checkpoint in {config.out}. Drop --resume to start a new run.")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise RunError(f"Output directory {out} is not writable ({error.strerror}); choose another --out.") from None


# ----------------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
    pointer = out / "latest"
    if not pointer.exists():
        return None
    path = out / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write `checkpoint-<step>` atomically (temporary name, fsync, rename), point `latest` at it, drop older ones."""
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=out))
    try:
        model.save_pretrained(staging)
        torch.save(state, staging / "state.pt")
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_text_atomically(out / "latest", final.name)
    for old in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------------
StepCallback = Callable[[int, dict[str, Any]], None]


def run(config: RunConfig, on_step: Optional[StepCallback] = None) -> dict[str, Any]:
    """Validate, then train (or only evaluate, for "zero-shot") and write the run's outputs. Returns results.json."""
    from .methods import get_method

    validate(config)
    method = get_method(config.method)
    out = Path(config.out)
    started = time.time()
    from .tasks import sample_tasks

    splits = sample_tasks(
        config.tasks,
        data_dir=config.data_dir,
        n_train=config.n_train,
        n_val=config.n_val,
        n_test=config.n_test,
        seed=config.seed,
    )
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
    }
    for group in groups:
        group_out = out / group[0] if method.per_task else out
        group_results = _run_group(config, method, group, splits, group_out, on_step)
        results["before"].update(group_results["before"])
        results["after"].update(group_results["after"])
    for key in ("before", "after"):
        scores = [r["score"] for r in results[key].values()]
        results[f"average_{key}"] = sum(scores) / len(scores) if scores else None
    results["wall_seconds"] = time.time() - started
    _write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    return results


def _run_group(config, method, tasks, splits, out: Path, on_step: Optional[StepCallback]) -> dict[str, Any]:
    from .tasks import evaluate_tasks

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config)
    test_sets = {t: splits[t].test for t in tasks}
    evaluate = lambda m: evaluate_tasks(  # noqa: E731
        m, tokenizer, test_sets, batch_size=config.eval_batch_size, max_length=config.max_length
    )
    before = evaluate(model) if (config.evaluate_before or not method.trains) and not config.resume else {}
    if not method.trains:
        return {"before": before, "after": before}
    model = _train(config, method, tasks, splits, out, model, tokenizer, on_step)
    return {"before": before, "after": evaluate(model)}


def _train(config, method, tasks, splits, out: Path, model, tokenizer, on_step):
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from .config import MaZOConfig
    from .tasks import MultiTaskSampler, calibration_loaders, multitask_losses
    from .zo import ZOSGD
    from .zo.weighting import make_weighting

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
    optimizer = ZOSGD(model, lr=lr, eps=config.eps, seed=config.seed, weighting=weighting)
    sampler = MultiTaskSampler({t: splits[t].train for t in tasks}, batch_size=config.batch_size, seed=config.seed)
    val_batches = _validation_batches(splits, tasks, tokenizer, config) if method.weighting == "coba" else None

    log_path = out / "losses.jsonl"
    start_step = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        _truncate_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    steps = sampler.encoded(tokenizer, max_length=config.max_length)
    progress = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=method.name)
    with open(log_path, "a") as log:
        for step in progress:
            if val_batches is not None and step % config.coba_every == 0:
                weighting.observe_validation(step, multitask_losses(model, val_batches))
            batches = next(steps)
            started = time.time()
            loss = optimizer.step(lambda batches=batches: multitask_losses(model, batches))
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
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                state = {"optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "step": step + 1}
                save_checkpoint(out, step + 1, model, state)
            if on_step is not None:
                on_step(step + 1, record)
    plot_losses(log_path, out / "loss_curves.png")
    model.save_pretrained(out / "adapter")
    return model


def _validation_batches(splits, tasks, tokenizer, config):
    from .tasks import encode_batch

    return {t: encode_batch(tokenizer, list(splits[t].val[: config.batch_size]), config.max_length) for t in tasks}


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps <= `last_step` (those a resumed run must not write twice)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
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

    from .tasks import evaluate_tasks, sample_tasks

    if not (Path(adapter) / "adapter_config.json").exists():
        raise RunError(f"--adapter {adapter} has no adapter_config.json; pass a directory written by save_pretrained.")
    config.method = "zero-shot"
    validate(config)
    splits = sample_tasks(
        config.tasks,
        data_dir=config.data_dir,
        n_train=config.n_train,
        n_val=config.n_val,
        n_test=config.n_test,
        seed=config.seed,
    )
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
