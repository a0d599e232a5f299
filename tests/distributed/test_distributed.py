"""Data-parallel ZO (issue 8) on the CPU: 2 processes, gloo, tiny models.

One `torch.multiprocessing.spawn` of two ranks (module fixture `ranks`) runs every distributed scenario and saves what
it saw; the tests compare the ranks with each other and with single-process references computed here:

- ZOSGD: parameters bitwise equal across ranks after N steps, bitwise equal to one process that averages the same two
  shard losses (micro-batches), and equal within fp32 rounding to one process over the full batch; per-task (1-D)
  losses; a non-finite loss on one rank makes every rank skip; bytes communicated per step.
- `check_in_sync` passes on synchronised ranks and names the rank that was perturbed.
- `compute_importance`: the same mask on both ranks, equal to the single-process mask on the union of the data.
- `MaZOTrainer` under 2 processes: no DDP, the same parameters on both ranks, equal (within fp32 rounding) to a single
  process at the same global batch.
"""

from __future__ import annotations

import os
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import get_peft_model
from torch import nn

from peft_mazo import ZOSGD, MaZOConfig, compute_importance
from peft_mazo import distributed as zo_dist
from tests.distributed.common import (
    FULL_BATCH_TOLERANCE,
    WORLD,
    float64_llama,
    half,
    lm_loss,
    step_batch,
    summed_cross_entropy,
)
from tests.helpers import bitwise_equal, make_tiny_llama, trainable


STEPS = 4
LR, EPS, SEED = 5e-2, 1e-3, 7
TRAINER_STEPS = 3


# --------------------------------------------------------------------------------------------------------------------
# shared helpers (used by the ranks and by the single-process references)
# --------------------------------------------------------------------------------------------------------------------
def tiny_model(r: int = 0, scorer: str = "magnitude", double: bool = False) -> nn.Module:
    """The tiny Llama with a MaZO adapter; `double`: float64 base, norms and delta (rounding far below the ZO signal)."""
    base = float64_llama() if double else make_tiny_llama()
    delta_dtype = "float64" if double else "float32"
    return get_peft_model(base, MaZOConfig(sparsity=0.5, r=r, scorer=scorer, delta_dtype=delta_dtype))


def two_task_losses(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(2,) per-task losses: the LM loss on the rows, and on the rows reversed in time."""
    return torch.stack([lm_loss(model, ids), lm_loss(model, ids.flip(1))])


def trainer_loss(outputs, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """`compute_loss_func` of the trainer runs: the token mean over the accumulated (and all-gathered) batch."""
    return summed_cross_entropy(outputs.logits, labels) / num_items_in_batch


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if "mazo_columns" in n or "mazo_bits" in n}


def calibration(task: int, rank: int | None = None) -> list[dict[str, torch.Tensor]]:
    """4 padded batches of one task (the whole data), or rank `rank`'s 2 of them."""
    generator = torch.Generator().manual_seed(1000 + task)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 10), generator=generator)
        attention = torch.ones_like(ids)
        attention[0, 7:] = 0  # padding that must not count
        batches.append({"input_ids": ids, "attention_mask": attention})
    return batches if rank is None else zo_dist.shard(batches, rank, WORLD)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 16, length: int = 12, seed: int = 0) -> None:
        self.ids = torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_arguments(output_dir: Path, per_device_batch: int):
    from peft_mazo import MaZOTrainingArguments

    return MaZOTrainingArguments(
        output_dir=str(output_dir),
        max_steps=TRAINER_STEPS,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=2,
        learning_rate=LR,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        zo_sync_check_steps=1,
    )


# --------------------------------------------------------------------------------------------------------------------
# the ranks
# --------------------------------------------------------------------------------------------------------------------
def _zo_run(rank: int, per_task: bool, double: bool = False) -> dict:
    model = tiny_model(double=double)
    opt = ZOSGD(model, lr=LR, eps=EPS, seed=SEED, momentum=0.5)
    assert opt.distributed
    losses = []
    for step in range(STEPS):
        ids = half(step_batch(step), rank)
        closure = partial(two_task_losses, model, ids) if per_task else partial(lm_loss, model, ids)
        opt.step(closure)
        losses.append(opt.last_step.loss)  # float64 (step() returns it rounded to float32)
    return dict(
        params=trainable(model),
        losses=losses,
        comm_bytes=opt.comm_bytes,
        step_bytes=opt.last_step.comm_bytes,
        losses_plus=opt.last_step.losses_plus,
        in_sync=zo_dist.check_in_sync(opt),
    )


