"""`MaZOTrainer`: the HF `Trainer` driving `ZOSGD` steps (glue only; the optimizer math lives in `peft_mazo.zo`).

How a step maps onto the Trainer's loop (transformers 5.x): the Trainer calls `training_step` once per micro-batch and
then `optimizer.step()` once per accumulation. `MaZOTrainer.training_step` keeps the micro-batches of the current
accumulation; on the last one it runs one ZO step over all of them with a shared z (all + forwards, then all -
forwards; no backward) and returns the step's loss (zero for the earlier micro-batches, so the Trainer's running sum is
the usual per-step mean). The Trainer's own `optimizer.step()` that follows is consumed as a no-op. Everything else is
the stock Trainer: LR schedulers (they set the param groups' `lr`), logging (plus `zo_projected_grad` and
`zo_skipped_steps`, minus the meaningless `grad_norm`), evaluation, checkpoints (`optimizer.pt` holds the seed stream,
step and momentum) and `resume_from_checkpoint`.

Data parallel (`torchrun --nproc_per_node N` / `accelerate launch`, NCCL or gloo): the Trainer's distributed sampler
shards the data, `ZOSGD` all-reduces the (2, T) losses once per step, and every rank applies the same update. The model
is never wrapped in `DistributedDataParallel` (ZO has no gradients to reduce, and DDP would allocate gradient buckets
the size of the trainable state): `accelerator.prepare_model` runs in evaluation mode (device placement and autocast
only). At the first optimizer creation the trainable parameters are broadcast from rank 0 (as DDP would) and the masks
are checked to be identical on every rank. FSDP, DeepSpeed and single-process multi-GPU `DataParallel` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from . import distributed as _dist
from .zo.optimizer import PERTURBATION_MODES, ZOSGD
from .zo.weighting import TaskWeighting


@dataclass
class MaZOTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the zeroth-order settings of `MaZOTrainer`.

    `learning_rate`, `weight_decay`, `lr_scheduler_type`, `gradient_accumulation_steps`, `seed` keep their Trainer
    meaning. Paper defaults: ε = 1e-3, constant lr 3e-4 (LoRA) or 1e-7 (full-model delta in half precision); MaZO's
    dense fp32 delta typically takes a larger lr than MeZO's full model.
    """

    zo_eps: float = field(default=1e-3, metadata={"help": "ZO perturbation scale ε (> 0)."})
    zo_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of the ZO direction stream; defaults to `seed`."}
    )
    zo_momentum: float = field(default=0.0, metadata={"help": "ZO-SGD momentum μ in [0, 1); 0 disables it."})
    zo_max_consecutive_skips: Optional[int] = field(
        default=None,
        metadata={"help": "Stop with an error after this many consecutive non-finite-loss steps (None: never)."},
    )
    zo_perturbation: str = field(
        default="auto",
        metadata={"help": "'auto' (eager for adapters up to 1 GiB of extra memory, else lazy), 'eager' or 'lazy'."},
    )
    zo_sync_check_steps: int = field(
        default=0,
        metadata={
            "help": "Distributed debug check: every N ZO steps, verify that all ranks hold bit-identical trainable "
            "state (a checksum all-gather; 0 = never)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.zo_eps > 0:
            raise ValueError(f"MaZOTrainingArguments.zo_eps must be > 0 (default 1e-3), got {self.zo_eps}.")
        if not 0.0 <= self.zo_momentum < 1.0:
            raise ValueError(f"MaZOTrainingArguments.zo_momentum must be in [0, 1), got {self.zo_momentum}.")
        if self.zo_perturbation not in PERTURBATION_MODES:
            raise ValueError(
                f"MaZOTrainingArguments.zo_perturbation must be one of {PERTURBATION_MODES}, got "
                f"{self.zo_perturbation!r}."
            )
        if self.zo_sync_check_steps < 0:
            raise ValueError(
                f"MaZOTrainingArguments.zo_sync_check_steps must be >= 0 (0 = never), got {self.zo_sync_check_steps}."
            )


class MaZOTrainer(Trainer):
    """A `transformers.Trainer` that trains with zeroth-order `ZOSGD` steps: two forwards per step, no backward.

    Use it like `Trainer`, with `MaZOTrainingArguments` (plain `TrainingArguments` work too, with the ZO defaults).
    The model runs in eval mode during ZO forwards (no dropout), so that L⁺ and L⁻ differ only by the perturbation.
    One device per process; several processes (`torchrun`) train data-parallel without DDP wrapping: each rank runs its
    shard of the batch and `ZOSGD` all-reduces the loss pair (see the module docstring). No FSDP/DeepSpeed/DataParallel.

    Example:

        ```py
        >>> args = peft_mazo.MaZOTrainingArguments("out", learning_rate=1e-4, zo_eps=1e-3, max_steps=1000)
        >>> trainer = peft_mazo.MaZOTrainer(model=peft_model, args=args, train_dataset=train, eval_dataset=val)
        >>> trainer.train()  # or trainer.train(resume_from_checkpoint=True)
        ```

    Args:
        weighting (`TaskWeighting`, *optional*): how per-task losses are combined when `compute_loss` returns a 1-D
            tensor of task losses (default: equal weights).
        *args, **kwargs: as for `transformers.Trainer`. A custom optimizer passed through `optimizers=` must be a
            `ZOSGD`.
    """

    def __init__(self, *args: Any, weighting: Optional[TaskWeighting] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.optimizer is not None and not isinstance(self.optimizer, ZOSGD):
            raise ValueError(
                f"MaZOTrainer trains with zeroth-order steps and needs a peft_mazo.ZOSGD optimizer, got "
                f"{type(self.optimizer).__name__}. Leave `optimizers` unset to build one from the arguments."
            )
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ValueError("MaZOTrainer builds its own ZOSGD optimizer; do not pass optimizer_cls_and_kwargs.")
        if self.args.fp16:
            raise ValueError(
                "MaZOTrainer does not support fp16 mixed precision (its gradient scaler needs gradients); use "
                "bf16=True or full precision."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "MaZOTrainer runs one device per process; this single process sees several GPUs (DataParallel). Launch "
                "one process per GPU with `torchrun --nproc_per_node N` (data parallel), or set CUDA_VISIBLE_DEVICES=0."
            )
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "MaZOTrainer does not support FSDP or DeepSpeed (they shard gradients and optimizer state that ZO does "
                "not have); launch plain data parallel with torchrun, or one process with device_map='auto'."
            )
        if self.args.world_size > 1 and not _dist.is_distributed():
            raise ValueError(
                f"world_size is {self.args.world_size} but no torch.distributed process group is initialised; launch "
                "with torchrun or accelerate launch."
            )
        self.zo_weighting = weighting
        self._zo_pending: list[tuple[dict[str, Any], Any]] = []

    # ----------------------------------------------------------------------------------------------------------------
    # distributed: no DDP
    # ----------------------------------------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator, with `prepare_model` always in evaluation mode: device placement and autocast, but no
        `DistributedDataParallel` wrapping (ZO needs no gradient reduction; `ZOSGD` all-reduces the losses)."""
        super().create_accelerator_and_postprocess()
        accelerator = self.accelerator
        prepare_model = accelerator.prepare_model
        if getattr(prepare_model, "_mazo_no_ddp", False):
            return

        def prepare_model_without_ddp(model: nn.Module, device_placement: Optional[bool] = None, **kwargs: Any):
            kwargs["evaluation_mode"] = True
            return prepare_model(model, device_placement=device_placement, **kwargs)

        prepare_model_without_ddp._mazo_no_ddp = True  # type: ignore[attr-defined]
        accelerator.prepare_model = prepare_model_without_ddp

    def _synchronize_ranks(self, model: nn.Module) -> None:
        """Data parallel: rank 0's trainable parameters on every rank (as DDP does), and the masks checked equal."""
        if not _dist.is_distributed():
            return
        _dist.broadcast_tensors_([p for p in model.parameters() if p.requires_grad], src=0)
        masks = {name: b for name, b in model.named_buffers() if "mazo_columns" in name or "mazo_bits" in name}
        _dist.check_in_sync(masks, step=0, what="MaZO masks (run compute_importance on every rank, distributed)")

    # ----------------------------------------------------------------------------------------------------------------
    # optimizer
    # ----------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build `ZOSGD` over the model's trainable parameters (weight decay as the Trainer applies it)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(name, p) for name, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for name, p in named if name in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0},
            ]
            self._synchronize_ranks(opt_model)
            args = self.args
            zo_seed = getattr(args, "zo_seed", None)
            self.optimizer = ZOSGD(
                opt_model,
                lr=args.learning_rate,
                eps=getattr(args, "zo_eps", 1e-3),
                momentum=getattr(args, "zo_momentum", 0.0),
                seed=args.seed if zo_seed is None else zo_seed,
                params=[g for g in groups if g["params"]],
                weighting=self.zo_weighting,
                max_consecutive_skips=getattr(args, "zo_max_consecutive_skips", None),
                perturbation=getattr(args, "zo_perturbation", "auto"),
            )
        return self.optimizer

    def zo_optimizer(self) -> ZOSGD:
        """The `ZOSGD` behind `self.optimizer` (which accelerate may have wrapped)."""
        optimizer = self.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, ZOSGD):
            raise ValueError(f"MaZOTrainer needs a ZOSGD optimizer, got {type(inner).__name__}.")
        return inner

    # ----------------------------------------------------------------------------------------------------------------
    # the step
    # ----------------------------------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Union[torch.Tensor, Any]],
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ) -> torch.Tensor:
        """Collect the micro-batch; on the last one of the accumulation, run one ZO step over all of them.

        Returns:
            `torch.Tensor`: 0-d, on `args.device`: the step's loss on the last micro-batch, 0 on the others.
        """
        optimizer = self.zo_optimizer()
        model.eval()  # deterministic forwards: L+ and L- must differ only by the perturbation
        self._zo_pending.append((self._prepare_inputs(inputs), num_items_in_batch))
        expected = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if len(self._zo_pending) < max(1, int(expected)):
            return torch.zeros((), device=self.args.device)
        pending, self._zo_pending = self._zo_pending, []
        closures = [partial(self._zo_loss, model, batch, count, len(pending)) for batch, count in pending]
        loss = type(optimizer).step(optimizer, closures)  # the real step, whatever is patched on the instance
        self._consume_next_optimizer_step(optimizer)
        every = getattr(self.args, "zo_sync_check_steps", 0)
        if every and optimizer.distributed:
            _dist.check_in_sync(optimizer, every=every)  # debug: raises DistributedSyncError if a rank diverged
        return loss.detach().to(self.args.device)

    def _zo_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Optional[Union[torch.Tensor, int]],
        num_micro_batches: int,
    ) -> torch.Tensor:
        """One micro-batch's loss, scaled so that `ZOSGD`'s mean over micro-batches is the Trainer's step loss."""
        with self.compute_loss_context_manager():
            # compute_loss may pop "labels" from the dict, and every micro-batch is evaluated twice: pass a copy.
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # normalised by the token count of the whole accumulation: the step loss is the sum, not the mean
            loss = loss * num_micro_batches
        return loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Optional[Union[torch.Tensor, int]]) -> bool:
        """Mirror of the Trainer's rule (transformers 5.17 and 5.23) for a loss already normalised over the
        accumulated batch."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _consume_next_optimizer_step(self, optimizer: ZOSGD) -> None:
        """The ZO step is done: the Trainer's `optimizer.step()` that follows reaches `optimizer.step(None)` (through
        accelerate's and the LR scheduler's wrappers, which still record the call); make that one call a no-op."""
        previous = vars(optimizer).get("step")
        if getattr(previous, "_mazo_consumes_step", False):
            return

        def consumed_step(closure: Any = None) -> None:
            if previous is None:
                del optimizer.step
            else:
                optimizer.step = previous

        consumed_step._mazo_consumes_step = True  # type: ignore[attr-defined]
        optimizer.step = consumed_step

    # ----------------------------------------------------------------------------------------------------------------
    # logging
    # ----------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs: drop `grad_norm` (there are no gradients), add the last projected gradient and the number
        of skipped (non-finite) steps."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(inner, ZOSGD) and "loss" in logs:
            logs.pop("grad_norm", None)
            if inner.last_step is not None:
                logs["zo_projected_grad"] = inner.last_step.projected_grad
            logs["zo_skipped_steps"] = inner.state["zo"]["skipped_steps"]
        super().log(logs, *args, **kwargs)
