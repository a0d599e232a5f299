"""MaZOTrainer end to end on a tiny model: ZO steps under TrainingArguments, logging, eval, checkpoints, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from peft import get_peft_model
from torch import nn
from transformers import TrainingArguments

from peft_mazo import ZOSGD, MaZOConfig, MaZOTrainer, MaZOTrainingArguments
from tests.helpers import make_tiny_llama, trainable


transformers.logging.set_verbosity_error()

MAX_STEPS, SAVE_STEPS, ACCUMULATION, LR = 6, 3, 2, 1e-2


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences; `pad_from` masks the labels of each row after a random length (varying token counts)."""

    def __init__(self, size: int = 32, length: int = 16, seed: int = 0, ragged: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (size, length), generator=generator)
        self.labels = self.ids.clone()
        if ragged:
            lengths = torch.randint(3, length + 1, (size,), generator=generator)
            self.labels[torch.arange(length)[None, :] >= lengths[:, None]] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def lora_model() -> nn.Module:
    return get_peft_model(make_tiny_llama(), MaZOConfig(sparsity=0.5, r=4))


def arguments(output_dir, **overrides) -> MaZOTrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=ACCUMULATION,
        learning_rate=LR,
        lr_scheduler_type="linear",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        save_steps=SAVE_STEPS,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        zo_eps=1e-3,
        zo_momentum=0.9,
    )
    kwargs.update(overrides)
    return MaZOTrainingArguments(**kwargs)


class RecordingTrainer(MaZOTrainer):
    """Records, at every real ZO step, the number of micro-batch closures and the learning rate in use."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not hasattr(self, "zo_calls"):
            self.zo_calls = []
            optimizer.register_step_pre_hook(
                # torch passes the bound call's args: (optimizer, closures)
                lambda opt, args, kwargs: self.zo_calls.append((len(args[1]), opt.param_groups[0]["lr"]))
            )
        return optimizer


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of MAX_STEPS steps with checkpoints every SAVE_STEPS (shared by the tests below)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    model = lora_model()
    initial = trainable(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = RecordingTrainer(
        model=model, args=arguments(output_dir), train_dataset=TokenDataset(), eval_dataset=TokenDataset(8, seed=1)
    )
    trainer.train()
    return dict(trainer=trainer, model=model, initial=initial, base=base, final=trainable(model), dir=output_dir)


def test_trains_logs_evaluates_and_checkpoints(uninterrupted):
    trainer, model = uninterrupted["trainer"], uninterrupted["model"]
    optimizer = trainer.zo_optimizer()
    assert isinstance(optimizer, ZOSGD) and optimizer.state["zo"]["step"] == MAX_STEPS
    assert not equal(uninterrupted["initial"], uninterrupted["final"])
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert equal(uninterrupted["base"], {n: p.detach() for n, p in frozen.items()})
    assert all(p.grad is None for p in model.parameters())

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(1, MAX_STEPS + 1))
    assert all("zo_projected_grad" in h and h["zo_skipped_steps"] == 0 and "grad_norm" not in h for h in train_logs)
    assert all(4.0 < h["loss"] < 6.0 for h in train_logs)  # ≈ ln(128) for random tokens: the real step loss
    eval_steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_steps == [SAVE_STEPS, MAX_STEPS]

    for step in (SAVE_STEPS, MAX_STEPS):
        checkpoint = uninterrupted["dir"] / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
            assert (checkpoint / name).exists(), name
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert saved["state"]["zo"]["step"] == step and saved["state"]["zo"]["seed"] == 0


def test_one_zo_step_per_accumulation_with_the_scheduled_lr(uninterrupted):
    calls = uninterrupted["trainer"].zo_calls
    assert [n for n, _ in calls] == [ACCUMULATION] * MAX_STEPS  # one step, all micro-batches sharing one z
    expected = [LR * (1 - i / MAX_STEPS) for i in range(MAX_STEPS)]  # linear schedule, no warmup
    assert [lr for _, lr in calls] == pytest.approx(expected, rel=1e-12)
    logged = [h["learning_rate"] for h in uninterrupted["trainer"].state.log_history if "loss" in h]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_resume_gives_the_uninterrupted_parameters(uninterrupted, tmp_path):
    checkpoint = uninterrupted["dir"] / f"checkpoint-{SAVE_STEPS}"
    model = lora_model()
    trainer = MaZOTrainer(
        model=model,
        args=arguments(tmp_path / "resumed"),
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(8, seed=1),
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.zo_optimizer().state["zo"]["step"] == MAX_STEPS
    assert equal(uninterrupted["final"], trainable(model))

    # control: the same checkpoint with its seed stream rewound ends elsewhere (the optimizer state matters)
    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    state = torch.load(tampered / "optimizer.pt", weights_only=True)
    state["state"]["zo"]["step"] = 0
    torch.save(state, tampered / "optimizer.pt")
    control = lora_model()
    args = arguments(tmp_path / "control", eval_strategy="no")
    MaZOTrainer(model=control, args=args, train_dataset=TokenDataset()).train(resume_from_checkpoint=str(tampered))
    assert not equal(uninterrupted["final"], trainable(control))


def test_step_loss_is_the_token_weighted_loss_of_the_accumulated_batch(tmp_path):
    """With lr = 0 the logged loss of a step is L(θ) over all its micro-batches (up to O(ε²)), weighted by tokens as
    the Trainer does (num_items_in_batch), not the mean of the micro-batch means."""
    data = TokenDataset(size=8, ragged=True)
    model = lora_model()
    args = arguments(tmp_path, max_steps=1, learning_rate=0.0, eval_strategy="no", save_strategy="no")
    trainer = MaZOTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    with torch.no_grad():
        token_weighted = float(model(input_ids=data.ids, labels=data.labels).loss)
        per_sample = [
            float(model(input_ids=data.ids[i : i + 1], labels=data.labels[i : i + 1]).loss) for i in range(8)
        ]
    assert logged == pytest.approx(token_weighted, abs=1e-4)
    assert abs(sum(per_sample) / 8 - token_weighted) > 1e-3  # the two reductions really differ on this data


def test_plain_training_arguments_work(tmp_path):
    model = lora_model()
    before = trainable(model)
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=LR, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = MaZOTrainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    optimizer = trainer.zo_optimizer()
    assert optimizer.state["zo"]["step"] == 2 and optimizer.state["zo"]["eps"] == 1e-3
    assert not equal(before, trainable(model))
    assert "eval_loss" in trainer.evaluate(TokenDataset(8, seed=1))


def test_bad_setups_are_refused(tmp_path):
    model = lora_model()
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="needs a peft_mazo.ZOSGD"):
        MaZOTrainer(
            model=model,
            args=arguments(tmp_path, eval_strategy="no"),
            train_dataset=TokenDataset(),
            optimizers=(sgd, None),
        )
    with pytest.raises(ValueError, match="zo_eps"):
        arguments(tmp_path, zo_eps=0.0)
    with pytest.raises(ValueError, match="zo_momentum"):
        arguments(tmp_path, zo_momentum=1.5)