def _nonfinite_run(rank: int) -> dict:
    model = tiny_model()
    opt = ZOSGD(model, lr=LR, eps=EPS, seed=SEED)
    skipped = []
    for step in range(3):
        ids = half(step_batch(step), rank)

        def closure(ids=ids, step=step):
            loss = lm_loss(model, ids)
            return loss * float("inf") if (step == 1 and rank == 1) else loss

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(closure)
        skipped.append(opt.last_step.skipped)
    return dict(params=trainable(model), skipped=skipped, skipped_steps=opt.state["zo"]["skipped_steps"])


def _sync_check_run(rank: int) -> dict:
    model = tiny_model()
    opt = ZOSGD(model, lr=LR, eps=EPS, seed=SEED)
    checked = [zo_dist.check_in_sync(model, every=2) for _ in range(3)]  # call counter 0, 1, 2: checks at 0 and 2
    first = next(p for p in model.parameters() if p.requires_grad)
    if rank == 1:
        with torch.no_grad():
            first.view(-1)[3] = torch.nextafter(first.view(-1)[3], torch.tensor(1.0))  # one ulp
    try:
        zo_dist.check_in_sync(opt)
        error = None
    except zo_dist.DistributedSyncError as caught:
        error = str(caught)
    seed_error = None
    try:
        ZOSGD(model, lr=LR, eps=EPS, seed=SEED + rank)
    except zo_dist.DistributedSyncError as caught:
        seed_error = str(caught)
    return dict(checked=checked, error=error, seed_error=seed_error)


def _importance_run(rank: int) -> dict:
    out = {}
    for scorer, max_bytes in (("mazo", None), ("mazo", 1), ("wanda", None)):
        model = tiny_model(scorer=scorer)
        report = compute_importance(
            model, {"a": calibration(0, rank), "b": calibration(1, rank)}, progress=False, max_stats_bytes=max_bytes
        )
        out[f"{scorer}-{max_bytes}"] = dict(masks=masks(model), tokens=report.tokens("a"))
    return out


def _trainer_run(rank: int, output_dir: Path) -> dict:
    import transformers

    from peft_mazo import MaZOTrainer

    transformers.logging.set_verbosity_error()
    model = tiny_model(r=4, double=True)
    if rank == 1:  # a different LoRA A on rank 1: the trainer must broadcast rank 0's, as DDP would
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mazo_A" in name:
                    p.add_(1.0)
    args = trainer_arguments(output_dir, per_device_batch=2)
    trainer = MaZOTrainer(model=model, args=args, train_dataset=TokenDataset(), compute_loss_func=trainer_loss)
    trainer.train()
    optimizer = trainer.zo_optimizer()
    return dict(
        params=trainable(model),
        wrapped=type(trainer.model_wrapped).__name__,
        distributed=optimizer.distributed,
        step=optimizer.state["zo"]["step"],
        comm_bytes=optimizer.comm_bytes,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
    )


def _worker(rank: int, out: str) -> None:
    # accelerate (under the HF Trainer) insists on MASTER_ADDR; the group itself is joined through a file (below)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # accelerate would set 2 threads per rank
    torch.set_num_threads(1)
    result: dict = {}
    try:
        # Rendezvous through a file of this test's own temporary directory: no TCP port to pick, release and race for
        # with other xdist workers. `init_from_env` then keeps the initialised group.
        torch.distributed.init_process_group(
            "gloo", init_method=(Path(out) / "rendezvous").resolve().as_uri(), rank=rank, world_size=WORLD
        )
        assert zo_dist.init_from_env() and zo_dist.world() == (rank, WORLD)
        result["zo"] = _zo_run(rank, per_task=False)
        result["zo_tasks"] = _zo_run(rank, per_task=True)
        result["zo64"] = _zo_run(rank, per_task=False, double=True)
        result["nonfinite"] = _nonfinite_run(rank)
        result["sync"] = _sync_check_run(rank)
        result["importance"] = _importance_run(rank)
        result["trainer"] = _trainer_run(rank, Path(out) / f"trainer-{rank}")
    except Exception:  # saved, so that the test shows the rank's traceback
        result["error"] = traceback.format_exc()
        raise
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    try:
        mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    except Exception as error:
        details = [torch.load(p, weights_only=False).get("error") for p in sorted(out.glob("rank*.pt"))]
        pytest.fail(f"a rank failed: {error}\n" + "\n".join(d for d in details if d))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------------------------------
