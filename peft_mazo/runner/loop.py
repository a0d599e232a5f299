"""The ZO training loop of one group of tasks: sample -> (pack) -> step -> log -> checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from .._atomic import save_dir_atomically
from . import ranks
from .checkpoint import (
    checkpoint_error,
    latest_checkpoint,
    load_checkpoint_state,
    remove_stale_files,
    resume_settings,
    save_checkpoint,
)
from .config import RunFailed
from .losslog import plot_losses, truncate_log
from .validation import ValidationSelector


logger = logging.getLogger(__name__)


def train_group(config, method, tasks, splits, out: Path, model, tokenizer, on_step):
    """The ZO training loop of one group of tasks.

    Returns `(model, skipped steps, CUDA-graph counts or None, selection or None)`. With `--eval-every`, the model
    returned holds the selected adapter (`best/`, the lowest validation loss; the last step's stays in `adapter/`)
    and `selection` is `ValidationSelector.summary()`."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from ..config import MaZOConfig
    from ..tasks import MultiTaskSampler, calibration_loaders, multitask_losses, supports_packing
    from ..tasks.graphs import CUDAGraphLosses
    from ..zo import ZOSGD
    from ..zo.weighting import make_weighting

    ranks.on_writer(remove_stale_files, out)  # the other ranks wait: they read `latest` next
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
        report = model.compute_importance(ranks.shard_calibration(loaders), progress=False)  # summed over ranks
        ranks.on_writer((out / "importance.txt").write_text, report.table())

    weighting = make_weighting(method.weighting, num_tasks=len(tasks))
    lr = config.lr if config.lr is not None else method.lr
    max_skips = config.max_skipped_steps or None
    optimizer = ZOSGD(
        model, lr=lr, eps=config.eps, seed=config.seed, weighting=weighting, max_consecutive_skips=max_skips
    )
    sampler = MultiTaskSampler({t: splits[t].train for t in tasks}, batch_size=config.batch_size, seed=config.seed)
    val_batches = _validation_batches(splits, tasks, tokenizer, config) if method.weighting == "coba" else None
    run_settings = resume_settings(config)

    selector = ValidationSelector(config, tasks, splits, tokenizer, out) if config.eval_every else None

    log_path = out / "losses.jsonl"
    divergence = _DivergenceWatch()
    start_step = 0
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        ranks.on_writer(truncate_log, log_path, start_step)
    elif log_path.exists() and ranks.is_writer():
        log_path.unlink()
    ranks.check_in_sync(model, optimizer)  # one mask, one adapter, one optimizer state on every rank
    if selector is not None:
        selector.start(start_step if checkpoint is not None else None)
        if checkpoint is None:
            selector.observe(0, model, candidate=False)  # the curve's starting point, never selected

    on_gpu = model.get_input_embeddings().weight.device.type == "cuda"
    graphed = CUDAGraphLosses(model) if config.cuda_graphs and on_gpu else None
    steps = _StepFeed(sampler, tokenizer, config.max_length, pack=supports_packing(model))
    progress = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps, desc=method.name,
        disable=not ranks.is_writer(),
    )  # fmt: skip
    with ranks.open_log(log_path) as log:
        for step in progress:
            if val_batches is not None and step % config.coba_every == 0:
                weighting.observe_validation(step, ranks.mean_over_ranks(multitask_losses(model, val_batches)))
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
                raise checkpoint_error(error, "losses.jsonl", out) from error
            if stopped:
                raise RunFailed(_nonfinite_message(step + 1, max_skips, out))
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            divergence.observe(step + 1, record["loss"], record["lr"])
            stop_early = False
            if selector is not None and selector.due(step + 1, config.steps):
                selector.observe(step + 1, model)  # before the checkpoint: best/ is never older than `latest`
                stop_early = selector.should_stop() and step + 1 < config.steps
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps or stop_early:
                state = {"optimizer": optimizer.state_dict(), "sampler": sampler_state, "step": step + 1}
                ranks.on_writer(save_checkpoint, out, step + 1, model, state, run_config=run_settings)
            if on_step is not None:
                on_step(step + 1, record)
            if stop_early:
                stopped_at = step + 1
                logger.info(
                    "Stopping at step %d: no lower validation loss in the last %d evaluations (--patience).",
                    stopped_at,
                    config.patience,
                )
                break
        else:
            stopped_at = None
    ranks.on_writer(_save_final, out, log_path, model)
    graphs = None if graphed is None else {"captures": graphed.captures, "replays": graphed.replays}
    selection = None
    if selector is not None:
        if selector.load_best(model) is None:
            logger.warning("No finite validation loss was seen: the last step's adapter is evaluated.")
        selection = selector.summary(stopped_at)
    return model, int(optimizer.state["zo"]["skipped_steps"]), graphs, selection


def _save_final(out: Path, log_path: Path, model) -> None:
    plot_losses(log_path, out / "loss_curves.png")
    try:
        save_dir_atomically(out / "adapter", model.save_pretrained)
    except OSError as error:
        raise checkpoint_error(error, "the final adapter", out) from error


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
        self._encoded = ranks.encoded_shards(sampler, tokenizer, max_length)  # this rank's share of every step
        self._sampler = sampler
        self._pack = pack
        self._ready: Optional[tuple] = None

    def prepare(self) -> None:
        from ..tasks import pack_batches

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
    from ..tasks import multitask_losses

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
    from ..tasks import encode_batch

    return {
        t: encode_batch(tokenizer, ranks.shard_examples(list(splits[t].val[: config.batch_size])), config.max_length)
        for t in tasks
    }