# single-process references
# --------------------------------------------------------------------------------------------------------------------
def single_process(per_task: bool, micro_batches: bool, double: bool = False) -> tuple[dict[str, torch.Tensor], list]:
    """One process: the full batch in one closure, or the two ranks' halves as two micro-batches."""
    model = tiny_model(double=double)
    opt = ZOSGD(model, lr=LR, eps=EPS, seed=SEED, momentum=0.5)
    assert not opt.distributed
    loss_fn = partial(two_task_losses if per_task else lm_loss, model)
    losses = []
    for step in range(STEPS):
        batch = step_batch(step)
        if micro_batches:
            opt.step([partial(loss_fn, half(batch, r)) for r in range(WORLD)])
        else:
            opt.step(partial(loss_fn, batch))
        losses.append(opt.last_step.loss)
    return trainable(model), losses


# --------------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,per_task,double", [("zo", False, False), ("zo_tasks", True, False), ("zo64", False, True)]
)
def test_zo_steps_match_across_ranks_and_a_single_process(ranks, key, per_task, double):
    zero, one = ranks[0][key], ranks[1][key]
    assert bitwise_equal(zero["params"], one["params"])
    assert zero["losses"] == one["losses"] and zero["in_sync"] and one["in_sync"]
    assert not bitwise_equal(zero["params"], trainable(tiny_model(double=double)))  # it trained

    # the same two shard losses averaged in one process: the very same float64 mean, so the same bits
    params, losses = single_process(per_task, micro_batches=True, double=double)
    assert bitwise_equal(zero["params"], params) and zero["losses"] == losses
    # one process over the full batch: the losses agree up to rounding (mean of two half-batch means vs one mean)
    params, losses = single_process(per_task, micro_batches=False, double=double)
    assert zero["losses"] == pytest.approx(losses, rel=1e-12 if double else 1e-5)
    if double:  # float64: the rounding stays far below the ZO signal, which ĝ = (L+ - L-) / 2ε amplifies by 500
        for name, value in zero["params"].items():
            torch.testing.assert_close(value, params[name], **FULL_BATCH_TOLERANCE)

    num_tasks = 2 if per_task else 1
    assert zero["step_bytes"] == 2 * num_tasks * 8  # (L+, L-) per task, float64, one all-reduce
    assert zero["comm_bytes"] == STEPS * zero["step_bytes"]
    assert zero["losses_plus"].shape == (num_tasks,)


def test_a_nonfinite_loss_on_one_rank_skips_the_step_everywhere(ranks):
    zero, one = ranks[0]["nonfinite"], ranks[1]["nonfinite"]
    assert zero["skipped"] == one["skipped"] == [False, True, False]
    assert zero["skipped_steps"] == one["skipped_steps"] == 1
    assert bitwise_equal(zero["params"], one["params"])


def test_check_in_sync_detects_a_perturbed_rank(ranks):
    for rank in range(WORLD):
        sync = ranks[rank]["sync"]
        assert sync["checked"] == [True, False, True]
        assert sync["error"] is not None and "Rank 1 diverged from rank 0" in sync["error"]
        assert "mazo_values" in sync["error"]  # names the tensor
        assert sync["seed_error"] is not None and "seed" in sync["seed_error"]


def test_check_in_sync_is_a_no_op_in_one_process():
    model = tiny_model()
    assert zo_dist.check_in_sync(model) is False
    assert zo_dist.world() == (0, 1) and not zo_dist.is_distributed()
    checksum = zo_dist.parameter_checksum(list(trainable(model).values()))
    assert checksum.dtype == torch.float64 and checksum.shape == (len(trainable(model)), 2)
    tensor = torch.randn(100)
    nudged = tensor.clone()
    nudged[17] = torch.nextafter(nudged[17], torch.tensor(10.0))
    assert zo_dist.parameter_checksum([tensor])[0, 1] != zo_dist.parameter_checksum([nudged])[0, 1]
    assert torch.equal(zo_dist.parameter_checksum([tensor]), zo_dist.parameter_checksum([tensor.clone()]))
    with pytest.raises(ValueError, match="distributed=True"):
        ZOSGD(model, lr=LR, distributed=True)


@pytest.mark.parametrize("setting", ["mazo-None", "mazo-1", "wanda-None"])
def test_importance_gives_one_mask_equal_to_the_single_process_mask(ranks, setting):
    zero, one = ranks[0]["importance"][setting], ranks[1]["importance"][setting]
    assert bitwise_equal(zero["masks"], one["masks"])
    scorer, max_bytes = setting.split("-")
    model = tiny_model(scorer=scorer)
    report = compute_importance(
        model,
        {"a": calibration(0), "b": calibration(1)},
        progress=False,
        max_stats_bytes=None if max_bytes == "None" else int(max_bytes),
    )
    assert zero["tokens"] == report.tokens("a") == 4 * (7 + 10)  # padding excluded, the union of the ranks' tokens
    assert bitwise_equal(zero["masks"], masks(model))
    assert not bitwise_equal(zero["masks"], masks(tiny_model(scorer=scorer)))  # the data changed the mask


def test_trainer_under_two_processes(ranks, tmp_path):
    import transformers

    from peft_mazo import MaZOTrainer

    zero, one = ranks[0]["trainer"], ranks[1]["trainer"]
    assert zero["distributed"] and zero["wrapped"] == "PeftModel"  # not DistributedDataParallel
    assert zero["step"] == one["step"] == TRAINER_STEPS
    assert zero["comm_bytes"] == TRAINER_STEPS * 16
    assert bitwise_equal(zero["params"], one["params"])  # rank 1's different LoRA A was overwritten by rank 0's
    assert zero["losses"] == one["losses"]

    # one process with the same global batch (2 ranks × 2 = 4 per micro-batch, same sampler order)
    transformers.logging.set_verbosity_error()
    model = tiny_model(r=4, double=True)
    trainer = MaZOTrainer(
        model=model,
        args=trainer_arguments(tmp_path, per_device_batch=4),
        train_dataset=TokenDataset(),
        compute_loss_func=trainer_loss,
    )
    trainer.train()
    single = trainable(model)
    assert not bitwise_equal(single, trainable(tiny_model(r=4, double=True)))
    for name, value in zero["params"].items():
        torch.testing.assert_close(value, single[name], **FULL_BATCH_TOLERANCE)
    single_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert zero["losses"] == pytest.approx(single_losses, rel=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# one process, model split over devices (device_map)
# --------------------------------------------------------------------------------------------------------------------
def test_zosgd_on_a_dispatched_model_matches_the_plain_model():
    """`device_map` / `accelerate.dispatch_model` puts an `AlignDevicesHook` on every block (moving activations between
    devices). The CPU has one device, so every block maps to "cpu", but the hooks are those of a split model; ZOSGD's
    per-layer perturbation hooks run inside them and the steps are bit-identical to the plain model's."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" for i in range(2)})
    base = dispatch_model(make_tiny_llama(), device_map=device_map, force_hooks=True)
    assert hasattr(base.model.layers[0], "_hf_hook")
    split = get_peft_model(base, MaZOConfig(sparsity=0.5, r=0))
    plain = tiny_model(scorer="mazo")
    ids = step_batch(0)
    for model in (split, plain):
        opt = ZOSGD(model, lr=LR, eps=EPS, seed=SEED)
        for _ in range(3):
            opt.step(partial(lm_loss, model, ids))
    assert bitwise_equal(trainable(split), trainable(plain))


def test_an_offloaded_trainable_tensor_is_refused():
    """What an adapted layer offloaded to "cpu"/"disk" by accelerate would hold: a meta tensor."""
    from peft_mazo import MaZOLayer

    model = tiny_model()
    layer = next(m for m in model.modules() if isinstance(m, MaZOLayer))
    values = layer.mazo_values["default"]
    layer.mazo_values["default"] = nn.Parameter(torch.empty_like(values, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        ZOSGD(model, lr=LR)
